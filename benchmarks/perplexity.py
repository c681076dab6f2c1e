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
MODES = ["q8f16_1", "q4f16_1", "q4f16_1+search", "q4f16_1+gptq", "q4f16_1+tune", "q3f16_1", "q3f16_1+search",
         "q3f16_1+gptq", "q3f16_1+tune"]
#: ``MODE+e2e`` is ``convert --calibrate`` (not in the default list: it doubles the time of ``MODE+tune``)
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


def quantized_copy(fp32: torch.nn.Module, mode: str, tok, bos) -> torch.nn.Module:
    """``MODE`` (RTN, what ``pocketvlm.load(path, quantization=MODE)`` does), ``MODE+search`` (error-minimising
    scales: ``convert``'s default), ``MODE+gptq`` (``convert --calibrate --tune-steps 0 --e2e-steps 0`` with the
    default text), ``MODE+tune`` (``convert --calibrate --e2e-steps 0``: GPTQ, then block-wise tuning),
    ``MODE+e2e`` (``convert --calibrate``: the same, then one pass of end-to-end scale tuning over the whole
    text) or ``MODE:decoder`` (diagnostic: decoder linears only, RTN)."""
    from pocketvlm.quant import e2etune
    from pocketvlm.quant.blocktune import STEPS
    from pocketvlm.quant.calibrate import calibrate_model, calibration_windows, default_text

    qm = copy.deepcopy(fp32)  # as if loaded again, without re-reading the GGUF
    base, _, scope = mode.partition(":")
    base, _, how = base.partition("+")
    if scope == "decoder":
        quantize_model(qm, base, skip=["lm_head"], embeddings=False)
    elif how in ("gptq", "tune", "e2e"):
        ids = tok.encode(default_text())
        tuning = calibration_windows(ids, windows=e2etune.WINDOWS, bos_token_id=bos)
        calibrate_model(qm, base, calibration_windows(ids, bos_token_id=bos), tune_steps=STEPS if how != "gptq" else 0,
                        e2e_steps=e2etune.one_pass(len(tuning)) if how == "e2e" else 0, e2e_windows=tuning)
    else:
        quantize_model(qm, base, embeddings=True, search=how == "search")
    return qm


def run_model(key: str, args, texts: dict[str, tuple[str, Path]]) -> list[dict]:
    label, path_fn = MODELS[key]
    path = path_fn()
    t0 = time.perf_counter()
    pm = pocketvlm.load(str(path), device=args.device, quantization="q0f32")  # the unquantized reference
    print(f"\n{label}: loaded in {time.perf_counter() - t0:.0f} s", flush=True)
    tok = pm.tokenizer
    bos = tok.bos_token_id if tok.add_bos_token else None
    ids = {name: tok.encode(text) for name, (text, _) in texts.items()}
    rows = []

    def measure(mode, model, nbytes, seconds):
        row = dict(model=label, engine="pocketvlm", mode=mode, bytes=nbytes, quantize_s=seconds, texts={})
        for name, tids in ids.items():
            r = evaluate_perplexity(model, tids, args.context, bos_token_id=bos, max_windows=args.windows,
                                    progress=False)
            row["texts"][name] = dict(ppl=r.ppl, stderr=r.stderr, windows=r.n_windows, scored=r.n_scored,
                                      running=r.window_ppl)
        print(f"  {mode:18s} " + "  ".join(f"{n} {t['ppl']:.4f}" for n, t in row["texts"].items())
              + f"  (quantized in {seconds:.0f} s)", flush=True)
        rows.append(row)

    for mode in args.modes:
        t = time.perf_counter()
        model = pm.model if mode == "none" else quantized_copy(pm.model, mode, tok, bos)
        measure("unquantized" if mode == "none" else mode, model, weight_bytes(model), time.perf_counter() - t)
        del model
    del pm

    if not args.skip_llamacpp:
        files = [("Q4_K_M (the file)", path)]
        try:
            files.append(("Q4_0 (same bits)", llamacpp.quantize_q4_0(path, llamacpp.llamacpp_home() / f"{key}-q4_0.gguf")))
        except (FileNotFoundError, RuntimeError) as e:
            print(f"  no Q4_0 file: {e}", flush=True)
        for mode, gguf in files:
            row = dict(model=label, engine="llama.cpp", mode=mode, bytes=gguf_tensor_bytes(gguf), quantize_s=0,
                       mix=gguf_type_mix(gguf), texts={})
            for name, (_, text_file) in texts.items():
                res = llamacpp.run_perplexity(gguf, text_file, ctx=args.context, threads=args.threads,
                                              chunks=args.windows)
                row["texts"][name] = dict(ppl=res.ppl, stderr=res.stderr, windows=res.n_chunks,
                                          scored=res.n_chunks * (args.context - args.context // 2 - 1),
                                          running=llama_window_ppls(res.log))
            print(f"  llama.cpp {mode:18s} " + "  ".join(f"{n} {t['ppl']:.4f}" for n, t in row["texts"].items()),
                  flush=True)
            rows.append(row)
    return rows


def table(rows: list[dict], names: list[str]) -> str:
    head = "| model | engine | weights | " + " | ".join(f"{n} PPL | vs unquantized" for n in names) + \
           " | weight MiB | quantize s |"
    out = [head, "| --- | --- | --- | " + " | ".join("---: | ---:" for _ in names) + " | ---: | ---: |"]
    for r in rows:
        base = next((b for b in rows if b["model"] == r["model"] and b["mode"] == "unquantized"), None)
        cells = []
        for n in names:
            t = r["texts"][n]
            rel = f"{(t['ppl'] / base['texts'][n]['ppl'] - 1) * 100:+.2f} %" if base else "n/a"
            cells.append(f"{t['ppl']:.4f} ± {t['stderr']:.3f} | {rel}")
        out.append(f"| {r['model']} | {r['engine']} | {r['mode']} | " + " | ".join(cells) +
                   f" | {r['bytes'] / 2**20:.1f} | {r['quantize_s']:.0f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--modes", nargs="+", default=["none", *MODES],
                    help="'none' = unquantized fp32; MODE (RTN), MODE+search, MODE+gptq, MODE+tune, MODE+e2e; "
                         "MODE:decoder = decoder linears only (embedding, LM head fp32)")
    ap.add_argument("--texts", nargs="+", default=list(llamacpp.TEXTS), choices=list(llamacpp.TEXTS))
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2, help="llama-perplexity threads")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--prefill", choices=["auto", "int8", "dense"], default="auto",
                    help="the windows' GEMMs on 4-bit layers: the CPU's default, the int8 GEMM at any length, or "
                         "dequantized weights with a bf16/fp32 GEMM (pocketvlm.quant.paths.PREFILL_INT8_ROWS)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    from pocketvlm.quant.blocktune import STEPS  # for the report
    if args.prefill != "auto":
        from pocketvlm.quant import paths
        paths.PREFILL_INT8_ROWS = (paths.PREFILL_INT8_MIN_ROWS, 1 << 62) if args.prefill == "int8" else (0, 0)

    with tempfile.TemporaryDirectory() as tmp:
        texts = {}
        for name in args.texts:
            raw = llamacpp.TEXTS[name]()
            f = Path(tmp) / f"{name}.txt"
            f.write_text(raw, encoding="utf-8")
            texts[name] = (raw.removesuffix("\n"), f)  # llama.cpp's -f drops one trailing newline
        rows = []
        for key in args.models:
            rows += run_model(key, args, texts)

    md = table(rows, args.texts)
    print("\n" + md)
    info = llamacpp.build_info()
    load = os.getloadavg()
    cmd = "python benchmarks/perplexity.py " + " ".join(argv if argv is not None else sys.argv[1:])
    mixes = "\n".join(f"  * {r['model']} {r['mode']}: {r['mix']}" for r in rows if "mix" in r)
    details = "\n".join(f"* {r['model']} / {r['mode']} / {n}: running PPL after each window "
                        f"{', '.join(f'{x:.4f}' for x in t['running'])}" for r in rows for n, t in r["texts"].items())
    doc = f"""# Perplexity of pocketvlm quantization modes

* date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}
* command: `{cmd.strip()}`
* machine: {cpu_name()}, {os.cpu_count()} cores, shared (load average at the end {load[0]:.1f}); torch {torch.__version__},
  {torch.get_num_threads()} torch threads, Python {platform.python_version()}; llama.cpp {info.get('llama_cpp_commit', '?')[:7]}
  ({args.threads} threads)
* texts, both held out from `convert --calibrate`'s default calibration text (the *other* pydoc_data topics,
  then the docstrings of other standard-library modules):
  * prose: pydoc_data topics {', '.join(llamacpp.PROSE_TOPICS)} (the language reference);
  * docstrings: the docstrings of {', '.join(llamacpp.DOCSTRING_MODULES)} (`inspect.getdoc`).
* {args.windows} windows of {args.context} tokens from the start of each text, each scoring its last
  {args.context - args.context // 2 - 1} tokens (llama.cpp's method; BOS replaces each window's first token where the
  tokenizer adds BOS), identical for both engines.
* "unquantized" is the Q4_K_M GGUF dequantized to float32: the MLC modes re-quantize those weights, so
  "vs unquantized" is the loss a mode adds on top of the GGUF's own quantization.
* pocketvlm rows quantize every linear and the embedding (tied LM head included):
  * `MODE`: MLC's round-to-nearest, `scale = max|w| / offset` (what `pocketvlm.load(path, quantization=MODE)` does);
  * `MODE+search`: error-minimising group scales (`pocketvlm convert`'s default);
  * `MODE+gptq`: GPTQ rounding calibrated on the default text (`pocketvlm convert --calibrate --tune-steps 0`),
    64 windows of 512; `MODE+tune`: the same, then {STEPS} steps of block-wise tuning per layer (`convert --calibrate`);
  * `MODE:decoder` (diagnostic): RTN on the decoder's linears only; embedding and LM head fp32.
  All of them write the same format (codes + one fp16 scale per group), so size and speed do not change.
* llama.cpp rows: `llama-perplexity` on the Q4_K_M file itself and on a Q4_0 file of the same bits
  (`llama-quantize --allow-requantize --output-tensor-type q4_0 --token-embedding-type q4_0 ... Q4_0`, from the
  Q4_K_M file, like the pocketvlm modes). Tensor types:
{mixes}
* weight MiB: persistent tensors (codes, scales, norms, biases; shared tensors once); for llama.cpp the
  GGUF's tensor data. quantize s: this run's wall time to quantize (shared machine).

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
