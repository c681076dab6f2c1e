"""GGUF (ggml) block formats, dequantized in vectorised torch from the raw block bytes.

Input is what ``gguf.GGUFReader`` gives for a tensor: ``tensor.data`` (a numpy array; uint8 rows of
blocks for quantized types, float arrays for F32/F16, uint16-ish for BF16), ``tensor.tensor_type``
and ``tensor.shape``. GGUF lists dims innermost-first (``ne0`` = the contiguous dim), the reverse of
PyTorch: a ``[out, in]`` Linear weight has GGUF shape ``(in, out)``; :func:`torch_shape` flips it.

The block table shows its arithmetic: ``(weights per block, bytes per block)``, e.g. Q4_K is
256 weights in 2+2 (fp16 d, dmin) + 12 (packed 6-bit scales/mins) + 128 (4-bit codes) = 144 bytes.

Each decoder follows ggml's reference layout (ggml-quants.c) and does the float arithmetic in the
same order as gguf-py's numpy ``gguf.quants`` so results are bit-identical to it (tested).
The ``*_codes`` helpers return integer codes plus float32 scale/zero per 32-weight group for
:mod:`pocketvlm.quant.linear`, which runs them on low-bit kernels without dequantizing.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from ..errors import CorruptWeightsError, QuantizationError

QK_K = 256
#: ggml type -> (weights per block, bytes per block)
BLOCKS: dict[T, tuple[int, int]] = {
    T.F32: (1, 4),
    T.F16: (1, 2),
    T.BF16: (1, 2),
    T.Q4_0: (32, 2 + 16),
    T.Q4_1: (32, 2 + 2 + 16),
    T.Q5_0: (32, 2 + 4 + 16),
    T.Q5_1: (32, 2 + 2 + 4 + 16),
    T.Q8_0: (32, 2 + 32),
    T.Q2_K: (QK_K, 16 + 64 + 2 + 2),
    T.Q3_K: (QK_K, 32 + 64 + 12 + 2),
    T.Q4_K: (QK_K, 2 + 2 + 12 + 128),
    T.Q5_K: (QK_K, 2 + 2 + 12 + 32 + 128),
    T.Q6_K: (QK_K, 128 + 64 + 16 + 2),
}


def torch_shape(gguf_shape) -> tuple[int, ...]:
    """GGUF dims (innermost first) -> PyTorch shape (outermost first)."""
    return tuple(int(d) for d in reversed(list(gguf_shape)))


def _f16(b: torch.Tensor) -> torch.Tensor:
    """``[nb, 2]`` uint8 little-endian -> float32 ``[nb, 1]`` via fp16."""
    return b.contiguous().view(torch.float16).float()


def _split(blocks: torch.Tensor, *sizes: int) -> list[torch.Tensor]:
    return list(torch.split(blocks, list(sizes), dim=-1))


def _nibbles(qs: torch.Tensor, groups: int) -> torch.Tensor:
    """``[nb, groups*32]`` bytes holding 64 codes per 32 bytes (low nibbles first) -> ``[nb, groups*64]``."""
    q = qs.view(qs.shape[0], groups, 1, 32) >> torch.tensor([0, 4], dtype=torch.uint8).view(1, 1, 2, 1)
    return (q & 15).reshape(qs.shape[0], groups * 64)


def _q4_0_q4_1_codes(qs: torch.Tensor) -> torch.Tensor:
    # 32-weight blocks: byte j holds element j (low nibble) and element j+16 (high nibble)
    return torch.cat([qs & 15, qs >> 4], dim=-1)


def _q5_high(qh: torch.Tensor) -> torch.Tensor:
    # 4 bytes = a little-endian uint32 whose bit j is element j's fifth bit; numpy's unpackbits is one pass
    # (torch's broadcast shift over an inner dim of 8 was most of Q5_0's decode time)
    bits = np.unpackbits(qh.contiguous().numpy(), axis=-1, bitorder="little")  # [nb, 32]
    return torch.from_numpy(bits)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K 12-byte field -> eight 6-bit scales and eight 6-bit mins (as uint8 [nb, 8])."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 63, (md & 15) | ((d >> 6) << 4)], dim=-1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 6) << 4)], dim=-1)
    return sc, mn


def _dq_q4_0(b):
    d, qs = _split(b, 2, 16)
    return _f16(d) * (_q4_0_q4_1_codes(qs).to(torch.int8) - 8).float()


def _dq_q4_1(b):
    d, m, qs = _split(b, 2, 2, 16)
    return _f16(d) * _q4_0_q4_1_codes(qs).float() + _f16(m)


def _q5_codes(qh, qs):
    return _q4_0_q4_1_codes(qs) | (_q5_high(qh) << 4)


def _dq_q5_0(b):
    d, qh, qs = _split(b, 2, 4, 16)
    q = _q5_codes(qh, qs).view(torch.int8).sub_(16)  # codes 0..31 as int8 bytes, minus 16 in place
    return q.float().mul_(_f16(d))  # the same one product d * q per weight as gguf-py


def _dq_q5_1(b):
    d, m, qh, qs = _split(b, 2, 2, 4, 16)
    return _f16(d) * _q5_codes(qh, qs).float() + _f16(m)


def _dq_q8_0(b):
    d, qs = _split(b, 2, 32)
    return qs.contiguous().view(torch.int8).float() * _f16(d)


def _dq_q2_k(b):
    nb = b.shape[0]
    scales, qs, d, dmin = _split(b, 16, 64, 2, 2)
    dl = (_f16(d) * (scales & 15).float()).view(nb, 16, 1)
    ml = (_f16(dmin) * (scales >> 4).float()).view(nb, 16, 1)
    shift = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
    q = ((qs.view(nb, 2, 1, 32) >> shift) & 3).reshape(nb, 16, 16).float()
    return (dl * q - ml).view(nb, QK_K)


def _dq_q3_k(b):
    nb = b.shape[0]
    hmask, qs, scales, d = _split(b, 32, 64, 12, 2)
    lo = (scales[:, :8].view(nb, 1, 8) >> torch.tensor([0, 4], dtype=torch.uint8).view(1, 2, 1)).reshape(nb, 16)
    hi = (scales[:, 8:].view(nb, 1, 4) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 4, 1)).reshape(nb, 16)
    sc = ((lo & 15) | ((hi & 3) << 4)).to(torch.int8) - 32
    dl = (_f16(d) * sc.float()).view(nb, 16, 1)
    ql = (qs.view(nb, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)) & 3
    qh = (hmask.view(nb, 1, 1, 32) >> torch.arange(8, dtype=torch.uint8).view(1, 8, 1, 1).view(1, 2, 4, 1)) & 1
    q = ql.to(torch.int8) - ((qh ^ 1) << 2).to(torch.int8)  # a clear high bit means "minus 4"
    return (dl * q.reshape(nb, 16, 16).float()).view(nb, QK_K)


def _dq_q4_k(b):
    nb = b.shape[0]
    d, dmin, scales, qs = _split(b, 2, 2, 12, 128)
    sc, mn = _k_scale_min(scales)
    dd = (_f16(d) * sc.float()).view(nb, 8, 1)
    dm = (_f16(dmin) * mn.float()).view(nb, 8, 1)
    q = _nibbles(qs, 4).view(nb, 8, 32).float()
    return (dd * q - dm).view(nb, QK_K)


def _dq_q5_k(b):
    nb = b.shape[0]
    d, dmin, scales, qh, qs = _split(b, 2, 2, 12, 32, 128)
    sc, mn = _k_scale_min(scales)
    dd = (_f16(d) * sc.float()).view(nb, 8, 1)
    dm = (_f16(dmin) * mn.float()).view(nb, 8, 1)
    high = (qh.view(nb, 1, 32) >> torch.arange(8, dtype=torch.uint8).view(1, 8, 1)) & 1  # [nb, 8, 32]
    q = (_nibbles(qs, 4).view(nb, 8, 32) | (high << 4)).float()
    return (dd * q - dm).view(nb, QK_K)


def _dq_q6_k(b):
    nb = b.shape[0]
    ql, qh, scales, d = _split(b, 128, 64, 16, 2)
    dd = (_f16(d) * scales.contiguous().view(torch.int8).float()).view(nb, 16, 1)
    low = (ql.view(nb, 2, 1, 64) >> torch.tensor([0, 4], dtype=torch.uint8).view(1, 1, 2, 1)) & 15
    low = low.reshape(nb, 2, 4, 32)  # [half, quarter, l]: quarters 0/1 from low nibbles of 64 bytes
    high = (qh.view(nb, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)) & 3
    q = (low | (high << 4)).to(torch.int8) - 32
    return (dd * q.reshape(nb, 16, 16).float()).view(nb, QK_K)


_DECODERS = {
    T.Q4_0: _dq_q4_0, T.Q4_1: _dq_q4_1, T.Q5_0: _dq_q5_0, T.Q5_1: _dq_q5_1, T.Q8_0: _dq_q8_0,
    T.Q2_K: _dq_q2_k, T.Q3_K: _dq_q3_k, T.Q4_K: _dq_q4_k, T.Q5_K: _dq_q5_k, T.Q6_K: _dq_q6_k,
}


def _as_type(ggml_type) -> T:
    try:
        t = T(int(ggml_type))
    except ValueError:
        t = None
    if t not in BLOCKS:
        names = ", ".join(x.name for x in BLOCKS)
        raise QuantizationError(f"GGUF tensor type {ggml_type!r} is not supported; supported: {names}")
    return t


def _from_numpy(arr: np.ndarray) -> torch.Tensor:
    """Zero-copy view of a (possibly read-only, memory-mapped) array; pocketvlm never writes to it."""
    arr = np.ascontiguousarray(arr).reshape(-1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(arr)


#: Blocks are decoded in slices of about this many weights, written into an output allocated once: the
#: integer and float temporaries (several times a slice) then stay small and in cache, instead of several
#: times a whole 151936 x 896 embedding table (which made them most of a quantized load's peak memory).
_SLICE_WEIGHTS = 1 << 18


def _by_slices(fn, blocks: torch.Tensor, weights_per_block: int, dtype: torch.dtype | None = None):
    """``fn(blocks)`` -> a tensor or tuple of tensors with one row per block, computed slice by slice
    (blocks are independent, so the result is the same as one call; ``dtype`` casts the outputs)."""
    nb = blocks.shape[0]
    step = max(1, _SLICE_WEIGHTS // weights_per_block)
    if nb <= step:
        out = fn(blocks)
        return out if dtype is None else out.to(dtype)
    outs, single = None, True
    for i in range(0, nb, step):
        parts = fn(blocks[i:i + step])
        single = isinstance(parts, torch.Tensor)
        parts = (parts,) if single else parts
        if outs is None:
            outs = [torch.empty((nb, *p.shape[1:]), dtype=dtype or p.dtype) for p in parts]
        for o, p in zip(outs, parts):
            o[i:i + step] = p
    return outs[0] if single else tuple(outs)


def _raw_bytes(data, ggml_type: T, shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor's blocks as uint8 ``[n_blocks, bytes_per_block]``, checking the byte count."""
    bs, nbytes = BLOCKS[ggml_type]
    raw = _from_numpy(np.asarray(data).view(np.uint8))
    n = int(np.prod(shape)) if shape else 1
    if shape and shape[-1] % bs:
        raise CorruptWeightsError(
            f"{ggml_type.name} tensor's inner dim {shape[-1]} is not a multiple of its block size {bs}"
        )
    if raw.numel() != n // bs * nbytes:
        raise CorruptWeightsError(
            f"{ggml_type.name} tensor of shape {shape} needs {n // bs * nbytes} bytes, got {raw.numel()}"
        )
    return raw.view(n // bs, nbytes)


def dequantize_gguf(data, ggml_type, shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize one GGUF tensor. ``shape`` is the PyTorch shape (see :func:`torch_shape`)."""
    t = _as_type(ggml_type)
    shape = tuple(int(s) for s in shape)
    if t is T.F32:
        return _from_numpy(np.asarray(data).view(np.float32)).reshape(shape).to(dtype)
    if t is T.F16:
        return _from_numpy(np.asarray(data).view(np.float16)).reshape(shape).to(dtype)
    if t is T.BF16:
        raw = _from_numpy(np.asarray(data).view(np.int16))
        return raw.view(torch.bfloat16).reshape(shape).to(dtype)
    blocks = _raw_bytes(data, t, shape)
    return _by_slices(_DECODERS[t], blocks, BLOCKS[t][0], dtype).reshape(shape)


# ----- integer codes for the low-bit kernels --------------------------------------------------------

def _int4_blocks(t: T, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if t is T.Q4_0:
        d, qs = _split(b, 2, 16)
        scale = _f16(d)
        return _q4_0_q4_1_codes(qs), scale, torch.zeros_like(scale)
    if t is T.Q4_1:
        d, m, qs = _split(b, 2, 2, 16)
        scale = _f16(d)
        return _q4_0_q4_1_codes(qs), scale, _f16(m) + 8 * scale
    d, dmin, sc_b, qs = _split(b, 2, 2, 12, 128)
    sc, mn = _k_scale_min(sc_b)
    scale = _f16(d) * sc.float()  # [nb, 8]
    return _nibbles(qs, 4), scale, 8 * scale - _f16(dmin) * mn.float()


def int4_codes(data, ggml_type, shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_0 / Q4_1 / Q4_K -> ``codes`` uint8 [out, in] (0..15) and float32 ``scale``, ``zero``
    [out, in/32] with ``w = (code - 8) * scale + zero`` exactly (in float32 arithmetic):

    * Q4_0: ``d*(q-8)``                -> scale d, zero 0
    * Q4_1: ``d*q + m``                -> scale d, zero m + 8d
    * Q4_K: ``d*sc*q - dmin*mn`` per 32 -> scale d*sc, zero 8*d*sc - dmin*mn
    """
    t = _as_type(ggml_type)
    if t not in (T.Q4_0, T.Q4_1, T.Q4_K):
        raise QuantizationError(f"{t.name} is not a 4-bit GGUF type (Q4_0, Q4_1, Q4_K)")
    out_f, in_f = shape
    b = _raw_bytes(data, t, tuple(shape))
    codes, scale, zero = _by_slices(lambda x: _int4_blocks(t, x), b, BLOCKS[t][0])
    g = in_f // 32
    return codes.reshape(out_f, in_f), scale.reshape(out_f, g), zero.reshape(out_f, g)


def _int8_blocks(t: T, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if t is T.Q8_0:
        d, qs = _split(b, 2, 32)
        return qs.contiguous().view(torch.int8), _f16(d)
    d, qh, qs = _split(b, 2, 4, 16)
    return _q5_codes(qh, qs).view(torch.int8).sub_(16), _f16(d)


def int8_codes(data, ggml_type, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 / Q5_0 -> signed ``codes`` int8 [out, in] and float32 ``scale`` [out, in/32],
    ``w = code * scale`` exactly (Q5_0's ``q - 16`` fits int8)."""
    t = _as_type(ggml_type)
    if t not in (T.Q8_0, T.Q5_0):
        raise QuantizationError(f"{t.name} is not an 8-bit-exact GGUF type (Q8_0, Q5_0)")
    out_f, in_f = shape
    b = _raw_bytes(data, t, tuple(shape))
    codes, scale = _by_slices(lambda x: _int8_blocks(t, x), b, BLOCKS[t][0])
    return codes.reshape(out_f, in_f), scale.reshape(out_f, in_f // 32)
