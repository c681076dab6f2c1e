"""The vision tower's fast paths (pocketvlm/quant/vision_fast.py): the int8 GEMM kernel (csrc/gemm_i8.cpp)
against its PyTorch twin, and whole CLIP / SigLIP towers at int8 and bf16 against fp32 and transformers.

Tolerances, and why: the int8 path's only errors are the per-channel weight and per-token activation roundings
(for Gaussian data max|x| ~ 3.3 sigma, so a rounding step of 3.3/127 sigma is an error of 0.75% of sigma each,
summed in exact int32): one layer's output is within ~1.1% (relative L2) of fp32 and a whole tower's features
within a few percent; bf16 keeps ~3 significant digits per op. The kernel itself
must equal the PyTorch formula up to float rounding of the epilogue (1e-5 of the output's scale), since both
round x identically."""
from __future__ import annotations

import pytest
import torch

from pocketvlm import loading
from pocketvlm.errors import QuantizationError
from pocketvlm.quant import cpu_kernel, vision_fast as vf

transformers = pytest.importorskip("transformers")

needs_kernel = pytest.mark.usefixtures("kernel")   # conftest: fails (not skips) when a compiler is here
SHAPES = [(1, 4, 1), (5, 7, 33), (13, 36, 40), (25, 100, 64), (577, 64, 96), (12, 4304, 48)]
ACTS = [None, "quick_gelu", "gelu_pytorch_tanh", "gelu"]


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@needs_kernel
@pytest.mark.parametrize("m, k, n", SHAPES)
@pytest.mark.parametrize("act", ACTS)
def test_kernel_equals_reference(m, k, n, act):
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    lin = vf.VisionInt8Linear(torch.randn(n, k, generator=g), torch.randn(n, generator=g))
    x = torch.randn(m, k, generator=g) * 3
    want = vf.int8_linear_reference(x, lin.qweight, lin.scale, lin.bias, act)
    got = lin(x, act)  # the VNNI kernel where the CPU has it, else the reference itself
    packed = torch.ops.pocketvlm.i8_pack(lin.qweight)
    code = vf._ACT_CODES.get(act, 0) if act else 0
    scalar = torch.ops.pocketvlm.i8_linear(x, packed, lin.scale, lin.bias, n, code, 1)
    if act and not code:
        scalar = vf._act(scalar, act)
    tol = 1e-5 * float(want.abs().max()) + 1e-6
    assert got.shape == want.shape == (m, n)
    torch.testing.assert_close(got, want, rtol=0, atol=tol)
    torch.testing.assert_close(scalar, want, rtol=0, atol=tol)


@needs_kernel
def test_kernel_edge_rows_and_no_bias():
    """A zero row (scale 0), a constant row, rows with one huge outlier; no bias; 3-d input."""
    g = torch.Generator().manual_seed(7)
    lin = vf.VisionInt8Linear(torch.randn(40, 20, generator=g), None)
    x = torch.randn(2, 4, 20, generator=g)
    x[0, 0] = 0
    x[0, 1] = 2.5
    x[1, 2, 3] = 1e4
    want = vf.int8_linear_reference(x.reshape(-1, 20), lin.qweight, lin.scale, None).reshape(2, 4, 40)
    got = lin(x)
    assert torch.all(got[0, 0] == 0)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))


def test_int8_linear_is_close_to_float():
    g = torch.Generator().manual_seed(3)
    w, b, x = torch.randn(256, 512, generator=g), torch.randn(256, generator=g), torch.randn(64, 512, generator=g)
    lin = vf.VisionInt8Linear(w, b)
    assert _rel(lin(x), torch.nn.functional.linear(x, w, b)) < 0.015  # 1.06% expected (see the docstring)


@needs_kernel
def test_kernel_rejects_bad_arguments():
    lin = vf.VisionInt8Linear(torch.randn(32, 16), None)
    lin(torch.randn(2, 16))
    with pytest.raises(RuntimeError, match="K = 20"):
        torch.ops.pocketvlm.i8_linear(torch.randn(2, 20), lin._packed, lin.scale, None, 32, 0, 0)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.pocketvlm.i8_linear(torch.randn(2, 16).double(), lin._packed, lin.scale, None, 32, 0, 0)
    with pytest.raises(RuntimeError, match="act"):
        torch.ops.pocketvlm.i8_linear(torch.randn(2, 16), lin._packed, lin.scale, None, 32, 5, 0)
    with pytest.raises(RuntimeError, match="int8"):
        torch.ops.pocketvlm.i8_pack(torch.randn(4, 4))


# --- whole towers: tiny random CLIP / SigLIP, and one at full CLIP-L width ---------------------------------

def _tower(tmp_path, kind, **cfg):
    torch.manual_seed(0)
    if kind == "clip":
        hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(hidden_act="quick_gelu", **cfg))
    else:
        hf = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**cfg))
    hf.eval().save_pretrained(tmp_path)
    return hf


def _fast(folder, precision):
    tower = loading.load(folder).model
    assert vf.apply_vision_precision(tower, precision) == precision
    return tower


TINY = dict(image_size=56, patch_size=14, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
            num_attention_heads=4)


@pytest.mark.parametrize("kind, layer", [("clip", -2), ("siglip", -1)])
@pytest.mark.parametrize("precision, tol", [("int8", 0.03), ("bf16", 0.02)])
def test_tiny_towers_stay_close_to_transformers(tmp_path, kind, layer, precision, tol):
    hf = _tower(tmp_path, kind, **TINY)
    px = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    fast = _fast(tmp_path, precision)
    with torch.inference_mode():
        want = hf(px, output_hidden_states=True).hidden_states[layer]
        got = fast(px, output_layer=layer)
    assert got.dtype == (torch.float32 if precision == "int8" else torch.bfloat16)
    assert _rel(got, want) < tol
    if precision == "int8":  # the swap reached every encoder matmul: q/k/v fused, activation in fc1
        layer0 = fast.vision_model.encoder.layers[0]
        assert isinstance(layer0.self_attn, vf.Int8Attention) and isinstance(layer0.mlp, vf.Int8MLP)
        assert layer0.self_attn.qkv_proj.qweight.shape == (3 * 64, 64)


@pytest.mark.slow
def test_full_width_clip_int8(tmp_path):
    """CLIP ViT-L/14-336 widths (1024 / 4096, 577 tokens) with 4 of its 24 layers: the real kernel shapes."""
    hf = _tower(tmp_path, "clip", image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                num_hidden_layers=4, num_attention_heads=16)
    px = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(2))
    fast = _fast(tmp_path, "int8")
    with torch.inference_mode():
        want = hf(px, output_hidden_states=True).hidden_states[-2]
        got = fast(px, output_layer=-2)
    assert got.shape == (1, 577, 1024)
    assert _rel(got, want) < 0.02


def test_auto_and_unknown_precision():
    cpu = torch.device("cpu")
    want = "int8" if vf.vnni_available() else ("bf16" if vf.cpu_has_native_bf16() else "fp32")
    assert vf.resolve_precision("auto", cpu) == want
    assert vf.resolve_precision("auto", torch.device("cuda")) == "bf16"
    with pytest.raises(QuantizationError, match="int8"):
        vf.resolve_precision("int4", cpu)


def needs_bf16_attention(fn):
    skip = pytest.mark.skipif(not (cpu_kernel.available() and vf.bf16_attention_available()),
                              reason="no AVX-512 BF16 here")
    return needs_kernel(skip(fn))


@needs_bf16_attention
@pytest.mark.parametrize("b, s, h, d", [(1, 5, 2, 8), (2, 37, 3, 64), (1, 100, 4, 72), (3, 50, 2, 128), (1, 33, 1, 2)])
def test_bf16_attention_kernel(b, s, h, d):
    """Equal to its PyTorch twin up to the exp approximation's rounding, and within bf16's error of fp32 SDPA."""
    qkv = torch.randn(b * s, 3 * h * d, generator=torch.Generator().manual_seed(s + d)) * 2
    got = torch.ops.pocketvlm.attention_bf16(qkv, b, h)
    torch.testing.assert_close(got, vf.attention_bf16_reference(qkv, b, h), rtol=0, atol=2e-3)
    q, k, v = qkv.view(b, s, 3, h, d).permute(2, 0, 3, 1, 4)
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b * s, h * d)
    assert _rel(got, exact) < 0.02


@needs_bf16_attention
def test_bf16_attention_rejects_bad_shapes():
    with pytest.raises(RuntimeError, match="head dim"):
        torch.ops.pocketvlm.attention_bf16(torch.randn(4, 3 * 2 * 3), 1, 2)
    with pytest.raises(RuntimeError, match="does not split"):
        torch.ops.pocketvlm.attention_bf16(torch.randn(5, 24), 2, 2)
