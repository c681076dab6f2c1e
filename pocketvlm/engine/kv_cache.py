"""A preallocated KV cache written in place at ``input_pos`` (gpt-fast style).

Shapes stay static so a compiled decode step never recompiles: ``k[i]``/``v[i]`` are ``[B, Hkv, max_len, D]``.
The cache may be stored in a narrower dtype than the model computes in (float16 for a float32 quantized
model, as llama.cpp's default f16 cache: half the memory, and half the bytes decode reads per cached
token); :meth:`update` hands attention the compute dtype.
``attend_len`` lets eager code attend only over the filled prefix (faster on CPU); a compiled step
leaves it ``None`` and attends over the whole buffer with a mask.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 v_head_dim: int | None = None):
        shape = (batch, n_kv_heads, max_len, head_dim)
        vshape = (batch, n_kv_heads, max_len, v_head_dim or head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(vshape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        self.attend_len: int | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k/v ``[B, Hkv, S, D]`` at positions ``input_pos [S]``; return the keys/values to attend over."""
        kc, vc = self.k[layer], self.v[layer]
        kc.index_copy_(2, input_pos, k.to(kc.dtype))
        vc.index_copy_(2, input_pos, v.to(vc.dtype))
        if self.attend_len is not None:
            kc, vc = kc[:, :, : self.attend_len], vc[:, :, : self.attend_len]
        if kc.dtype != k.dtype:  # a narrower stored cache: attend in the compute dtype
            kc, vc = kc.to(k.dtype), vc.to(v.dtype)
        return kc, vc

    def key_positions(self, device) -> torch.Tensor:
        n = self.max_len if self.attend_len is None else self.attend_len
        return torch.arange(n, device=device)

    def reset(self) -> None:
        for t in self.k + self.v:
            t.zero_()
        self.attend_len = None
