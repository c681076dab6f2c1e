"""Several rows in one fused step (FusedDecode.rows, DecodePlan.step_rows): a batch of independent sequences and a
run of draft tokens of one sequence each give, bit for bit, what single-token steps give; and the kernels' AVX-512
VNNI path equals their AVX2 path bit for bit (it is what makes several rows cheaper than one call each)."""
import pytest
import torch

from pocketvlm.engine.fused import FusedDecode
from pocketvlm.engine.generate import Slot
from pocketvlm.quant import cpu_kernel as ck
from pocketvlm.quant import quantize_model

import test_families

pytestmark = pytest.mark.usefixtures("kernel")   # conftest: fails (not skips) when a compiler is here

PROMPTS = [[5, 17, 99, 3, 250, 41, 7], [8, 1, 2], [300, 301, 12, 13, 14, 15, 16, 17, 9]]


def _model(kind, tmp_path, mode):
    _, model = test_families.tiny(kind, tmp_path)
    quantize_model(model, mode, embeddings=True)
    return model


def _slots(model, fused, n, kv_dtype=None):
    return [Slot(model, 64, prefill_chunk_size=4, dtype=kv_dtype, decode_step=fused) for _ in range(n)]


@pytest.mark.parametrize("kind,mode", [("qwen2", "q4f16_1"), ("gemma3", "q8f16_1"), ("mistral-sliding", "q4f16_1")])
def test_a_batch_of_sequences_equals_each_alone(kind, mode, tmp_path):
    model = _model(kind, tmp_path, mode)
    fused = FusedDecode(model)
    alone, batch = _slots(model, fused, 3), _slots(model, fused, 3)
    toks = []
    for a, b, p in zip(alone, batch, PROMPTS):
        la, lb = a.prefill(p, p), b.prefill(p, p)
        assert torch.equal(la, lb)
        toks.append(int(la.argmax()))
    for _ in range(6):  # past the sliding window (4); the three sequences sit at different positions
        want = [a.decode(t) for a, t in zip(alone, toks)]
        got = fused.rows(batch, toks, [len(b.keys) for b in batch])
        for b, t in zip(batch, toks):
            b.keys.append(t)
        for w, g in zip(want, got):
            assert torch.equal(w, g.float())
        toks = [int(w.argmax()) for w in want]
    for a, b in zip(alone, batch):
        for ka, kb in zip(a.cache.k, b.cache.k):
            assert torch.equal(ka, kb)


@pytest.mark.parametrize("kv_dtype", [None, torch.float32], ids=["kv-default", "kv-f32"])
def test_draft_tokens_of_one_sequence_equal_sequential_steps(kv_dtype, tmp_path):
    """Rows of one cache at consecutive positions: each attends to the ones before it (speculative verification)."""
    model = _model("qwen2", tmp_path, "q4f16_1")
    fused = FusedDecode(model)
    (seq, one), p = _slots(model, fused, 2, kv_dtype), PROMPTS[0]
    seq.prefill(p, p), one.prefill(p, p)
    drafts = [11, 250, 3, 3, 97]
    want = []
    for t in drafts:
        want.append(one.decode(t))
    got = fused.rows([seq] * len(drafts), drafts, list(range(len(p), len(p) + len(drafts))))
    for w, g in zip(want, got):
        assert torch.equal(w, g.float())
    n = len(p) + len(drafts)
    for ka, kb in zip(one.cache.k, seq.cache.k):
        assert torch.equal(ka[:, :, :n], kb[:, :, :n])


def test_rows_reject_two_writes_to_one_position(tmp_path):
    model = _model("qwen2", tmp_path, "q4f16_1")
    fused = FusedDecode(model)
    (s,) = _slots(model, fused, 1)
    s.prefill(PROMPTS[1], PROMPTS[1])
    with pytest.raises(RuntimeError, match="two rows write position"):
        fused.rows([s, s], [1, 2], [3, 3])
    with pytest.raises(RuntimeError, match="outside the KV cache"):
        fused.rows([s], [1], [64])


@pytest.mark.parametrize("n,k", [(64, 96), (8, 4864), (136, 896)])
@pytest.mark.parametrize("m", [1, 3, 4, 7])
@pytest.mark.parametrize("kind", ["q4-sym-f16", "q4-affine-f32", "q8-f16"])
def test_vnni_path_equals_avx2_path(kind, m, n, k):
    if not ck._ops.i8_vnni():
        pytest.skip("this CPU has no AVX-512 VNNI: the AVX2 path is the only one")
    g = torch.Generator().manual_seed(m * 131 + n)
    x = torch.randn(m, k, generator=g) * 3
    s = torch.rand(n, k // 32, generator=g) * 0.02
    if kind == "q8-f16":
        w = ck.pack_q8(torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int16), s, dtype=torch.float16)
        run = lambda impl: ck._ops.q8_linear(x, w.qweight, w.scales, w.biases, impl)  # noqa: E731
    else:
        codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
        if kind == "q4-sym-f16":
            w = ck.pack_q4(codes, s, offset=7.0, dtype=torch.float16)
        else:
            w = ck.pack_q4(codes, s, biases=torch.randn(n, k // 32, generator=g) * 0.01, dtype=torch.float32)
        assert w.packed.dim() == 3  # rows8, where the VNNI path runs
        run = lambda impl: ck._ops.q4_linear(x, w.packed, w.scales, w.biases, w.offset, True, impl)  # noqa: E731
    assert torch.equal(run(0), run(2))
    torch.testing.assert_close(run(0), run(1), rtol=1e-5, atol=1e-4)  # the portable loops: same sums, other order
