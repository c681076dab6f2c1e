"""The fused C++ decode step (engine/fused.py, csrc/decode_step.cpp) against the eager PyTorch decode of the
same quantized model: every llama-like family and its quirks (q/k/v biases, GQA, sliding windows shorter
than the sequence, Gemma norms, sandwich norms, soft-capping, QK-norm, two RoPE tables, partial rotary,
fused projections), q4, q5 and q8 layers, then greedy generation on the real Qwen2.5-0.5B."""
import pytest
import torch

from pocketvlm.engine.fused import FusedDecode, plan_or_reason
from pocketvlm.engine.generate import Slot
from pocketvlm.quant import cpu_kernel, quantize_model

import test_families

pytestmark = pytest.mark.usefixtures("kernel")   # conftest: fails (not skips) when a compiler is here

CASES = [(test_families, k) for k in ("llama", "llama3-rope", "mistral-sliding", "qwen2", "qwen2-yarn", "gemma",
                                      "gemma-untied", "gemma2", "gemma3", "phi3", "phi3-sliding")]


def _pair(model, kv_dtype=None):
    """(eager slot, fused slot) over the same model, with their own caches."""
    fused = FusedDecode(model)
    return (Slot(model, 64, prefill_chunk_size=5, dtype=kv_dtype),
            Slot(model, 64, prefill_chunk_size=5, dtype=kv_dtype, decode_step=fused))


def _decode_both(model, prompt, steps=12, kv_dtype=None):
    eager, fused = _pair(model, kv_dtype)
    a, b = eager.prefill(prompt, prompt), fused.prefill(prompt, prompt)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # prefill is the same code
    worst = 0.0
    for i in range(steps):
        tok = int(a.argmax())
        a, b = eager.decode(tok), fused.decode(tok)
        worst = max(worst, float((a - b).abs().max() / a.abs().max()))
    return worst


@pytest.mark.parametrize("mod,kind", CASES, ids=[k for _, k in CASES])
@pytest.mark.parametrize("mode", ["q4f16_1", "q8f16_1"])
def test_fused_decode_matches_eager(mod, kind, mode, tmp_path):
    _, model = mod.tiny(kind, tmp_path)
    quantize_model(model, mode)
    # 7 prompt + 12 generated positions: past every sliding window (4) of these configs
    worst = _decode_both(model, [5, 17, 99, 3, 250, 41, 7])
    # same kernels and int8 activation rounding on both sides: only the float summation order differs
    # (attention, norms, exp), ~1e-7 of the logits' range; where that flips the rounding of one int8
    # activation a logit moves by up to ~5e-3 of the range. A real mistake (RoPE, a norm, a mask) is O(1).
    assert worst < 1e-2, worst


@pytest.mark.parametrize("mod,kind", [(test_families, "qwen2"), (test_families, "mistral-sliding"), (test_families, "gemma3")],
                         ids=["qwen2", "mistral-sliding", "gemma3"])
def test_fused_decode_with_float16_kv_cache(mod, kind, tmp_path):
    """The float16 KV cache (the default for quantized float32 models): fused and eager decode write and
    read the same rounded keys and values, up to a key whose float32 value the two paths compute one bit
    apart landing on the other side of a float16 rounding midpoint; the cache keeps that one-ulp (5e-4)
    difference, which moves these tiny random models' logits by up to ~3% of their range (the same size
    as float16 vs float32 cache altogether: 0.7-6% here). A wrong index, RoPE or mask is O(1)."""
    _, model = mod.tiny(kind, tmp_path)
    quantize_model(model, "q4f16_1", embeddings=True)
    assert _decode_both(model, [5, 17, 99, 3, 250, 41, 7], kv_dtype=torch.float16) < 5e-2
    half, full = Slot(model, 64, dtype=torch.float16, decode_step=FusedDecode(model)), Slot(model, 64)
    assert half.cache.k[0].dtype == torch.float16 and half.cache.nbytes * 2 == full.cache.nbytes


def test_fused_decode_q4f32_and_affine_gguf_style_layers(tmp_path):
    _, model = test_families.tiny("qwen2", tmp_path)
    quantize_model(model, "q4f32_1")
    assert _decode_both(model, [1, 2, 3, 4, 5]) < 1e-2


def _as_q5(model):
    """Every 8-bit layer (and embedding table) of ``model`` re-quantized to 5 bits: an :class:`Int5Linear`
    (fp16 d = max|w| / 15 per 32 weights, codes -15..15; GGUF's quantizer divides by 16, but then an
    embedding row's 8d and the tiny models' unit norm weights put activations exactly halfway between
    two int8 steps, where eager and fused rounding may break the tie differently)."""
    from pocketvlm.quant import GGUF_INT5, Int5Linear, Int8Linear

    for name, m in list(model.named_modules()):
        if type(m) is not Int8Linear:
            continue
        w = m.dequantize().view(m.out_features, -1, 32)
        d = (w.abs().amax(-1) / 15).clamp_min(1e-6).half()
        q5 = Int5Linear(m.in_features, m.out_features, m.bias is not None, mode=GGUF_INT5)
        q5.qweight.copy_(torch.round(w / d.float().unsqueeze(-1)).clamp(-16, 15).view(m.out_features, -1))
        q5.scales.copy_(d)
        if m.bias is not None:
            q5.bias.data.copy_(m.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q5)


@pytest.mark.parametrize("mod,kind", [(test_families, "qwen2"), (test_families, "gemma3")], ids=["qwen2", "gemma3"])
def test_fused_decode_with_5bit_layers(mod, kind, tmp_path):
    """GGUF Q5_0 layers (the 5-bit rows8 layout), embedding table and tied head included."""
    _, model = mod.tiny(kind, tmp_path)
    quantize_model(model, "q8f16_1", embeddings=True)
    _as_q5(model)
    plan = FusedDecode(model).plan
    assert plan.has_embedding() and plan.has_head()
    assert _decode_both(model, [5, 17, 99, 3, 250, 41, 7]) < 1e-2
    five = [m for m in model.modules() if type(m).__name__ == "Int5Linear"]
    assert five and all(m._own.packed.shape[-1] == 160 for m in five if m.out_features % 8 == 0)


def test_fused_decode_with_both_q4_layouts_in_one_phase(tmp_path, monkeypatch):
    """rows and rows8 layers side by side in one multi-layer phase (q/k/v, gate/up): the block numbering
    across layers of different block sizes."""
    calls = []
    orig = cpu_kernel.pack_q4

    def alternating(*a, **kw):
        calls.append(1)
        return orig(*a, **kw, layout="rows" if len(calls) % 2 else "auto")

    monkeypatch.setattr(cpu_kernel, "pack_q4", alternating)
    _, model = test_families.tiny("qwen2", tmp_path)
    quantize_model(model, "q4f16_1")
    assert _decode_both(model, [5, 17, 99, 3, 250]) < 1e-2
    dims = {m._own.packed.dim() for m in model.modules() if getattr(m, "_own", None) is not None}
    assert dims == {2, 3}


@pytest.mark.parametrize("head_dim,kv,window", [(96, 2, 0), (64, 1, 11), (24, 4, 0)], ids=["d96", "d64-mqa-window", "d24-mha"])
def test_fused_attention_shapes(head_dim, kv, window, tmp_path):
    """The attention's vector paths: 8 positions at a time plus a remainder, 64 outputs in registers plus
    a remainder (96 = 64 + 32; 24 < 64), one kv head for all query heads (split across the threads) or one
    per head, a sliding window whose start is not a multiple of 8; 22 positions in all."""
    extra = dict(sliding_window=window) if window else {}
    _, model = test_families.tiny("mistral-sliding" if window else "llama", tmp_path, head_dim=head_dim,
                                num_key_value_heads=kv, num_attention_heads=4 if kv < 4 else kv, **extra)
    quantize_model(model, "q4f16_1")
    assert _decode_both(model, [5, 17, 99, 3, 250, 41, 7, 8, 9, 10], steps=12) < 1e-2


def test_models_that_do_not_qualify_say_why(tmp_path):
    _, model = test_families.tiny("llama", tmp_path)
    fused, why = plan_or_reason(model)  # unquantized
    assert fused is None and "not a q4/q8 layer" in why
    quantize_model(model, "q3f16_1")
    fused, why = plan_or_reason(model)
    assert fused is None and "Int3Linear" in why


def test_fused_step_rejects_a_position_outside_the_cache(tmp_path):
    _, model = test_families.tiny("llama", tmp_path)
    quantize_model(model, "q4f16_1")
    eager, fused = _pair(model)
    fused.prefill([1, 2], [1, 2])
    with pytest.raises(RuntimeError, match="outside the KV cache"):
        fused.decode_step(fused, 3, 64)


def test_real_qwen_gguf_mode_fused_equals_eager(qwen_gguf):
    """The file's own blocks (``quantization="gguf"``, what ``scripts/chat.sh`` runs): Q4_K on the 4-bit,
    Q5_0 on the 5-bit, Q8_0 (and requantized Q6_K) on the 8-bit kernel; fused and eager decode agree."""
    import pocketvlm
    from pocketvlm.quant import GGUF_INT4, GGUF_INT5

    pm = pocketvlm.load(qwen_gguf, quantization="gguf", context_window_size=256, fused=False)
    modes = set(pm.loaded.quantization["modules"].values())
    assert {GGUF_INT4, GGUF_INT5, "q8f16_1"} <= modes, modes
    a, ids, greedy = _greedy_fused_equals_eager(pm, 24)
    assert "return" in pm.tokenizer.decode(a)  # a real answer, not noise


def _greedy_fused_equals_eager(pm, n):
    """Greedy tokens of eager and fused decode (float32 caches) on a code prompt: asserted equal, returned."""
    from pocketvlm.engine.sampling import SamplingParams

    ids = pm.tokenizer.encode("def fibonacci(n):")
    greedy = SamplingParams(temperature=0.0)
    a = [r.token for r in Slot(pm.model, 256).generate(ids, ids, greedy, n)]
    b = [r.token for r in Slot(pm.model, 256, decode_step=FusedDecode(pm.model)).generate(ids, ids, greedy, n)]
    assert a == b
    return a, ids, greedy


def test_real_qwen_greedy_tokens_identical(qwen_gguf):
    import pocketvlm

    pm = pocketvlm.load(qwen_gguf, quantization="q4f16_1", context_window_size=256, fused=False)
    a, ids, greedy = _greedy_fused_equals_eager(pm, 32)
    # the float16 KV cache that quantized models get by default: the same answer (measured on a 400-token
    # prompt: logits within 2.2% of their range of a float32 cache's, the same argmax for 48 tokens)
    half = Slot(pm.model, 256, dtype=torch.float16, decode_step=FusedDecode(pm.model))
    assert [r.token for r in half.generate(ids, ids, greedy, 32)] == a


@pytest.mark.parametrize("mod,kind", [(test_families, "qwen2"), (test_families, "llama"), (test_families, "gemma")],
                         ids=["qwen2-tied", "llama-untied", "gemma-scaled"])
def test_fused_decode_with_quantized_embedding_and_head(mod, kind, tmp_path):
    _, model = mod.tiny(kind, tmp_path)
    quantize_model(model, "q4f16_1", embeddings=True)
    plan = FusedDecode(model).plan
    assert plan.has_embedding() and plan.has_head()  # the whole token runs in the plan
    assert _decode_both(model, [5, 17, 99, 3, 250, 41, 7]) < 1e-2


def test_load_reports_and_enforces_the_decode_path(tmp_path):
    import pocketvlm
    from serve_fixtures import write_tokenizer

    test_families.tiny("qwen2", tmp_path)
    write_tokenizer(tmp_path)
    pm = pocketvlm.load(tmp_path, quantization="q4f16_1")
    assert pm.info()["decode"] == "fused"
    assert pocketvlm.load(tmp_path, quantization="q4f16_1", fused=False).info()["decode"].startswith("eager (off")
    assert "not a q4/q8 layer" in pocketvlm.load(tmp_path).info()["decode"]  # fp32: eager, and why
    with pytest.raises(ValueError, match="cannot run this model"):
        pocketvlm.load(tmp_path, fused=True)


def test_kv_cache_dtype_choice(tmp_path):
    """float16 KV cache by default for a quantized float32 model (as llama.cpp), the model's dtype otherwise,
    any dtype on request; a bad name is a clear error."""
    import pocketvlm
    from pocketvlm.errors import ConfigError
    from serve_fixtures import write_tokenizer

    test_families.tiny("qwen2", tmp_path)
    write_tokenizer(tmp_path)
    pm = pocketvlm.load(tmp_path, quantization="q4f16_1", context_window_size=32)
    assert pm.info()["kv_cache_dtype"] == "float16" and pm.new_slot().cache.k[0].dtype == torch.float16
    assert pocketvlm.load(tmp_path, context_window_size=32).new_slot().cache.k[0].dtype == torch.float32
    pm32 = pocketvlm.load(tmp_path, quantization="q4f16_1", kv_cache_dtype="float32")
    assert pm32.new_slot().cache.k[0].dtype == torch.float32 and pm32.info()["decode"] == "fused"
    q0 = pocketvlm.load(tmp_path, quantization="q0f16")  # only cast, not quantized: the model's own dtype
    assert q0.kv_cache_dtype == q0.dtype
    with pytest.raises(ConfigError, match="unknown dtype"):
        pocketvlm.load(tmp_path, quantization="q4f16_1", kv_cache_dtype="float8")
    assert isinstance(pm.generate([5, 17, 99], max_tokens=4, temperature=0), str)  # runs on the fp16 cache


PORTABLE = r"""
import sys, pathlib, tempfile
sys.path.insert(0, sys.argv[2])
import torch
torch.ops.load_library(sys.argv[1])
from pocketvlm.quant import cpu_kernel as ck
ck._state.update(tried=True, ok=True, path=sys.argv[1])
assert not ck.simd()
import test_families
from test_fused_decode import _as_q5, _decode_both
from pocketvlm.quant import quantize_model
for mod, kind, mode in [(test_families, "qwen2", "q4f16_1"), (test_families, "gemma3", "q8f16_1"), (test_families, "llama", "q5")]:
    _, m = mod.tiny(kind, pathlib.Path(tempfile.mkdtemp()))
    quantize_model(m, "q8f16_1" if mode == "q5" else mode, embeddings=True)
    if mode == "q5":
        _as_q5(m)
    print(kind, _decode_both(m, [5, 17, 99, 3, 250, 41, 7]))
"""


def test_portable_build_without_simd(tmp_path):
    """The library as a CPU without AVX2 (ARM laptops, phones) builds it: the portable loops, fused decode
    included, compile and agree with eager decode."""
    import subprocess
    import sys
    from pathlib import Path

    lib = tmp_path / "portable.so"
    cmd = [c for c in cpu_kernel._compile_command("c++", lib) if c not in ("-mavx2", "-mfma", "-mf16c")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-c", PORTABLE, str(lib), str(Path(__file__).parent)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    worst = [float(line.split()[1]) for line in r.stdout.splitlines() if line.startswith(("qwen2", "gemma3", "llama"))]
    assert len(worst) == 3 and max(worst) < 1e-2, r.stdout
