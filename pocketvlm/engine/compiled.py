"""``torch.compile`` of the single-token decode step (gpt-fast style), with an eager fallback.

Only the decode step is compiled: its shapes are static (one token, a KV cache of fixed length attended
with a mask), so it compiles once per model and cache size. Prefill stays eager: its shapes vary and it is
compute-bound anyway. Where no compiler is available (no C++ toolchain, an unsupported platform), the first
call fails, a warning says so, and the step falls back to eager for good.
"""
from __future__ import annotations

import warnings

import torch


def _step(model, token: torch.Tensor, pos: torch.Tensor, cache):
    return model(token, input_pos=pos, cache=cache, logits_to_keep=1)[0, -1]


class CompiledDecode:
    def __init__(self, model, mode: str | None = None):
        self.model = model
        self.fn = torch.compile(_step, dynamic=False, mode=mode)
        self.failed = False

    def __call__(self, slot, token: int, pos: int) -> torch.Tensor:
        tok = torch.tensor([[token]], device=slot.device)
        p = torch.tensor([pos], device=slot.device)
        if not self.failed:
            slot.cache.attend_len = None  # static shape: attend over the whole cache with a mask
            try:
                return self.fn(slot.model, tok, p, slot.cache)
            except Exception as e:  # compiler missing or unsupported op: keep serving, eagerly
                self.failed = True
                warnings.warn(f"torch.compile of the decode step failed ({type(e).__name__}: {e}); using eager decode")
        slot.cache.attend_len = pos + 1
        return _step(slot.model, tok, p, slot.cache)


def compiler_available() -> bool:
    """Whether torch.compile can build CPU kernels here (needs a C++ compiler for inductor)."""
    import shutil

    return shutil.which("g++") is not None or shutil.which("c++") is not None or shutil.which("clang++") is not None
