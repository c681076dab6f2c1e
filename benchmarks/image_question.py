"""The whole image question, pocketvlm vs llama.cpp on the same model: image encode ms and time to the first
answer token for one image + a short question, same run, same threads.

    python benchmarks/image_question.py [--threads 2] [--repeat 3] [--type q4_0] [--model scenes|clip-l]

(also a section of benchmarks/compare.py). Two models:
- ``scenes``: pocketvlm-scenes as it ships (q4f16_1 LLM, vision tower at its "auto" precision; a 168-px DINOv2
  ViT-S/14: 144 image tokens);
- ``clip-l``: a full-size LLaVA-1.5-style model, a random-weight CLIP ViT-L/14-336 tower (577 tokens, feature
  layer -2, the class token dropped: 576 image tokens) with a fresh MLP projector on the real
  Qwen2.5-Coder-0.5B-Instruct (``assemble_llava``; made once in the cache). Its answers mean nothing (the tower is
  random); its timings are those of the LLaVA-1.5 shape. pocketvlm quantizes its LLM to q4f16_1 at load.
llama.cpp runs ``pocketvlm export gguf MODEL --type q4_0`` (Q4_0 LLM: the same 4 bits per weight plus a scale per
32 weights, tower and projector f16) with ``llama-mtmd-cli``. llama.cpp's figures are its own: ``mtmd batch
encoding done in`` (vision tower) and ``llama_perf`` prompt eval (text and image embeddings through the LLM); its
first token = encode + prompt eval. pocketvlm's first token is timed around ``chat(..., stream=True)`` with the
image not in its feature cache.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
IMAGE = HERE.parent / "docs" / "scene-example.png"
QUESTION = "How many shapes are there?\nAnswer with a single word or number."


def vision_models(cache: Path) -> dict[str, Path]:
    """Full-size random-weight towers in HF layout, made once and cached."""
    import torch
    import transformers

    specs = {
        "clip-vit-l-14-336": transformers.CLIPVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
            patch_size=14, projection_dim=768, hidden_act="quick_gelu"),
        "siglip-so400m-384": transformers.SiglipVisionConfig(
            hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, image_size=384,
            patch_size=14),
    }
    out = {}
    for name, cfg in specs.items():
        d = cache / name
        if not (d / "config.json").exists():
            torch.manual_seed(0)
            cls = transformers.CLIPVisionModel if "clip" in name else transformers.SiglipVisionModel
            cls(cfg).save_pretrained(d)
        out[name] = d
    return out


def clip_l_llava() -> Path:
    """The random CLIP-L/336 tower + fresh projector + real Qwen2.5-Coder-0.5B LLaVA folder (made once)."""
    from pocketvlm.real_models import cache_dir, qwen_gguf_path
    from pocketvlm.train import assemble_llava

    cache = cache_dir() / "bench-models"
    folder = cache / "llava-clip-l-336-qwen0.5b"
    if not (folder / "config.json").exists():
        assemble_llava(qwen_gguf_path(), vision_models(cache)["clip-vit-l-14-336"], folder, image_size=336,
                       feature_layers=(-2,))
    return folder


MODELS = {"scenes": "pocketvlm-scenes", "clip-l": "llava-clip-l-336-qwen0.5b"}


def run(threads: int = 2, repeat: int = 3, kind: str = "q4_0", model: str = "scenes") -> dict:
    import torch

    import pocketvlm
    from pocketvlm.export import export_gguf
    from pocketvlm.export.llamacpp import binary, mtmd_answer
    from pocketvlm.image import load_image, preprocess
    from pocketvlm.real_models import cache_dir

    torch.set_num_threads(threads)
    name = MODELS[model]
    source = str(clip_l_llava()) if model == "clip-l" else name
    out = cache_dir() / "bench-models" / f"gguf-{name}-{kind}"
    files = out / f"{name}.gguf", out / f"mmproj-{name}.gguf"
    if not all(f.exists() for f in files):
        export_gguf(source, out, type=kind, name=name)
    m = pocketvlm.load(source, **({"quantization": "q4f16_1"} if model == "clip-l" else {}))
    msgs = [{"role": "user", "content": [{"type": "image", "image": str(IMAGE)}, {"type": "text", "text": QUESTION}]}]
    ours_enc, ours_first, answer = [], [], None
    for _ in range(repeat + 1):  # the first round warms up
        m._image_cache.clear()
        m.reset()
        img = load_image(str(IMAGE))
        t = time.perf_counter()
        pre = preprocess(img, m.image_processor, dtype=m.dtype, device=m.device)
        with torch.inference_mode():
            m.model.encode_images(pre.pixel_values, image_sizes=[pre.image_size])
        enc = (time.perf_counter() - t) * 1000
        m._image_cache.clear()
        m.reset()
        t = time.perf_counter()
        stream = m.chat(msgs, stream=True, max_tokens=8, temperature=0)
        first = next(iter(stream))
        ours_first.append((time.perf_counter() - t) * 1000)
        ours_enc.append(enc)
        answer = first + "".join(stream)
    ours_enc, ours_first = ours_enc[1:], ours_first[1:]
    exe = binary("llama-mtmd-cli")
    rows = {"pocketvlm": {"encode": ours_enc, "first": ours_first, "answer": answer.strip(),
                          "what": f"q4f16_1, vision {m.vision_precision}"}}
    if exe is not None:
        enc, first, wall = [], [], []
        for _ in range(repeat + 1):
            # "<__media__>\n": the text pocketvlm-scenes' chat template writes after an image part
            ans, t = mtmd_answer(files[0], files[1], IMAGE, "<__media__>\n" + QUESTION, n_predict=8, threads=threads,
                                 exe=exe)
            enc.append(t["encode_ms"])
            first.append(t["encode_ms"] + t["prompt_ms"])
            wall.append(t["wall_ms"])
        rows["llama.cpp"] = {"encode": enc[1:], "first": first[1:], "answer": ans, "wall": wall[1:],
                             "what": f"{kind.upper()} LLM, f16 tower (llama-mtmd-cli)"}
    return {"threads": threads, "repeat": repeat, "rows": rows, "llama_cpp": str(exe) if exe else None,
            "model": model}


def table(r: dict) -> list[str]:
    def ms(v):
        return f"{statistics.mean(v):.0f} ± {statistics.pstdev(v):.0f}"

    what = {"scenes": "pocketvlm-scenes", "clip-l": "random CLIP-L/336 + real Qwen 0.5B LLaVA"}[r.get("model", "scenes")]
    lines = [f"| image question, {r['threads']} threads ({what}, docs/scene-example.png) | weights | "
             "image encode ms | first answer token ms | answer |", "|---|---|---:|---:|---|"]
    for name, row in r["rows"].items():
        lines.append(f"| {name} | {row['what']} | {ms(row['encode'])} | {ms(row['first'])} | {row['answer']!r} |")
    if "llama.cpp" in r["rows"]:
        o, l = r["rows"]["pocketvlm"], r["rows"]["llama.cpp"]
        lines.append(f"| ratio (llama.cpp / pocketvlm) | | {statistics.mean(l['encode']) / statistics.mean(o['encode']):.2f}x "
                     f"| {statistics.mean(l['first']) / statistics.mean(o['first']):.2f}x | |")
    else:
        lines.append("llama-mtmd-cli not found: build it with benchmarks/build_llamacpp.sh")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--type", default="q4_0")
    ap.add_argument("--model", choices=list(MODELS), default="scenes")
    a = ap.parse_args(argv)
    print("\n".join(table(run(a.threads, a.repeat, a.type, a.model))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
