"""Does one client freeze another? The longest gap between two tokens of a running stream while another client
sends a long prompt (~1,500 tokens), a 4 MB junk prompt, or an image question (a 168 px scene, and a 4000x3000
photo-sized picture that is decoded and resized first), through the server's scheduler, on the real default VLM
pocketvlm-scenes (Qwen2.5-Coder-0.5B-Instruct at q4f16_1 + the DINOv2 tower in bf16; same run, 2 threads).

    .venv/bin/python benchmarks/stall.py [--threads 2] [--model pocketvlm-scenes] [--prefill-chunk-size 512]

Every intruder runs the way the HTTP server runs it: its prompt is prepared (tokenized, images decoded and
encoded) on the caller's thread, then the scheduler's worker reads it one prefill chunk per turn between the
running stream's decode steps. Writes benchmarks/results/stall-<date>-chunk<size>.md.
"""
from __future__ import annotations

import argparse
import base64
import datetime
import io
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
STREAM_TOKENS = 240


def _data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def longest_gap(engine, model: str, intruder, timeout: float = 300.0) -> tuple[float, float, float, str]:
    """(longest gap between tokens of a running stream while ``intruder()`` runs beside it, the longest before
    it, the intruder's own seconds, what the intruder got). The stream runs in a daemon thread and every wait has
    a deadline, so a failure is reported, never a hang."""
    stamps: list[float] = []
    started, failed = threading.Event(), []

    def stream():
        try:
            s = engine.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Write a long story about a lighthouse keeper."}],
                max_tokens=STREAM_TOKENS, temperature=0.7, seed=1, stream=True)
            for ch in s:
                if ch.choices and ch.choices[0].delta.content:
                    stamps.append(time.perf_counter())
                    if len(stamps) == 30:
                        started.set()
        except Exception as e:  # noqa: BLE001 - reported below
            failed.append(e)
        finally:
            started.set()

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    if not started.wait(timeout) or failed or len(stamps) < 30:
        raise RuntimeError(f"the stream did not get going: {failed or len(stamps)}")
    t0 = time.perf_counter()
    try:
        got = intruder()
    except Exception as e:  # noqa: BLE001 - a refusal is an outcome
        got = f"{type(e).__name__}: {str(e)[:60]}"
    t1 = time.perf_counter()
    t.join(timeout)
    if t.is_alive() or failed:
        raise RuntimeError(f"the stream did not finish: {failed}")
    if stamps[-1] < t1:
        raise RuntimeError(f"the stream ended before the intruder did ({len(stamps)} tokens): raise STREAM_TOKENS")
    gaps = [(b - a, b) for a, b in zip(stamps, stamps[1:])]
    during = max((g for g, b in gaps if t0 <= b <= t1 + 0.5), default=0.0)
    before = max((g for g, b in gaps if stamps[10] < b < t0), default=0.0)
    return during, before, t1 - t0, got


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="pocketvlm-scenes")
    ap.add_argument("--prefill-chunk-size", type=int, default=512)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from PIL import Image

    import pocketvlm
    from pocketvlm.scenes import make_scene
    from pocketvlm.serve.engine import Engine

    pm = pocketvlm.load(a.model, prefill_chunk_size=a.prefill_chunk_size)
    words = " ".join(f"item{i}" for i in range(390))  # ~1,500 tokens
    n_long = len(pm.tokenizer.encode(words))
    scene = make_scene(1, 3).image
    big = scene.resize((4000, 3000), Image.BILINEAR)

    def ask(content, max_tokens=4):
        r = engine.chat.completions.create(model="m", messages=[{"role": "user", "content": content}],
                                           max_tokens=max_tokens, temperature=0)
        return repr(r.choices[0].message.content)

    def image_question(img):
        return lambda: ask([{"type": "image_url", "image_url": {"url": _data_url(img)}},
                            {"type": "text", "text": "How many shapes are there?"}])

    cases = [(f"a {n_long:,}-token prompt", lambda: ask(words)),
             ("a 4 MB junk prompt", lambda: ask("x" * (4 << 20))),
             (f"an image question ({scene.width}x{scene.height} scene)", image_question(scene)),
             ("an image question (4000x3000 picture)", image_question(big))]
    rows = []
    with Engine({"m": pm}, slots=4) as engine:
        ask("Hi")  # warm-up
        for name, fn in cases:
            during, before, took, got = longest_gap(engine, "m", fn)
            rows.append(f"| {name} | {during * 1e3:.0f} | {before * 1e3:.0f} | {took:.2f} | {got} |")
            print(rows[-1], flush=True)
    text = "\n".join([f"# one client beside another — {datetime.datetime.now():%Y-%m-%d %H:%M}", "",
                      f"{a.model} (q4f16_1 language model), {a.threads} threads, scheduler with 4 slots, prefill "
                      f"chunks of {pm.prefill_chunk_size} tokens; a sampled stream of {STREAM_TOKENS} tokens runs "
                      "while the other request is prepared and answered", "",
                      "| while another client sends | longest gap between the stream's tokens, ms | longest gap "
                      "before it, ms | the other request took, s | it got |",
                      "|---|---:|---:|---:|---|", *rows])
    print(text)
    (HERE / "results" / f"stall-{datetime.date.today()}-chunk{a.prefill_chunk_size}.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
