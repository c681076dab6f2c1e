"""pocketvlm.quant.cpu_kernel: the C++ int4 GEMV against a plain fp32 reference (dequantize, x @ W.T)."""
import pytest
import torch

from pocketvlm.errors import QuantizationError
from pocketvlm.quant import cpu_kernel as ck

SHAPES = [  # (N, K, M): N not a multiple of the 4-row unroll, odd and even group counts, M = 1 and 3
    (1, 32, 1), (5, 32, 3), (13, 96, 1), (7, 160, 3), (130, 896, 1), (67, 896, 3), (9, 4864, 1), (6, 4864, 3),
]
FORMS = ["mlc_sym7_f16", "q4_0_sym8_f32", "affine_f16"]
LAYOUTS = ["rows", "rows8", "q5"]  # rows8 and q5 (5-bit rows8) tests round N up to a multiple of 8
# every weight form in every layout, except affine 5-bit: GGUF Q5_0's form has no affine variant
LAYOUT_FORMS = [(layout, form) for layout in LAYOUTS for form in FORMS if (layout, form) != ("q5", "affine_f16")]


def rows_for(n, layout):
    return -(-n // 8) * 8 if layout in ("rows8", "q5") else n


pytestmark = pytest.mark.usefixtures("kernel")   # conftest: fails (not skips) when a compiler is here


def make(n, k, form, seed=0, layout="auto"):
    g = torch.Generator().manual_seed(seed)
    if layout == "q5":  # GGUF Q5_0's form: (q - 16) * s, q in 0..31, symmetric only
        assert form != "affine_f16", "the 5-bit layout has no affine form"
        codes = torch.randint(0, 32, (n, k), generator=g, dtype=torch.uint8)
        s = torch.rand(n, k // 32, generator=g) * 0.05 + 0.001
        return ck.pack_q5(codes, s, dtype=torch.float32 if form == "q4_0_sym8_f32" else torch.float16)
    codes = torch.randint(0, 16 if form == "affine_f16" else 15, (n, k), generator=g, dtype=torch.uint8)
    s = torch.rand(n, k // 32, generator=g) * 0.05 + 0.001
    if form == "mlc_sym7_f16":
        return ck.pack_q4(codes, s, offset=7, layout=layout)
    if form == "q4_0_sym8_f32":
        return ck.pack_q4(codes, s, offset=8, dtype=torch.float32, layout=layout)
    return ck.pack_q4(codes, s, biases=-8 * s + torch.randn(n, k // 32, generator=g) * 0.01, layout=layout)


def dequantized(w):
    """The exact float weight of a kernel weight, 4/5-bit or 8-bit."""
    return ck.dequantize_q8_reference(w) if isinstance(w, ck.Q8Weight) else ck.dequantize_reference(w)


def ref_fp32(x, w):
    return (x.double() @ dequantized(w).double().t()).float()


def ref_int8(x, w):
    """What the int8 path computes: x rounded per 32-block to int8 steps of max|x|/127."""
    xg = x.view(x.shape[0], -1, 32)
    d = xg.abs().amax(-1, keepdim=True) / 127
    xq = torch.where(d > 0, torch.round(xg / torch.where(d > 0, d, 1)), 0) * d
    return ref_fp32(xq.view_as(x), w)


def rel_err(y, ref):
    return ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("n,k,m", SHAPES)
@pytest.mark.parametrize("scalar", [False, True], ids=["simd", "scalar"])
@pytest.mark.parametrize("layout,form", LAYOUT_FORMS)
def test_fp32_path_matches_reference(n, k, m, form, scalar, layout):
    n = rows_for(n, layout)
    w = make(n, k, form, layout=layout)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
    y = ck.q4_linear(x, w, act="fp32", scalar=scalar)
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert rel_err(y, ref_fp32(x, w)) < 1e-4


@pytest.mark.parametrize("n,k,m", SHAPES)
@pytest.mark.parametrize("scalar", [False, True], ids=["simd", "scalar"])
@pytest.mark.parametrize("layout,form", LAYOUT_FORMS)
def test_int8_path_matches_quantized_reference(n, k, m, form, scalar, layout):
    n = rows_for(n, layout)
    w = make(n, k, form, layout=layout)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(2))
    y = ck.q4_linear(x, w, act="int8", scalar=scalar)
    assert rel_err(y, ref_int8(x, w)) < 1e-4  # exactly the activation-quantized product
    # stated tolerance vs the unquantized product: rounding x moves each element by <= dx/2
    d = x.view(m, -1, 32).abs().amax(-1) / 127  # [M, G]
    wabs = ck.dequantize_reference(w).abs().view(n, -1, 32).sum(-1)  # [N, G]
    bound = 0.5 * d @ wabs.t()  # [M, N]
    assert ((y - ref_fp32(x, w)).abs() <= bound * 1.001 + 1e-6).all()


def test_int8_activation_error_is_small_on_average():
    w = make(896, 896, "mlc_sym7_f16")
    x = torch.randn(4, 896, generator=torch.Generator().manual_seed(3))
    y, ref = ck.q4_linear(x, w, act="int8"), ref_fp32(x, w)
    assert ((y - ref).norm() / ref.norm()).item() < 1e-2


def test_leading_dims_and_zero_input():
    w = make(11, 64, "affine_f16")
    x = torch.randn(2, 3, 64)
    y = ck.q4_linear(x, w, act="fp32")
    assert y.shape == (2, 3, 11)
    assert rel_err(y.view(6, 11), ref_fp32(x.view(6, 64), w)) < 1e-4
    z = ck.q4_linear(torch.zeros(1, 64), w, act="int8")  # all-zero blocks: dx = 0 must not give NaN
    assert torch.equal(z, torch.zeros(1, 11))


def at_1_and_2_threads(fn):
    """``fn()`` run with 1 and with 2 intra-op threads (the thread count restored after)."""
    old = torch.get_num_threads()
    try:
        out = []
        for n in (1, 2):
            torch.set_num_threads(n)
            out.append(fn())
        return out
    finally:
        torch.set_num_threads(old)


def test_threads_do_not_change_result():
    w = make(1000, 896, "mlc_sym7_f16")
    x = torch.randn(1, 896)
    y1, y2 = at_1_and_2_threads(lambda: ck.q4_linear(x, w))
    assert torch.equal(y1, y2)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("n", [37, 40])  # rows (auto for N % 8 != 0), rows8
def test_dequantize_matches_reference_and_roundtrip(form, n):
    w = make(n, 4864, form)
    assert w.packed.dim() == (3 if n % 8 == 0 else 2)
    assert torch.equal(ck.dequantize_q4(w), ck.dequantize_reference(w))
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 16, (n, 4864), generator=g, dtype=torch.uint8)
    packed = ck.pack_q4(codes, torch.ones(n, 152)).packed
    assert torch.equal(ck.unpack_q4(packed), codes)
    rows = torch.tensor([n - 1, 0, 9, 9, 30])
    assert torch.equal(ck.unpack_q4_rows(packed, rows), codes[rows])


@pytest.mark.parametrize("form", FORMS)
def test_layouts_agree(form):
    """The same weight packed both ways: identical dequantized values, the same products up to float
    summation order (the integer group sums are exact in both)."""
    a, b = make(64, 896, form, layout="rows"), make(64, 896, form, layout="rows8")
    assert torch.equal(ck.dequantize_reference(a), ck.dequantize_reference(b))
    assert torch.equal(ck.rows_major(b.scales), a.scales)
    x = torch.randn(3, 896, generator=torch.Generator().manual_seed(6))
    for act in ("int8", "fp32"):
        assert rel_err(ck.q4_linear(x, b, act=act), ck.q4_linear(x, a, act=act)) < 1e-5


def test_rows8_layout_is_documented_one():
    k = torch.arange(32).view(1, 32)
    r = torch.arange(8).view(8, 1)
    codes = ((k + r) % 16).to(torch.uint8)  # q[r, k] = (k + r) % 16
    w = ck.pack_q4(codes, torch.arange(1, 9, dtype=torch.float32).view(8, 1), layout="rows8")
    assert w.packed.shape == (1, 1, 128) and w.scales.shape == (1, 1, 8)
    p = w.packed[0, 0]
    for c in range(4):
        for row in range(8):
            for j in range(4):
                byte = int(p[32 * c + 4 * row + j])
                assert byte & 15 == (8 * c + j + row) % 16 and byte >> 4 == (8 * c + 4 + j + row) % 16
    assert w.scales[0, 0].tolist() == list(range(1, 9))
    with pytest.raises(QuantizationError, match="N % 8"):
        ck.pack_q4(codes[:7], torch.ones(7, 1), layout="rows8")
    with pytest.raises(QuantizationError, match="layout"):
        ck.pack_q4(codes, torch.ones(8, 1), layout="cols")


def test_q5_layout_is_documented_one():
    k = torch.arange(32).view(1, 32)
    r = torch.arange(8).view(8, 1)
    codes = ((3 * k + r) % 32).to(torch.uint8)  # q[r, k] = (3k + r) % 32
    w = ck.pack_q5(codes, torch.arange(1, 9, dtype=torch.float32).view(8, 1))
    assert w.packed.shape == (1, 1, 160) and w.scales.shape == (1, 1, 8) and w.offset == 16.0 and w.biases is None
    p = w.packed[0, 0]
    for row in range(8):
        for i in range(32):
            c, t, j = i // 8, (i % 8) // 4, i % 4
            nib = int(p[32 * c + 4 * row + j]) >> (4 * t) & 15
            high = int(p[128 + 4 * row + j]) >> (i // 4) & 1
            assert nib | high << 4 == (3 * i + row) % 32
    assert torch.equal(ck.unpack_q4(w.packed), codes)
    rows = torch.tensor([7, 0, 3, 3])
    assert torch.equal(ck.unpack_q4_rows(w.packed, rows), codes[rows])


@pytest.mark.parametrize("bad", ["n", "range", "float_codes", "scale_shape"])
def test_pack_q5_rejects_bad_input(bad):
    codes, s = torch.zeros(8, 64, dtype=torch.uint8), torch.ones(8, 2)
    if bad == "n":
        codes, s = codes[:7], s[:7]
    elif bad == "range":
        codes[0, 0] = 32
    elif bad == "float_codes":
        codes = codes.float()
    else:
        s = s[:, :1]
    with pytest.raises(QuantizationError):
        ck.pack_q5(codes, s)


@pytest.mark.parametrize("scalar", [False, True], ids=["simd", "scalar"])
def test_q5_extremes_do_not_saturate(scalar):
    """Codes 31 against +-127 activations in every chunk: the int16 partial sums must not overflow."""
    w = ck.pack_q5(torch.full((8, 64), 31, dtype=torch.uint8), torch.ones(8, 2), offset=0.0, dtype=torch.float32)
    for v in (1.0, -1.0):
        y = ck.q4_linear(torch.full((1, 64), v), w, act="int8", scalar=scalar)
        assert torch.allclose(y, torch.full((1, 8), 31.0 * 64 * v))


def test_q5_dequantize_op_is_exact():
    for form in ("mlc_sym7_f16", "q4_0_sym8_f32"):
        w = make(24, 4864, form, layout="q5")
        assert torch.equal(ck.dequantize_q4(w), ck.dequantize_reference(w))


def test_pack_layout_is_documented_one():
    codes = torch.arange(32, dtype=torch.uint8).remainder(16).view(1, 32)  # q[j] = j % 16
    p = ck.pack_q4(codes, torch.ones(1, 1), layout="rows").packed
    assert p.shape == (1, 16)
    assert [int(b) & 15 for b in p[0]] == list(range(16))  # low nibble: q[j]
    assert [int(b) >> 4 for b in p[0]] == list(range(16))  # high nibble: q[j + 16]


def test_mlc_form_equals_its_definition():
    codes = torch.tensor([[0, 7, 14] + [7] * 29], dtype=torch.uint8)
    w = ck.pack_q4(codes, torch.tensor([[0.5]]), offset=7)
    assert ck.dequantize_q4(w)[0, :3].tolist() == [-3.5, 0.0, 3.5]


@pytest.mark.parametrize("bad", ["k", "range", "float_codes", "scale_shape", "bias_shape", "dtype", "overflow"])
def test_pack_rejects_bad_input(bad):
    codes, s = torch.zeros(4, 64, dtype=torch.uint8), torch.ones(4, 2)
    kw = {}
    if bad == "k":
        codes, s = torch.zeros(4, 48, dtype=torch.uint8), torch.ones(4, 2)
    elif bad == "range":
        codes = codes.clone(); codes[0, 0] = 16
    elif bad == "float_codes":
        codes = codes.float()
    elif bad == "scale_shape":
        s = torch.ones(4, 3)
    elif bad == "bias_shape":
        kw["biases"] = torch.ones(2, 2)
    elif bad == "dtype":
        kw["dtype"] = torch.bfloat16
    elif bad == "overflow":
        s = torch.full((4, 2), 1e6)  # not representable in float16
    with pytest.raises(QuantizationError):
        ck.pack_q4(codes, s, **kw)


def test_linear_rejects_bad_input():
    w = make(4, 64, "mlc_sym7_f16")
    with pytest.raises(QuantizationError, match="pad x"):
        ck.q4_linear(torch.randn(1, 63), w)
    with pytest.raises(QuantizationError, match="act"):
        ck.q4_linear(torch.randn(1, 64), w, act="int4")


def test_build_failure_falls_back(monkeypatch):
    w = make(10, 96, "affine_f16")
    x = torch.randn(2, 96)

    def boom():
        raise RuntimeError("no compiler")

    monkeypatch.setitem(ck._state, "tried", False)
    monkeypatch.setitem(ck._state, "ok", False)
    monkeypatch.setattr(ck, "_build", boom)
    with pytest.warns(RuntimeWarning, match="unavailable"):
        assert ck.available() is False
    assert ck.available() is False  # warns once, then stays off
    assert not ck.simd()
    assert rel_err(ck.q4_linear(x, w, act="int8"), ref_fp32(x, w)) < 1e-5  # fallback is the exact product
    assert torch.equal(ck.dequantize_q4(w), ck.dequantize_reference(w))


def test_build_without_compiler_reports_cleanly(monkeypatch):
    monkeypatch.setenv("CXX", "definitely-not-a-compiler-xyz")
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        ck._build()


def test_ops_pass_opcheck_for_torch_compile():
    """Fake-tensor (Meta) kernels and schemas are consistent, so torch.compile can trace the ops."""
    w = make(12, 64, "affine_f16")
    x = torch.randn(3, 64)
    torch.library.opcheck(torch.ops.pocketvlm.q4_linear.default, (x, w.packed, w.scales, w.biases, 7.0, True, 0))
    torch.library.opcheck(torch.ops.pocketvlm.q4_dequantize.default, (w.packed, w.scales, None, 7.0))
    w8 = make(16, 64, "affine_f16")  # rows8
    torch.library.opcheck(torch.ops.pocketvlm.q4_linear.default, (x, w8.packed, w8.scales, w8.biases, 7.0, True, 0))
    torch.library.opcheck(torch.ops.pocketvlm.q4_dequantize.default, (w8.packed, w8.scales, None, 7.0))
    w5 = make(16, 64, "mlc_sym7_f16", layout="q5")
    torch.library.opcheck(torch.ops.pocketvlm.q4_linear.default, (x, w5.packed, w5.scales, None, 16.0, True, 0))
    torch.library.opcheck(torch.ops.pocketvlm.q4_dequantize.default, (w5.packed, w5.scales, None, 16.0))


# ----- int8 weights -------------------------------------------------------------------------------
Q8_SHAPES = [(1, 32, 1), (5, 96, 3), (13, 256, 1), (7, 288, 3), (130, 896, 1), (6, 4864, 3)]  # G % 8 = 1,3,0,1,4,0


def make_q8(n, k, affine, seed=0, layout="auto"):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int16)
    s = torch.rand(n, k // 32, generator=g) * 0.01 + 0.001
    b = torch.randn(n, k // 32, generator=g) * 0.01 if affine else None
    return ck.pack_q8(codes, s, biases=b, layout=layout)


@pytest.mark.parametrize("affine", [False, True], ids=["sym", "affine"])
@pytest.mark.parametrize("n,k,m", Q8_SHAPES)
@pytest.mark.parametrize("scalar", [False, True], ids=["simd", "scalar"])
@pytest.mark.parametrize("layout", ["rows", "rows8"])
def test_q8_matches_quantized_reference(n, k, m, affine, scalar, layout):
    n = rows_for(n, layout)
    w = make_q8(n, k, affine, layout=layout)
    assert w.qweight.dim() == (3 if layout == "rows8" else 2)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(4))
    y = ck.q8_linear(x, w, scalar=scalar)
    assert y.shape == (m, n)
    wf = ck.dequantize_q8_reference(w).double()
    xg = x.view(m, -1, 32)
    d = xg.abs().amax(-1, keepdim=True) / 127
    xq = (torch.round(xg / d) * d).view(m, k)
    ref_q = (xq.double() @ wf.t()).float()
    assert rel_err(y, ref_q) < 1e-4
    bound = 0.5 * d.squeeze(-1).double() @ wf.abs().view(n, -1, 32).sum(-1).t()
    assert ((y.double() - x.double() @ wf.t()).abs() <= bound * 1.001 + 1e-6).all()


@pytest.mark.parametrize("n", [4, 8], ids=["rows", "rows8"])
def test_q8_extremes_do_not_saturate(n):
    """-128 weights against +-127 activations: the |w| x sign trick must not overflow int16."""
    codes = torch.full((n, 64), -128, dtype=torch.int16)
    w = ck.pack_q8(codes, torch.ones(n, 2), dtype=torch.float32)  # also covers float32 scales
    x = torch.full((1, 64), -1.0)
    assert torch.allclose(ck.q8_linear(x, w), torch.full((1, n), 128.0 * 64))


def test_q8_rows8_layout_is_documented_one():
    k = torch.arange(64).view(1, 64)
    r = torch.arange(16).view(16, 1)
    codes = (k + 3 * r - 100).to(torch.int8)  # q[r, k] = k + 3r - 100
    w = ck.pack_q8(codes, torch.arange(1, 33, dtype=torch.float32).view(16, 2), layout="rows8")
    assert w.qweight.shape == (2, 2, 256) and w.scales.shape == (2, 2, 8)
    for b in range(2):
        for g in range(2):
            for c in range(8):
                for row in range(8):
                    for j in range(4):
                        assert int(w.qweight[b, g, 32 * c + 4 * row + j]) == 32 * g + 4 * c + j + 3 * (8 * b + row) - 100
    assert w.scales[1, 0].tolist() == [float(2 * (8 + row) + 1) for row in range(8)]
    assert torch.equal(ck.unpack_q8(w.qweight), codes)
    rows = torch.tensor([15, 0, 9, 9])
    assert torch.equal(ck.unpack_q8(w.qweight, rows), codes[rows])
    with pytest.raises(QuantizationError, match="N % 8"):
        ck.pack_q8(codes[:7], torch.ones(7, 2), layout="rows8")
    with pytest.raises(QuantizationError, match="layout"):
        ck.pack_q8(codes, torch.ones(16, 2), layout="cols")


def test_q8_rejects_bad_input():
    with pytest.raises(QuantizationError):
        ck.pack_q8(torch.zeros(2, 48, dtype=torch.int8), torch.ones(2, 1))
    with pytest.raises(QuantizationError):
        ck.pack_q8(torch.full((2, 32), 200, dtype=torch.int16), torch.ones(2, 1))
    with pytest.raises(QuantizationError):
        ck.pack_q8(torch.zeros(2, 32, dtype=torch.int8), torch.ones(2, 2))
    w = ck.pack_q8(torch.zeros(2, 32, dtype=torch.int8), torch.ones(2, 1))
    with pytest.raises(QuantizationError, match="pad x"):
        ck.q8_linear(torch.randn(1, 31), w)


def test_q8_fallback_without_kernel(monkeypatch):
    w = make_q8(9, 96, True)
    x = torch.randn(2, 96)
    monkeypatch.setitem(ck._state, "tried", True)
    monkeypatch.setitem(ck._state, "ok", False)
    assert rel_err(ck.q8_linear(x, w), (x.double() @ ck.dequantize_q8_reference(w).double().t()).float()) < 1e-5
    assert torch.equal(ck.dequantize_q8(w), ck.dequantize_q8_reference(w))  # the fallback dequantizes too


@pytest.mark.parametrize("affine", [False, True], ids=["sym", "affine"])
@pytest.mark.parametrize("half", [True, False], ids=["f16", "f32"])
def test_q8_dequantize_op_matches_pytorch(affine, half):
    """The dense (prefill) path's one-pass dequantize: q * s (+ b) rounded once. With float16 scales the
    product is exact in float32, so it is PyTorch's result bit for bit; with float32 scales it is the
    exactly rounded value, never further from it than PyTorch's twice-rounded one."""
    g = torch.Generator().manual_seed(7)
    codes = torch.randint(-128, 128, (40, 96), generator=g, dtype=torch.int16)
    s = torch.rand(40, 3, generator=g) * 0.03
    b = torch.randn(40, 3, generator=g) * 0.01 if affine else None
    w = ck.pack_q8(codes, s, biases=b, dtype=torch.float16 if half else torch.float32)
    got = torch.ops.pocketvlm.q8_dequantize(w.qweight, w.scales, w.biases)
    ref = ck.dequantize_q8_reference(w)
    if half or not affine:
        assert torch.equal(got, ref)
    assert w.qweight.dim() == 3  # N = 40: the rows8 layout
    exact = ck.unpack_q8(w.qweight).double().view(40, 3, 32) * ck.rows_major(w.scales).double().unsqueeze(-1)
    if affine:
        exact = exact + ck.rows_major(w.biases).double().unsqueeze(-1)
    exact = exact.view(40, 96)
    assert torch.equal(got, exact.float())  # correctly rounded
    assert ((got.double() - exact).abs() <= (ref.double() - exact).abs()).all()


@pytest.mark.parametrize("n", [12, 16], ids=["rows", "rows8"])
def test_q8_opcheck(n):
    w = make_q8(n, 288, True)
    torch.library.opcheck(torch.ops.pocketvlm.q8_linear.default, (torch.randn(2, 288), w.qweight, w.scales,
                                                                      w.biases, 0))
    torch.library.opcheck(torch.ops.pocketvlm.q8_dequantize.default, (w.qweight, w.scales, w.biases))
