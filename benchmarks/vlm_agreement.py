"""Greedy answers of pocketvlm vs transformers on the same LLaVA folder, question by question.

    python -m benchmarks.vlm_agreement FOLDER --data QUESTIONS.jsonl [--limit N] [--json OUT]

Both run float32 (pocketvlm with vision_precision fp32 and no quantization), the same chat template and
greedy decoding; the share of identical answers is printed (the README's pocketvlm-vs-transformers figure).
"""
from __future__ import annotations

import argparse
import json
import time


def main(argv=None):
    import pocketvlm
    from pocketvlm.eval import evaluate, load_questions, pocketvlm_answerer, transformers_answerer

    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--data", required=True)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--per-type", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--ours-json", default=None, help="also write pocketvlm's fp32 eval (as `pocketvlm eval --json`)")
    a = ap.parse_args(argv)
    qs = load_questions(a.data)
    t = time.time()
    ours = evaluate(pocketvlm_answerer(pocketvlm.load(a.folder, quantization="q0f32", vision_precision="fp32")),
                    qs, limit=a.limit, per_type=a.per_type)
    t_ours = time.time() - t
    t = time.time()
    ref = evaluate(transformers_answerer(a.folder), qs, limit=a.limit, per_type=a.per_type)
    t_ref = time.time() - t
    pairs = list(zip(ours.records, ref.records))
    same = sum(o.prediction == r.prediction for o, r in pairs)
    diff = [(o.id, o.prediction, r.prediction) for o, r in pairs if o.prediction != r.prediction]
    print(f"identical greedy answers: {same}/{len(pairs)} = {100 * same / len(pairs):.1f}%")
    print(f"accuracy pocketvlm {100 * ours.overall.accuracy:.1f}%, transformers {100 * ref.overall.accuracy:.1f}%;"
          f" time pocketvlm {t_ours:.0f} s, transformers {t_ref:.0f} s")
    for d in diff[:20]:
        print("  differs:", d)
    if a.ours_json:
        with open(a.ours_json, "w") as f:
            f.write(json.dumps({"model": ours.to_dict(), "blind": None}, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"identical": same, "n": len(pairs), "differ": diff, "seconds": [t_ours, t_ref],
                       "accuracy": [ours.overall.accuracy, ref.overall.accuracy]}, f, indent=1)


if __name__ == "__main__":
    main()
