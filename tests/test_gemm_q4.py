"""The int8 prefill GEMM of 4-bit rows8 weights (csrc/gemm_q4.cpp) against the activation-quantized reference, and
the QuantLinear path that uses it for long inputs."""
import pytest
import torch

from pocketvlm.errors import QuantizationError
from pocketvlm.quant import cpu_kernel as ck
from pocketvlm.quant import linear as ql
from pocketvlm.quant import paths

from test_cpu_kernel import FORMS, at_1_and_2_threads, dequantized, make, make_q8, ref_int8, rel_err

pytestmark = pytest.mark.usefixtures("kernel")   # conftest: fails (not skips) when a compiler is here

# (N, K, M): panel tails (N % 32 = 8, 16, 24, 0), one and several groups, M around the 6-row micro-kernel
SHAPES = [(8, 32, 1), (24, 96, 5), (40, 160, 6), (72, 64, 7), (32, 896, 13), (136, 4864, 3), (256, 896, 70)]


KINDS = [*FORMS, "q5", "q8_sym", "q8_affine"]  # 4-bit forms (MLC, Q4_0, affine), GGUF Q5_0's 5-bit, 8-bit


def make_kind(n, k, kind):
    if kind.startswith("q8"):
        return make_q8(n, k, kind == "q8_affine", layout="rows8")
    return make(n, k, "mlc_sym7_f16" if kind == "q5" else kind, layout="q5" if kind == "q5" else "rows8")


@pytest.mark.parametrize("n,k,m", SHAPES)
@pytest.mark.parametrize("scalar", [False, True], ids=["simd", "scalar"])
@pytest.mark.parametrize("kind", KINDS)
def test_gemm_matches_activation_quantized_reference(n, k, m, kind, scalar):
    w = make_kind(n, k, kind)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(2))
    x[:, 5] *= 30  # an outlier channel: its group gets a coarser step, the others do not
    y = ck.q4_gemm(x, w, scalar=scalar)
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert rel_err(y, ref_int8(x, w)) < 1e-4  # exactly the activation-quantized product
    # decode's int8 path computes the same thing, so a prompt reads the same whichever path runs it
    own = ck.q8_linear(x, w, scalar=True) if isinstance(w, ck.Q8Weight) else ck.q4_linear(x, w, act="int8", scalar=True)
    assert rel_err(y, own) < 1e-5
    wf = dequantized(w).double()
    d = x.view(m, -1, 32).abs().amax(-1).double() / 127
    bound = 0.5 * d @ wf.abs().view(n, -1, 32).sum(-1).t()  # stated tolerance vs exact
    assert ((y.double() - x.double() @ wf.t()).abs() <= bound * 1.001 + 1e-6).all()


def test_gemm_zero_input_and_threads():
    w = make(64, 896, "mlc_sym7_f16", layout="rows8")
    assert torch.equal(ck.q4_gemm(torch.zeros(9, 896), w), torch.zeros(9, 64))  # dx = 0: no NaN
    x = torch.randn(50, 896, generator=torch.Generator().manual_seed(4))
    y1, y2 = at_1_and_2_threads(lambda: ck.q4_gemm(x, w))
    assert torch.equal(y1, y2)  # each output element is summed in one fixed order


def test_gemm_rejects_bad_input():
    w = make(16, 64, "mlc_sym7_f16", layout="rows8")
    with pytest.raises(QuantizationError, match="must be"):
        ck.q4_gemm(torch.randn(3, 32), w)
    with pytest.raises(RuntimeError, match="rows8"):
        ck.q4_gemm(torch.randn(3, 64), make(16, 64, "mlc_sym7_f16", layout="rows"))
    with pytest.raises(RuntimeError, match="rows8"):
        ck.q4_gemm(torch.randn(3, 64), make_q8(16, 64, False, layout="rows"))
    with pytest.raises(RuntimeError, match="integer offset"):
        ck.q4_gemm(torch.randn(3, 64), w._replace(offset=7.5))


def test_gemm_passes_opcheck_for_torch_compile():
    w = make(16, 64, "affine_f16", layout="rows8")
    x = torch.randn(3, 64)
    torch.library.opcheck(torch.ops.pocketvlm.q4_gemm.default, (x, w.packed, w.scales, w.biases, 0.0, 0))


@pytest.mark.parametrize("affine", [False, True], ids=["mlc", "gguf-affine"])
def test_quant_linear_long_inputs_take_the_int8_gemm(monkeypatch, affine):
    lin = torch.nn.Linear(896, 136, bias=True)
    torch.manual_seed(0)
    q = ql.Int4Linear(896, 136, bias=True, affine=affine)
    g = 896 // 32
    q.qweight.copy_(torch.randint(0, 256, q.qweight.shape, dtype=torch.uint8))
    q.scales.copy_(torch.rand(136, g) * 0.02 + 0.001)
    if affine:
        q.zeros.copy_(torch.randn(136, g) * 0.01)
    q.bias.data.copy_(lin.bias.data)
    x = torch.randn(2, 40, 896)  # 80 rows: past the own kernel's row limit
    monkeypatch.setattr(paths, "PREFILL_INT8_ROWS", (0, 0))
    q.dense_dtype = torch.float32
    dense = q(x)
    monkeypatch.setattr(paths, "PREFILL_INT8_ROWS", (16, 1 << 62))
    calls = []
    real = ck.q4_gemm
    monkeypatch.setattr(ck, "q4_gemm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    y = q(x)
    assert calls and y.shape == (2, 40, 136)
    ref = ref_int8(x.view(80, 896), q._own).view(2, 40, 136) + q.bias.detach()
    assert rel_err(y.view(80, -1), ref.view(80, -1)) < 1e-4
    assert ((y - dense).norm() / dense.norm()).item() < 1e-2  # activation rounding only


def test_rows_take_the_same_path_on_every_call(monkeypatch):
    """A layer's first call (kernel weights not yet prepared) and later ones (the decode fast path) must pick the
    same code for the same row count: a package loaded lazily equals the in-memory model bit for bit."""
    monkeypatch.setattr(paths, "PREFILL_INT8_ROWS", (16, 1 << 62))
    q = ql.quant_linear_from_float(torch.nn.Linear(96, 40), "q4f16_1")
    x = torch.randn(30, 96, generator=torch.Generator().manual_seed(5))
    first, second = q(x), q(x)
    assert torch.equal(first, second)
    assert torch.equal(first, ck.q4_gemm(x, q._own) + q.bias.detach())


@pytest.mark.parametrize("mode", ["q8f16_1", "q4f16_1"])
def test_quant_linear_8bit_and_4bit_layers_share_the_gemm(monkeypatch, mode):
    monkeypatch.setattr(paths, "PREFILL_INT8_ROWS", (16, 1 << 62))
    q = ql.quant_linear_from_float(torch.nn.Linear(128, 48), mode)
    x = torch.randn(20, 128, generator=torch.Generator().manual_seed(6))
    calls = []
    real = ck.q4_gemm
    monkeypatch.setattr(ck, "q4_gemm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    y = q(x)
    assert calls and torch.equal(y, real(x, q._own) + q.bias.detach())
    monkeypatch.setattr(paths, "PREFILL_INT8_ROWS", (0, 0))
    assert ((y - q(x)).norm() / y.norm()).item() < 1e-2  # the own kernel / dense path: activation rounding apart
