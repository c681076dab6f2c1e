"""Speculative greedy decoding (engine/speculative.py): prompt-lookup drafts verified in one fused step give the
very tokens of plain greedy decoding, on tiny random models and on the real Qwen2.5-Coder-0.5B, and really keep
drafts where the answer repeats its input."""
import inspect
import json
import textwrap

import pytest

from pocketvlm.engine import speculative
from pocketvlm.engine.fused import FusedDecode
from pocketvlm.engine.generate import Slot
from pocketvlm.engine.sampling import SamplingParams
from pocketvlm.quant import quantize_model

import test_families

pytestmark = pytest.mark.usefixtures("kernel")   # conftest: fails (not skips) when a compiler is here

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture
def kept(monkeypatch):
    """(proposed, kept) of every verification while the test runs."""
    log = []
    record = speculative.PromptLookup.record

    def spy(self, proposed, k):
        log.append((proposed, k))
        return record(self, proposed, k)

    monkeypatch.setattr(speculative.PromptLookup, "record", spy)
    return log


def _tokens(slot, ids, n, params=GREEDY, **kw):
    return [r.token for r in slot.generate(ids, ids, params, n, **kw)]


@pytest.mark.parametrize("kind,mode", [("qwen2", "q4f16_1"), ("gemma3", "q8f16_1")])
def test_tiny_models_same_tokens_with_and_without_drafts(kind, mode, tmp_path, kept):
    _, model = test_families.tiny(kind, tmp_path)
    quantize_model(model, mode, embeddings=True)
    fused = FusedDecode(model)
    ids = [5, 17, 99, 3, 250, 41, 7, 5, 17, 99, 3, 250, 41, 7, 5, 17]  # a repeating prompt: drafts to propose
    plain = Slot(model, 128, prefill_chunk_size=8, decode_step=fused)
    plain.max_draft = 0
    want = _tokens(plain, ids, 60)
    assert not kept
    spec = Slot(model, 128, prefill_chunk_size=8, decode_step=fused)
    assert _tokens(spec, ids, 60) == want
    assert kept  # verifications ran (random weights loop, so their n-grams recur)
    assert spec.keys == plain.keys  # what the cache holds, position by position
    # banned ids, stop ids and the context window's end are honoured the same way
    ban = [want[0], want[3]]
    plain.reset(), spec.reset()
    assert _tokens(spec, ids, 40, banned_ids=ban) == _tokens(plain, ids, 40, banned_ids=ban)
    plain.reset(), spec.reset()
    stop = {want[20]}
    assert _tokens(spec, ids, 60, stop_ids=stop) == _tokens(plain, ids, 60, stop_ids=stop)
    short_a, short_b = (Slot(model, 30, prefill_chunk_size=8, decode_step=fused) for _ in range(2))
    short_a.max_draft = 0
    assert _tokens(short_b, ids, 60) == _tokens(short_a, ids, 60)


def test_sampling_and_repetition_penalty_decode_plainly(tmp_path, kept):
    _, model = test_families.tiny("qwen2", tmp_path)
    quantize_model(model, "q4f16_1")
    slot = Slot(model, 128, prefill_chunk_size=8, decode_step=FusedDecode(model))
    ids = [5, 17, 99, 3] * 4
    _tokens(slot, ids, 30, SamplingParams(temperature=0.8, seed=1))
    slot.reset()
    _tokens(slot, ids, 30, SamplingParams(temperature=0.0, repetition_penalty=1.3))
    assert not kept


def test_prompt_lookup_drafts_and_adapts():
    lk = speculative.PromptLookup(max_draft=7, pause=3)
    lk.extend([1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3])
    assert lk.propose(10) == [4, 5, 6, 7]  # after the latest earlier "1 2 3"; starts at 4 tokens
    assert lk.propose(2) == [4, 5]
    lk.record(4, 4)
    assert lk.propose(10) == [4, 5, 6, 7, 8, 9, 1]  # doubled, capped at max_draft
    lk.record(7, 2)
    assert len(lk.propose(10)) == 2
    lk.record(2, 0), lk.record(1, 0)  # two verifications in a row kept nothing: pause
    assert [lk.propose(10) for _ in range(3)] == [[], [], []]
    assert lk.propose(10) == [4]
    lk.record(1, 0), lk.record(1, 0)  # again, before anything was kept: a pause twice as long
    assert [lk.propose(10) for _ in range(6)] == [[]] * 6 and lk.propose(10) == [4]
    lk.record(1, 1)  # kept: back to the first pause length
    lk.record(2, 0), lk.record(1, 0)
    assert [lk.propose(10) for _ in range(3)] == [[]] * 3 and lk.propose(10)
    empty = speculative.PromptLookup()
    empty.extend([1, 2, 3])
    assert empty.propose(5) == []


@pytest.fixture(scope="module")
def qwen_q4(qwen_gguf):
    import pocketvlm

    return pocketvlm.load(qwen_gguf, quantization="q4f16_1", context_window_size=2048)


def _type_hint_prompt():
    src = "\n".join(textwrap.dedent(inspect.getsource(json.JSONEncoder.iterencode)).splitlines()[:40])
    return f"Add type hints to this Python function. Reply with the whole function only.\n\n```python\n{src}\n```"


@pytest.mark.parametrize("prompt", [_type_hint_prompt(), "Write a haiku about rain.", "List the numbers 1 to 30."],
                         ids=["type-hints", "haiku", "count"])
def test_real_qwen_answers_identical_with_drafts(qwen_q4, prompt, kept):
    msgs = [{"role": "user", "content": prompt}]
    plain = qwen_q4.new_slot()
    plain.max_draft = 0
    want = qwen_q4.complete_chat(msgs, max_tokens=120, temperature=0, slot=plain)
    got = qwen_q4.complete_chat(msgs, max_tokens=120, temperature=0, slot=qwen_q4.new_slot())
    assert got.tokens == want.tokens and got.text == want.text
    if prompt.startswith("Add type hints"):  # the answer repeats the code: most drafts are kept
        assert sum(k for _, k in kept) > 0.5 * len(want.tokens), kept


def test_real_gemma3_completions_identical_with_drafts(gemma3_gguf, kept):
    import pocketvlm

    pm = pocketvlm.load(gemma3_gguf, quantization="q8f16_1", context_window_size=512)
    for prompt in ["The capital of France is Paris. The capital of France is", "def add(a, b):\n    return a + b\n\n"
                   "def add3(a, b, c):\n"]:
        plain = pm.new_slot()
        plain.max_draft = 0
        want = pm.generate(prompt, max_tokens=48, temperature=0, slot=plain)
        assert pm.generate(prompt, max_tokens=48, temperature=0, slot=pm.new_slot()) == want
    assert kept
