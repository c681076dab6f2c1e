"""Concurrent streams through the server's scheduler (pocketvlm.serve.engine): aggregate decode tokens/s of 1, 2 and
4 streams on the real Qwen2.5-Coder-0.5B-Instruct q4f16_1, same run. The active slots' next tokens are decoded in
one fused step (weights read once for all of them), so the aggregate should grow with the streams.

    .venv/bin/python benchmarks/batched_decode.py [--threads 2] [--max-tokens 160] [--temperature 0.7]

Decode rate of n streams = tokens produced while all n were generating / that window (from the last stream's
first token to the first stream's last token), so neither prefill nor a stream finishing early counts. Streams
are sampled with a seed (greedy requests also decode speculatively, which is measured in speculative.py).
Writes benchmarks/results/batched-decode-<date>.md.
"""
from __future__ import annotations

import argparse
import datetime
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
PROMPTS = ["Write a long story about a lighthouse keeper.", "Explain in detail how a compiler works.",
           "Describe the history of Rome at length.", "Write a long poem about the four seasons."]


def streams(engine, n: int, max_tokens: int, temperature: float) -> tuple[float, int]:
    """(aggregate decode tokens/s while all n streams run, tokens in that window)."""
    stamps: list[list[float]] = [[] for _ in range(n)]

    def one(i):
        s = engine.chat.completions.create(model="qwen", messages=[{"role": "user", "content": PROMPTS[i]}],
                                           max_tokens=max_tokens, temperature=temperature, seed=i, stream=True)
        for _ in s:
            stamps[i].append(time.perf_counter())

    ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    start = max(s[0] for s in stamps)
    end = min(s[-1] for s in stamps)
    tokens = sum(sum(1 for x in s if start < x <= end) for s in stamps)
    return tokens / (end - start), tokens


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    import pocketvlm
    from pocketvlm.real_models import qwen_gguf_path
    from pocketvlm.serve.engine import Engine

    pm = pocketvlm.load(qwen_gguf_path(), quantization="q4f16_1", context_window_size=1024)
    rates = {}
    with Engine({"qwen": pm}, slots=4) as e:
        streams(e, 1, 8, a.temperature)  # warm-up
        for n in (1, 2, 4):
            rates[n] = max(streams(e, n, a.max_tokens, a.temperature)[0] for _ in range(a.repeat))
            print(n, f"{rates[n]:.1f}", flush=True)
        batched = e.schedulers["qwen"].batched
    lines = [f"# concurrent streams, batched decode — {datetime.datetime.now():%Y-%m-%d %H:%M}",
             f"Qwen2.5-Coder-0.5B-Instruct q4f16_1, {a.threads} threads, scheduler with 4 slots, temperature "
             f"{a.temperature} with seeds, up to {a.max_tokens} tokens per stream, best of {a.repeat}", "",
             "| streams | aggregate decode tok/s | vs one stream |", "|---:|---:|---:|"]
    lines += [f"| {n} | {r:.1f} | {r / rates[1]:.2f}x |" for n, r in rates.items()]
    lines.append(f"\ndecodes run in batches of several slots: {batched}")
    text = "\n".join(lines)
    print(text)
    (HERE / "results" / f"batched-decode-{datetime.date.today()}.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
