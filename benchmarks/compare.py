"""Side-by-side, one run, same weights, same prompt, same thread count: pocketvlm vs transformers (fp32 and
bf16) vs llama.cpp, on the real Qwen2.5-Coder-0.5B-Instruct GGUF; and image encoding of full-size random-weight
CLIP ViT-L/14-336 and SigLIP-so400m-384 (pocketvlm fp32 / fast path vs transformers fp32).

    .venv/bin/python benchmarks/compare.py [--threads 2] [--prompt-tokens 512] [--gen-tokens 64] [--repeat 3]

Needs the test extras (transformers) and llama.cpp built by ``benchmarks/build_llamacpp.sh`` (skipped with a
note when absent). Prints a table of absolute figures and ratios and writes it to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def best_of(fn, repeat):
    xs = []
    for _ in range(repeat):
        xs.append(fn())
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def transformers_llm(path: Path, dtype, ids, gen_tokens, repeat):
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype).eval()
    x = torch.tensor([ids])

    def prefill():
        t = time.perf_counter()
        with torch.inference_mode():
            model(x, use_cache=True)
        return len(ids) / (time.perf_counter() - t)

    def decode():
        with torch.inference_mode():
            cache = DynamicCache(config=model.config)
            out = model(x[:, :16], past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            t = time.perf_counter()
            for _ in range(gen_tokens):
                out = model(tok, past_key_values=out.past_key_values, use_cache=True)
                tok = out.logits[:, -1:].argmax(-1)
            return gen_tokens / (time.perf_counter() - t)

    prefill()  # warm-up
    r = {"prefill": best_of(prefill, repeat), "decode": best_of(decode, repeat)}
    del model
    gc.collect()
    return r


VISION_PATHS = ("fp32", "bf16", "int8")


def bench_vision(folder: Path, repeat: int) -> dict:
    """One tile through the full-size tower: transformers fp32, then pocketvlm at each vision precision, each
    checked against transformers' features (max abs diff for fp32, relative L2 error for the fast paths)."""
    import transformers

    from pocketvlm import loading
    from pocketvlm.quant.vision_fast import apply_vision_precision

    size = 336 if "clip" in folder.name else 384
    px = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    ref = transformers.AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    layer = -2 if "clip" in folder.name else -1

    def t(fn):
        fn()
        def one():
            s = time.perf_counter()
            fn()
            return (time.perf_counter() - s) * 1000
        return best_of(one, repeat)

    r = {}
    with torch.inference_mode():
        r["transformers fp32"] = t(lambda: ref(px, output_hidden_states=True))
        want = ref(px, output_hidden_states=True).hidden_states[layer]
        del ref
        gc.collect()
        for p in VISION_PATHS:
            ours = loading.load(folder).model
            apply_vision_precision(ours, p)
            r[f"pocketvlm {p}"] = t(lambda: ours(px, output_layer=layer))
            got = ours(px, output_layer=layer).float()
            if p == "fp32":
                r["fp32 max abs diff"] = float((got - want).abs().max())
            r[f"{p} rel err"] = float((got - want).norm() / want.norm())
            del ours
            gc.collect()
    return r


LLAMACPP_PEER = "llama.cpp Q4_0 (same bits)"
GGUF_ROW = "pocketvlm gguf (the Q4_K_M file's own blocks)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quantization", default="q4f16_1")
    ap.add_argument("--skip", action="append", default=[],
                    help="llm-pocketvlm, pocketvlm-gguf, int8-prefill, transformers, llamacpp, vision, "
                    "image-question, image-question-clip-l")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from pocketvlm.bench import run_bench
    from pocketvlm.quant import cpu_kernel, paths
    from pocketvlm.real_models import cache_dir, qwen_gguf_path

    path = qwen_gguf_path()
    rows, notes = {}, []
    ids = torch.randint(100, 30000, (a.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    # Decode is measured at two depths: right after the prompt (--prompt-tokens tokens in the cache: what a chat
    # turn sees) and from an (almost) empty context (llama-bench's plain tg test; 16 tokens for the others).
    if "llm-pocketvlm" not in a.skip:
        # the fused decode step (default); the GGUF file's own blocks (the very weights llama.cpp runs);
        # the same q4 weights decoded by the eager PyTorch modules; fp32
        configs = [(a.quantization, None, f"pocketvlm {a.quantization}"), ("gguf", None, GGUF_ROW),
                   (a.quantization, False, f"pocketvlm {a.quantization} eager decode"), ("q0f32", None, "pocketvlm fp32")]
        if "amx_bf16" in cpu_kernel.cpu_flags() and "int8-prefill" not in a.skip:
            # where AMX runs 512-row prefill GEMMs in bf16, also time the int8 GEMM at every length: the prefill of
            # CPUs with AVX-512 VNNI and without AMX (Zen 4, Ice Lake), measured on this core
            configs.insert(1, (a.quantization, "int8-prefill", f"pocketvlm {a.quantization}, int8 prefill at any length"))
        for q, fused, name in configs:
            if q == "gguf" and "pocketvlm-gguf" in a.skip:
                continue
            saved = paths.PREFILL_INT8_ROWS
            if fused == "int8-prefill":
                fused, paths.PREFILL_INT8_ROWS = None, (paths.PREFILL_INT8_MIN_ROWS, 1 << 62)
            try:
                r = run_bench(path, prompt_tokens=a.prompt_tokens, gen_tokens=a.gen_tokens, repeat=a.repeat,
                              threads=a.threads, quantization=q, fused=fused, progress=True)
            finally:
                paths.PREFILL_INT8_ROWS = saved
            rows[name] = {"prefill": (r.prefill_tok_s["mean"], r.prefill_tok_s["stdev"]),
                          "decode deep": (r.decode_tok_s["mean"], r.decode_tok_s["stdev"]),
                          "bandwidth share": r.bandwidth_share, "decode path": r.decode_path,
                          "MB/token": r.bytes_per_token / 1e6, "MB/token KV": r.kv_bytes_per_token / 1e6,
                          "load s": r.load_s,
                          "bandwidth GB/s": r.bandwidth_gb_s}
            if fused is None and q and "int8 prefill" not in name:
                s = run_bench(path, prompt_tokens=16, gen_tokens=a.gen_tokens, repeat=a.repeat, threads=a.threads,
                              quantization=q, progress=True, measure_bw=False)
                rows[name]["decode"] = (s.decode_tok_s["mean"], s.decode_tok_s["stdev"])
                rows[name]["MB/token empty"] = s.bytes_per_token / 1e6
            gc.collect()
    if "transformers" not in a.skip:
        for name, dt in [("transformers fp32", torch.float32), ("transformers bf16", torch.bfloat16)]:
            rows[name] = transformers_llm(path, dt, ids, a.gen_tokens, a.repeat)
    if "llamacpp" not in a.skip:
        try:
            import llamacpp

            # the same file (Q4_K_M), and the fair peer of q4f16_1: the same bits (Q4_0 with its output and token
            # embedding at Q4_0 too, 338 MiB like the q4f16_1 package), made once by llama-quantize
            q4_0 = llamacpp.llamacpp_home() / "qwen-q4_0.gguf"
            if not q4_0.is_file():
                llamacpp.quantize_q4_0(path, q4_0)
            for name, f in (("llama.cpp Q4_K_M", path), (LLAMACPP_PEER, q4_0)):
                lb = llamacpp.run_bench(f, threads=a.threads, n_prompt=a.prompt_tokens, n_gen=a.gen_tokens,
                                        repetitions=a.repeat, depth=a.prompt_tokens)
                rows[name] = {"prefill": (lb.prefill.tokens_per_s, lb.prefill.stddev),
                              "decode": (lb.decode.tokens_per_s, lb.decode.stddev)}
                if lb.decode_at_depth:
                    rows[name]["decode deep"] = (lb.decode_at_depth.tokens_per_s, lb.decode_at_depth.stddev)
            notes.append("llama.cpp build: " + llamacpp.build_info().get("cmake_flags", "(no BUILD-INFO.txt)"))
        except (FileNotFoundError, RuntimeError) as e:
            notes.append(f"llama.cpp skipped: {e}")
    image_q = image_q_clip = None
    if "image-question" not in a.skip:  # pocketvlm-scenes vs llama-mtmd-cli on its GGUF export
        import image_question

        image_q = image_question.run(a.threads, a.repeat)
        gc.collect()
        if "image-question-clip-l" not in a.skip:  # the LLaVA-1.5 shape: CLIP-L/336, 576 image tokens
            image_q_clip = image_question.run(a.threads, a.repeat, model="clip-l")
            gc.collect()
    vis = {}
    if "vision" not in a.skip:
        import image_question

        for name, folder in image_question.vision_models(cache_dir() / "bench-models").items():
            vis[name] = bench_vision(folder, a.repeat)
            gc.collect()

    lines = [f"# pocketvlm compare — {datetime.datetime.now():%Y-%m-%d %H:%M}",
             f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
             f"{torch.__version__}; model: Qwen2.5-Coder-0.5B-Instruct ({path.name}); prompt {a.prompt_tokens} "
             f"tokens, {a.gen_tokens} generated, {a.repeat} repeats",
             f"command: python benchmarks/compare.py {' '.join(argv or sys.argv[1:])}"
             # OMP_WAIT_POLICY=passive slows llama.cpp's and torch's many small parallel regions 2x: say it
             + "".join(f" ({k}={os.environ[k]})" for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS") if k in os.environ),
             "",
             f"| engine | prefill tok/s ({a.prompt_tokens}) | decode tok/s, empty context | decode tok/s after the "
             f"{a.prompt_tokens}-token prompt |", "|---|---:|---:|---:|"]

    def cell(r, key, fmt="{:.2f}"):
        return f"{fmt.format(r[key][0])} ± {fmt.format(r[key][1])}" if key in r else "-"

    for name, r in rows.items():
        lines.append(f"| {name} | {cell(r, 'prefill', '{:.1f}')} | {cell(r, 'decode')} | {cell(r, 'decode deep')} |")
    ours = rows.get(f"pocketvlm {a.quantization}")
    if ours:
        lines += ["", f"| ratio (pocketvlm {a.quantization} / other) | prefill | decode, empty context | "
                  "decode after the prompt |", "|---|---:|---:|---:|"]

        def ratio(r, key):
            return f"{ours[key][0] / r[key][0]:.2f}x" if key in ours and key in r else "-"

        for name, r in rows.items():
            if name != f"pocketvlm {a.quantization}":
                lines.append(f"| vs {name} | {ratio(r, 'prefill')} | {ratio(r, 'decode')} | {ratio(r, 'decode deep')} |")
        if GGUF_ROW in rows and "llama.cpp Q4_K_M" in rows:  # the same weights on both engines
            g, lc = rows[GGUF_ROW], rows["llama.cpp Q4_K_M"]
            cells = [f"{g[k][0] / lc[k][0]:.2f}x" if k in g and k in lc else "-" for k in ("prefill", "decode", "decode deep")]
            lines.append(f"| pocketvlm gguf / llama.cpp, the same file | {' | '.join(cells)} |")
        i8 = rows.get(f"pocketvlm {a.quantization}, int8 prefill at any length")
        if i8 and LLAMACPP_PEER in rows:  # the prefill of VNNI CPUs without AMX, against the same-bits peer
            lines.append(f"| pocketvlm {a.quantization} with the int8 prefill at any length / {LLAMACPP_PEER} | "
                         f"{i8['prefill'][0] / rows[LLAMACPP_PEER]['prefill'][0]:.2f}x | - | - |")
        lines.append(f"\npocketvlm {a.quantization}: measured bandwidth {ours['bandwidth GB/s']:.1f} GB/s; decode after the "
                     f"prompt reads {ours['MB/token']:.0f} MB per token (of which {ours['MB/token KV']:.1f} MB KV cache) "
                     f"-> {100 * ours['bandwidth share']:.0f}% of the limit")
        if "decode" in ours:
            limit = ours["bandwidth GB/s"] * 1e3 / ours["MB/token empty"]
            lines.append(f"empty-context decode reads {ours['MB/token empty']:.0f} MB per token -> "
                         f"{100 * ours['decode'][0] / limit:.0f}% of the limit")
    if vis:
        lines += ["", "| image encode, 1 tile (ms; speed-up vs transformers fp32; relative L2 error of the features) | "
                  "transformers fp32 | " + " | ".join(f"pocketvlm {p}" for p in VISION_PATHS) + " |",
                  "|---|---:|" + "---:|" * len(VISION_PATHS)]
        for name, r in vis.items():
            base = r["transformers fp32"][0]
            cells = [f"{r[f'pocketvlm {p}'][0]:.0f} ± {r[f'pocketvlm {p}'][1]:.0f} ({base / r[f'pocketvlm {p}'][0]:.2f}x; "
                     f"{r[f'{p} rel err']:.1e})" for p in VISION_PATHS]
            lines.append(f"| {name} | {base:.0f} ± {r['transformers fp32'][1]:.0f} | " + " | ".join(cells) + " |")
        lines.append("fp32 max abs diff vs transformers: "
                     + ", ".join(f"{n} {r['fp32 max abs diff']:.1e}" for n, r in vis.items()))
    for r in (image_q, image_q_clip):
        if r:
            lines += [""] + image_question.table(r)
    lines += [""] + notes
    text = "\n".join(lines)
    print(text)
    out = HERE / "results" / f"compare-{datetime.datetime.now():%Y-%m-%d-%H%M}.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text + "\n")
    (out.with_suffix(".json")).write_text(json.dumps({"llm": rows, "vision": vis, "image_question": image_q,
                                                          "image_question_clip_l": image_q_clip}, indent=1,
                                                         default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
