"""MLC mode table, quantize/dequantize and packing, checked against plain-Python references."""
import math

import numpy as np
import pytest
import torch

from pocketvlm.errors import QuantizationError
from pocketvlm.quant import formats
from pocketvlm.quant.formats import MODES, parse_mode

QUANT_MODES = ["q4f16_1", "q4f32_1", "q3f16_1", "q8f16_1"]


def test_mode_table_matches_mlc():
    expect = {  # name: (bits, group, scale dtype)
        "q4f16_1": (4, 32, "float16"), "q4f32_1": (4, 32, "float32"),
        "q3f16_1": (3, 40, "float16"), "q8f16_1": (8, 32, "float16"),
    }
    for name, (bits, g, sd) in expect.items():
        m = parse_mode(name)
        assert (m.bits, m.group_size, m.scale_dtype) == (bits, g, sd)
        assert m.offset == 2 ** (bits - 1) - 1
    assert parse_mode("q4f16_1").bytes_per_weight == pytest.approx(0.5 + 2 / 32)
    assert parse_mode("q3f16_1").bytes_per_weight == pytest.approx(3 / 8 + 2 / 40)
    assert parse_mode("q0bf16").bytes_per_weight == 2 and not parse_mode("q0f32").quantized
    assert set(MODES) == {"q0f32", "q0f16", "q0bf16", *expect}


def test_unknown_mode_lists_valid_names():
    with pytest.raises(QuantizationError, match="q4f16_1.*q8f16_1|valid modes"):
        parse_mode("q5f16_7")
    with pytest.raises(QuantizationError):
        formats.quantize(torch.randn(4, 32), "int4")


def test_quantize_rejects_bad_weights():
    with pytest.raises(QuantizationError, match="2-D"):
        formats.quantize(torch.randn(32), "q4f16_1")
    with pytest.raises(QuantizationError, match="floating"):
        formats.quantize(torch.ones(4, 32, dtype=torch.int32), "q4f16_1")
    with pytest.raises(QuantizationError, match="does not quantize"):
        formats.quantize(torch.randn(4, 32), "q0f16")
    codes, scales = formats.quantize(torch.randn(4, 64), "q4f16_1")
    with pytest.raises(QuantizationError, match="do not match"):
        formats.dequantize(codes, scales[:, :1], "q4f16_1")


def _reference_quantize(w: np.ndarray, bits: int, g: int, sdt):
    """Straightforward per-group loop, MLC's formula, with zero padding of the input dim."""
    off, qmax = 2 ** (bits - 1) - 1, 2 ** bits - 1
    rows, cols = w.shape
    kp = math.ceil(cols / g) * g
    wp = np.zeros((rows, kp), np.float32)
    wp[:, :cols] = w
    codes = np.zeros((rows, kp), np.uint8)
    scales = np.zeros((rows, kp // g), sdt)
    for r in range(rows):
        for j in range(kp // g):
            grp = wp[r, j * g:(j + 1) * g]
            s = sdt(np.float32(np.abs(grp).max()) / np.float32(off))
            scales[r, j] = s
            for i, x in enumerate(grp):
                q = 0.0 if s == 0 else np.round(np.float32(x) / np.float32(s))
                codes[r, j * g + i] = min(max(q + off, 0), qmax)
    return codes, scales


@pytest.mark.parametrize("name", QUANT_MODES)
@pytest.mark.parametrize("cols", [80, 100])  # 100: not divisible by 32 or 40 -> padding
def test_quantize_bit_exact_vs_reference(name, cols):
    mode = parse_mode(name)
    g = torch.Generator().manual_seed(cols)
    w = torch.randn(6, cols, generator=g) * 0.05
    w[0, :] = 0  # an all-zero row: scale 0, codes = offset
    sdt = {"float16": np.float16, "float32": np.float32}[mode.scale_dtype]
    ref_codes, ref_scales = _reference_quantize(w.numpy(), mode.bits, mode.group_size, sdt)
    codes, scales = formats.quantize(w, mode)
    assert np.array_equal(codes.numpy(), ref_codes)
    assert np.array_equal(scales.numpy(), ref_scales)
    assert (codes[0] == mode.offset).all()
    # dequantize == (q - offset) * scale exactly, padding dropped
    deq = formats.dequantize(codes, scales, mode, cols)
    ref = (ref_codes.astype(np.float32) - mode.offset) * np.repeat(ref_scales.astype(np.float32), mode.group_size, 1)
    assert deq.shape == (6, cols)
    assert np.array_equal(deq.numpy(), ref[:, :cols])
    # and it is a quantization: error within half a step per group
    step = torch.from_numpy(np.repeat(ref_scales.astype(np.float32), mode.group_size, 1))[:, :cols]
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()


def test_padding_is_zero_and_quantizes_to_offset():
    w = torch.randn(3, 50)  # q3f16_1 group 40: padded to 80
    codes, scales = formats.quantize(w, "q3f16_1")
    assert codes.shape == (3, 80) and scales.shape == (3, 2)
    assert (codes[:, 50:] == 3).all()


def test_pack_4bit_reference_and_roundtrip():
    c = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    p = formats.pack_4bit(c)
    ref = [[int(c[r, 2 * i]) | (int(c[r, 2 * i + 1]) << 4) for i in range(32)] for r in range(5)]
    assert p.tolist() == ref
    assert torch.equal(formats.unpack_4bit(p), c)
    with pytest.raises(QuantizationError):
        formats.pack_4bit(c[:, :63])


def test_pack_3bit_reference_and_roundtrip():
    c = torch.randint(0, 8, (4, 80), dtype=torch.uint8)
    p = formats.pack_3bit(c)
    assert p.dtype == torch.int32 and p.shape == (4, 8)
    ref = [[sum(int(c[r, 10 * i + j]) << (3 * j) for j in range(10)) for i in range(8)] for r in range(4)]
    assert p.tolist() == ref
    assert torch.equal(formats.unpack_3bit(p), c)
    with pytest.raises(QuantizationError):
        formats.pack_3bit(c[:, :75])
    with pytest.raises(QuantizationError):
        formats.pack(c, 5)


@pytest.mark.parametrize("mode", ["q4f16_1", "q3f16_1", "q8f16_1"])
def test_quantize_in_row_slices_is_identical(mode, monkeypatch):
    # big tables are quantized in slices of rows (bounded temporaries); the result must not change
    torch.manual_seed(3)
    w = torch.randn(37, 100)
    whole = formats.quantize(w, mode)
    monkeypatch.setattr(formats, "_CHUNK_ELEMENTS", 3 * 128)  # a few rows per slice, uneven last slice
    sliced = formats.quantize(w, mode)
    assert torch.equal(whole[0], sliced[0]) and torch.equal(whole[1], sliced[1])
