"""Does one client freeze another? The longest gap between two tokens of a running stream while another client
sends a long prompt (1,500 tokens) or a 4 MB junk prompt, through the server's scheduler, on the real
Qwen2.5-Coder-0.5B-Instruct q4f16_1 (same run, 2 threads).

    .venv/bin/python benchmarks/stall.py [--threads 2]

Writes benchmarks/results/stall-<date>.md.
"""
from __future__ import annotations

import argparse
import datetime
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def longest_gap(engine, intruder) -> tuple[float, float]:
    """(longest gap between tokens of a running stream while ``intruder()`` runs beside it, the same before)."""
    stamps: list[float] = []
    started = threading.Event()

    def stream():
        s = engine.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "Write a long story."}],
                                           max_tokens=400, temperature=0.7, seed=1, stream=True)
        for _ in s:
            stamps.append(time.perf_counter())
            if len(stamps) == 40:
                started.set()

    t = threading.Thread(target=stream)
    t.start()
    started.wait()
    t0 = time.perf_counter()
    intruder()
    t1 = time.perf_counter()
    t.join()
    gaps = [(b - a, b) for a, b in zip(stamps, stamps[1:])]
    during = max((g for g, b in gaps if t0 <= b <= t1 + 0.5), default=0.0)
    before = max((g for g, b in gaps if b < t0 and b > stamps[10]), default=0.0)
    return during, before


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    import pocketvlm
    from pocketvlm.errors import PocketVLMError
    from pocketvlm.real_models import qwen_gguf_path
    from pocketvlm.serve.engine import Engine

    pm = pocketvlm.load(qwen_gguf_path(), quantization="q4f16_1", context_window_size=4096)
    words = " ".join(f"item{i}" for i in range(700))  # ~1,500 tokens
    assert 1300 < len(pm.tokenizer.encode(words)) < 1800

    def long_prompt():
        engine.chat.completions.create(model="qwen", messages=[{"role": "user", "content": words}], max_tokens=4)

    def junk():
        try:
            engine.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "x" * (4 << 20)}],
                                           max_tokens=4)
        except (PocketVLMError, ValueError) as e:
            return type(e).__name__
        return "answered"

    rows = []
    with Engine({"qwen": pm}, slots=4) as engine:
        for name, fn in (("a 1,500-token prompt", long_prompt), ("a 4 MB junk prompt", junk)):
            during, before = longest_gap(engine, fn)
            rows.append(f"| {name} | {during * 1e3:.0f} | {before * 1e3:.0f} |")
            print(rows[-1], flush=True)
    text = "\n".join([f"# one client beside another — {datetime.datetime.now():%Y-%m-%d %H:%M}",
                      f"Qwen2.5-Coder-0.5B-Instruct q4f16_1, {a.threads} threads, scheduler with 4 slots, prefill chunks "
                      f"of {pm.prefill_chunk_size} tokens", "",
                      "| while another client sends | longest gap between the stream's tokens, ms | before it, ms |",
                      "|---|---:|---:|", *rows])
    print(text)
    (HERE / "results" / f"stall-{datetime.date.today()}.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
