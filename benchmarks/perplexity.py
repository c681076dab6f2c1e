"""Perplexity of pocketvlm's quantization modes on the real GGUF models, next to llama.cpp's.

    .venv/bin/python benchmarks/perplexity.py                       # Qwen and Gemma, 8 windows of 512
    .venv/bin/python benchmarks/perplexity.py --models qwen --windows 4 --modes q4f16_1

For each model: the GGUF dequantized to float32 ("unquantized": the Q4_K_M weights, exactly, in
fp32), the same weights re-quantized by pocketvlm to each MLC mode (linears and embeddings, as
``pocketvlm.load(path, quantization=MODE)`` does), and llama.cpp's ``llama-perplexity`` on the
original Q4_K_M file. Same text (benchmarks/llamacpp.py's pydoc_data prose), same tokens, same
windows, same scoring (second half of each window, BOS replacing each window's first token where
the tokenizer adds BOS; see pocketvlm/eval/perplexity.py). Writes a markdown table to
benchmarks/results/perplexity.md.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llamacpp  # noqa: E402

import pocketvlm  # noqa: E402
from pocketvlm.eval import evaluate_perplexity  # noqa: E402
from pocketvlm.quant import quantize_model  # noqa: E402
from pocketvlm.real_models import gemma3_gguf_path, qwen_gguf_path  # noqa: E402

MODELS = {"qwen": ("Qwen2.5-Coder-0.5B-Instruct Q4_K_M", qwen_gguf_path),
          "gemma3": ("Gemma 3 270M Q4_K_M", gemma3_gguf_path)}
MODES = ["q8f16_1", "q4f16_1", "q4f32_1", "q3f16_1"]
RESULTS = Path(__file__).resolve().parent / "results" / "perplexity.md"


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the persistent tensors (weights, packed codes, scales), each storage counted once
    (tied embeddings/LM head share one). Taken before any forward, while quantized modules hold
    their plain layout."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def gguf_tensor_bytes(path: Path) -> int:
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(path).tensors)


def gguf_type_mix(path: Path) -> str:
    """Share of the GGUF's weights per tensor type: llama.cpp's "Q4_K_M" falls back to Q5_0/Q8_0 for
    rows not a multiple of 256 (896 for Qwen-0.5B, 640 for Gemma-270M), so these files are mostly 5-8 bit."""
    from collections import Counter

    from gguf import GGUFReader

    mix = Counter()
    for t in GGUFReader(path).tensors:
        mix[t.tensor_type.name] += int(t.n_elements)
    total = sum(mix.values())
    return ", ".join(f"{k} {v / total:.1%}" for k, v in mix.most_common())


def llama_window_ppls(log: str) -> list[float]:
    return [float(x) for x in re.findall(r"\[\d+\]([0-9.]+),", log)]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def run_model(key: str, args, text: str, text_file: Path) -> list[dict]:
    label, path_fn = MODELS[key]
    path = path_fn()
    t0 = time.perf_counter()
    pm = pocketvlm.load(str(path), device=args.device, quantization="q0f32")  # the unquantized reference
    print(f"\n{label}: loaded in {time.perf_counter() - t0:.0f} s", flush=True)
    tok = pm.tokenizer
    bos = tok.bos_token_id if tok.add_bos_token else None
    ids = tok.encode(text)
    print(f"{len(ids)} tokens, BOS per window: {bos is not None}", flush=True)
    rows = []

    def measure(name, model, nbytes):
        t = time.perf_counter()
        r = evaluate_perplexity(model, ids, args.context, bos_token_id=bos, max_windows=args.windows)
        secs = time.perf_counter() - t
        print(f"  {name:12s} PPL {r.ppl:.4f} ± {r.stderr:.4f}  ({r.n_windows} windows, {r.n_scored} tokens, "
              f"{secs:.0f} s)  per-window running PPL {[round(x, 4) for x in r.window_ppl]}", flush=True)
        rows.append(dict(model=label, engine="pocketvlm", mode=name, ppl=r.ppl, stderr=r.stderr, bytes=nbytes,
                         windows=r.n_windows, scored=r.n_scored, seconds=secs, running=r.window_ppl))

    if "none" in args.modes:
        measure("unquantized", pm.model, weight_bytes(pm.model))
    for mode in [m for m in args.modes if m != "none"]:
        qm = copy.deepcopy(pm.model)  # same as load(path, quantization=mode), without re-reading the GGUF
        base, _, scope = mode.partition(":")
        if scope == "decoder":  # diagnostic: decoder linears only, embedding and LM head stay fp32
            quantize_model(qm, base, skip=["lm_head"], embeddings=False)
        else:
            quantize_model(qm, base, embeddings=True)
        measure(mode, qm, weight_bytes(qm))
        del qm
    del pm

    if not args.skip_llamacpp:
        t = time.perf_counter()
        res = llamacpp.run_perplexity(path, text_file, ctx=args.context, threads=args.threads, chunks=args.windows)
        secs = time.perf_counter() - t
        running = llama_window_ppls(res.log)
        print(f"  {'llama.cpp':12s} PPL {res.ppl:.4f} ± {res.stderr:.4f}  ({res.n_chunks} chunks, {secs:.0f} s)  "
              f"per-window running PPL {running}", flush=True)
        rows.append(dict(model=label, engine="llama.cpp", mode="Q4_K_M (llama-perplexity)", ppl=res.ppl,
                         stderr=res.stderr, bytes=gguf_tensor_bytes(path), windows=res.n_chunks,
                         mix=gguf_type_mix(path),
                         scored=res.n_chunks * (args.context - args.context // 2 - 1), seconds=secs, running=running))
    return rows


def table(rows: list[dict]) -> str:
    out = ["| model | engine | weights | PPL | ± | vs unquantized | weight MiB | windows | scored tokens | wall s |",
           "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        base = next((b["ppl"] for b in rows if b["model"] == r["model"] and b["mode"] == "unquantized"), None)
        rel = f"{(r['ppl'] / base - 1) * 100:+.2f} %" if base else "n/a"
        out.append(f"| {r['model']} | {r['engine']} | {r['mode']} | {r['ppl']:.4f} | {r['stderr']:.4f} | {rel} | "
                   f"{r['bytes'] / 2**20:.1f} | {r['windows']} | {r['scored']} | {r['seconds']:.0f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--modes", nargs="+", default=["none", *MODES], help="'none' = unquantized fp32; MODE:decoder = decoder linears only (embedding, LM head fp32)")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2, help="llama-perplexity threads")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    raw = llamacpp.prose_text()
    text = raw.removesuffix("\n")  # llama.cpp's -f drops one trailing newline; tokenize what it sees
    with tempfile.TemporaryDirectory() as tmp:
        text_file = llamacpp.write_prose_file(Path(tmp) / "prose.txt")
        rows = []
        for key in args.models:
            rows += run_model(key, args, text, text_file)

    md = table(rows)
    print("\n" + md)
    info = llamacpp.build_info()
    load = os.getloadavg()
    cmd = "python benchmarks/perplexity.py " + " ".join(argv if argv is not None else sys.argv[1:])
    mixes = "\n".join(f"  * {r['model']}: {r['mix']}" for r in rows if "mix" in r)
    details = "\n".join(f"* {r['model']} / {r['mode']}: running PPL after each window "
                        f"{', '.join(f'{x:.4f}' for x in r['running'])}" for r in rows)
    doc = f"""# Perplexity of pocketvlm quantization modes

* date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}
* command: `{cmd.strip()}`
* machine: {cpu_name()}, {os.cpu_count()} cores, shared (load average at the end {load[0]:.1f}); torch {torch.__version__},
  {torch.get_num_threads()} torch threads, Python {platform.python_version()}; llama.cpp {info.get('llama_cpp_commit', '?')[:7]}
  ({args.threads} threads)
* text: `benchmarks/llamacpp.py` prose (pydoc_data topics {', '.join(llamacpp.PROSE_TOPICS)}, {len(raw)} chars),
  {args.windows} windows of {args.context} tokens from the start of the text, each scoring its last
  {args.context - args.context // 2 - 1} tokens (llama.cpp's method; BOS replaces each window's first token where the
  tokenizer adds BOS), identical for both engines.
* "unquantized" is the Q4_K_M GGUF dequantized to float32: the MLC modes re-quantize those weights, so
  "vs unquantized" is the loss a mode adds on top of the GGUF's own quantization. llama.cpp runs the
  Q4_K_M file itself (its dot products quantize activations to 8 bit), so its PPL should sit next to
  "unquantized".
* pocketvlm modes quantize every linear and the embedding (tied LM head included), as
  `pocketvlm.load(path, quantization=MODE)`. The decoder's linears see 512 rows per window and take
  the quantized modules' prefill path (weight dequantized to fp32 per call + dense GEMM); the LM head
  runs only on the {args.context - args.context // 2} scored rows (`logits_to_keep`), below
  `DENSE_MIN_TOKENS`, so it takes the int4 kernel (bf16 activations, bf16-rounded scales).
* what the GGUF source holds (share of weights by type; the "Q4_K_M" files are mostly 5-8 bit, so
  the 4-bit MLC modes are a real step down from them):
{mixes}
* `MODE:decoder` rows (diagnostic): only the decoder's linears quantized; embedding and LM head fp32.
* weight MiB: persistent tensors (codes, scales, norms, biases; shared tensors once); for llama.cpp the
  GGUF's tensor data. wall s: this run's wall time on the shared machine (not a speed benchmark).

{md}

Per-window detail (llama.cpp's `[i]` running values next to pocketvlm's; same tokens give the same trend):

{details}
"""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(doc)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
