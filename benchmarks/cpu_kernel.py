"""GB/s of pocketvlm's CPU int4/int8 kernels (pocketvlm/quant/cpu_kernel.py) vs fp32 F.linear, M = 1.

q4 in its default rows8 layout, and the same weights in the older rows layout ("rows layout" column).

Qwen2.5-0.5B decode shapes (N x K). "GB/s" = bytes of weight data the op must read per call
(q4: packed nibbles + fp16 scales [+ fp16 biases]; q8: int8 codes + fp16 scales; fp32: 4 B/weight) / best time. All variants of a
shape are timed interleaved in the same rounds, so ratios survive a noisy shared machine; each number
is the fastest single call over all rounds.

    .venv/bin/python benchmarks/cpu_kernel.py [--threads 2] [--rounds 7] [--m 1]

On a shared, oversubscribed machine run it with OMP_WAIT_POLICY=passive: with the default (spinning)
policy idle OpenMP threads steal the cores the working ones need and 2-thread calls often take
5-12 ms instead of ~0.2 ms (torch's own element-wise ops show the same).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from pocketvlm.bench import best_time
from pocketvlm.quant import cpu_kernel as ck

SHAPES = [(896, 896), (128, 896), (4864, 896), (896, 4864), (151936, 896)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--m", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    assert ck.available() and ck.simd(), "kernel (AVX2) not available"
    print(f"threads={a.threads} M={a.m} rounds={a.rounds} torch={torch.__version__} "
          f"capability={torch.backends.cpu.get_cpu_capability()}")
    hdr = (f"{'N x K':>13} | {'fp32 GB/s':>9} | {'q4 int8 GB/s':>12} {'us':>8} | {'rows layout':>11} | "
           f"{'q4 fp32 GB/s':>12} {'us':>8} | "
           f"{'affine int8 GB/s':>16} | {'q8 GB/s':>7} {'us':>8} | {'q4 int8 speedup vs fp32 (time)':>30}")
    print(hdr)
    print("-" * len(hdr))
    g = torch.Generator().manual_seed(0)
    for n, k in SHAPES:
        codes = torch.randint(0, 15, (n, k), generator=g, dtype=torch.uint8)
        s = torch.rand(n, k // 32, generator=g) * 0.02
        w_sym = ck.pack_q4(codes, s, offset=7)  # rows8 (all these N are multiples of 8)
        w_rows = ck.pack_q4(codes, s, offset=7, layout="rows")
        w_aff = ck.pack_q4(codes, s, biases=-7 * s)
        w_q8 = ck.pack_q8(torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int16), s)
        dense = ck.dequantize_q4(w_sym)
        x = torch.randn(a.m, k)
        q4_bytes = w_sym.packed.numel() + 2 * w_sym.scales.numel()
        aff_bytes = q4_bytes + 2 * w_aff.biases.numel()
        fp_bytes = 4 * n * k
        q8_bytes = n * k + 2 * w_q8.scales.numel()
        reps = max(3, int(2e8 / (n * k)))  # ~constant work per round
        fns = {
            "fp32": lambda: F.linear(x, dense),
            "i8": lambda: ck.q4_linear(x, w_sym, act="int8"),
            "rows": lambda: ck.q4_linear(x, w_rows, act="int8"),
            "f32": lambda: ck.q4_linear(x, w_sym, act="fp32"),
            "aff": lambda: ck.q4_linear(x, w_aff, act="int8"),
            "q8": lambda: ck.q8_linear(x, w_q8),
        }
        best = {key: float("inf") for key in fns}
        for _ in range(a.rounds):
            for key, fn in fns.items():
                best[key] = min(best[key], best_time(fn, reps))
        gbs = lambda b, t: b / t / 1e9  # noqa: E731
        print(f"{n:>6} x {k:<4} | {gbs(fp_bytes, best['fp32']):9.1f} | {gbs(q4_bytes, best['i8']):12.1f} "
              f"{best['i8'] * 1e6:8.0f} | {gbs(q4_bytes, best['rows']):11.1f} | {gbs(q4_bytes, best['f32']):12.1f} {best['f32'] * 1e6:8.0f} | "
              f"{gbs(aff_bytes, best['aff']):16.1f} | {gbs(q8_bytes, best['q8']):7.1f} {best['q8'] * 1e6:8.0f} | "
              f"{best['fp32'] / best['i8']:30.2f}")
        del dense, w_q8


if __name__ == "__main__":
    main()
