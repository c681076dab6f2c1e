"""Fast paths for the vision encoder, which is compute-bound (hundreds of tokens per tile), not bandwidth-bound.

Which path is fastest depends on the CPU, so it is an explicit choice (``vision_precision``) with ``"auto"``
picking by measured facts:

* ``"fp32"``: exact (the reference the others are checked against).
* ``"bf16"``: the tower in bfloat16. Fast only where the CPU multiplies bf16 natively (AVX-512-BF16 / AMX:
  about 3x fp32 on a Xeon with AMX); on AVX2-only CPUs PyTorch's bf16 GEMM was measured 4-7x *slower* than
  fp32, so "auto" never picks it there. On CUDA/MPS, bf16/fp16 is the natural fast path.
* ``"int8"``: every linear layer of the tower as a dynamically quantized int8 GEMM (per-output-channel
  symmetric int8 weights, activations quantized per call to uint8 per tensor, fbgemm/oneDNN kernels that
  use AVX2 ``vpmaddubsw``): measured ~2.5x fp32 GEMM throughput on the 2-core AVX2 EPYC and 1.5-2x per
  image tile end to end; about 1% relative error per layer, which accumulates: 1.4% on CLIP ViT-L/14-336
  features but 30% on a full-size random SigLIP-so400m, so "auto" does not pick it.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

VISION_PRECISIONS = ("auto", "fp32", "bf16", "int8")


def cpu_has_native_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _int8_engine_ok() -> bool:
    return any(e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm", "onednn", "qnnpack"))


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in VISION_PRECISIONS:
        from ..errors import QuantizationError

        raise QuantizationError(f"unknown vision precision {precision!r}; use one of {', '.join(VISION_PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type != "cpu":
        return "bf16" if device.type == "cuda" else "fp32"
    # int8 is ~2x faster on AVX2 but not accurate enough to be a silent default: its per-tensor activation
    # scale lost 30% (relative L2) of full-size random SigLIP-so400m features (1.4% on CLIP ViT-L), measured
    # by benchmarks/compare.py. It stays an explicit choice.
    return "bf16" if cpu_has_native_bf16() else "fp32"


class DynamicInt8Linear(nn.Module):
    """``nn.Linear`` contract over per-channel int8 weights, run with PyTorch's dynamic-quantized GEMM."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = (w.abs().amax(1) / 127).clamp_min(1e-12)
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        self._packed = None
        self._failed = False

    def _pack(self):
        with warnings.catch_warnings():  # quantized-tensor constructors are deprecated but still the only
            warnings.simplefilter("ignore")  # way to reach the fbgemm/oneDNN dynamic int8 GEMM from Python
            return self._pack_now()

    def _pack_now(self):
        wq = torch._make_per_channel_quantized_tensor(self.qweight, self.scale.double(),
                                                      torch.zeros_like(self.scale, dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(wq, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        if x.device.type == "cpu" and not self._failed:
            try:
                if self._packed is None:
                    self._packed = self._pack()
                y = torch.ops.quantized.linear_dynamic(x.reshape(-1, shape[-1]).float().contiguous(), self._packed, False)
                return y.reshape(*shape[:-1], self.out_features).to(dtype)
            except (RuntimeError, NotImplementedError) as e:
                self._failed = True
                warnings.warn(f"int8 dynamic GEMM unavailable ({e}); vision layers fall back to dequantized fp32")
        w = self.qweight.float() * self.scale[:, None]
        return F.linear(x.float(), w, self.bias).to(dtype)


def int8_linears(module: nn.Module) -> nn.Module:
    """Swap every plain ``nn.Linear`` under ``module`` for a :class:`DynamicInt8Linear`, in place."""
    for mod in list(module.modules()):
        for child_name, child in list(mod.named_children()):
            if type(child) is nn.Linear:
                setattr(mod, child_name, DynamicInt8Linear(child))
    return module


def find_vision_parts(model: nn.Module):
    """(vision tower, projector) of a VLM in any of the families' layouts, or (None, None)."""
    inner = getattr(model, "model", model)
    tower = getattr(inner, "vision_tower", None) or getattr(model, "vision_tower", None)
    proj = None
    for name in ("multi_modal_projector", "mm_projector"):
        proj = proj or getattr(inner, name, None) or getattr(model, name, None)
    return tower, proj


def _cast_input(dtype):
    def hook(module, args, kwargs):
        if args and torch.is_tensor(args[0]) and args[0].is_floating_point():
            args = (args[0].to(dtype),) + tuple(args[1:])
        return args, kwargs
    return hook


def apply_vision_precision(model: nn.Module, precision: str = "auto") -> str:
    """Switch the VLM's vision tower to the chosen precision in place; returns the precision used."""
    tower, proj = find_vision_parts(model)
    if tower is None:
        return "none"
    p = next(tower.parameters())
    precision = resolve_precision(precision, p.device)
    if precision == "int8":
        int8_linears(tower)
    elif precision == "bf16" and p.dtype != torch.bfloat16:
        tower.to(torch.bfloat16)
        # the tower's own code casts pixels to its weight dtype; features go back to the projector's dtype
        if proj is not None:
            pdt = next(proj.parameters()).dtype
            proj.register_forward_pre_hook(_cast_input(pdt), with_kwargs=True)
    return precision
