"""Time to ready: a fresh process loads a model and gives its first answer token, pocketvlm against llama.cpp
on the same weights' bits, rounds interleaved in one run.

* pocketvlm: a q4f16_1 package of the real Qwen2.5-Coder-0.5B (converted once into the cache; packages store
  4-bit weights in the kernel layout) and, for ``scripts/chat.sh``'s default, ``pocketvlm-scenes`` (its GGUF
  Qwen + DINOv2 tower + trained projector). Reported: ``import`` (torch and pocketvlm), ``load`` (after the
  import until ``pocketvlm.load`` returns), ``first token`` (a one-word chat turn) and the process's wall time.
* llama.cpp: ``llama-completion`` on the Q4_0 file of the same bits (``--no-warmup``, one token), its own
  ``load time`` line and the process's wall time.

    python benchmarks/load_time.py --rounds 3
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import llamacpp  # noqa: E402

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
torch.set_num_threads(int(sys.argv[2]))
import pocketvlm
t1 = time.perf_counter()
m = pocketvlm.load(sys.argv[1])
t2 = time.perf_counter()
m.chat([{"role": "user", "content": "Hi"}], max_tokens=1, temperature=0)
t3 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "first token": t3 - t2}))
"""


def pocketvlm_round(model: str, threads: int) -> dict:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", CHILD, model, str(threads)], capture_output=True, text=True, check=True)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["process"] = time.perf_counter() - t
    return out


def llamacpp_round(gguf: Path, threads: int) -> dict:
    t = time.perf_counter()
    r = subprocess.run([str(llamacpp.binary("llama-completion")), "-m", str(gguf), "-p", "Hi", "-n", "1",
                        "-t", str(threads), "--no-warmup", "-no-cnv", "--temp", "0"],
                       capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t
    m = re.search(r"load time\s*=\s*([\d.]+) ms", r.stdout + r.stderr)
    return {"load": float(m.group(1)) / 1000 if m else float("nan"), "process": wall}


def package(source: str, out: Path) -> Path:
    from pocketvlm.package import convert, load_package

    try:
        load_package(out, verify=True)
        return out
    except Exception:
        return convert(source, "q4f16_1", out, overwrite=True, progress=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-scenes", action="store_true")
    a = ap.parse_args(argv)
    from pocketvlm.real_models import cache_dir, qwen_gguf_path

    src = qwen_gguf_path()
    pkg = package(str(src), cache_dir() / "bench-models" / "qwen2.5-coder-0.5b-instruct-q4f16_1")
    q4_0 = llamacpp.llamacpp_home() / "qwen-q4_0.gguf"
    if not q4_0.exists():
        llamacpp.quantize_q4_0(src, q4_0)
    engines = {"pocketvlm q4f16_1 package": lambda: pocketvlm_round(str(pkg), a.threads),
               "llama.cpp Q4_0 (same bits)": lambda: llamacpp_round(q4_0, a.threads)}
    if not a.skip_scenes:
        engines["pocketvlm-scenes (chat.sh's default)"] = lambda: pocketvlm_round("pocketvlm-scenes", a.threads)
    for run in engines.values():  # one untimed round each: files in the page cache, kernels compiled
        run()
    got: dict[str, list[dict]] = {k: [] for k in engines}
    for _ in range(a.rounds):
        for name, run in engines.items():
            got[name].append(run())
    keys = ["import", "load", "first token", "process"]
    print(f"\n{a.rounds} rounds, {a.threads} threads (median; seconds)\n")
    print("| engine | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for name, rounds in got.items():
        cells = []
        for k in keys:
            vals = [r[k] for r in rounds if k in r]
            cells.append(f"{statistics.median(vals):.2f}" if vals else "-")
        print(f"| {name} | " + " | ".join(cells) + " |")
    ours = statistics.median(r["load"] + r["first token"] for r in got["pocketvlm q4f16_1 package"])
    theirs = statistics.median(r["load"] for r in got["llama.cpp Q4_0 (same bits)"])
    print(f"\npocketvlm load + first token {ours:.2f} s = {ours / theirs:.1f}x llama.cpp's load time {theirs:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
