"""Quality guard on the real models: error-minimising scales beat round-to-nearest, and calibrated (GPTQ)
rounding keeps q4f16_1 near the unquantized model (benchmarks/perplexity.py has the full table).

Perplexity over 4 windows of 512 tokens of the held-out prose (benchmarks/llamacpp.py, the same scoring as
the benchmark); calibration on 32 windows of the default text (convert's default is 64: a shorter run, so
the bounds carry a margin). Measured with 8 windows and 64 calibration windows: Qwen q4f16_1 +6.0% (RTN),
+4.9% (search), GPTQ in the README; Gemma 3 270M +94%, +61%, +7.1%.
"""
import copy


from pocketvlm.eval import perplexity
from pocketvlm.quant import quantize_model
from pocketvlm.quant.calibrate import calibrate_model, calibration_windows, default_text

WINDOWS = 4


def _ppls(pm, prose_text, bound_gptq, gptq_beats_search: bool):
    tok = pm.tokenizer
    bos = tok.bos_token_id if tok.add_bos_token else None
    ids = tok.encode(prose_text)

    def ppl(model):
        return perplexity(model, ids, 512, progress=False, max_windows=WINDOWS, bos_token_id=bos)

    out = {"fp32": ppl(pm.model)}
    for how in ("rtn", "search"):
        m = copy.deepcopy(pm.model)
        quantize_model(m, "q4f16_1", embeddings=True, search=how == "search")
        out[how] = ppl(m)
        del m
    m = copy.deepcopy(pm.model)
    calibrate_model(m, "q4f16_1", calibration_windows(tok.encode(default_text()), 512, 32, bos), progress=False)
    out["gptq"] = ppl(m)
    print({k: round(v, 4) for k, v in out.items()})
    assert out["search"] < out["rtn"]
    assert out["gptq"] < out["rtn"]
    if gptq_beats_search:
        assert out["gptq"] < out["search"]
    assert out["gptq"] < out["fp32"] * bound_gptq
    return out


def test_real_qwen_q4_scales_and_gptq(qwen_real, prose_text):
    # target +3% (met with 64 calibration windows: +2.6% on 8 eval windows); 32 windows measured +4.0% on these 4,
    # only 0.5% under the scale search alone, so that order is not asserted here
    _ppls(qwen_real, prose_text, 1.06, gptq_beats_search=False)


def test_real_gemma3_q4_gptq_is_not_broken(gemma3_gguf, prose_text):
    import pocketvlm

    pm = pocketvlm.load(gemma3_gguf, quantization="q0f32")
    _ppls(pm, prose_text, 1.15, gptq_beats_search=True)  # RTN +94%: broken at q4f16_1; target +10% (32 windows: +7.9%)
