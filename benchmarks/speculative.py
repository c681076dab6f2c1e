"""Speculative greedy decoding (prompt lookup, pocketvlm/engine/speculative.py) vs plain greedy decoding, same
model, same run: decode tokens/s (first answer token to last, so prefill is not in it), whether the answers are
identical, and how many draft tokens were kept.

    .venv/bin/python benchmarks/speculative.py [--threads 2] [--repeat 2] [--max-tokens 300]

Tasks: one grounded in its input (add type hints to a 60-line standard-library function: the answer repeats the
code) and free ones (a story, a list) where drafts rarely hold. Real Qwen2.5-Coder-0.5B-Instruct at q4f16_1.
Writes benchmarks/results/speculative-<date>.md.
"""
from __future__ import annotations

import argparse
import datetime
import inspect
import json
import statistics
import textwrap
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def tasks() -> dict[str, str]:
    src = "\n".join(textwrap.dedent(inspect.getsource(json.JSONEncoder.iterencode)).splitlines()[:60])
    return {
        "add type hints to a 60-line function": "Add type hints to this Python function. Reply with the whole "
                                                f"function only.\n\n```python\n{src}\n```",
        "a short story": "Write a short story about a robot who learns to paint.",
        "explain a concept": "Explain what a hash table is and when to use one.",
        "count to 60": "List the numbers 1 to 60, separated by commas.",
    }


def decode_rate(pm, msgs, max_tokens: int, draft: int) -> tuple[float, list[int], int]:
    """(decode tokens/s, tokens, draft tokens kept) of one greedy answer on a fresh slot."""
    from pocketvlm.engine import speculative

    kept = []
    record = speculative.PromptLookup.record

    def spy(self, proposed, k):
        kept.append(k)
        return record(self, proposed, k)

    speculative.PromptLookup.record = spy
    try:
        slot = pm.new_slot()
        slot.max_draft = draft
        times, tokens = [], []
        for ev in pm.run(pm.chat_prompt(msgs), max_tokens=max_tokens, temperature=0, slot=slot):
            times.append(time.perf_counter())
            tokens.append(ev.token)
    finally:
        speculative.PromptLookup.record = record
    return (len(tokens) - 1) / (times[-1] - times[0]), tokens, sum(kept)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=300)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    import pocketvlm
    from pocketvlm.real_models import qwen_gguf_path

    pm = pocketvlm.load(qwen_gguf_path(), quantization="q4f16_1", context_window_size=2048)
    lines = [f"# speculative greedy decoding — {datetime.datetime.now():%Y-%m-%d %H:%M}",
             f"Qwen2.5-Coder-0.5B-Instruct q4f16_1, {a.threads} threads, greedy, up to {a.max_tokens} tokens, "
             f"{a.repeat} alternating runs each (mean); decode tok/s from the first answer token to the last", "",
             "| task | tokens | plain tok/s | speculative tok/s | speed-up | draft tokens kept | identical |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for name, prompt in tasks().items():
        msgs = [{"role": "user", "content": prompt}]
        plain, spec = [], []
        for _ in range(a.repeat):
            r0, t0, _ = decode_rate(pm, msgs, a.max_tokens, 0)
            r1, t1, kept = decode_rate(pm, msgs, a.max_tokens, 7)
            plain.append(r0)
            spec.append(r1)
        p, s = statistics.fmean(plain), statistics.fmean(spec)
        lines.append(f"| {name} | {len(t0)} | {p:.1f} | {s:.1f} | {s / p:.2f}x | {kept} | {'yes' if t0 == t1 else 'NO'} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    out = HERE / "results" / f"speculative-{datetime.date.today()}.md"
    out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
