"""MLC LLM's weight quantization modes: the mode table, quantize/dequantize and bit packing.

Every quantized mode is symmetric group quantization without a zero point (MLC's "group_quantize"):

    per group of ``group_size`` consecutive weights along the input dim (a row of ``W [out, in]``):
        scale = max|w| / (2^(bits-1) - 1)              (stored in ``scale_dtype``)
        q     = clamp(round(w / scale) + offset, 0, max_code),   offset = 2^(bits-1) - 1,
                max_code = 2^bits - 1 (8-bit: 254, so that ``q - offset`` fits a signed int8)
        w_hat = (q - offset) * scale

``scale`` is rounded to ``scale_dtype`` *before* dividing, so dequantizing with the stored scale
reproduces exactly what the quantizer meant. An all-zero group gets scale 0 and codes ``offset``.

Input dims that the group size does not divide are padded with zeros up to a multiple of the
group (the padding quantizes to code ``offset`` = weight 0); ``dequantize`` drops the padding
again when given the original ``in_features``. MLC's q3f16_1 uses group 40, which does not divide
896 (Qwen2.5-0.5B's hidden size), so this happens in practice.

Packing (documented layouts, the saved form of quantized tensors):
  * 4-bit: two codes per uint8, element ``2i`` in the low nibble, ``2i+1`` in the high nibble.
  * 3-bit: ten codes per int32 (30 bits used, bits 30-31 zero), element ``10i+j`` in bits
    ``3j .. 3j+2``. Group 40 = exactly 4 words, so groups never straddle words.
  * 8-bit: one code per uint8 (no packing).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import QuantizationError
from .scales import magnitude_weights, search_scales

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class QuantMode:
    """One row of the mode table. ``bits == 0`` means no quantization (weights kept as ``dtype``)."""

    name: str
    bits: int
    group_size: int
    scale_dtype: str  # the dtype scales are stored in ("" for q0 modes)
    dtype: str  # the float dtype of unquantized weights and of activations in MLC's naming

    @property
    def quantized(self) -> bool:
        return self.bits > 0

    @property
    def offset(self) -> int:
        return (1 << (self.bits - 1)) - 1  # 7 for 4-bit, 3 for 3-bit, 127 for 8-bit

    @property
    def max_code(self) -> int:
        """The largest code: ``2^bits - 1`` (4-bit: +8 steps), except 8-bit's ``254`` (+127 steps): 8-bit codes
        are held as signed int8 ``code - 127`` (and exported as GGUF Q8_0), where 255 would wrap to -128."""
        return 254 if self.bits == 8 else (1 << self.bits) - 1

    @property
    def bytes_per_weight(self) -> float:
        """Storage per weight: the code bits plus the group's scale shared by ``group_size`` weights."""
        if not self.quantized:
            return torch.finfo(_DTYPES[self.dtype]).bits / 8
        return self.bits / 8 + torch.finfo(_DTYPES[self.scale_dtype]).bits / 8 / self.group_size

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return _DTYPES[self.scale_dtype]

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


#: MLC LLM's modes. bytes/weight: q4f16_1 = 0.5 + 2/32 = 0.5625, q4f32_1 = 0.5 + 4/32 = 0.625,
#: q3f16_1 = 0.375 + 2/40 = 0.425, q8f16_1 = 1 + 2/32 = 1.0625.
MODES: dict[str, QuantMode] = {
    m.name: m
    for m in (
        QuantMode("q0f32", 0, 0, "", "float32"),
        QuantMode("q0f16", 0, 0, "", "float16"),
        QuantMode("q0bf16", 0, 0, "", "bfloat16"),
        QuantMode("q4f16_1", 4, 32, "float16", "float16"),
        QuantMode("q4f32_1", 4, 32, "float32", "float32"),
        QuantMode("q3f16_1", 3, 40, "float16", "float16"),
        QuantMode("q8f16_1", 8, 32, "float16", "float16"),
    )
}


def parse_mode(name: str | QuantMode) -> QuantMode:
    """The :class:`QuantMode` called ``name``; :class:`QuantizationError` listing valid names if unknown."""
    if isinstance(name, QuantMode):
        return name
    mode = MODES.get(str(name).strip().lower())
    if mode is None:
        raise QuantizationError(
            f"unknown quantization mode {name!r}; valid modes: {', '.join(MODES)}"
        )
    return mode


def padded_in_features(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size) * group_size


def _check_weight(w: torch.Tensor) -> None:
    if w.dim() != 2:
        raise QuantizationError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise QuantizationError(f"expected a floating-point weight, got {w.dtype}")


#: quantize() works on slices of at most this many weights: its float temporaries are ~5x the slice, which
#: for a whole 151936 x 896 embedding table was ~2.5 GB of the peak memory of loading a 0.5B model.
_CHUNK_ELEMENTS = 1 << 22


def quantize(w: torch.Tensor, mode: str | QuantMode, *, search: bool = False,
             importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w [out, in]``: returns unpacked ``codes`` uint8 ``[out, in_padded]`` and
    ``scales [out, in_padded // group]`` in the mode's scale dtype.

    ``search=True`` chooses each group's scale by minimising its reconstruction error
    (:func:`pocketvlm.quant.scales.search_scales`; never worse than the RTN scale of the formula above),
    weighted per input column by ``importance [in]`` when given; the format is the same."""
    mode = parse_mode(mode)
    if not mode.quantized:
        raise QuantizationError(f"mode {mode.name} does not quantize; cast the weight to {mode.dtype}")
    _check_weight(w)
    out_f, in_f = w.shape
    g = mode.group_size
    kp = padded_in_features(in_f, g)
    rows = max(1, _CHUNK_ELEMENTS // max(1, kp))
    if out_f > rows:  # rows are independent: quantize in slices so the float transients stay small
        codes = torch.empty(out_f, kp, dtype=torch.uint8, device=w.device)
        scales = torch.empty(out_f, kp // g, dtype=mode.torch_scale_dtype, device=w.device)
        for r in range(0, out_f, rows):
            codes[r:r + rows], scales[r:r + rows] = quantize(w[r:r + rows], mode, search=search,
                                                             importance=importance)
        return codes, scales
    w = w.float()
    if kp != in_f:
        w = torch.nn.functional.pad(w, (0, kp - in_f))
    wg = w.view(out_f, kp // g, g)
    if search:
        h = magnitude_weights(wg)
        if importance is not None:
            h = h * torch.nn.functional.pad(importance.float().reshape(-1), (0, kp - in_f)).view(kp // g, g)
        scales = search_scales(wg, mode.offset, mode.max_code, mode.torch_scale_dtype, h)
    else:
        scales = (wg.abs().amax(-1) / mode.offset).to(mode.torch_scale_dtype)  # [out, G]
    s = scales.float().unsqueeze(-1)
    q = torch.where(s > 0, torch.round(wg / torch.where(s > 0, s, 1.0)), 0.0)
    codes = (q + mode.offset).clamp_(0, mode.max_code).to(torch.uint8).view(out_f, kp)
    return codes, scales


def dequantize(
    codes: torch.Tensor, scales: torch.Tensor, mode: str | QuantMode, in_features: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(codes - offset) * scale`` per group, computed in float32 then cast to ``dtype``;
    the zero padding is dropped when ``in_features`` is given."""
    mode = parse_mode(mode)
    out_f, kp = codes.shape
    g = mode.group_size
    if kp % g or scales.shape != (out_f, kp // g):
        raise QuantizationError(
            f"codes {tuple(codes.shape)} and scales {tuple(scales.shape)} do not match group size {g}"
        )
    w = (codes.view(out_f, kp // g, g).float() - mode.offset) * scales.float().unsqueeze(-1)
    w = w.view(out_f, kp)
    if in_features is not None:
        w = w[:, :in_features]
    return w.to(dtype)


# ----- packing -------------------------------------------------------------------------------------

def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """``[..., 2n]`` codes 0..15 -> ``[..., n]`` uint8 (even element in the low nibble)."""
    if codes.shape[-1] % 2:
        raise QuantizationError(f"4-bit packing needs an even last dim, got {tuple(codes.shape)}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_4bit(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_4bit`: ``[..., n]`` uint8 -> ``[..., 2n]`` uint8 codes."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)


def pack_3bit(codes: torch.Tensor) -> torch.Tensor:
    """``[..., 10n]`` codes 0..7 -> ``[..., n]`` int32, element ``10i+j`` in bits ``3j..3j+2``."""
    if codes.shape[-1] % 10:
        raise QuantizationError(f"3-bit packing needs a last dim divisible by 10, got {tuple(codes.shape)}")
    c = codes.to(torch.int32).unflatten(-1, (-1, 10))
    shifts = torch.arange(0, 30, 3, dtype=torch.int32, device=codes.device)
    return (c << shifts).sum(-1, dtype=torch.int32)  # disjoint bit fields: sum == bitwise or


def unpack_3bit(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_3bit`: ``[..., n]`` int32 -> ``[..., 10n]`` uint8 codes."""
    shifts = torch.arange(0, 30, 3, dtype=torch.int32, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 7).to(torch.uint8).flatten(-2)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 4:
        return pack_4bit(codes)
    if bits == 3:
        return pack_3bit(codes)
    if bits == 8:
        return codes.to(torch.uint8)
    raise QuantizationError(f"no packing for {bits}-bit codes; supported: 3, 4, 8")


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 4:
        return unpack_4bit(packed)
    if bits == 3:
        return unpack_3bit(packed)
    if bits == 8:
        return packed.to(torch.uint8)
    raise QuantizationError(f"no packing for {bits}-bit codes; supported: 3, 4, 8")
