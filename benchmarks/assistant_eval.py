"""The two-model assistant against its VLM alone on the held-out scenes, and its latency split.

    python benchmarks/assistant_eval.py --per-type 20 --chat qwen2.5-coder-0.5b-instruct -o benchmarks/results/assistant

Accuracy: every question of the held-out scenes set (pocketvlm.eval's default data, seed 1) asked to the VLM
alone (as ``pocketvlm eval`` asks it) and to the assistant with each describe prompt, greedy, scored by
``pocketvlm.eval.matching``; one loaded VLM and chat model serve all of them (resident). Latency: for a few
fresh images, the describe time, the chat model's first token and its decode rate, for the resident and the
sequential policy (the sequential one includes loading each model, which is what that policy costs).
Writes ``<out>.json`` (every answer) and ``<out>.md`` (tables) as it goes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import pocketvlm
from pocketvlm.assistant import DEFAULT_DESCRIBE_PROMPT, Assistant
from pocketvlm.eval.cli import default_data
from pocketvlm.eval.matching import match
from pocketvlm.eval.vqa import load_questions, select, wilson_interval

PROMPTS = {"default": DEFAULT_DESCRIBE_PROMPT, "question": "{question}"}
OPEN_QUESTION = "What do you see in this picture?"


def ask(model, image, question, max_tokens=16, **kw):
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(image)}},
                                         {"type": "text", "text": question}]}]
    return model.chat(msgs, temperature=0, max_tokens=max_tokens, **kw)


def timed_answer(asst, image, question, max_tokens=64):
    """(describe ms, answer first-token ms, decode tokens/s, text, description)."""
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(image)}},
                                         {"type": "text", "text": question}]}]
    t0 = time.perf_counter()
    prompt = asst.chat_prompt(msgs, max_tokens=max_tokens)
    t1 = time.perf_counter()
    first, n, parts = None, 0, []
    for ev in asst.run(prompt, temperature=0, max_tokens=max_tokens):
        n += 1
        parts.append(ev.text)
        if first is None:
            first = time.perf_counter()
    t2 = time.perf_counter()
    describe_ms = sum(d["describe_ms"] for d in prompt.extra["descriptions"])
    return {"describe_ms": describe_ms, "prompt_ms": 1000 * (t1 - t0), "first_token_ms": 1000 * (first - t1),
            "tokens_per_s": (n - 1) / (t2 - first) if n > 1 else None, "tokens": n, "answer": "".join(parts),
            "description": prompt.extra["descriptions"][0]["description"]}


def summarize(records, systems):
    types = sorted({r["type"] for r in records}, key=lambda t: [r["type"] for r in records].index(t))
    rows = ["| type | n | " + " | ".join(systems) + " |", "|---|---:|" + "---:|" * len(systems)]
    for t in types + ["overall"]:
        rs = [r for r in records if t == "overall" or r["type"] == t]
        cells = []
        for s in systems:
            c = sum(r[s]["correct"] for r in rs)
            lo, hi = wilson_interval(c, len(rs))
            cells.append(f"{100 * c / len(rs):.1f} [{100 * lo:.0f}, {100 * hi:.0f}]")
        rows.append(f"| {t} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def latency_table(lat):
    rows = ["| policy | n | describe ms | prompt ms (describe + chat model load) | answer first-token ms | "
            "answer tokens/s |", "|---|---:|---:|---:|---:|---:|"]
    for policy, rs in lat.items():
        if not rs:
            continue
        med = lambda k: statistics.median([r[k] for r in rs if r[k] is not None])  # noqa: E731
        rows.append(f"| {policy} | {len(rs)} | {med('describe_ms'):.0f} | {med('prompt_ms'):.0f} | {med('first_token_ms'):.0f} | "
                    f"{med('tokens_per_s'):.1f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vision", default="pocketvlm-scenes")
    ap.add_argument("--chat", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--per-type", type=int, default=20)
    ap.add_argument("--prompts", default="default,question", help=f"describe prompts to run: {', '.join(PROMPTS)}")
    ap.add_argument("--latency-images", type=int, default=4, help="0: no latency runs")
    ap.add_argument("--sequential-images", type=int, default=2)
    ap.add_argument("-o", "--out", default="benchmarks/results/assistant")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    questions = select(load_questions(default_data(200)), per_type=a.per_type)
    by_type: dict = {}
    for q in questions:
        by_type.setdefault(q.type, []).append(q)
    questions = [q for group in zip(*by_type.values()) for q in group]  # types interleaved: a partial run is fair
    vlm, chat = pocketvlm.load(a.vision), pocketvlm.load(a.chat)
    names = [p for p in a.prompts.split(",") if p]
    assistants = {p: Assistant(vlm, chat, describe_prompt=PROMPTS[p]) for p in names}
    systems = ["vlm"] + [f"assistant[{p}]" for p in names]
    result = {"vision": a.vision, "chat": a.chat, "per_type": a.per_type, "prompts": {p: PROMPTS[p] for p in names},
              "records": [], "latency": {}}

    def save():
        md = [f"# assistant vs VLM alone: {a.vision} + {a.chat}, held-out scenes (seed 1), greedy", "",
              summarize(result["records"], systems) if result["records"] else "", "",
              latency_table(result["latency"]) if result["latency"] else ""]
        out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        out.with_suffix(".md").write_text("\n".join(md) + "\n")

    # latency first (short), resident then sequential, on images not used before
    seen = []
    for q in questions:
        if q.image not in seen:
            seen.append(q.image)
    lat_img = seen[-a.latency_images:]  # an open question: the answer is long enough to time its decode
    result["latency"]["resident"] = [dict(timed_answer(assistants[names[0]], img, OPEN_QUESTION), image=str(img))
                                     for img in (lat_img if a.latency_images else [])]
    save()
    if a.latency_images and a.sequential_images:
        seq = Assistant(a.vision, a.chat, describe_prompt=PROMPTS[names[0]], memory="sequential")
        result["latency"]["sequential"] = [dict(timed_answer(seq, img, OPEN_QUESTION), image=str(img))
                                           for img in lat_img[:a.sequential_images]]
        del seq
    save()
    print(latency_table(result["latency"]), flush=True)

    t0 = time.perf_counter()
    for i, q in enumerate(questions, 1):
        rec = {"id": q.id, "type": q.type, "question": q.question, "answer": q.answer}
        for s, model in zip(systems, [vlm] + list(assistants.values())):
            pred = ask(model, q.image, q.question)
            parsed, correct = match(pred, q.answer, q.answer_kind, q.choices)
            rec[s] = {"prediction": pred, "correct": bool(correct)}
            if s != "vlm":
                rec[s]["description"] = model.last_info()["descriptions"][0]["description"]
        result["records"].append(rec)
        if i % 5 == 0 or i == len(questions):
            save()
            print(f"{i}/{len(questions)} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    print(summarize(result["records"], systems))
    return 0


if __name__ == "__main__":
    sys.exit(main())
