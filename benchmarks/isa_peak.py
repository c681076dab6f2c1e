"""Peak arithmetic of one core of this CPU, measured: fp32 FMA vs the int8 dot-product sequence an AVX2
int8 GEMM is built from (vpmaddubsw, vpmaddwd, vpaddd), and, where the CPU has AVX-512, 512-bit fp32 FMA, bf16
``vdpbf16ps`` and int8 VNNI ``vpdpbusd``.

It bounds what int8 can do for image encoding: a ViT is matrix products, so an int8 path can be at most
(int8 ops/s) / (fp32 FLOP/s) times faster than an fp32 one that runs near peak, on the same core.

    .venv/bin/python benchmarks/isa_peak.py

Compiles a small C++ loop with the system compiler (g++/c++), independent accumulator chains (10 fp32, 6 int8
with distinct weights) so throughput, not latency, is measured; one thread, best of 5.

Measured 2026-11-22 on the 2-core AMD EPYC (Zen 3) VM, 7 runs: fp32 97-102 GFLOP/s, int8 158-224 GOP/s ->
int8 / fp32 = 1.6-2.2x, i.e. about 2x: vpmaddubsw and vpmaddwd both go to the vector multiply pipes that also
run the FMAs, two instructions per 32 products where fp32 needs four FMAs. So an int8 ViT cannot be 3x faster
than an fp32 one that runs near peak on this CPU (AVX512-VNNI's one-instruction vpdpbusd or AMX would be).

Measured 2026-12-02 on the 2-core AMD EPYC Zen 4 VM (AVX-512 with BF16 and VNNI), one core: fp32 FMA 116
GFLOP/s (the same with 256- or 512-bit registers: Zen 4 splits zmm work in two), bf16 vdpbf16ps 231, int8
vpdpbusd 459 GOP/s: int8 VNNI is 4x fp32 and 2x bf16, which is why the vision fast path is int8 there.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SRC = r"""
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdint>
static double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }
#define HIDE(v) asm volatile("" : "+x"(v))
__attribute__((noinline)) double fp32(long n) {
  __m256 a[10], x = _mm256_set1_ps(1.0001f), y = _mm256_set1_ps(0.9999f);
  for (int i = 0; i < 10; ++i) a[i] = _mm256_set1_ps(float(i));
  double t = now();
  for (long k = 0; k < n; ++k) {
    HIDE(x);
#pragma GCC unroll 16
    for (int i = 0; i < 10; ++i) a[i] = _mm256_fmadd_ps(x, y, a[i]);
  }
  t = now() - t;
  float s = 0; for (int i = 0; i < 10; ++i) s += a[i][0];
  if (s == 1.2345f) std::puts("");
  return double(n) * 10 * 16 / t;  // 8 lanes x (mul + add)
}
__attribute__((noinline)) double int8(long n) {
  // 6 chains with their own weights (identical ones would be computed once), x changes every iteration
  __m256i a[6], w[6], x = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
  for (int i = 0; i < 6; ++i) { a[i] = _mm256_set1_epi32(i); w[i] = _mm256_set1_epi8(char(i - 3)); }
  double t = now();
  for (long k = 0; k < n; ++k) {
    HIDE(x);
#pragma GCC unroll 16
    for (int i = 0; i < 6; ++i) a[i] = _mm256_add_epi32(a[i], _mm256_madd_epi16(_mm256_maddubs_epi16(x, w[i]), ones));
  }
  t = now() - t;
  int64_t s = 0; for (int i = 0; i < 6; ++i) s += _mm256_extract_epi32(a[i], 0);
  if (s == 12345) std::puts("");
  return double(n) * 6 * 64 / t;  // 32 u8 x s8 products + their sums
}
#define T512 __attribute__((target("avx512f,avx512bw,avx512vnni,avx512bf16")))
#define HIDEZ(v) asm volatile("" : "+v"(v))
T512 __attribute__((noinline)) double fp32_512(long n) {
  __m512 a[12], x = _mm512_set1_ps(1.0001f), y = _mm512_set1_ps(0.9999f);
  for (int i = 0; i < 12; ++i) a[i] = _mm512_set1_ps(float(i));
  double t = now();
  for (long k = 0; k < n; ++k) {
    HIDEZ(x);
#pragma GCC unroll 16
    for (int i = 0; i < 12; ++i) a[i] = _mm512_fmadd_ps(x, y, a[i]);
  }
  t = now() - t;
  float s = 0; for (int i = 0; i < 12; ++i) s += a[i][0];
  if (s == 1.2345f) std::puts("");
  return double(n) * 12 * 32 / t;
}
T512 __attribute__((noinline)) double bf16_512(long n) {
  __m512 a[12];
  __m512bh x = (__m512bh)_mm512_set1_epi16(0x3f80), y = (__m512bh)_mm512_set1_epi16(0x3f80);
  for (int i = 0; i < 12; ++i) a[i] = _mm512_set1_ps(float(i));
  double t = now();
  for (long k = 0; k < n; ++k) {
    HIDEZ(x);
#pragma GCC unroll 16
    for (int i = 0; i < 12; ++i) a[i] = _mm512_dpbf16_ps(a[i], x, y);
  }
  t = now() - t;
  float s = 0; for (int i = 0; i < 12; ++i) s += a[i][0];
  if (s == 1.2345f) std::puts("");
  return double(n) * 12 * 64 / t;  // 32 bf16 pairs -> 16 lanes, 2 products + 2 adds each
}
T512 __attribute__((noinline)) double vnni_512(long n) {
  __m512i a[12], x = _mm512_set1_epi8(3), w = _mm512_set1_epi8(2);
  for (int i = 0; i < 12; ++i) a[i] = _mm512_set1_epi32(i);
  double t = now();
  for (long k = 0; k < n; ++k) {
    HIDEZ(x);
#pragma GCC unroll 16
    for (int i = 0; i < 12; ++i) a[i] = _mm512_dpbusd_epi32(a[i], x, w);
  }
  t = now() - t;
  long s = 0; for (int i = 0; i < 12; ++i) s += _mm_extract_epi32(_mm512_castsi512_si128(a[i]), 0);
  if (s == 12345) std::puts("");
  return double(n) * 12 * 128 / t;  // 64 u8 x s8 products + their sums
}
int main() {
  double f = 0, q = 0, f5 = 0, b5 = 0, v5 = 0;
  const bool z = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vnni") &&
                 __builtin_cpu_supports("avx512bf16");
  for (int r = 0; r < 5; ++r) {
    double a = fp32(20000000), b = int8(20000000); if (a > f) f = a; if (b > q) q = b;
    if (z) { a = fp32_512(10000000); if (a > f5) f5 = a; a = bf16_512(10000000); if (a > b5) b5 = a;
             a = vnni_512(10000000); if (a > v5) v5 = a; }
  }
  std::printf("%.1f %.1f %.1f %.1f %.1f\n", f / 1e9, q / 1e9, f5 / 1e9, b5 / 1e9, v5 / 1e9);
}
"""


def main() -> None:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise SystemExit("no C++ compiler")
    with tempfile.TemporaryDirectory() as d:
        src, exe = Path(d) / "peak.cpp", Path(d) / "peak"
        src.write_text(SRC)
        subprocess.run([cxx, "-O3", "-mavx2", "-mfma", str(src), "-o", str(exe)], check=True)
        out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()
    fp32, int8, fp32_512, bf16_512, vnni_512 = map(float, out)
    print(f"one core: fp32 FMA {fp32:.1f} GFLOP/s, int8 (vpmaddubsw + vpmaddwd + vpaddd) {int8:.1f} GOP/s "
          f"-> int8 / fp32 = {int8 / fp32:.2f}x")
    if fp32_512:
        print(f"AVX-512: fp32 FMA {fp32_512:.1f} GFLOP/s, bf16 vdpbf16ps {bf16_512:.1f} GFLOP/s, int8 vpdpbusd "
              f"{vnni_512:.1f} GOP/s -> bf16 / fp32 = {bf16_512 / fp32_512:.2f}x, int8 / fp32 = "
              f"{vnni_512 / fp32_512:.2f}x")
    else:
        print("no AVX-512 VNNI/BF16 on this CPU")


if __name__ == "__main__":
    main()
