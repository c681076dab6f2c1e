"""pocketvlm vs llama.cpp on the same model exported to GGUF: greedy answers question by question.

    python benchmarks/gguf_interop.py [MODEL] --data QUESTIONS.jsonl [--per-type N] [--types f16,q8_0]
        [--workdir DIR] [--json OUT]

MODEL (default pocketvlm-scenes) is exported with ``pocketvlm export gguf`` at each type; then, for every
question, pocketvlm (float32, vision fp32, the original model) and ``llama-mtmd-cli`` (the exported pair,
greedy, jinja chat template, 2 threads) answer. Two image inputs: the scene image as it is (each engine
preprocesses: pocketvlm-scenes stretches to 168x168, llama.cpp pads to square first), and the image already
resized to the model's input size by pocketvlm (the engines then see the same pixels: this isolates the model
math). Prints identical-answer shares and both engines' accuracy. llama-mtmd-cli's prompt is ``--media-prefix`` +
the question, so that its chat template renders the text pocketvlm's does (pocketvlm-scenes' template writes
"<image>\n" before the question; llama-mtmd-cli, given no marker, puts the image right before the question).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main(argv=None):
    import pocketvlm
    from pocketvlm.eval import evaluate, load_questions, pocketvlm_answerer
    from pocketvlm.eval.matching import match
    from pocketvlm.export import export_gguf
    from pocketvlm.export.llamacpp import mtmd_answer

    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="pocketvlm-scenes")
    ap.add_argument("--data", required=True)
    ap.add_argument("--per-type", type=int, default=None)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--types", default="f16,q8_0")
    ap.add_argument("--inputs", default="resized,as-is", help="resized, as-is or both")
    ap.add_argument("--media-prefix", default="<__media__>\n",
                    help="what goes before the question in llama-mtmd-cli's -p: the image marker, then what the "
                         "model's chat template writes after an image part (pocketvlm-scenes: a newline)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="gguf-interop-"))
    qs = load_questions(a.data)
    ours_model = pocketvlm.load(a.model, quantization="q0f32", vision_precision="fp32")
    size = ours_model.image_processor.size or (ours_model.image_processor.shortest_edge,) * 2
    t = time.time()
    ours = evaluate(pocketvlm_answerer(ours_model), qs, limit=a.limit, per_type=a.per_type)
    t_ours = time.time() - t
    work.mkdir(parents=True, exist_ok=True)
    results = {"n": len(ours.records), "pocketvlm_accuracy": ours.overall.accuracy, "pocketvlm_s": t_ours}
    print(f"pocketvlm fp32: accuracy {100 * ours.overall.accuracy:.1f}% on {len(ours.records)} ({t_ours:.0f} s)")
    by_id = {q.id: q for q in qs}
    for kind in a.types.split(","):
        out = work / kind
        if not (out / f"{Path(a.model).name}.gguf").exists():
            t = time.time()
            export_gguf(a.model, out, type=kind, name=Path(a.model).name)
            print(f"exported {kind} in {time.time() - t:.0f} s")
        files = out / f"{Path(a.model).name}.gguf", out / f"mmproj-{Path(a.model).name}.gguf"
        for inp in a.inputs.split(","):
            same = correct = 0
            diffs = []
            t = time.time()
            for rec in ours.records:
                q = by_id[rec.id]
                img = Path(q.image)
                if inp == "resized":
                    from PIL import Image

                    img = work / "resized.png"
                    Image.open(q.image).convert("RGB").resize((size[1], size[0]), Image.BICUBIC).save(img)
                ans, _ = mtmd_answer(files[0], files[1], img, a.media_prefix + q.question, n_predict=16)
                mine = _ours_on(ours_model, img, q.question) if inp == "resized" else rec.prediction
                same += ans.strip() == mine.strip()
                correct += match(ans, q.answer, q.answer_kind, q.choices)[1]
                if ans.strip() != mine.strip():
                    diffs.append((q.id, mine, ans))
            n = len(ours.records)
            key = f"{kind}/{inp}"
            results[key] = {"identical": same, "n": n, "llamacpp_accuracy": correct / n, "seconds": time.time() - t,
                            "differ": diffs[:30]}
            print(f"{key}: identical {same}/{n} = {100 * same / n:.1f}%, llama.cpp accuracy {100 * correct / n:.1f}%"
                  f" ({time.time() - t:.0f} s)")
            for d in diffs[:10]:
                print("   differs:", d)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


def _ours_on(model, path: Path, question: str) -> str:
    msgs = [{"role": "user", "content": [{"type": "image", "image": str(path)}, {"type": "text", "text": question}]}]
    return model.chat(msgs, max_tokens=16, temperature=0)


if __name__ == "__main__":
    main()
