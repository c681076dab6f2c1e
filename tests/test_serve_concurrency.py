"""The server under load: concurrent streams against solo answers, disconnects freeing slots, the queue
limit, client timeouts cancelling generation, memory flat over many requests (split from test_serve.py,
same tiny model and fixtures)."""
from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from pocketvlm.serve import schemas
from pocketvlm.serve.app import ServerThread, create_app
from pocketvlm.serve.engine import Engine

sys.path.insert(0, str(Path(__file__).parent))
from serve_common import (  # noqa: E402,F401 - fixtures and helpers
    MAX_BODY, MAX_PIXELS, assert_error, client, data_url, engine, image_dir, image_msg, keyed_server, one_torch_thread,
    pm, png_bytes, png_header_only, post, reference, server, tiny_dir, user)


# --- concurrency -------------------------------------------------------------------------------------

PROMPTS = ["Hello!", "What is in this picture?", "Count: one two three", "The quick brown fox",
           "Describe the image", "The sky is blue", "thank you", "question answer model"]


def test_eight_concurrent_streams_complete_and_match_solo_answers(server, pm, engine):
    max_tokens = 20
    solo = {p: reference(pm, user(p), max_tokens)[0] for p in PROMPTS}
    assert len(set(solo.values())) > 1  # the prompts really lead to different answers
    observed, health_latency, stop = [], [], threading.Event()

    def watch():
        while not stop.is_set():
            t0 = time.perf_counter()
            h = httpx.get(server.url + "/health", timeout=30).json()
            health_latency.append(time.perf_counter() - t0)
            observed.append(h["schedulers"]["tiny"])
            time.sleep(0.01)

    def stream_one(p):
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        s = c.chat.completions.create(model="tiny", messages=user(p), max_tokens=max_tokens, temperature=0,
                                      stream=True)
        parts, finish = [], None
        for ch in s:
            parts.append(ch.choices[0].delta.content or "")
            finish = ch.choices[0].finish_reason or finish
        return "".join(parts), finish

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(8) as ex:
            results = dict(zip(PROMPTS, ex.map(stream_one, PROMPTS)))
    finally:
        stop.set()
        watcher.join()
    for p in PROMPTS:
        assert results[p][0] == solo[p], p
        assert results[p][1] in ("stop", "length")
    # requests really overlapped: all four slots busy at once and others queued behind them
    assert max(o["active"] for o in observed) == 4
    assert max(o["waiting"] for o in observed) >= 1
    assert len(health_latency) >= 3  # /health kept answering during generation
    assert engine.schedulers["tiny"].stats()["free_slots"] == 4


def test_disconnect_mid_stream_frees_the_slot(pm):
    e = Engine({"tiny": pm}, slots=1)
    sched = e.schedulers["tiny"]
    try:
        with ServerThread(create_app(e)) as s:
            body = {"model": "tiny", "messages": user("Hello!"), "max_tokens": 900, "temperature": 0, "stream": True}
            with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=60) as r:
                lines = r.iter_lines()
                got = [next(lines) for _ in range(6)]  # a few events, then hang up
            assert any(g.startswith("data: ") for g in got)
            t0 = time.perf_counter()
            r2 = post(s, {"model": "tiny", "messages": user("thank you"), "max_tokens": 3, "temperature": 0})
            assert r2.status_code == 200
            wait = time.perf_counter() - t0
            steps_after = sched.steps
            # the abandoned answer stopped far short of its 900 tokens: its slot went to the next request
            assert steps_after < 300, (steps_after, wait)
            time.sleep(0.3)
            assert sched.steps == steps_after  # nothing is still generating for the gone client
            assert sched.stats() == {"slots": 1, "active": 0, "waiting": 0, "free_slots": 1}
    finally:
        e.close()


class _GatedModel:
    """A stand-in PocketModel whose answers wait on a gate, to hold slots for as long as a test needs."""

    context_window_size = 64

    def __init__(self):
        self.gate = threading.Event()

    def new_slot(self):
        return type("Slot", (), {"keys": [], "reset": lambda self: None})()

    def chat_prompt(self, messages):
        from pocketvlm.api import Prompt

        return Prompt([1, 2], [1, 2])

    def run(self, prompt, *, max_tokens, stop, slot, **sampling):
        from pocketvlm.api import Event

        self.gate.wait(30)
        yield Event("ok", 5, "stop", 2, 1)


def test_queue_limit_raises_server_busy_and_maps_to_503():
    from pocketvlm.errors import ServerBusyError
    from pocketvlm.serve.app import error_json, error_response_for
    from pocketvlm.serve.engine import Job, Scheduler

    fake = _GatedModel()
    sched = Scheduler(fake, n_slots=1, max_waiting=1)
    got = []
    req = schemas.parse_chat_request({"messages": user("hi")})
    try:
        a = sched.submit(Job(req, req.messages, {}, lambda k, v: got.append((k, v))))
        deadline = time.monotonic() + 10
        while sched.stats()["active"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        b = sched.submit(Job(req, req.messages, {}, lambda k, v: got.append((k, v))))
        assert sched.stats()["waiting"] == 1
        with pytest.raises(ServerBusyError) as ei:
            sched.submit(Job(req, req.messages, {}, lambda k, v: None))
        status, body = error_response_for(ei.value)
        assert status == 503 and body["error"]["code"] == "server_busy"
        assert error_json(ei.value).headers["retry-after"] == "1"
        fake.gate.set()  # both accepted requests then finish
        assert a.done.wait(10) and b.done.wait(10)
        assert [k for k, _ in got] == ["event", "event"]
    finally:
        fake.gate.set()
        sched.close()


def test_non_streaming_client_timeout_cancels_generation(pm):
    e = Engine({"tiny": pm}, slots=1)
    sched = e.schedulers["tiny"]
    try:
        with ServerThread(create_app(e)) as s:
            with pytest.raises(httpx.ReadTimeout):
                post(s, {"model": "tiny", "messages": user("Hello!"), "max_tokens": 1000, "temperature": 0},
                     timeout=0.3)
            deadline = time.monotonic() + 10
            while sched.stats()["active"] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert sched.stats()["active"] == 0
            assert sched.steps < 1000
    finally:
        e.close()


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status")


def test_memory_flat_over_200_sequential_requests(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        def one(i):
            body = {"model": "tiny", "messages": user(PROMPTS[i % len(PROMPTS)] + f" {i}"), "max_tokens": 4,
                    "stream": i % 2 == 0}
            r = c.post("/v1/chat/completions", json=body)
            assert r.status_code == 200
        for i in range(30):  # warm up allocator, caches, threads
            one(i)
        before = _rss_mb()
        for i in range(200):
            one(i)
        grown = _rss_mb() - before
    print(f"RSS {before:.1f} MB before, grew {grown:+.1f} MB over 200 requests")
    assert grown < 10, f"RSS grew {grown:.1f} MB over 200 requests"


def test_a_long_prompt_is_prefilled_between_other_streams_tokens(tiny_dir):
    """A long prompt is read one prefill chunk per scheduler turn, so a running stream keeps getting tokens
    while it is read (before, the whole prefill ran in one turn and the stream waited for all of it); its
    answer is the same as alone."""
    import pocketvlm

    small = pocketvlm.load(tiny_dir, prefill_chunk_size=16)
    long_prompt = user("the quick brown fox jumps " * 12)  # ~300 tokens (a tokenizer of few merges): ~19 chunks
    with Engine({"t": small}, slots=2) as e:
        alone = e.chat.completions.create(model="t", messages=long_prompt, max_tokens=3, temperature=0)
        events, lock = [], threading.Lock()

        def stream(name, msgs, n):
            for ch in e.chat.completions.create(model="t", messages=msgs, max_tokens=n, temperature=0, stream=True):
                if ch.choices and ch.choices[0].delta.content is not None:
                    with lock:
                        events.append((name, ch.choices[0].delta.content))

        a = threading.Thread(target=stream, args=("a", user("Count: one two"), 120))
        a.start()
        while not events:
            time.sleep(0.001)
        b = threading.Thread(target=stream, args=("b", long_prompt, 3))
        with lock:
            events.append(("b submitted", ""))
        b.start()
        b.join()
        a.join()
    names = [n for n, _ in events]
    # tokens of "a" while b's prompt was read (from b's submission to its first token): one per prefill chunk
    during = names[names.index("b submitted"):names.index("b")].count("a")
    assert during >= 10, names
    assert "".join(t for n, t in events if n == "b") == alone.choices[0].message.content


def test_a_4mb_prompt_is_refused_before_tokenizing(engine, pm):
    from pocketvlm.errors import ContextWindowError

    t = time.perf_counter()
    with pytest.raises(ContextWindowError, match="characters"):
        engine.chat.completions.create(model="tiny", messages=user("x" * (4 << 20)), max_tokens=2)
    assert time.perf_counter() - t < 1.0  # (tokenizing it took 3.6-3.9 s on the worker thread before)
    just_under = "y " * (pm.context_window_size * 16 - 100)  # under the character cap: tokenized, then too long
    with pytest.raises(ContextWindowError, match="tokens"):
        engine.chat.completions.create(model="tiny", messages=user(just_under), max_tokens=2)


@pytest.mark.usefixtures("kernel")
def test_active_streams_decode_together_and_answer_as_alone(tiny_dir):
    """A q4 model on the fused step: the scheduler decodes its active slots' next tokens in one step (weights read
    once for all), and every answer, greedy or sampled with a seed, is the one that request gets alone."""
    import pocketvlm

    q4 = pocketvlm.load(tiny_dir, quantization="q4f16_1")
    assert q4.fused_reason is None  # the fused decode step runs it
    reqs = [(p, t, s) for p, t, s in [(PROMPTS[0], 0.0, None), (PROMPTS[2], 0.8, 5), (PROMPTS[3], 0.0, None),
                                      (PROMPTS[5], 1.0, 9)]]

    def alone(p, t, s):
        return "".join(e.text for e in q4.run(q4.chat_prompt(user(p)), max_tokens=24, slot=q4.new_slot(),
                                               temperature=t, seed=s))

    want = [alone(*r) for r in reqs]
    with Engine({"tiny": q4}, slots=4) as e:
        with ThreadPoolExecutor(4) as ex:
            got = list(ex.map(lambda r: e.chat.completions.create(
                model="tiny", messages=user(r[0]), max_tokens=24, temperature=r[1], seed=r[2]).choices[0].message.content,
                reqs))
        batched = e.schedulers["tiny"].batched
    assert got == want
    assert batched >= 2 * 24  # most tokens were decoded in batches of several slots
