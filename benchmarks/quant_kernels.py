"""Micro-benchmark of pocketvlm's quantized matmul paths on Qwen2.5-0.5B-sized weights.

Reports, per weight shape ``[out, in]`` and token count M, the median time of one call and the
GB/s of *weights read* (the format's bytes incl. scales / time): decode (M=1) is bandwidth-bound so
GB/s is the figure of merit; for prefill (M=512) GFLOP/s is printed too.

Paths:
  fp32 / bf16   F.linear on a dense weight
  q4 / q8 / q3  QuantLinear (q4f16_1, q8f16_1, q3f16_1) on the own kernel (int8 activations)
  *-dense       the same modules on the dense path (dequantize + GEMM), which prefill takes

Then a sweep of M for the 4864x896 weight comparing the own kernel with the dense path, which
sets ``pocketvlm.quant.paths.OWN_KERNEL_MAX_TOKENS_AVX2`` / ``_VNNI``.

Run:  .venv/bin/python benchmarks/quant_kernels.py [--threads 2] [--quick]
Several distinct copies of small weights are cycled so they are read from memory, not cache.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from pocketvlm.quant import formats
from pocketvlm.quant import paths as qpaths
from pocketvlm.quant.linear import quant_linear_from_float

SHAPES = [(896, 896), (4864, 896), (896, 4864), (151936, 896)]  # [out, in]
CACHE_DEFEAT_BYTES = 96 << 20


def _time(fn, min_s: float, min_iters: int = 3, warmup: int = 1) -> float:
    for _ in range(warmup):  # once per cycled copy: includes each module's one-time kernel repack
        fn()
    times, t_end = [], time.perf_counter() + min_s
    while len(times) < min_iters or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class _Cycle:
    """Call ``op(i)`` on copies 0..n-1 in turn."""

    def __init__(self, n):
        self.n, self.i = n, 0

    def next(self):
        self.i = (self.i + 1) % self.n
        return self.i


def _paths(out_f, in_f, copies, m):
    """(name, bytes of weights read per call, callable) for one shape."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(out_f, in_f, generator=g) * 0.02
    cyc = _Cycle(copies)
    x32 = torch.randn(m, in_f, generator=g)
    xbf = x32.bfloat16()
    paths = []

    w32 = [base.clone() for _ in range(copies)]
    paths.append(("fp32", out_f * in_f * 4, lambda: F.linear(x32, w32[cyc.next()])))
    wbf = [base.bfloat16() for _ in range(copies)]
    paths.append(("bf16", out_f * in_f * 2, lambda: F.linear(xbf, wbf[cyc.next()])))
    yield from paths

    lin = nn.Linear(in_f, out_f, bias=False)
    lin.weight.data = base
    for mode, label in (("q4f16_1", "q4"), ("q8f16_1", "q8"), ("q3f16_1", "q3")):
        mods = [quant_linear_from_float(lin, mode) for _ in range(copies)]
        nbytes = out_f * formats.padded_in_features(in_f, formats.parse_mode(mode).group_size) * formats.parse_mode(mode).bytes_per_weight
        kernel_bytes = nbytes if mode != "q3f16_1" else out_f * mods[0].kernel_cols * (0.5 + 8 / 32)
        yield label, kernel_bytes, _forced(mods, cyc, x32, own=True)
        yield label + "-dense", nbytes, _forced(mods, cyc, x32, own=False)
        del mods


def _forced(mods, cyc, x, own: bool):
    """A call of the next module with the own kernel forced on (any M) or off."""
    def call():
        saved = qpaths.OWN_KERNEL_MAX_TOKENS
        qpaths.OWN_KERNEL_MAX_TOKENS = 10**9 if own else 0
        try:
            return mods[cyc.next()](x)
        finally:
            qpaths.OWN_KERNEL_MAX_TOKENS = saved
    return call


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="shorter timing windows")
    ap.add_argument("--sweep-only", action="store_true")
    ap.add_argument("--decode-only", action="store_true", help="only M=1, no sweep")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    min_s = 0.2 if args.quick else 0.6
    print(f"torch {torch.__version__}, {args.threads} threads, load average at start {os.getloadavg()[0]:.2f}")
    if not args.sweep_only:
        print(f"{'shape [out,in]':>16} {'M':>4} {'path':>14} {'ms/call':>9} {'GB/s':>7} {'GFLOP/s':>8}")
        for out_f, in_f in SHAPES:
            for m in (1,) if args.decode_only else (1, 512):
                if m == 512 and out_f > 100000:
                    continue  # the LM head only runs on the last prompt token
                copies = max(1, min(8, math.ceil(CACHE_DEFEAT_BYTES / (out_f * in_f * 2))))
                for name, nbytes, fn in _paths(out_f, in_f, copies, m):
                    if out_f > 100000 and name.endswith("-dense"):
                        continue  # a 1-token call never takes the dense path; it only costs minutes here
                    t = _time(fn, min_s, warmup=copies)
                    print(f"{out_f:>7}x{in_f:<8} {m:>4} {name:>14} {t * 1e3:9.3f} {nbytes / t / 1e9:7.2f} "
                          f"{2 * m * out_f * in_f / t / 1e9:8.1f}", flush=True)
    if args.decode_only:
        return
    print("\nown kernel vs dense (dequantize + GEMM) for 4864x896, ms/call:")
    lin = nn.Linear(896, 4864, bias=False)
    for mode in ("q4f16_1", "q8f16_1", "q3f16_1"):
        mods = [quant_linear_from_float(lin, mode) for _ in range(4)]
        cyc = _Cycle(4)
        row = []
        for m in (1, 8, 16, 32, 64, 128, 256, 512):
            x = torch.randn(m, 896)
            res = [_time(_forced(mods, cyc, x, own), min_s / 2, warmup=4) * 1e3 for own in (True, False)]
            row.append(f"M={m}: {res[0]:.2f}/{res[1]:.2f}")
        print(f"  {mode}: " + "  ".join(row) + "   (own/dense)", flush=True)
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
