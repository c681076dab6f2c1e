"""PyTorch's low-bit CPU kernels and the bookkeeping they need.

* ``aten._weight_int4pack_mm_for_cpu(x, packed, group, scale_zeros)`` computes
  ``x @ W.T`` with ``W[n, k] = (code - 8) * scale[g, n] + zero[g, n]`` for codes 0..15, group 32/64/
  128/256. ``x``, scales and zeros must share one dtype; it is only fast with bfloat16 (fp32 and fp16
  activations measured 10-40x slower here), so callers cast to bf16 and back.
* ``aten._convert_weight_to_int4pack_for_cpu(codes int32 [N, K], 1)`` -> uint8 ``[N, K/2]`` in a
  kernel-specific nibble order (N must be a multiple of 16, K of the group).

The packed order is not documented, so :func:`unpack_int4_cpu` learns it by packing index patterns
with the kernel's own packer (once per shape, cached) and inverts it. The packer works on blocks of
32 rows in PyTorch's AVX2 build and 64 in its AVX-512 one (found by a round trip), the remaining rows as one
block of their own; tests check that on several shapes.
"""
from __future__ import annotations

from functools import lru_cache

import torch

_aten = torch.ops.aten
_PACK_CHUNK_ROWS = 4096  # pack big matrices in row chunks to bound the int32 temporary


def cpu_int4_supported(n: int, k: int, group: int) -> bool:
    """Whether the CPU int4 kernel can take a ``[n, k]`` weight with this group size."""
    return (
        hasattr(_aten, "_weight_int4pack_mm_for_cpu")
        and n % 16 == 0 and group in (32, 64, 128, 256) and k % group == 0
    )


def pack_int4_cpu(codes: torch.Tensor) -> torch.Tensor:
    """codes ``[N, K]`` (0..15, any int dtype) -> the CPU kernel's packed uint8 ``[N, K/2]``."""
    n = codes.shape[0]
    chunks = [
        _aten._convert_weight_to_int4pack_for_cpu(codes[i : i + _PACK_CHUNK_ROWS].to(torch.int32).contiguous(), 1)
        for i in range(0, n, _PACK_CHUNK_ROWS)
    ]
    return torch.cat(chunks) if len(chunks) > 1 else chunks[0]


@lru_cache(maxsize=64)
def _nibble_order(rows: int, k: int) -> torch.Tensor:
    """For a ``[rows, k]`` block: for each flat code index, the position of its nibble among the
    block's packed nibbles (nibble order: byte 0 low, byte 0 high, byte 1 low, ...)."""
    idx = torch.arange(rows * k, dtype=torch.int64)
    src = torch.zeros(rows * k, dtype=torch.int64)  # nibble position -> code index
    for shift in range(0, max(1, (rows * k - 1).bit_length()), 4):
        plane = ((idx >> shift) & 15).view(rows, k).to(torch.int32)
        p = _aten._convert_weight_to_int4pack_for_cpu(plane, 1).reshape(-1)
        src |= torch.stack([p & 15, p >> 4], -1).reshape(-1).to(torch.int64) << shift
    return torch.argsort(src)  # a gather (index_select) is much faster than the scatter


def _unpack_blocks(packed_blocks: torch.Tensor, rows: int, k: int) -> torch.Tensor:
    """uint8 ``[B, rows*k/2]`` (B packed row blocks) -> codes uint8 ``[B, rows, k]``."""
    nib = torch.stack([packed_blocks & 15, packed_blocks >> 4], -1).reshape(packed_blocks.shape[0], rows * k)
    order = _nibble_order(rows, k).to(packed_blocks.device)
    return nib.index_select(1, order).view(-1, rows, k)


@lru_cache(maxsize=1)
def _block_rows() -> int:
    """Rows per block of the packer: 32 in PyTorch's AVX2 build of the kernel, 64 in its AVX-512 one
    (checked by a round trip, not assumed from the CPU's name)."""
    g = torch.Generator().manual_seed(0)
    for b in (64, 32):
        codes = torch.randint(0, 16, (2 * b + 16, 64), generator=g, dtype=torch.uint8)
        if torch.equal(_unpack_with(pack_int4_cpu(codes), b), codes):
            return b
    raise RuntimeError("PyTorch's int4 packer uses a row-block layout pocketvlm does not know")


def _unpack_with(packed: torch.Tensor, b: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    n, k = packed.shape[0], packed.shape[1] * 2
    nb = n // b * b
    flat = packed.reshape(-1)
    head = flat[: nb * k // 2].view(nb // b, b * k // 2)
    tail = flat[nb * k // 2 :].view(1, -1)  # the last n - nb rows are packed as one block of their own
    if rows is None:
        parts = []
        if nb:
            parts.append(_unpack_blocks(head, b, k).reshape(nb, k))
        if n > nb:
            parts.append(_unpack_blocks(tail, n - nb, k).reshape(n - nb, k))
        return torch.cat(parts) if len(parts) > 1 else parts[0]
    rows = rows.reshape(-1)
    out = torch.empty(rows.numel(), k, dtype=torch.uint8, device=packed.device)
    in_head = rows < nb
    if in_head.any():
        r = rows[in_head]
        blocks, inv = torch.unique(r // b, return_inverse=True)  # unpack each needed block once
        out[in_head] = _unpack_blocks(head[blocks], b, k)[inv, r % b]
    if (~in_head).any():
        out[~in_head] = _unpack_blocks(tail, n - nb, k)[0, rows[~in_head] - nb]
    return out


def unpack_int4_cpu(packed: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_int4_cpu`: uint8 ``[N, K/2]`` -> codes uint8 ``[N, K]``, or only the
    given ``rows`` (a 1-D index tensor), unpacking just the row blocks that hold them."""
    return _unpack_with(packed, _block_rows(), rows)


def int4_mm(x: torch.Tensor, packed: torch.Tensor, group: int, scale_zeros: torch.Tensor) -> torch.Tensor:
    """``x [M, K]`` (dtype of ``scale_zeros [K/group, N, 2]``) times the packed weight -> ``[M, N]``."""
    return _aten._weight_int4pack_mm_for_cpu(x, packed, group, scale_zeros)
