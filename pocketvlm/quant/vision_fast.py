"""Fast paths for the vision encoder, which is compute-bound (hundreds of tokens per tile), not bandwidth-bound.

Which path is fastest depends on the CPU, so it is an explicit choice (``vision_precision``) with ``"auto"``
picking by what the CPU has:

* ``"fp32"``: exact (the reference the others are checked against).
* ``"bf16"``: the tower in bfloat16 (PyTorch/oneDNN kernels). Fast only where the CPU multiplies bf16 natively
  (AVX-512-BF16 / AMX); on AVX2-only CPUs PyTorch's bf16 GEMM was measured 4-7x *slower* than fp32. On
  CUDA/MPS, bf16 is the natural fast path ("auto" picks it on CUDA).
* ``"int8"``: every matrix product of the encoder layers as an int8 x int8 GEMM on pocketvlm's own AVX-512 VNNI
  kernel (``csrc/gemm_i8.cpp``): weights symmetric int8 per output channel, activations quantized per token
  (row) to int8 at each call, exact int32 sums; bias and the MLP activation (quick GELU / tanh GELU) are
  applied in the kernel's epilogue (DINOv2's exact erf GELU right after it, in PyTorch); q, k and v are one
  GEMM. DINOv2's layer scales stay fp32 multiplies outside the GEMMs. The attention between them runs on a bf16 kernel
  (``attention_bf16``: q, k, v and the softmax numerators rounded to bf16, fp32 sums and softmax; ~2x fp32
  SDPA) where the CPU has AVX-512-BF16, else on fp32 SDPA. On a CPU without AVX-512 VNNI the same int8
  arithmetic runs in PyTorch (identical results up to float rounding, no faster than fp32).

Why int8 and not bf16 on CPUs that have both (measured on the 2-core AMD EPYC Zen 4 VM, one core each):
fp32 FMA 116 GFLOP/s, bf16 ``vdpbf16ps`` 231, int8 ``vpdpbusd`` 459 GOP/s (``benchmarks/isa_peak.py``). The
accuracy is that of bf16: relative L2 error of the output features vs fp32, full-size random weights, one tile:
CLIP ViT-L/14-336 1.1% (bf16 1.2%), SigLIP-so400m-384 1.8% (bf16 1.1%); one tile took 3.3-4.1x less time than
transformers fp32 in the same run (bf16: 1.4-1.9x; benchmarks/compare.py). "auto" picks int8 where the kernel
has VNNI, bf16 on CUDA and on CPUs with native bf16 but no VNNI, fp32 otherwise; for a DINOv2 tower it never
picks int8 (3.2-3.7% feature error on the real ViT-S/14, over the 3% the other towers keep; bf16 1.0%): bf16
where bf16 is native, fp32 otherwise. ``apply_vision_precision`` returns the precision that runs.

(An earlier int8 path used PyTorch's dynamic-quantized fbgemm GEMM with one activation scale per tensor: 34%
feature error on SigLIP-so400m and no VNNI speed-up; it is gone.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models import clip, dinov2
from . import cpu_kernel
from .cpu_kernel import cpu_has_native_bf16

VISION_PRECISIONS = ("auto", "fp32", "bf16", "int8")
_ACT_CODES = {"quick_gelu": 1, "gelu_pytorch_tanh": 2, "gelu_new": 2}  # fused in the kernel's epilogue


def vnni_available() -> bool:
    """Whether the int8 GEMM runs on the AVX-512 VNNI kernel here (builds the CPU kernel on first call)."""
    return cpu_kernel.available() and bool(torch.ops.pocketvlm.i8_vnni())


def bf16_attention_available() -> bool:
    """Whether the encoder's self-attention runs on the AVX-512 BF16 kernel here."""
    return vnni_available() and bool(torch.ops.pocketvlm.attention_bf16_cpu())


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in VISION_PRECISIONS:
        from ..errors import QuantizationError

        raise QuantizationError(f"unknown vision precision {precision!r}; use one of {', '.join(VISION_PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type != "cpu":
        return "bf16" if device.type == "cuda" else "fp32"
    if vnni_available():
        return "int8"
    return "bf16" if cpu_has_native_bf16() else "fp32"


# ----- int8 arithmetic (the kernel's, and its PyTorch twin) --------------------------------------------
def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``W [N, K]`` -> (int8 codes, float32 scale [N]): symmetric per output channel, ``W ~ q * scale``."""
    w = w.detach().float()
    amax = w.abs().amax(1)
    scale = amax / 127
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    return torch.round(w * inv[:, None]).clamp(-127, 127).to(torch.int8), scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``[M, K]`` -> (int8 codes, float32 scale [M]), per row, exactly as the kernel rounds."""
    amax = x.abs().amax(1)
    # (127 / t would be t.reciprocal() * 127: one more rounding than the kernel's division)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    return torch.round(x * inv[:, None]).clamp(-127, 127).to(torch.int8), amax / 127


def _act(y: torch.Tensor, act: str | None) -> torch.Tensor:
    return y if act is None else clip.ACT[act](y)


def int8_linear_reference(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                          act: str | None = None) -> torch.Tensor:
    """What ``i8_linear`` computes, in PyTorch: ``act(sa * ws * (qa @ qw.T) + bias)`` (sums exact in float64)."""
    qa, sa = quantize_rows(x.float())
    acc = (qa.double() @ qweight.double().T).float()
    y = acc * (sa[:, None] * scale[None, :])
    if bias is not None:
        y = y + bias
    return _act(y, act)


class VisionInt8Linear(nn.Module):
    """``nn.Linear``'s contract over per-channel int8 weights, run by the int8 GEMM; ``forward(x, act)`` also
    applies ``act`` (a ``clip.ACT`` name), in the kernel's epilogue when it knows it."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        q, s = quantize_weight(weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", s)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self._packed = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "VisionInt8Linear":
        return cls(linear.weight, linear.bias)

    def _kernel_ok(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and self.qweight.device.type == "cpu" and vnni_available()

    def forward(self, x: torch.Tensor, act: str | None = None) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, shape[-1]).float()
        if self._kernel_ok(x):
            if self._packed is None:
                self._packed = torch.ops.pocketvlm.i8_pack(self.qweight)
            code = _ACT_CODES.get(act, 0) if act is not None else 0
            y = torch.ops.pocketvlm.i8_linear(x2.contiguous(), self._packed, self.scale, self.bias,
                                                 self.out_features, code, 0)
            if act is not None and code == 0:
                y = _act(y, act)
        else:
            y = int8_linear_reference(x2, self.qweight, self.scale, self.bias, act)
        return y.reshape(*shape[:-1], self.out_features).to(dtype)

    def _apply(self, fn, recurse=True):  # a device move invalidates the packed copy
        self._packed = None
        return super()._apply(fn, recurse)


def attention_bf16_reference(qkv: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """What ``attention_bf16`` computes, in PyTorch: ``qkv [B*S, 3*H*D]`` -> ``[B*S, H*D]``, with q (times
    1/sqrt(D)), k, v and the softmax numerators rounded to bf16, products summed in fp32."""
    bs, width = qkv.shape
    s, d = bs // batch, width // (3 * heads)
    q, k, v = qkv.view(batch, s, 3, heads, d).permute(2, 0, 3, 1, 4)  # [B, H, S, D] each
    r = lambda t: t.bfloat16().float()  # noqa: E731
    scores = r(q * (1 / torch.sqrt(torch.tensor(float(d))))) @ r(k).transpose(-1, -2)
    e = r(torch.exp(scores - scores.amax(-1, keepdim=True)))
    o = (e @ r(v)) / e.sum(-1, keepdim=True)
    return o.transpose(1, 2).reshape(bs, heads * d)


class Int8Attention(nn.Module):
    """``clip.Attention`` (or ``dinov2.Attention``, the same arithmetic under HF's nested names) with q, k and v as
    one int8 GEMM (the input is quantized once), the attention itself on the bf16 kernel where the CPU has
    AVX-512 BF16 (else ``scaled_dot_product_attention`` in fp32), and an int8 ``out_proj``."""

    def __init__(self, attn: clip.Attention | dinov2.Attention):
        super().__init__()
        self.n_heads, self.head_dim = attn.n_heads, attn.head_dim
        if isinstance(attn, dinov2.Attention):
            a = attn.attention
            ps, out = (a.query, a.key, a.value), attn.output.dense
        else:
            ps, out = (attn.q_proj, attn.k_proj, attn.v_proj), attn.out_proj
        bias = None if ps[0].bias is None else torch.cat([p.bias for p in ps])
        self.qkv_proj = VisionInt8Linear(torch.cat([p.weight for p in ps]), bias)
        self.out_proj = VisionInt8Linear.from_linear(out)

    def forward(self, x):
        B, S, _ = x.shape
        qkv = self.qkv_proj(x)  # [B, S, 3*H*D]
        if (x.device.type == "cpu" and qkv.dtype == torch.float32 and self.head_dim % 2 == 0
                and self.head_dim <= 128 and bf16_attention_available()):
            o = torch.ops.pocketvlm.attention_bf16(qkv.reshape(B * S, -1).contiguous(), B, self.n_heads)
            return self.out_proj(o.view(B, S, -1))
        q, k, v = qkv.view(B, S, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [B, H, S, D] each
        o = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(o.transpose(1, 2).reshape(B, S, -1))


class Int8MLP(nn.Module):
    """``clip.MLP`` on int8 GEMMs, the activation fused into ``fc1``."""

    def __init__(self, mlp: clip.MLP):
        super().__init__()
        self.fc1 = VisionInt8Linear.from_linear(mlp.fc1)
        self.fc2 = VisionInt8Linear.from_linear(mlp.fc2)
        self.act_name = next(k for k, f in clip.ACT.items() if f is mlp.act)

    def forward(self, x):
        return self.fc2(self.fc1(x, act=self.act_name))


def int8_linears(module: nn.Module) -> nn.Module:
    """Swap, in place, every ``clip.Attention`` / ``dinov2.Attention`` / ``clip.MLP`` (the encoder layers of CLIP,
    SigLIP and DINOv2) under ``module`` for its int8 version, and every other plain ``nn.Linear`` for a
    :class:`VisionInt8Linear`."""
    swaps = {clip.Attention: Int8Attention, dinov2.Attention: Int8Attention, clip.MLP: Int8MLP,
             nn.Linear: VisionInt8Linear.from_linear}
    for child_name, child in list(module.named_children()):
        make = swaps.get(type(child))
        if make is not None:
            setattr(module, child_name, make(child))
        else:
            int8_linears(child)
    return module


def find_vision_parts(model: nn.Module):
    """(vision tower, projector) of a VLM in any of the families' layouts, (the encoder, None) for a bare
    CLIP / SigLIP / DINOv2 encoder, or (None, None)."""
    if isinstance(model, (clip.Model, dinov2.Model)):  # siglip.Model is a clip.Model too
        return model, None
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


def apply_vision_precision(model: nn.Module, precision: str = "auto", device: torch.device | None = None) -> str:
    """Switch the VLM's vision tower to the chosen precision in place; returns the precision used ("none" for a
    model without a vision tower). ``device``: where "auto" is resolved for (default: the tower's own; a model
    built on meta for a memory estimate names the device it estimates)."""
    tower, proj = find_vision_parts(model)
    if tower is None:
        resolve_precision(precision, torch.device("cpu"))  # a bad name is an error for any model
        return "none"
    p = next(tower.parameters())
    asked, precision = precision, resolve_precision(precision, device or p.device)
    if asked == "auto" and precision == "int8" and isinstance(tower, dinov2.Model):
        # DINOv2 is more sensitive to int8 than CLIP/SigLIP: relative L2 error of the real ViT-S/14's features
        # 3.2% (raw last layer) / 3.7% (after layernorm) vs bf16's 0.9-1.0%; and at ViT-S width bf16 was faster
        # here (AMX). So "auto" never picks int8 for it; an explicit "int8" still runs int8.
        precision = "bf16" if cpu_has_native_bf16() else "fp32"
    if precision == "int8":
        int8_linears(tower)
    elif precision == "bf16" and p.dtype != torch.bfloat16:
        tower.to(torch.bfloat16)
        # the tower's own code casts pixels to its weight dtype; features go back to the projector's dtype
        if proj is not None:
            pdt = next(proj.parameters()).dtype
            proj.register_forward_pre_hook(_cast_input(pdt), with_kwargs=True)
    return precision
