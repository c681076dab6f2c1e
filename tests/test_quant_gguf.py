"""GGUF block dequantization vs gguf-py's numpy reference, on random blocks and the real files."""
import warnings

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from pocketvlm.errors import CorruptWeightsError, QuantizationError
from pocketvlm.quant import gguf_blocks
from pocketvlm.quant.apply import GGUF_INT5, build_quantized, gguf_embedding, gguf_linear
from pocketvlm.quant.gguf_blocks import BLOCKS, dequantize_gguf, torch_shape
from pocketvlm.quant.embedding import QuantEmbedding
from pocketvlm.quant.linear import Int4Linear, Int5Linear, Int8Linear

QUANT_TYPES = [t for t, (bs, _) in BLOCKS.items() if bs > 1]


def _random_blocks(t, rows, blocks_per_row, seed):
    """Random bytes with sane fp16 fields (random fp16 bytes would include inf/nan)."""
    rng = np.random.default_rng(seed)
    bs, nbytes = BLOCKS[t]
    raw = rng.integers(0, 256, size=(rows * blocks_per_row, nbytes), dtype=np.uint8)
    f16 = lambda n: rng.uniform(-0.1, 0.1, size=(raw.shape[0], n)).astype(np.float16).view(np.uint8)
    fields = {  # byte offsets of fp16 fields per type
        T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
        T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
    }[t]
    for off in fields:
        raw[:, off:off + 2] = f16(1)
    return raw.reshape(rows, blocks_per_row * nbytes), (rows, blocks_per_row * bs)


@pytest.mark.parametrize("t", QUANT_TYPES, ids=lambda t: t.name)
def test_random_blocks_equal_gguf_quants(t):
    raw, shape = _random_blocks(t, 5, 3, seed=int(t))
    ref = gguf.quants.dequantize(raw, t)
    got = dequantize_gguf(raw, t, shape)
    assert got.shape == shape == ref.shape
    assert np.array_equal(got.numpy(), ref)


@pytest.mark.parametrize("t", [T.F32, T.F16, T.BF16], ids=lambda t: t.name)
def test_float_pass_through(t):
    x = torch.randn(3, 8)
    arr = {T.F32: x.numpy(), T.F16: x.half().numpy(), T.BF16: x.bfloat16().view(torch.int16).numpy()}[t]
    got = dequantize_gguf(arr, t, (3, 8))
    ref = {T.F32: x, T.F16: x.half().float(), T.BF16: x.bfloat16().float()}[t]
    assert torch.equal(got, ref)


def test_bad_gguf_inputs():
    raw, shape = _random_blocks(T.Q4_0, 2, 2, seed=1)
    with pytest.raises(CorruptWeightsError, match="bytes"):
        dequantize_gguf(raw[:, :-1], T.Q4_0, shape)
    with pytest.raises(CorruptWeightsError, match="block size"):
        dequantize_gguf(raw, T.Q4_0, (2, 63))
    with pytest.raises(QuantizationError, match="not supported"):
        dequantize_gguf(raw, T.IQ2_XXS, shape)
    with pytest.raises(QuantizationError, match="2-D"):
        gguf_linear(raw.reshape(-1), T.Q4_0, (128,))
    with pytest.raises(QuantizationError, match="bias"):
        gguf_linear(raw, T.Q4_0, (64, 2), bias=torch.zeros(3))


def test_torch_shape_reverses_gguf_dims():
    assert torch_shape([896, 4864]) == (4864, 896)


@pytest.mark.parametrize("t", [T.Q4_0, T.Q4_1, T.Q4_K], ids=lambda t: t.name)
def test_int4_codes_reproduce_dequant(t):
    raw, shape = _random_blocks(t, 16, 2, seed=7)
    codes, scale, zero = gguf_blocks.int4_codes(raw, t, shape)
    w = (codes.view(16, -1, 32).float() - 8) * scale.unsqueeze(-1) + zero.unsqueeze(-1)
    ref = torch.from_numpy(gguf.quants.dequantize(raw, t))
    torch.testing.assert_close(w.view(shape), ref, rtol=0, atol=1e-6)  # same value, other float op order


@pytest.mark.parametrize("t", [T.Q8_0, T.Q5_0], ids=lambda t: t.name)
def test_int8_codes_exact(t):
    raw, shape = _random_blocks(t, 16, 2, seed=8)
    codes, scale = gguf_blocks.int8_codes(raw, t, shape)
    w = codes.view(16, -1, 32).float() * scale.unsqueeze(-1)
    assert torch.equal(w.view(shape), torch.from_numpy(gguf.quants.dequantize(raw, t)))


# ----- the real files ---------------------------------------------------------------------------------

class _Tensor:
    def __init__(self, name, data, tensor_type, shape):
        self.name, self.data, self.tensor_type, self.shape = name, data, T(int(tensor_type)), [int(d) for d in shape]


def _pick(path):
    """The smallest 2-D tensor of each type, plus one 1-D tensor, as GGUFReader gives them."""
    picked = {}
    for t in gguf.GGUFReader(path).tensors:
        key = t.tensor_type if len(t.shape) == 2 else "1d"
        if key not in picked or t.n_elements < picked[key].n_elements:
            picked[key] = t
    return {k: _Tensor(t.name, np.array(t.data), t.tensor_type, t.shape) for k, t in picked.items()}


@pytest.fixture(scope="module")
def real_tensors(request):
    """Tensors of the real GGUF files. GGUFReader parses the whole file (tens of seconds on this
    machine, mostly the tokenizer metadata), so the picked tensors are cached in pytest's cache
    keyed by file name and size; delete .pytest_cache to re-read."""
    from pocketvlm.real_models import gemma3_gguf_path, qwen_gguf_path

    cache = request.config.cache.mkdir("pocketvlm-quant-gguf")
    out = {}
    for path in (qwen_gguf_path(), gemma3_gguf_path()):
        f = cache / f"{path.name}-{path.stat().st_size}.pt"
        if f.exists():
            rows = torch.load(f, weights_only=False)
        else:
            rows = [(t.name, t.data, int(t.tensor_type), t.shape) for t in _pick(path).values()]
            torch.save(rows, f)
        for name, data, tt, shape in rows:
            t = _Tensor(name, data, tt, shape)
            out[(path.name, t.tensor_type if len(shape) == 2 else "1d")] = t
    return out


def test_real_files_use_expected_types(real_tensors):
    types = {k[1] for k in real_tensors if k[1] != "1d"}
    assert {T.Q4_K, T.Q5_0, T.Q6_K, T.Q8_0} <= types


def test_real_tensors_equal_gguf_quants(real_tensors):
    for (fname, _), t in real_tensors.items():
        ref = gguf.quants.dequantize(t.data, t.tensor_type)
        got = dequantize_gguf(t.data, t.tensor_type, torch_shape(t.shape))
        assert got.shape == ref.shape, (fname, t.name)
        assert np.array_equal(got.numpy(), ref), (fname, t.name)


def test_real_tensors_as_modules(real_tensors):
    for (fname, tt), t in real_tensors.items():
        if tt == "1d":
            continue
        ref = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mod, mode = gguf_linear(t.data, t.tensor_type, t.shape, name=t.name)
        w = mod.dequantize() if hasattr(mod, "dequantize") else mod.weight.detach()
        assert w.shape == ref.shape and mod.in_features == ref.shape[1]
        if tt == T.Q4_K:
            assert isinstance(mod, Int4Linear) and not caught
            torch.testing.assert_close(w, ref, rtol=0, atol=1e-6)
        elif tt in (T.Q8_0, T.Q5_0):
            assert isinstance(mod, Int5Linear if tt == T.Q5_0 else Int8Linear) and torch.equal(w, ref)
            assert not caught and mode == (GGUF_INT5 if tt == T.Q5_0 else "q8f16_1")
        elif tt == T.Q6_K:
            assert isinstance(mod, Int8Linear) and "requantized" in str(caught[0].message)
            step = mod.scales.float().repeat_interleave(32, 1)  # the 8-bit step per group
            assert ((w - ref).abs() <= step / 2).all()
        # the module runs: a few tokens through the kernel path
        x = torch.randn(2, ref.shape[1])
        y = mod(x)
        rel = (y - x.bfloat16().float() @ w.t()).norm() / (x @ w.t()).norm()
        assert rel < 1e-2
        if tt == T.Q5_0:  # now held in the kernel's 5-bit layout: still the file's values, and saved as before
            assert mod._layout == "own" and mod.qweight.shape[-1] == 160
            assert torch.equal(mod.dequantize(), ref) and torch.equal(mod.dense_weight(torch.float32), ref)
            rows = torch.tensor([3, 0, ref.shape[0] - 1])
            assert torch.equal(mod.dequantize(rows=rows), ref[rows])
            state = mod.state_dict()
            assert state["qweight"].dtype == torch.int8 and state["qweight"].shape == ref.shape
            again = build_quantized(torch.nn.Sequential(torch.nn.Linear(ref.shape[1], ref.shape[0], bias=False,
                                                                        device="meta")), {"0": GGUF_INT5})[0]
            again.load_state_dict(state, assign=True)
            assert isinstance(again, Int5Linear) and torch.equal(again(x), mod(x))


def test_real_embedding_rows(real_tensors):
    t = real_tensors[("gemma-3-270m-q4_k_m.gguf", T.Q8_0)]
    emb, mode = gguf_embedding(t.data, t.tensor_type, t.shape)
    assert isinstance(emb, QuantEmbedding) and mode == "q8f16_1"
    ref = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type))
    ids = torch.tensor([[0, 5, ref.shape[0] - 1], [7, 7, 1]])
    assert torch.equal(emb(ids), ref[ids])
