"""Run llama.cpp's own tools as the reference point for pocketvlm's benchmarks.

The tools are built by ``benchmarks/build_llamacpp.sh`` under ``~/.cache/pocketvlm/llama.cpp``
(or ``$LLAMACPP_HOME``); nothing of llama.cpp lives in the repo.

    python benchmarks/llamacpp.py            # llama-bench + llama-perplexity on the real Qwen GGUF
    python benchmarks/llamacpp.py --model gemma3 --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pocketvlm.quant.calibrate import HELD_OUT_MODULES, HELD_OUT_TOPICS, module_docstrings
from pocketvlm.real_models import gemma3_gguf_path, qwen_gguf_path

BUILD_SCRIPT = Path(__file__).resolve().parent / "build_llamacpp.sh"


def llamacpp_home() -> Path:
    return Path(os.environ.get("LLAMACPP_HOME", Path.home() / ".cache" / "pocketvlm" / "llama.cpp"))


def binary(name: str) -> Path:
    """Path of a built llama.cpp tool, e.g. ``binary("llama-bench")``."""
    path = llamacpp_home() / "build" / "bin" / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise FileNotFoundError(f"{path} is missing; build llama.cpp first with `bash {BUILD_SCRIPT}`")
    return path


def build_info() -> dict[str, str]:
    """The ``key: value`` lines of BUILD-INFO.txt (llama.cpp commit, cmake flags, ...)."""
    info = {}
    path = llamacpp_home() / "BUILD-INFO.txt"
    if path.is_file():
        for line in path.read_text().splitlines():
            key, sep, value = line.partition(": ")
            if sep:
                info[key] = value
    return info


@dataclass(frozen=True)
class Speed:
    tokens_per_s: float
    stddev: float
    n_tokens: int


@dataclass(frozen=True)
class BenchResult:
    prefill: Speed | None  # llama-bench's ppN test
    decode: Speed | None  # llama-bench's tgM test, from an empty context
    raw: list[dict]  # llama-bench's JSON records, for reports
    decode_at_depth: Speed | None = None  # tgM after ``depth`` tokens already in the cache (``-d``)
    depth: int = 0


def parse_bench_json(text: str) -> BenchResult:
    """Split llama-bench ``-o json`` records into the prompt-processing and generation tests."""
    records = json.loads(text)
    prefill = decode = deep = None
    depth = 0
    for rec in records:
        ts, sd = float(rec["avg_ts"]), float(rec["stddev_ts"])
        d = int(rec.get("n_depth", 0) or 0)
        if rec["n_prompt"] > 0 and rec["n_gen"] == 0 and d == 0:
            prefill = Speed(ts, sd, int(rec["n_prompt"]))
        elif rec["n_gen"] > 0 and rec["n_prompt"] == 0:
            if d == 0:
                decode = Speed(ts, sd, int(rec["n_gen"]))
            else:
                deep, depth = Speed(ts, sd, int(rec["n_gen"])), d
    return BenchResult(prefill, decode, records, deep, depth)


def run_bench(model: str | Path, threads: int = 2, n_prompt: int = 512, n_gen: int = 128,
              repetitions: int = 3, extra: list[str] | None = None, timeout: float = 1800,
              depth: int = 0) -> BenchResult:
    """llama-bench prefill (pp``n_prompt``) and decode (tg``n_gen``) speed in tokens/s; with ``depth`` the
    decode is also measured after ``depth`` tokens in the cache (as after a prompt of that length)."""
    cmd = [str(binary("llama-bench")), "-m", str(model), "-t", str(threads),
           "-p", str(n_prompt), "-n", str(n_gen), "-r", str(repetitions), "-o", "json", *(extra or [])]
    if depth:
        cmd += ["-d", f"0,{depth}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    return parse_bench_json(out.stdout)


_FINAL_PPL = re.compile(r"Final estimate:\s*PPL\s*=\s*([0-9.]+)\s*\+/-\s*([0-9.]+)")


_CHUNKS = re.compile(r"calculating perplexity over (\d+) chunks, n_ctx=(\d+)")


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    stderr: float
    n_chunks: int  # windows scored; each scores its second ctx/2 tokens
    log: str


def parse_perplexity_output(text: str) -> tuple[float, float]:
    """The ``Final estimate: PPL = x +/- y`` line of llama-perplexity's output."""
    match = _FINAL_PPL.search(text)
    if match is None:
        raise ValueError("no 'Final estimate: PPL = ...' line in llama-perplexity output")
    return float(match.group(1)), float(match.group(2))


def run_perplexity(model: str | Path, text_file: str | Path, ctx: int = 512, threads: int = 2,
                   chunks: int | None = None, batch: int | None = None,
                   extra: list[str] | None = None, timeout: float = 3600) -> PerplexityResult:
    """llama-perplexity's final PPL on ``text_file`` with windows of ``ctx`` tokens.

    llama.cpp scores only the second half of each window (the first half is context), so the
    text needs at least ``2 * ctx`` tokens.
    """
    cmd = [str(binary("llama-perplexity")), "-m", str(model), "-f", str(text_file),
           "-c", str(ctx), "-t", str(threads)]
    if chunks is not None:
        cmd += ["--chunks", str(chunks)]
    if batch is not None:
        cmd += ["-b", str(batch)]
    cmd += extra or []
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    log = out.stdout + out.stderr
    if out.returncode != 0:
        raise RuntimeError(f"llama-perplexity failed ({out.returncode}): {log.strip()[-2000:]}")
    ppl, err = parse_perplexity_output(log)
    chunks_match = _CHUNKS.search(log)
    return PerplexityResult(ppl, err, int(chunks_match.group(1)) if chunks_match else -1, log)


def quantize_q4_0(src: str | Path, dst: str | Path, timeout: float = 1800) -> Path:
    """``llama-quantize`` of ``src`` to Q4_0 with the output and token-embedding tensors at Q4_0 too: the
    file of the same bits as pocketvlm's q4f16_1 (4.5 bits per weight everywhere)."""
    dst = Path(dst)
    if not dst.is_file():
        cmd = [str(binary("llama-quantize")), "--allow-requantize", "--output-tensor-type", "q4_0",
               "--token-embedding-type", "q4_0", str(src), str(dst), "Q4_0"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"llama-quantize failed ({out.returncode}): {(out.stdout + out.stderr)[-2000:]}")
    return dst


# Real English prose that every CPython install carries: the language reference's topic texts
# used by help() (pydoc_data). Mostly prose with a few code lines; it changes only with the
# Python version, which is therefore part of the result's identity. `convert --calibrate`'s default
# text is the *other* topics, so these stay held out.
PROSE_TOPICS = HELD_OUT_TOPICS
#: A second held-out text of another kind: the docstrings of these pure-Python standard-library modules
#: (module, classes, functions; in name order), which no calibration text contains.
DOCSTRING_MODULES = HELD_OUT_MODULES


def prose_text(max_chars: int = 40_000) -> str:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in PROSE_TOPICS if k in topics)
    return text[:max_chars]


def write_prose_file(path: str | Path, max_chars: int = 40_000) -> Path:
    path = Path(path)
    path.write_text(prose_text(max_chars), encoding="utf-8")
    return path


def docstring_text(max_chars: int = 120_000) -> str:
    """The docstrings (``inspect.getdoc``) of :data:`DOCSTRING_MODULES` and their public members defined
    there, each once, joined by blank lines."""
    return "\n\n".join(module_docstrings(DOCSTRING_MODULES))[:max_chars]


#: held-out texts by name: text function (both engines read the same characters)
TEXTS = {"prose": prose_text, "docstrings": docstring_text}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen", help="qwen, gemma3, or a path to a GGUF file")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("--ctx", type=int, default=512, help="llama-perplexity context size")
    ap.add_argument("--chunks", type=int, default=8, help="llama-perplexity chunks (0 = whole text)")
    ap.add_argument("--text", help="text file for llama-perplexity (default: Python reference prose)")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--skip-ppl", action="store_true")
    args = ap.parse_args(argv)

    model = {"qwen": qwen_gguf_path, "gemma3": gemma3_gguf_path}.get(args.model)
    model = model() if model else Path(args.model)
    info = build_info()
    print(f"model: {model}")
    print(f"llama.cpp: {info.get('llama_cpp_commit', '?')} (llama-cpp-python {info.get('llama_cpp_python', '?')})")
    print(f"cmake flags: {info.get('cmake_flags', '?')}")

    if not args.skip_bench:
        res = run_bench(model, args.threads, args.n_prompt, args.n_gen, args.repetitions)
        for name, s in (("prefill", res.prefill), ("decode", res.decode)):
            if s is not None:
                tag = f"pp{s.n_tokens}" if name == "prefill" else f"tg{s.n_tokens}"
                print(f"{name:8s} {tag:6s} {s.tokens_per_s:8.2f} ± {s.stddev:.2f} tokens/s  "
                      f"({args.threads} threads)")

    if not args.skip_ppl:
        text = Path(args.text) if args.text else None
        if text is None:
            text = write_prose_file(llamacpp_home() / "prose.txt")
            print(f"text: pydoc_data topics {', '.join(PROSE_TOPICS)} "
                  f"(Python {sys.version_info.major}.{sys.version_info.minor}), {text.stat().st_size} bytes")
        ppl = run_perplexity(model, text, ctx=args.ctx, threads=args.threads,
                             chunks=args.chunks or None)
        print(f"perplexity ctx={args.ctx} chunks={ppl.n_chunks}: {ppl.ppl:.4f} ± {ppl.stderr:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
