"""Sampling functions, stop strings and the KV-cache slot, on a tiny random model."""
import pytest
import torch

from pocketvlm.api import StopStringFilter
from pocketvlm.engine import sampling
from pocketvlm.engine.generate import Slot
from pocketvlm.engine.sampling import SamplingParams
from pocketvlm.errors import ContextWindowError, SamplingError


@pytest.mark.parametrize("kw", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1),
                                dict(min_p=1.5), dict(repetition_penalty=0.0)])
def test_invalid_sampling_values(kw):
    with pytest.raises(SamplingError):
        SamplingParams(**kw)


def test_greedy_and_filters():
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    assert sampling.sample(logits, SamplingParams(temperature=0)) == 1
    assert torch.isinf(sampling.top_k(logits, 2)).tolist() == [True, False, False, True]
    probs = logits.softmax(-1)  # ~[0.09, 0.66, 0.24, 0.01]
    kept = ~torch.isinf(sampling.top_p(logits, 0.7))
    assert kept.tolist() == [False, True, True, False]  # 0.66 < 0.7 so the second token is needed too
    kept = ~torch.isinf(sampling.min_p(logits, 0.3))
    assert kept.tolist() == (probs >= 0.3 * probs.max()).tolist()


def test_repetition_penalty_matches_hf_rule():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = sampling.repetition_penalty(logits, torch.tensor([0, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


def test_seed_makes_sampling_reproducible():
    logits = torch.randn(50)
    p = SamplingParams(temperature=1.0, seed=7)
    a = [sampling.sample(logits, p, g) for g in [sampling.make_generator(7)] for _ in range(20)]
    b = [sampling.sample(logits, p, g) for g in [sampling.make_generator(7)] for _ in range(20)]
    assert a == b and len(set(a)) > 1


def test_sampling_draws_from_the_distribution():
    """The inverse-CDF draw: frequencies match the softmax (8,000 draws, within 4 standard errors), and tokens
    that top-k / top-p / min-p removed are never drawn."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5, float("-inf"), 1.5])
    p = SamplingParams(temperature=1.0, seed=3)
    g = sampling.make_generator(3)
    n = 8000
    counts = torch.bincount(torch.tensor([sampling.sample(logits, p, g) for _ in range(n)]), minlength=7).double()
    want = logits.softmax(-1).double()
    se = (want * (1 - want) / n).sqrt()
    assert counts[5] == 0 and ((counts / n - want).abs() <= 4 * se + 1e-9).all(), (counts / n, want)
    top2 = SamplingParams(temperature=0.7, top_k=2, seed=1)
    assert {sampling.sample(logits, top2, g) for _ in range(300)} == {0, 6}


def test_stop_string_filter_holds_back_prefixes():
    f = StopStringFilter(["</end>"])
    out = f.push("hello </e") + f.push("nd> more")
    assert out == "hello " and f.stopped
    f = StopStringFilter(["STOP"])
    assert f.push("ST") == "" and f.push("ART") == "START" and not f.stopped


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import transformers

    from pocketvlm import loading

    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100, max_position_embeddings=128)
    ref = transformers.Qwen2ForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("tiny")
    ref.save_pretrained(d)
    return ref, loading.load(d).model


def test_slot_greedy_equals_transformers_generate(tiny_model):
    ref, ours = tiny_model
    prompt = [5, 17, 42, 9, 3]
    want = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                        pad_token_id=0)[0, len(prompt):].tolist()
    slot = Slot(ours, context_window_size=64, prefill_chunk_size=2)  # chunked prefill on purpose
    got = [s.token for s in slot.generate(prompt, prompt, SamplingParams(temperature=0), 12)]
    assert got == want


def test_slot_reuses_prefix_and_reports_finish(tiny_model):
    _, ours = tiny_model
    slot = Slot(ours, context_window_size=64)
    p1 = [1, 2, 3, 4]
    steps = list(slot.generate(p1, p1, SamplingParams(temperature=0), 3))
    assert [s.finish_reason for s in steps] == [None, None, "length"]
    # a second turn that extends the first: same answer as a fresh slot
    p2 = p1 + [s.token for s in steps] + [7, 8]
    fresh = Slot(ours, context_window_size=64)
    a = [s.token for s in slot.generate(p2, p2, SamplingParams(temperature=0), 5)]
    b = [s.token for s in fresh.generate(p2, p2, SamplingParams(temperature=0), 5)]
    assert a == b
    stop = {b[1]}
    steps = list(Slot(ours, 64).generate(p2, p2, SamplingParams(temperature=0), 5, stop_ids=stop))
    assert steps[-1].finish_reason == "stop" and len(steps) == 2


def test_prompt_over_context_window_is_clear_error(tiny_model):
    _, ours = tiny_model
    slot = Slot(ours, context_window_size=16)
    ids = list(range(16))
    with pytest.raises(ContextWindowError, match="context window is 16"):
        list(slot.generate(ids, ids, SamplingParams(temperature=0), 4))
    # generation stops at the end of the window with finish_reason "length"
    ids = list(range(12))
    steps = list(slot.generate(ids, ids, SamplingParams(temperature=0), 100))
    assert len(steps) == 4 and steps[-1].finish_reason == "length"


@pytest.mark.skipif(not __import__("pocketvlm.engine.compiled", fromlist=["x"]).compiler_available(),
                    reason="no C++ compiler: torch.compile cannot build CPU kernels here")
def test_compiled_decode_step_equals_eager(tmp_path):
    """The torch.compile'd decode step (static cache, attended with a mask) gives eager decode's logits and
    greedy tokens, and really ran compiled (no fallback warning)."""
    import warnings

    import pocketvlm
    from serve_fixtures import make_tiny_qwen2

    d = make_tiny_qwen2(tmp_path / "m")
    eager = pocketvlm.load(d, context_window_size=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a compile failure falls back with a warning: fail instead
        compiled = pocketvlm.load(d, context_window_size=64, compile=True)
        ids = list(range(5, 17))
        outs = []
        for pm in (eager, compiled):
            slot = pm.new_slot()
            logits = [slot.prefill(ids, ids)]
            tok = int(logits[0].argmax())
            toks = [tok]
            for _ in range(6):
                logits.append(slot.decode(tok))
                tok = int(logits[-1].argmax())
                toks.append(tok)
            outs.append((torch.stack([lg.float().reshape(-1) for lg in logits]), toks))
    from torch._dynamo.utils import counters

    assert not compiled.decode_step.failed and counters["stats"]["unique_graphs"] >= 1  # dynamo built a graph
    assert outs[0][1] == outs[1][1]
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-4, atol=1e-4)


def test_exact_slot_gives_a_fresh_slots_greedy_whatever_ran_before(tiny_model, monkeypatch):
    """An exact slot (the server's, for greedy requests) reuses only whole prefill chunks a fresh prefill computes
    the same way; a plain slot reuses every cached position, whose numbers depend on how they were computed
    (a q4 model: chunks of 16+ rows take the dense bf16 path, shorter ones and decode the int8 kernel)."""
    import copy

    from pocketvlm.quant import paths, quantize_model

    # 32-row prefill chunks on the dense path (as on AVX2-only CPUs; with AVX-512 VNNI such chunks run the own kernel
    # or the int8 prefill GEMM, whose rows do not depend on each other, and plain reuse then happens to compute the
    # same numbers)
    monkeypatch.setattr(paths, "OWN_KERNEL_MAX_TOKENS", 16)
    monkeypatch.setattr(paths, "PREFILL_INT8_ROWS", (0, 0))
    _, ours = tiny_model
    q4 = copy.deepcopy(ours)
    quantize_model(q4, "q4f16_1")
    greedy = SamplingParams(temperature=0)
    b = [5, 17, 42, 9, 3, 11, 23, 31, 2, 8, 14, 27, 33, 41, 6, 19, 22, 28, 35, 44]
    slot, plain = Slot(q4, 128, prefill_chunk_size=32), Slot(q4, 128, prefill_chunk_size=32)
    slot.exact_reuse = True
    answer = [s.token for s in slot.generate(b, b, greedy, 20)]
    assert [s.token for s in plain.generate(b, b, greedy, 20)] == answer
    a = b + answer + [7, 8]  # the next turn: 42 positions, 40 of them cached (20 computed by decode)
    rows = []
    forward = Slot._forward

    def spy(self, ids, embeds, start, logits_to_keep):
        rows.append((start, (ids if ids is not None else embeds).shape[1]))
        return forward(self, ids, embeds, start, logits_to_keep)

    monkeypatch.setattr(Slot, "_forward", spy)
    want = Slot(q4, 128, prefill_chunk_size=32).prefill(a, a)
    assert rows == [(0, 32), (32, 10)]
    rows.clear()
    got = slot.prefill(a, a, exact=True)
    assert rows == [(0, 32), (32, 10)]  # nothing reusable: recomputed as a fresh slot does
    reused = plain.prefill(a, a)  # the plain slot reuses 40 positions and computes 2
    assert torch.equal(got, want) and not torch.equal(reused, want)
    rows.clear()
    c = a + [9, 10, 12] * 6  # a third turn: the first chunk is canonical now and is reused
    fresh = Slot(q4, 128, prefill_chunk_size=32).prefill(c, c)
    rows.clear()
    assert torch.equal(slot.prefill(c, c, exact=True), fresh) and rows == [(32, 28)]
