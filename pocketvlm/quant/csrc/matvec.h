// What the matrix-vector kernels (matvec_*.cpp, multi_linear.cpp) share: the int8 activations, code and
// scale addressing in each layout (described in kernels.h), row-block scheduling, and the block functions
// MultiLinear calls. Internal to the library; the ops themselves are declared in kernels.h.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>

#include "avx512.h"
#include "kernels.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define PVLM_AVX2 1
#else
#define PVLM_AVX2 0
#endif

// Functions compiled for AVX-512 VNNI on 256-bit registers (vpdpbusd), called only where vnni_cpu() says so.
#if PVLM_AVX2 && PVLM_X86 && defined(__GNUC__)
#define PVLM_HAVE_VNNI256 1
#define PVLM_VNNI256 __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni")))
#else
#define PVLM_HAVE_VNNI256 0
#endif

namespace pvlm {

constexpr int64_t kGroup = 32;

inline float to_f(float v) { return v; }
inline float to_f(c10::Half v) { return static_cast<float>(v); }

// ---------------------------------------------------------------------------------------------
// Activation preparation for the int8 path: per row m and group g
//   xq (int8, 32 per group), dx (float), qs = dx * sum(xq) (float, the quantized group sum).
// AVX2 wants pairs of groups laid out as [g0 x0..15 | g1 x0..15 | g0 x16..31 | g1 x16..31]
// (64 bytes per pair, the odd last group paired with zeros) to match one 32-byte weight load.
struct QuantX {
  int64_t M, G, P;               // rows, groups, group pairs
  bool paired = true;            // false: natural order, 32 bytes per group
  std::vector<int8_t> xq;        // [M, P, 64] pair layout
  std::vector<float> dx;         // [M, G]
  std::vector<float> qs;         // [M, G]
  std::vector<int32_t> xs;       // [M, G] sum of the group's int8 codes (qs = dx * xs), for the prefill GEMM
};

// paired: the q4 pair layout above; otherwise natural order, 32 bytes per group (the q8 kernel, the prefill
// GEMM). Rows run in parallel once there are enough of them (prefill).
void quantize_x(const float* x, int64_t M, int64_t K, QuantX& q, bool paired = true);

inline int8_t xq_at(const QuantX& q, int64_t m, int64_t g, int i) {
  if (!q.paired) return q.xq[(m * q.G + g) * kGroup + i];
  return q.xq[(m * q.P + g / 2) * 64 + (g & 1) * 16 + ((i < 16) ? i : i + 16)];
}

// Code q[n][k] and the index of scale/bias (n, g) in either layout (the portable paths read through these).
inline int64_t r8_stride(bool q5) { return q5 ? 160 : 128; }  // bytes per (row block, group)

inline int q4_code(bool r8, const uint8_t* w, int64_t K, int64_t n, int64_t k, bool q5 = false) {
  const int64_t g = k / kGroup;
  const int i = static_cast<int>(k % kGroup);
  if (r8) {
    const int c = i >> 3, t = i & 7;
    const uint8_t* wg = w + ((n >> 3) * (K / kGroup) + g) * r8_stride(q5);
    const uint8_t b = wg[c * 32 + 4 * (n & 7) + (t & 3)];
    const int lo = t < 4 ? (b & 15) : (b >> 4);
    return q5 ? lo | (((wg[128 + 4 * (n & 7) + (i & 3)] >> (i >> 2)) & 1) << 4) : lo;
  }
  const uint8_t b = w[n * (K / 2) + g * 16 + (i & 15)];
  return i < 16 ? (b & 15) : (b >> 4);
}
inline int64_t q4_sidx(bool r8, int64_t G, int64_t n, int64_t g) {
  return r8 ? ((n >> 3) * G + g) * 8 + (n & 7) : n * G + g;
}

// Code q[n][k] of a q8 weight in either layout.
inline int q8_code(bool r8, const int8_t* w, int64_t K, int64_t n, int64_t k) {
  if (!r8) return w[n * K + k];
  const int64_t g = k / kGroup;
  const int i = static_cast<int>(k % kGroup);
  return w[((n >> 3) * (K / kGroup) + g) * 256 + 32 * (i >> 2) + 4 * (n & 7) + (i & 3)];
}

#if PVLM_AVX2
// two consecutive per-group values as [v0 x4 | v1 x4]
inline __m256 pair_bcast(const float* p) {
  __m128 v = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(p)));
  return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(v), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
}
inline __m256 pair_bcast(const c10::Half* p) {
  int32_t bits;
  std::memcpy(&bits, p, 4);
  __m128 v = _mm_cvtph_ps(_mm_cvtsi32_si128(bits));
  return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(v), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Prepared per-call activation vectors for the int8 AVX2 path, per row m:
//  * blocks of 8 groups (the main loop): the 4 per-pair int32 dot vectors of a block are reduced
//    with 3 hadds to one vector holding groups in the order [g0 g2 g4 g6 g1 g3 g5 g7], so one
//    int->float conversion and 2 FMAs serve 8 groups. dx8 / cs8 are stored in that order, qs8 in
//    natural order (it multiplies the biases, which are loaded unpermuted).
//  * leftover pairs (G % 8): dxv = [dx0 x4 | dx1 x4], csv = [c0/4 x4 | c1/4 x4] (a group spans 4 lanes).
// Symmetric form: cs = -offset * qs, folded into the dot before the scale multiply.
struct PairVecs {
  int64_t G8;
  std::vector<float> dx8, cs8, qs8;  // [M, G8, 8]
  std::vector<float> dxv, csv;       // [M, P, 8] (only the leftover pairs are used)
};

void make_pair_vecs(const QuantX& q, float off, bool affine, PairVecs& pv);
#else
struct PairVecs {};  // the portable loops need no prepared activation vectors
#endif  // PVLM_AVX2

constexpr int64_t kRows = 4;  // output rows per inner block (rows layout; a rows8 block is 8 rows)
inline int64_t rows_per_block(bool r8) { return r8 ? 8 : kRows; }  // q8 and q4 rows: kRows

// f.template operator()<R>(m0) for the rows [m0, m0 + R) of M, R = 4 while 4 are left, then the rest at once:
// the VNNI kernels unpack a weight group once for R rows of x, with R a compile-time count (registers).
template <typename F>
void by_row_groups(int64_t M, const F& f) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) f.template operator()<4>(m);
  switch (M - m) {
    case 3: f.template operator()<3>(m); break;
    case 2: f.template operator()<2>(m); break;
    case 1: f.template operator()<1>(m); break;
    default: break;
  }
}

// f(b0, b1) over [0, nblocks) on torch's intra-op threads, with chunks claimed first come first served
// rather than split statically: on a shared, oversubscribed CPU a thread that is descheduled mid-call
// no longer holds half of the rows hostage - the others take its chunks.
template <typename F>
void for_blocks(int64_t nblocks, int64_t grain, const F& f) {
  const int64_t nt = std::min<int64_t>(at::get_num_threads(), (nblocks + grain - 1) / grain);
  if (nt <= 1 || at::in_parallel_region()) {
    f(int64_t(0), nblocks);
    return;
  }
  const int64_t chunk = std::max<int64_t>(1, nblocks / (nt * 8));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) {
    for (;;) {
      const int64_t b0 = next.fetch_add(chunk);
      if (b0 >= nblocks) break;
      f(b0, std::min(nblocks, b0 + chunk));
    }
  });
}

// N, K and the layout of a q4 weight (shapes checked by check_args)
struct Q4Shape {
  int64_t N, K;
  bool r8;
  bool q5;  // rows8 with 5-bit codes
};

inline Q4Shape q4_shape(const at::Tensor& packed) {
  if (packed.dim() == 3) return {packed.size(0) * 8, packed.size(1) * kGroup, true, packed.size(2) == 160};
  return {packed.size(0), packed.size(1) * 2, false, false};
}


Q4Shape q8_shape(const at::Tensor& qw);  // N, K and the layout of a q8 weight

// Argument checks shared by the ops and make_linref (clear errors instead of crashes).
void check_scales(const char* kind, const Q4Shape& sh, const at::Tensor& w, const at::Tensor& scales,
                  const c10::optional<at::Tensor>& biases);
Q4Shape check_args(const at::Tensor& packed, const at::Tensor& scales, const c10::optional<at::Tensor>& biases);
Q4Shape check_q8_args(const at::Tensor& qw, const at::Tensor& scales, const c10::optional<at::Tensor>& biases);

// Row blocks [b0, b1) (rows_per_block(r8) rows each) of y = W x, int8 activations (paired for q4 rows, natural
// order otherwise). impl: 0 the fastest this CPU has (AVX-512 VNNI for rows8, else AVX2), 1 the portable loops,
// 2 AVX2 without VNNI (for tests: VNNI and AVX2 give bit-identical results). Instantiated for S = float, c10::Half.
template <typename S, bool AFFINE>
void q4_i8_blocks(const QuantX& q, const PairVecs& pv, int64_t K, const uint8_t* w, const S* sc, const S* bi,
                  float off, float* y, int64_t N, int64_t b0, int64_t b1, int impl, bool r8, bool q5);
template <typename S, bool AFFINE>
void q8_i8_blocks(const QuantX& q, int64_t K, const int8_t* w, const S* sc, const S* bi, float* y, int64_t N,
                  int64_t b0, int64_t b1, int impl, bool r8);

}  // namespace pvlm
