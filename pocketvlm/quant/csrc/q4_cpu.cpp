// pocketvlm CPU 4-bit matrix-vector / small-matrix kernels (see pocketvlm/quant/cpu_kernel.py).
//
// Two weight layouts for a weight W [N, K] with K % 32 == 0, G = K / 32 groups:
//  "rows" (any N):
//   packed  uint8 [N, K/2]  row n, group g occupies bytes [16g, 16g+16); byte j holds
//                           q[32g + j] in the low nibble and q[32g + 16 + j] in the high nibble,
//                           so one and/shift yields 16 consecutive codes (no byte shuffles).
//   scales  float16|float32 [N, G]
//   biases  same dtype [N, G] or absent
//  "rows8" (N % 8 == 0; pack_q4's default there), told apart by its 3-d shapes:
//   packed  uint8 [N/8, G, 128]  row block b (rows 8b..8b+7), group g, chunk c = 0..3 of 8 codes:
//                           byte 32c + 4r + j (r = row in the block, j = 0..3) holds q[8b+r][32g+8c+j]
//                           in its low nibble and q[8b+r][32g+8c+4+j] in its high nibble.
//   scales, biases [N/8, G, 8]   the 8 rows' values of group g side by side.
//  "rows8" with 5-bit codes (q in 0..31: GGUF Q5_0, offset 16), packed uint8 [N/8, G, 160]: bytes 0..127 as
//   above hold the low 4 bits of each code; byte 128 + 4r + j holds bit 4 of q[8b+r][32g + 4t + j] in its
//   bit t (t = 2c + nibble = 0..7), so shifting the 32 plane bytes once puts a chunk-half's fifth bits at
//   bit 4 of the same bytes as its nibbles: 3 more instructions per 32 codes, 5.5 bits per weight in all.
//   One 32-byte load holds 4 consecutive codes of each of 8 rows per nibble, so vpmaddubsw against 4
//   activation bytes broadcast to all lanes sums them per row (no horizontal adds, no permutes), a
//   group's 8 partial sums stay in int16 until one vpmaddwd, and the 8 rows' scales are one load:
//   ~1.5x the rows layout's in-cache speed, which is what lets decode reach the memory bandwidth.
//   W[n, 32g + i] = q * scales[n, g] + biases[n, g]            (affine: GGUF Q4_K/Q4_1, ...)
//   W[n, 32g + i] = (q - offset) * scales[n, g]                (symmetric: MLC offset 7, Q4_0 offset 8)
//
// Two inner loops:
//   exact (fp32 activations): codes -> fp32, FMA with x; fp32 accumulation.
//   int8 activations (llama.cpp-style): x quantized per 32-block to int8 (dx = max|x|/127),
//     integer dot with vpmaddubsw (unsigned nibble x signed int8), one int->float per group.
//     The bias / offset term uses the *quantized* group sum, so the only error is the activation
//     rounding (|err| <= sum_i |W_i| * dx_g / 2 per group).
// Compiled with AVX2/FMA/F16C when the build passes -mavx2 -mfma -mf16c; every op also has a portable
// scalar path (always compiled; selected by impl=1 or when AVX2 is absent) so the code builds anywhere.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "kernels.h"

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

namespace {

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
};

// paired: the q4 pair layout above; otherwise natural order, 32 bytes per group (the q8 kernel).
void quantize_x(const float* x, int64_t M, int64_t K, QuantX& q, bool paired = true) {
  q.M = M;
  q.paired = paired;
  q.G = K / kGroup;
  q.P = (q.G + 1) / 2;
  q.xq.resize(M * q.P * 64);
  q.dx.resize(M * q.G);
  q.qs.resize(M * q.G);
  if (paired && (q.G & 1))  // the odd last group's partner half stays zero
    for (int64_t m = 0; m < M; ++m) {
      int8_t* last = q.xq.data() + (m * q.P + q.P - 1) * 64;
      std::memset(last + 16, 0, 16);
      std::memset(last + 48, 0, 16);
    }
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < q.G; ++g) {
      const float* xg = x + m * K + g * kGroup;
      int8_t* dst = paired ? q.xq.data() + (m * q.P + g / 2) * 64 + (g & 1) * 16 : q.xq.data() + (m * q.G + g) * 32;
      const int hi_off = paired ? 32 : 16;  // where x16..31 go
#if PVLM_AVX2
      const __m256 sign = _mm256_set1_ps(-0.f);
      const __m256 v0 = _mm256_loadu_ps(xg), v1 = _mm256_loadu_ps(xg + 8);
      const __m256 v2 = _mm256_loadu_ps(xg + 16), v3 = _mm256_loadu_ps(xg + 24);
      __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
      const float d = _mm_cvtss_f32(m4) / 127.f;
      const __m256 id = _mm256_set1_ps(d > 0.f ? 1.f / d : 0.f);
      // cvtps rounds to nearest-even (default MXCSR), like std::nearbyint in the scalar path
      const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, id)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, id));
      const __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, id)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, id));
      const __m256i a = _mm256_permute4x64_epi64(_mm256_packs_epi32(i0, i1), 0xD8);  // x0..15 int16
      const __m256i b = _mm256_permute4x64_epi64(_mm256_packs_epi32(i2, i3), 0xD8);  // x16..31 int16
      const __m256i p8 = _mm256_permute4x64_epi64(_mm256_packs_epi16(a, b), 0xD8);   // x0..31 int8
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(p8));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + hi_off), _mm256_extracti128_si256(p8, 1));
      __m256i s8 = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
      __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
      const int32_t s = _mm_cvtsi128_si32(s4);
#else
      float amax = 0.f;
      for (int i = 0; i < kGroup; ++i) amax = std::fmax(amax, std::fabs(xg[i]));
      const float d = amax / 127.f;
      const float id = d > 0.f ? 1.f / d : 0.f;
      int32_t s = 0;
      for (int i = 0; i < kGroup; ++i) {
        const int v = static_cast<int>(std::nearbyint(xg[i] * id));
        s += v;
        dst[(i < 16) ? i : i - 16 + hi_off] = static_cast<int8_t>(v);
      }
#endif
      q.dx[m * q.G + g] = d;
      q.qs[m * q.G + g] = d * static_cast<float>(s);
    }
  }
}

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

// ---------------------------------------------------------------------------------------------
// Scalar paths (portable; also the reference the AVX2 paths are tested against).
template <typename S, bool AFFINE>
void rows_exact_scalar(const float* x, int64_t M, int64_t K, const uint8_t* w, const S* sc,
                       const S* bi, float off, float* y, int64_t N, int64_t n0, int64_t n1, bool r8, bool q5) {
  const int64_t G = K / kGroup;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * K;
      float acc = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        const float* xg = xr + g * kGroup;
        float dot = 0.f, xs = 0.f;
        for (int i = 0; i < kGroup; ++i) {
          dot += float(q4_code(r8, w, K, n, g * kGroup + i, q5)) * xg[i];
          xs += xg[i];
        }
        const float s = to_f(sc[q4_sidx(r8, G, n, g)]);
        const float b = AFFINE ? to_f(bi[q4_sidx(r8, G, n, g)]) : -off * s;
        acc += s * dot + b * xs;
      }
      y[m * N + n] = acc;
    }
  }
}

template <typename S, bool AFFINE>
void rows_i8_scalar(const QuantX& q, int64_t K, const uint8_t* w, const S* sc, const S* bi,
                    float off, float* y, int64_t N, int64_t n0, int64_t n1, bool r8, bool q5) {
  const int64_t G = K / kGroup;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < q.M; ++m) {
      float acc = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        int32_t dot = 0;
        for (int i = 0; i < kGroup; ++i) dot += int32_t(q4_code(r8, w, K, n, g * kGroup + i, q5)) * xq_at(q, m, g, i);
        const float s = to_f(sc[q4_sidx(r8, G, n, g)]);
        const float b = AFFINE ? to_f(bi[q4_sidx(r8, G, n, g)]) : -off * s;
        acc += s * q.dx[m * G + g] * float(dot) + b * q.qs[m * G + g];
      }
      y[m * N + n] = acc;
    }
  }
}

#if PVLM_AVX2
using pvlm::hsum8;

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

void make_pair_vecs(const QuantX& q, float off, bool affine, PairVecs& pv) {
  static const int kOrder[8] = {0, 2, 4, 6, 1, 3, 5, 7};
  pv.G8 = q.G / 8;
  pv.dx8.assign(q.M * pv.G8 * 8, 0.f);
  pv.cs8.assign(q.M * pv.G8 * 8, 0.f);
  pv.qs8.assign(q.M * pv.G8 * 8, 0.f);
  pv.dxv.assign(q.M * q.P * 8, 0.f);
  pv.csv.assign(q.M * q.P * 8, 0.f);
  const float f = affine ? 1.f : -off;
  for (int64_t m = 0; m < q.M; ++m) {
    for (int64_t b = 0; b < pv.G8; ++b)
      for (int l = 0; l < 8; ++l) {
        const int64_t i = (m * pv.G8 + b) * 8 + l;
        pv.dx8[i] = q.dx[m * q.G + 8 * b + kOrder[l]];
        pv.cs8[i] = f * q.qs[m * q.G + 8 * b + kOrder[l]];
        pv.qs8[i] = q.qs[m * q.G + 8 * b + l];
      }
    for (int64_t g = 0; g < q.G; ++g)
      for (int l = 0; l < 4; ++l) {
        const int64_t i = (m * q.P + g / 2) * 8 + (g & 1) * 4 + l;
        pv.dxv[i] = q.dx[m * q.G + g];
        pv.csv[i] = 0.25f * f * q.qs[m * q.G + g];
      }
  }
}

// int32 dot products of one 32-byte weight load (2 groups) with the matching activations: [g0 x4 | g1 x4]
inline __m256i pair_dot(const uint8_t* wp, const int8_t* xp, __m256i m4, __m256i ones) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp));
  const __m256i lo = _mm256_and_si256(v, m4);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
  const __m256i xa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp));
  const __m256i xb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + 32));
  // |each int16| <= 2 * 15 * 127 per maddubs, the sum of two still fits int16
  const __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xa), _mm256_maddubs_epi16(hi, xb));
  return _mm256_madd_epi16(s16, ones);
}

// R output rows at once sharing the activation loads; int8 activations.
template <typename S, bool AFFINE, int R>
inline void block_i8_avx2(const QuantX& q, const PairVecs& pv, int64_t K, const uint8_t* w, const S* sc,
                          const S* bi, float off, float* y, int64_t N, int64_t n) {
  const int64_t G = K / kGroup, Gp = G / 2, rb = K / 2, G8 = pv.G8;
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i perm = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  for (int64_t m = 0; m < q.M; ++m) {
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    const int8_t* xp = q.xq.data() + m * q.P * 64;
    for (int64_t b = 0; b < G8; ++b) {
      const __m256 dx8 = _mm256_loadu_ps(pv.dx8.data() + (m * G8 + b) * 8);
      const __m256 cs8 = _mm256_loadu_ps(pv.cs8.data() + (m * G8 + b) * 8);
      const int8_t* xb = xp + b * 256;
      for (int r = 0; r < R; ++r) {
        const uint8_t* wb = w + (n + r) * rb + b * 128;
        _mm_prefetch(reinterpret_cast<const char*>(wb + 2 * R * rb), _MM_HINT_T0);  // two row blocks ahead (see q8)
        _mm_prefetch(reinterpret_cast<const char*>(wb + 2 * R * rb + 64), _MM_HINT_T0);
        const __m256i d0 = pair_dot(wb, xb, m4, ones), d1 = pair_dot(wb + 32, xb + 64, m4, ones);
        const __m256i d2 = pair_dot(wb + 64, xb + 128, m4, ones), d3 = pair_dot(wb + 96, xb + 192, m4, ones);
        const __m256 dot = _mm256_cvtepi32_ps(
            _mm256_hadd_epi32(_mm256_hadd_epi32(d0, d1), _mm256_hadd_epi32(d2, d3)));  // [g0 g2 g4 g6 g1 g3 g5 g7]
        const __m256 sv = _mm256_permutevar8x32_ps(load8(sc + (n + r) * G + 8 * b), perm);
        if (AFFINE) {
          acc[r] = _mm256_fmadd_ps(sv, _mm256_mul_ps(dx8, dot), acc[r]);
          acc[r] = _mm256_fmadd_ps(load8(bi + (n + r) * G + 8 * b),
                                   _mm256_loadu_ps(pv.qs8.data() + (m * G8 + b) * 8), acc[r]);
        } else {
          acc[r] = _mm256_fmadd_ps(sv, _mm256_fmadd_ps(dx8, dot, cs8), acc[r]);
        }
      }
    }
    const float* dxp = pv.dxv.data() + m * q.P * 8;
    const float* csp = pv.csv.data() + m * q.P * 8;
    for (int64_t p = 4 * G8; p < Gp; ++p) {  // leftover pairs
      const __m256 dxv = _mm256_loadu_ps(dxp + p * 8);
      const __m256 csv = _mm256_loadu_ps(csp + p * 8);
      for (int r = 0; r < R; ++r) {
        const __m256 dot = _mm256_cvtepi32_ps(pair_dot(w + (n + r) * rb + p * 32, xp + p * 64, m4, ones));
        const __m256 sv = pair_bcast(sc + (n + r) * G + 2 * p);
        if (AFFINE) {
          acc[r] = _mm256_fmadd_ps(sv, _mm256_mul_ps(dxv, dot), acc[r]);
          acc[r] = _mm256_fmadd_ps(pair_bcast(bi + (n + r) * G + 2 * p), csv, acc[r]);
        } else {
          acc[r] = _mm256_fmadd_ps(sv, _mm256_fmadd_ps(dxv, dot, csv), acc[r]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      float t = hsum8(acc[r]);
      if (G & 1) {  // odd last group: 16-byte weight load (a 32-byte one could run past the buffer)
        const int64_t g = G - 1;
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (n + r) * rb + g * 16));
        const __m128i m4s = _mm_set1_epi8(0x0F);
        const __m128i lo = _mm_and_si128(v, m4s), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4s);
        const __m128i xa = _mm_loadu_si128(reinterpret_cast<const __m128i*>(xp + Gp * 64));
        const __m128i xb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(xp + Gp * 64 + 32));
        const __m128i s16 = _mm_add_epi16(_mm_maddubs_epi16(lo, xa), _mm_maddubs_epi16(hi, xb));
        __m128i s32 = _mm_madd_epi16(s16, _mm_set1_epi16(1));
        s32 = _mm_add_epi32(s32, _mm_shuffle_epi32(s32, 0x4E));
        s32 = _mm_add_epi32(s32, _mm_shuffle_epi32(s32, 0xB1));
        const float s = to_f(sc[(n + r) * G + g]);
        const float b = AFFINE ? to_f(bi[(n + r) * G + g]) : -off * s;
        t += s * q.dx[m * G + g] * float(_mm_cvtsi128_si32(s32)) + b * q.qs[m * G + g];
      }
      y[m * N + n + r] = t;
    }
  }
}

// R output rows at once; fp32 activations, exact path. xs = per-group sums of x, [M, G].
template <typename S, bool AFFINE, int R>
inline void block_exact_avx2(const float* x, const float* xs, int64_t M, int64_t K, const uint8_t* w,
                             const S* sc, const S* bi, float off, float* y, int64_t N, int64_t n) {
  const int64_t G = K / kGroup, rb = K / 2;
  const __m128i m4 = _mm_set1_epi8(0x0F);
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    __m256 acc[R];
    float bacc[R];
    for (int r = 0; r < R; ++r) { acc[r] = _mm256_setzero_ps(); bacc[r] = 0.f; }
    for (int64_t g = 0; g < G; ++g) {
      const __m256 x0 = _mm256_loadu_ps(xr + g * 32), x1 = _mm256_loadu_ps(xr + g * 32 + 8);
      const __m256 x2 = _mm256_loadu_ps(xr + g * 32 + 16), x3 = _mm256_loadu_ps(xr + g * 32 + 24);
      const float xsg = xs[m * G + g];
      for (int r = 0; r < R; ++r) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (n + r) * rb + g * 16));
        const __m128i lo = _mm_and_si128(v, m4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);
        __m256 d = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), x0);
        d = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), x1, d);
        d = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), x2, d);
        d = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), x3, d);
        const float s = to_f(sc[(n + r) * G + g]);
        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(s), d, acc[r]);
        bacc[r] += (AFFINE ? to_f(bi[(n + r) * G + g]) : -off * s) * xsg;
      }
    }
    for (int r = 0; r < R; ++r) y[m * N + n + r] = hsum8(acc[r]) + bacc[r];
  }
}

// Software prefetch distance of the rows8 loop: the group 8 ahead (1 KB). The hardware prefetcher alone
// left the fused decode's matrix phases at ~21 GB/s of weights on 2 threads; with this line a token took
// 12.7 instead of 15.5 ms (Qwen2.5-0.5B q4f16_1, same session, interleaved runs); 512-2048 B ahead
// measured alike, 4 KB worse.
constexpr int64_t kPrefetchR8 = 1024;

// Bit T of every byte of v moved to bit 4 of the same byte (other bits garbage): a 16-bit shift by at
// most 4 never carries a bit across the byte boundary into bit 4.
template <int T>
inline __m256i bit_to4(__m256i v) {
  if constexpr (T < 4) return _mm256_slli_epi16(v, 4 - T);
  else if constexpr (T > 4) return _mm256_srli_epi16(v, T - 4);
  else return v;
}

// Chunk C (8 codes per row) of a rows8 group: the 32 low-nibble and 32 high-nibble codes, with their fifth
// bits from the plane hv when Q5.
template <bool Q5, int C>
inline void r8_chunk(const uint8_t* wg, __m256i hv, __m256i& lo, __m256i& hi) {
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + 32 * C));
  lo = _mm256_and_si256(v, m4);
  hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
  if constexpr (Q5) {
    const __m256i m16 = _mm256_set1_epi8(0x10);
    lo = _mm256_or_si256(lo, _mm256_and_si256(bit_to4<2 * C>(hv), m16));
    hi = _mm256_or_si256(hi, _mm256_and_si256(bit_to4<2 * C + 1>(hv), m16));
  }
}

// s16 += the int16 dot sums of chunk C against its 8 activation bytes
template <bool Q5, int C>
inline __m256i r8_chunk_dot(const uint8_t* wg, __m256i hv, const int32_t* xi, __m256i s16) {
  __m256i lo, hi;
  r8_chunk<Q5, C>(wg, hv, lo, hi);
  return _mm256_add_epi16(s16, _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(xi[2 * C])),
                                                _mm256_maddubs_epi16(hi, _mm256_set1_epi32(xi[2 * C + 1]))));
}

// Row block b (8 rows) of the rows8 layout, int8 activations in natural order (QuantX paired = false).
template <typename S, bool AFFINE, bool Q5 = false>
inline void block_i8_r8(const QuantX& q, int64_t K, const uint8_t* w, const S* sc, const S* bi, float off,
                        float* y, int64_t N, int64_t b) {
  const int64_t G = K / kGroup, stride = r8_stride(Q5);
  const __m256i ones = _mm256_set1_epi16(1);
  const uint8_t* wb = w + b * G * stride;
  const S* sb = sc + b * G * 8;
  const S* bb = AFFINE ? bi + b * G * 8 : nullptr;
  for (int64_t m = 0; m < q.M; ++m) {  // M > 1: the block's bytes (4K) come from L1 again
    const int8_t* xm = q.xq.data() + m * G * kGroup;
    const float* dx = q.dx.data() + m * G;
    const float* qs = q.qs.data() + m * G;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      const uint8_t* wg = wb + g * stride;
      _mm_prefetch(reinterpret_cast<const char*>(wg + kPrefetchR8), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(wg + kPrefetchR8 + 64), _MM_HINT_T0);
      if (Q5) _mm_prefetch(reinterpret_cast<const char*>(wg + kPrefetchR8 + 128), _MM_HINT_T0);
      int32_t xi[8];  // the group's activations as 8 runs of 4 bytes
      std::memcpy(xi, xm + g * kGroup, 32);
      const __m256i hv = Q5 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + 128)) : _mm256_setzero_si256();
      // |one vpmaddubsw lane| <= 2 * 15 * 127 = 3810 (4-bit codes; 2 * 31 * 127 = 7874 for 5-bit ones):
      // 8 (4 for 5-bit codes) of them summed fit int16
      __m256i s16 = r8_chunk_dot<Q5, 1>(wg, hv, xi, r8_chunk_dot<Q5, 0>(wg, hv, xi, _mm256_setzero_si256()));
      __m256i s32;
      if constexpr (Q5) {
        s32 = _mm256_madd_epi16(s16, ones);
        s16 = _mm256_setzero_si256();
      }
      s16 = r8_chunk_dot<Q5, 3>(wg, hv, xi, r8_chunk_dot<Q5, 2>(wg, hv, xi, s16));
      if constexpr (Q5) s32 = _mm256_add_epi32(s32, _mm256_madd_epi16(s16, ones));
      else s32 = _mm256_madd_epi16(s16, ones);
      const __m256 dot = _mm256_cvtepi32_ps(s32);  // the 8 rows' group sums
      const __m256 sv = load8(sb + g * 8);
      if (AFFINE) {
        acc = _mm256_fmadd_ps(sv, _mm256_mul_ps(dot, _mm256_set1_ps(dx[g])), acc);
        acc = _mm256_fmadd_ps(load8(bb + g * 8), _mm256_set1_ps(qs[g]), acc);
      } else {
        acc = _mm256_fmadd_ps(sv, _mm256_fmadd_ps(dot, _mm256_set1_ps(dx[g]), _mm256_set1_ps(-off * qs[g])), acc);
      }
    }
    _mm256_storeu_ps(y + m * N + 8 * b, acc);
  }
}

// Row block b of the rows8 layout, fp32 activations (exact path). xs = per-group sums of x, [M, G].
template <typename S, bool AFFINE, bool Q5 = false>
inline void block_exact_r8(const float* x, const float* xs, int64_t M, int64_t K, const uint8_t* w, const S* sc,
                           const S* bi, float off, float* y, int64_t N, int64_t b) {
  const int64_t G = K / kGroup, stride = r8_stride(Q5);
  const __m256i m4 = _mm256_set1_epi32(0x0F), one = _mm256_set1_epi32(1);
  const uint8_t* wb = w + b * G * stride;
  const S* sb = sc + b * G * 8;
  const S* bb = AFFINE ? bi + b * G * 8 : nullptr;
  for (int64_t m = 0; m < M; ++m) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      const float* xg = x + m * K + g * kGroup;
      __m256 d[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      const uint8_t* wg = wb + g * stride;
      // the fifth bits: byte j of each row's lane, bit 2c (+1 for the high nibble)
      const __m256i hv = Q5 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + 128)) : _mm256_setzero_si256();
      for (int c = 0; c < 4; ++c) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + 32 * c));
        // byte j of each 32-bit lane (one row): code 8c+j in its low nibble, 8c+4+j in its high one
        for (int j = 0; j < 4; ++j) {
          __m256i lq = _mm256_and_si256(_mm256_srli_epi32(v, 8 * j), m4);
          __m256i hq = _mm256_and_si256(_mm256_srli_epi32(v, 8 * j + 4), m4);
          if (Q5) {
            lq = _mm256_or_si256(lq, _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(hv, 8 * j + 2 * c), one), 4));
            hq = _mm256_or_si256(hq, _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(hv, 8 * j + 2 * c + 1), one), 4));
          }
          const __m256 lo = _mm256_cvtepi32_ps(lq);
          const __m256 hi = _mm256_cvtepi32_ps(hq);
          d[j] = _mm256_fmadd_ps(lo, _mm256_set1_ps(xg[8 * c + j]), d[j]);
          d[j] = _mm256_fmadd_ps(hi, _mm256_set1_ps(xg[8 * c + 4 + j]), d[j]);
        }
      }
      const __m256 dot = _mm256_add_ps(_mm256_add_ps(d[0], d[1]), _mm256_add_ps(d[2], d[3]));
      const __m256 sv = load8(sb + g * 8);
      const float xsg = xs[m * G + g];
      if (AFFINE) {
        acc = _mm256_fmadd_ps(sv, dot, acc);
        acc = _mm256_fmadd_ps(load8(bb + g * 8), _mm256_set1_ps(xsg), acc);
      } else {
        acc = _mm256_fmadd_ps(sv, _mm256_add_ps(dot, _mm256_set1_ps(-off * xsg)), acc);
      }
    }
    _mm256_storeu_ps(y + m * N + 8 * b, acc);
  }
}
#else
struct PairVecs {};  // the portable loops need no prepared activation vectors
#endif  // PVLM_AVX2

constexpr int64_t kRows = 4;  // output rows per inner block (rows layout; a rows8 block is 8 rows)
inline int64_t rows_per_block(bool r8) { return r8 ? 8 : kRows; }  // q8 and q4 rows: kRows

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

// Row blocks [b0, b1) (rows_per_block(r8) rows each) of y = W x, q4 weights, int8 activations (paired
// for rows, natural order for rows8): the AVX2 blocks, or the portable loops when scalar (forced without
// AVX2). Shared by the per-layer op and MultiLinear.
template <typename S, bool AFFINE>
void q4_i8_blocks(const QuantX& q, const PairVecs& pv, int64_t K, const uint8_t* w, const S* sc, const S* bi,
                  float off, float* y, int64_t N, int64_t b0, int64_t b1, bool scalar, bool r8, bool q5) {
#if PVLM_AVX2
  if (!scalar && r8) {
    if (q5) for (int64_t b = b0; b < b1; ++b) block_i8_r8<S, AFFINE, true>(q, K, w, sc, bi, off, y, N, b);
    else for (int64_t b = b0; b < b1; ++b) block_i8_r8<S, AFFINE>(q, K, w, sc, bi, off, y, N, b);
    return;
  }
  if (!scalar) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b * kRows;
      if (n + kRows <= N) block_i8_avx2<S, AFFINE, kRows>(q, pv, K, w, sc, bi, off, y, N, n);
      else for (int64_t r = n; r < N; ++r) block_i8_avx2<S, AFFINE, 1>(q, pv, K, w, sc, bi, off, y, N, r);
    }
    return;
  }
#endif
  const int64_t rpb = rows_per_block(r8);
  rows_i8_scalar<S, AFFINE>(q, K, w, sc, bi, off, y, N, b0 * rpb, std::min(N, b1 * rpb), r8, q5);
}

// N, K and the layout of a q4 weight (shapes checked by check_args)
struct Q4Shape {
  int64_t N, K;
  bool r8;
  bool q5;  // rows8 with 5-bit codes
};

Q4Shape q4_shape(const at::Tensor& packed) {
  if (packed.dim() == 3) return {packed.size(0) * 8, packed.size(1) * kGroup, true, packed.size(2) == 160};
  return {packed.size(0), packed.size(1) * 2, false, false};
}

Q4Shape q8_shape(const at::Tensor& qw) {  // N, K and the layout of a q8 weight
  if (qw.dim() == 3) return {qw.size(0) * 8, qw.size(1) * kGroup, true, false};
  return {qw.size(0), qw.size(1), false, false};
}

template <typename S, bool AFFINE>
void run_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                const c10::optional<at::Tensor>& biases, double offset, bool int8_act, bool scalar,
                at::Tensor& y) {
  const auto [N, K, r8, q5] = q4_shape(packed);
  const int64_t M = x.size(0);
  const float* xp = x.data_ptr<float>();
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const S* sc = scales.data_ptr<S>();
  const S* bi = AFFINE ? biases->data_ptr<S>() : nullptr;
  const float off = static_cast<float>(offset);
  float* yp = y.data_ptr<float>();
  const int64_t rpb = rows_per_block(r8);
  const int64_t nblocks = (N + rpb - 1) / rpb;
  // grain: >= ~256k weights per task, so small matrices (e.g. 128 x 896 k/v projections) run on one
  // thread: waking a second one costs more than the ~10 us of work, and far more on a loaded machine
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / (K * rpb * std::max<int64_t>(1, M)));
#if !PVLM_AVX2
  scalar = true;
#endif
  if (int8_act) {
    // reused between calls (no allocation per token); the local reference is what the lambdas capture -
    // naming the thread_local inside them would give each worker thread its own, empty, copy
    thread_local QuantX q_buf;
    QuantX& q = q_buf;
    quantize_x(xp, M, K, q, /*paired=*/!r8);
    thread_local PairVecs pv_buf;
    PairVecs& pv = pv_buf;
#if PVLM_AVX2
    if (!scalar && !r8) make_pair_vecs(q, off, AFFINE, pv);
#endif
    for_blocks(nblocks, grain, [&](int64_t b0, int64_t b1) {
      q4_i8_blocks<S, AFFINE>(q, pv, K, w, sc, bi, off, yp, N, b0, b1, scalar, r8, q5);
    });
    return;
  }
  if (scalar) {
    for_blocks(nblocks, grain, [&](int64_t b0, int64_t b1) {
      rows_exact_scalar<S, AFFINE>(xp, M, K, w, sc, bi, off, yp, N, b0 * rpb, std::min(N, b1 * rpb), r8, q5);
    });
    return;
  }
#if PVLM_AVX2
  const int64_t G = K / kGroup;
  std::vector<float> xs(M * G);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.f;
      for (int i = 0; i < kGroup; ++i) s += xp[m * K + g * kGroup + i];
      xs[m * G + g] = s;
    }
  for_blocks(nblocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      if (r8) {
        if (q5) block_exact_r8<S, AFFINE, true>(xp, xs.data(), M, K, w, sc, bi, off, yp, N, b);
        else block_exact_r8<S, AFFINE>(xp, xs.data(), M, K, w, sc, bi, off, yp, N, b);
        continue;
      }
      const int64_t n = b * kRows;
      if (n + kRows <= N) {
        block_exact_avx2<S, AFFINE, kRows>(xp, xs.data(), M, K, w, sc, bi, off, yp, N, n);
      } else {
        for (int64_t r = n; r < N; ++r)
          block_exact_avx2<S, AFFINE, 1>(xp, xs.data(), M, K, w, sc, bi, off, yp, N, r);
      }
    }
  });
#endif
}

// scales/biases of a weight w of shape sh (either layout), for a q4 or q8 ("kind") op
void check_scales(const char* kind, const Q4Shape& sh, const at::Tensor& w, const at::Tensor& scales,
                  const c10::optional<at::Tensor>& biases) {
  TORCH_CHECK(sh.K % kGroup == 0, kind, ": K must be a multiple of 32, got ", sh.K);
  const bool shape_ok = sh.r8 ? (scales.dim() == 3 && scales.size(0) == w.size(0) && scales.size(1) == w.size(1) &&
                                 scales.size(2) == 8)
                              : (scales.dim() == 2 && scales.size(0) == sh.N && scales.size(1) == sh.K / kGroup);
  TORCH_CHECK(scales.device().is_cpu() && scales.is_contiguous() && shape_ok, kind,
              ": scales must be a contiguous CPU tensor, [N, K/32] (rows) or [N/8, K/32, 8] (rows8)");
  TORCH_CHECK(scales.scalar_type() == at::kHalf || scales.scalar_type() == at::kFloat, kind,
              ": scales must be float16 or float32");
  if (biases.has_value())
    TORCH_CHECK(biases->sizes() == scales.sizes() && biases->scalar_type() == scales.scalar_type() &&
                    biases->is_contiguous() && biases->device().is_cpu(),
                kind, ": biases must match scales (shape, dtype, contiguous CPU)");
}

Q4Shape check_args(const at::Tensor& packed, const at::Tensor& scales, const c10::optional<at::Tensor>& biases) {
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kByte &&
                  (packed.dim() == 2 || (packed.dim() == 3 && (packed.size(2) == 128 || packed.size(2) == 160))) &&
                  packed.is_contiguous(),
              "q4: packed must be a contiguous CPU uint8 tensor, [N, K/2] (rows), [N/8, K/32, 128] (rows8) or "
              "[N/8, K/32, 160] (rows8, 5-bit codes)");
  const Q4Shape sh = q4_shape(packed);
  check_scales("q4", sh, packed, scales, biases);
  return sh;
}

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                     const c10::optional<at::Tensor>& biases, double offset, bool int8_act, int64_t impl) {
  const Q4Shape sh = check_args(packed, scales, biases);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "q4_linear: x must be a contiguous CPU float32 [M, K] tensor");
  TORCH_CHECK(x.size(1) == sh.K, "q4_linear: x has K = ", x.size(1), " but the weight has K = ", sh.K);
  at::Tensor y = at::empty({x.size(0), sh.N}, x.options());
  if (x.size(0) == 0 || sh.N == 0) return y;
  const bool scalar = impl == 1;
  const bool affine = biases.has_value();
  if (scales.scalar_type() == at::kHalf) {
    if (affine) run_linear<c10::Half, true>(x, packed, scales, biases, offset, int8_act, scalar, y);
    else run_linear<c10::Half, false>(x, packed, scales, biases, offset, int8_act, scalar, y);
  } else {
    if (affine) run_linear<float, true>(x, packed, scales, biases, offset, int8_act, scalar, y);
    else run_linear<float, false>(x, packed, scales, biases, offset, int8_act, scalar, y);
  }
  return y;
}

// One weight: q * s + b (affine) or (q - off) * s (symmetric: the subtraction is exact, so this is
// bit-identical to MLC's own formula, float32 scales included).
inline float dq(int q, float s, float b, float off, bool affine) {
  return affine ? float(q) * s + b : (float(q) - off) * s;
}

#if PVLM_AVX2
// 32 weights of one group from its codes (k0: codes 0..15, k1: 16..31, one per byte) into o[0..32)
inline void store_group(float* o, __m128i k0, __m128i k1, float s, float b, float off, bool affine) {
  const __m256 sv = _mm256_set1_ps(s), bv = _mm256_set1_ps(b), ov = _mm256_set1_ps(off);
  const __m128i parts[4] = {k0, _mm_srli_si128(k0, 8), k1, _mm_srli_si128(k1, 8)};
  for (int i = 0; i < 4; ++i) {
    const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[i]));
    _mm256_storeu_ps(o + 8 * i, affine ? _mm256_fmadd_ps(q, sv, bv) : _mm256_mul_ps(_mm256_sub_ps(q, ov), sv));
  }
}
#endif

template <typename S>
void run_dequant(const at::Tensor& packed, const at::Tensor& scales, const c10::optional<at::Tensor>& biases,
                 float off, at::Tensor& out) {
  const auto [N, K, r8, q5] = q4_shape(packed);
  const int64_t G = K / kGroup, stride = r8_stride(q5);
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const S* sc = scales.data_ptr<S>();
  const S* bi = biases.has_value() ? biases->data_ptr<S>() : nullptr;
  float* o = out.data_ptr<float>();
  if (r8) {
    at::parallel_for(0, N / 8, std::max<int64_t>(1, 2048 / K), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        for (int64_t g = 0; g < G; ++g) {
          const uint8_t* wg = w + (b * G + g) * stride;
          for (int r = 0; r < 8; ++r) {
            const int64_t n = 8 * b + r, si = (b * G + g) * 8 + r;
            const float s = to_f(sc[si]);
            const float bv = bi ? to_f(bi[si]) : 0.f;
            float* og = o + n * K + g * kGroup;
#if PVLM_AVX2
            // the row's 4 bytes of each chunk: low nibbles are codes 8c..8c+3, high ones 8c+4..8c+7
            int32_t wd[4];
            for (int c = 0; c < 4; ++c) std::memcpy(&wd[c], wg + 32 * c + 4 * r, 4);
            const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wd));
            const __m128i m4 = _mm_set1_epi8(0x0F);
            const __m128i lo = _mm_and_si128(v, m4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);
            __m128i k0 = _mm_unpacklo_epi32(lo, hi), k1 = _mm_unpackhi_epi32(lo, hi);  // codes 0..15, 16..31
            if (q5) {  // code i's fifth bit: bit i >> 2 of plane byte 128 + 4r + (i & 3)
              int32_t pl;
              std::memcpy(&pl, wg + 128 + 4 * r, 4);
              const __m128i p = _mm_set1_epi32(pl), m16 = _mm_set1_epi8(0x10);  // byte i: plane byte i & 3
              const __m128i b0 = _mm_setr_epi8(1, 1, 1, 1, 2, 2, 2, 2, 4, 4, 4, 4, 8, 8, 8, 8);
              const __m128i b1 = _mm_setr_epi8(16, 16, 16, 16, 32, 32, 32, 32, 64, 64, 64, 64, -128, -128, -128, -128);
              k0 = _mm_or_si128(k0, _mm_and_si128(_mm_cmpeq_epi8(_mm_and_si128(p, b0), b0), m16));
              k1 = _mm_or_si128(k1, _mm_and_si128(_mm_cmpeq_epi8(_mm_and_si128(p, b1), b1), m16));
            }
            store_group(og, k0, k1, s, bv, off, bi != nullptr);
#else
            for (int i = 0; i < kGroup; ++i)
              og[i] = dq(q4_code(true, w, K, n, g * kGroup + i, q5), s, bv, off, bi != nullptr);
#endif
          }
        }
    });
    return;
  }
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / K), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t g = 0; g < G; ++g) {
        const float s = to_f(sc[n * G + g]);
        const float b = bi ? to_f(bi[n * G + g]) : 0.f;
        const uint8_t* wg = w + n * (K / 2) + g * 16;
        float* og = o + n * K + g * kGroup;
#if PVLM_AVX2
        const __m128i m4 = _mm_set1_epi8(0x0F);
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wg));
        store_group(og, _mm_and_si128(v, m4), _mm_and_si128(_mm_srli_epi16(v, 4), m4), s, b, off, bi != nullptr);
#else
        for (int j = 0; j < 16; ++j) {
          og[j] = dq(wg[j] & 15, s, b, off, bi != nullptr);
          og[j + 16] = dq(wg[j] >> 4, s, b, off, bi != nullptr);
        }
#endif
      }
  });
}

at::Tensor q4_dequantize(const at::Tensor& packed, const at::Tensor& scales, const c10::optional<at::Tensor>& biases,
                         double offset) {
  const Q4Shape sh = check_args(packed, scales, biases);
  at::Tensor out = at::empty({sh.N, sh.K}, packed.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  if (scales.scalar_type() == at::kHalf) run_dequant<c10::Half>(packed, scales, biases, float(offset), out);
  else run_dequant<float>(packed, scales, biases, float(offset), out);
  return out;
}


// ---------------------------------------------------------------------------------------------
// q8: int8 codes W = q * scale (+ bias), scales/biases as for q4, in two layouts:
//  rows:  qweight [N, K] natural order, scales/biases [N, K/32];
//  rows8 (N % 8 == 0): qweight [N/8, K/32, 256]: row block b, group g, chunk c = 0..7 of 4 codes: byte
//         32c + 4r + j holds q[8b+r][32g+4c+j]; scales/biases [N/8, K/32, 8]. As for q4, one 32-byte load
//         then feeds 8 rows (vpmaddubsw against 4 activation bytes broadcast to all lanes) and the block is
//         one contiguous stream: 12 -> 2x GB/s on the 151936 x 896 LM head (see block_q8_r8).
// Int8 activations only (x quantized per 32-block exactly as in the q4 int8 path).
inline int q8_code(bool r8, const int8_t* w, int64_t K, int64_t n, int64_t k) {
  if (!r8) return w[n * K + k];
  const int64_t g = k / kGroup;
  const int i = static_cast<int>(k % kGroup);
  return w[((n >> 3) * (K / kGroup) + g) * 256 + 32 * (i >> 2) + 4 * (n & 7) + (i & 3)];
}

template <typename S, bool AFFINE>
void rows_q8_scalar(const QuantX& q, int64_t K, const int8_t* w, const S* sc, const S* bi, float* y, int64_t N,
                    int64_t n0, int64_t n1, bool r8) {
  const int64_t G = K / kGroup;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < q.M; ++m) {
      float acc = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        const int8_t* xg = q.xq.data() + (m * G + g) * kGroup;
        int32_t dot = 0;
        for (int i = 0; i < kGroup; ++i) dot += q8_code(r8, w, K, n, g * kGroup + i) * int32_t(xg[i]);
        const int64_t si = q4_sidx(r8, G, n, g);
        acc += to_f(sc[si]) * q.dx[m * G + g] * float(dot);
        if (AFFINE) acc += to_f(bi[si]) * q.qs[m * G + g];
      }
      y[m * N + n] = acc;
    }
}

#if PVLM_AVX2
// int32 partial dot products of one group (32 int8 weights x 32 int8 activations), 8 lanes
inline __m256i q8_dot(const int8_t* wp, const int8_t* xp, __m256i ones) {
  const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp));
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp));
  // vpmaddubsw wants one unsigned operand: |w| x (x with w's sign); |pair sums| <= 2*128*127 fits int16
  const __m256i s16 = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
  return _mm256_madd_epi16(s16, ones);
}

// Prefetch distance of the q8 loop, within each of the block's row streams. It was two row blocks ahead
// (8 rows: 7 KB at K = 896 but 39 KB at K = 4864, past L1 before use); 2 KB ahead took the 151936 x 896
// LM head from ~15 to ~21 GB/s on 2 threads (benchmarks/cpu_kernel.py, same session; 1 KB: 14, 3-6 KB: 20-23).
constexpr int64_t kPrefetchQ8 = 2048;
// ... and of the rows8 loop (one stream): measured alike at 1-2 KB on the LM head.
constexpr int64_t kPrefetchQ8R8 = 2048;

template <typename S, bool AFFINE, int R>
inline void block_q8_avx2(const QuantX& q, int64_t K, const int8_t* w, const S* sc, const S* bi, float* y,
                          int64_t N, int64_t n) {
  const int64_t G = K / kGroup, G8 = G / 8;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t m = 0; m < q.M; ++m) {
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    const int8_t* xp = q.xq.data() + m * G * kGroup;
    for (int64_t b = 0; b < G8; ++b) {
      const __m256 dx8 = _mm256_loadu_ps(q.dx.data() + m * G + 8 * b);
      const int8_t* xb = xp + b * 256;
      for (int r = 0; r < R; ++r) {
        const int8_t* wb = w + (n + r) * K + b * 256;
        // the hardware prefetcher alone left DRAM-bound shapes (lm_head) at ~half of q4's GB/s
        for (int c = 0; c < 256; c += 64) _mm_prefetch(reinterpret_cast<const char*>(wb + kPrefetchQ8 + c), _MM_HINT_T0);
        // 3 hadds + a 128-bit lane swap turn 8 per-group vectors into [g0 .. g7] in natural order
        const __m256i t = _mm256_hadd_epi32(_mm256_hadd_epi32(q8_dot(wb, xb, ones), q8_dot(wb + 32, xb + 32, ones)),
                                            _mm256_hadd_epi32(q8_dot(wb + 64, xb + 64, ones),
                                                              q8_dot(wb + 96, xb + 96, ones)));
        const __m256i u = _mm256_hadd_epi32(
            _mm256_hadd_epi32(q8_dot(wb + 128, xb + 128, ones), q8_dot(wb + 160, xb + 160, ones)),
            _mm256_hadd_epi32(q8_dot(wb + 192, xb + 192, ones), q8_dot(wb + 224, xb + 224, ones)));
        const __m256i sum = _mm256_add_epi32(_mm256_permute2x128_si256(t, u, 0x20), _mm256_permute2x128_si256(t, u, 0x31));
        const __m256 dot = _mm256_cvtepi32_ps(sum);
        acc[r] = _mm256_fmadd_ps(load8(sc + (n + r) * G + 8 * b), _mm256_mul_ps(dx8, dot), acc[r]);
        if (AFFINE)
          acc[r] = _mm256_fmadd_ps(load8(bi + (n + r) * G + 8 * b), _mm256_loadu_ps(q.qs.data() + m * G + 8 * b), acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      float t = hsum8(acc[r]);
      for (int64_t g = 8 * G8; g < G; ++g) {  // leftover groups
        __m256i d = q8_dot(w + (n + r) * K + g * kGroup, xp + g * kGroup, ones);
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(d), _mm256_extracti128_si256(d, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
        t += to_f(sc[(n + r) * G + g]) * q.dx[m * G + g] * float(_mm_cvtsi128_si32(s4));
        if (AFFINE) t += to_f(bi[(n + r) * G + g]) * q.qs[m * G + g];
      }
      y[m * N + n + r] = t;
    }
  }
}

// Row block b (8 rows) of the q8 rows8 layout. Per chunk: |w| x (x with w's sign) in vpmaddubsw (pair sums
// <= 2 * 128 * 127 fit int16), then straight to int32 (two chunks would not fit int16).
template <typename S, bool AFFINE>
inline void block_q8_r8(const QuantX& q, int64_t K, const int8_t* w, const S* sc, const S* bi, float* y,
                        int64_t N, int64_t b) {
  const int64_t G = K / kGroup;
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* wb = w + b * G * 256;
  const S* sb = sc + b * G * 8;
  const S* bb = AFFINE ? bi + b * G * 8 : nullptr;
  for (int64_t m = 0; m < q.M; ++m) {
    const int8_t* xm = q.xq.data() + m * G * kGroup;
    const float* dx = q.dx.data() + m * G;
    const float* qs = q.qs.data() + m * G;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      const int8_t* wg = wb + g * 256;
      for (int c = 0; c < 256; c += 64) _mm_prefetch(reinterpret_cast<const char*>(wg + kPrefetchQ8R8 + c), _MM_HINT_T0);
      int32_t xi[8];
      std::memcpy(xi, xm + g * kGroup, 32);
      __m256i s32 = _mm256_setzero_si256();
      for (int c = 0; c < 8; ++c) {
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + 32 * c));
        const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(_mm256_set1_epi32(xi[c]), wv));
        s32 = _mm256_add_epi32(s32, _mm256_madd_epi16(p, ones));
      }
      const __m256 dot = _mm256_cvtepi32_ps(s32);  // the 8 rows' group sums
      acc = _mm256_fmadd_ps(load8(sb + g * 8), _mm256_mul_ps(dot, _mm256_set1_ps(dx[g])), acc);
      if (AFFINE) acc = _mm256_fmadd_ps(load8(bb + g * 8), _mm256_set1_ps(qs[g]), acc);
    }
    _mm256_storeu_ps(y + m * N + 8 * b, acc);
  }
}
#endif  // PVLM_AVX2

// The same for q8 weights (blocks of kRows rows, or 8 in the rows8 layout).
template <typename S, bool AFFINE>
void q8_i8_blocks(const QuantX& q, int64_t K, const int8_t* w, const S* sc, const S* bi, float* y, int64_t N,
                  int64_t b0, int64_t b1, bool scalar, bool r8) {
#if PVLM_AVX2
  if (!scalar && r8) {
    for (int64_t b = b0; b < b1; ++b) block_q8_r8<S, AFFINE>(q, K, w, sc, bi, y, N, b);
    return;
  }
  if (!scalar) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b * kRows;
      if (n + kRows <= N) block_q8_avx2<S, AFFINE, kRows>(q, K, w, sc, bi, y, N, n);
      else for (int64_t r = n; r < N; ++r) block_q8_avx2<S, AFFINE, 1>(q, K, w, sc, bi, y, N, r);
    }
    return;
  }
#endif
  const int64_t rpb = rows_per_block(r8);
  rows_q8_scalar<S, AFFINE>(q, K, w, sc, bi, y, N, b0 * rpb, std::min(N, b1 * rpb), r8);
}

template <typename S, bool AFFINE>
void run_q8(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& scales, const c10::optional<at::Tensor>& biases,
            bool scalar, at::Tensor& y) {
  const auto [N, K, r8, q5_unused] = q8_shape(qw);
  const int64_t M = x.size(0);
  const int8_t* w = qw.data_ptr<int8_t>();
  const S* sc = scales.data_ptr<S>();
  const S* bi = AFFINE ? biases->data_ptr<S>() : nullptr;
  float* yp = y.data_ptr<float>();
  thread_local QuantX q_buf;  // see run_linear: capture the reference, not the thread_local
  QuantX& q = q_buf;
  quantize_x(x.data_ptr<float>(), M, K, q, /*paired=*/false);
  const int64_t rpb = rows_per_block(r8);
  const int64_t nblocks = (N + rpb - 1) / rpb;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 17) / (K * rpb * std::max<int64_t>(1, M)));
  for_blocks(nblocks, grain, [&](int64_t b0, int64_t b1) {
    q8_i8_blocks<S, AFFINE>(q, K, w, sc, bi, yp, N, b0, b1, scalar, r8);
  });
}

Q4Shape check_q8_args(const at::Tensor& qw, const at::Tensor& scales, const c10::optional<at::Tensor>& biases) {
  TORCH_CHECK(qw.device().is_cpu() && qw.scalar_type() == at::kChar && qw.is_contiguous() &&
                  (qw.dim() == 2 || (qw.dim() == 3 && qw.size(2) == 256)),
              "q8: qweight must be a contiguous CPU int8 tensor, [N, K] (rows) or [N/8, K/32, 256] (rows8)");
  const Q4Shape sh = q8_shape(qw);
  check_scales("q8", sh, qw, scales, biases);
  return sh;
}

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& scales,
                     const c10::optional<at::Tensor>& biases, int64_t impl) {
  const Q4Shape sh = check_q8_args(qw, scales, biases);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous() &&
                  x.size(1) == sh.K,
              "q8_linear: x must be a contiguous CPU float32 [M, K] tensor with the weight's K");
  at::Tensor y = at::empty({x.size(0), sh.N}, x.options());
  if (x.size(0) == 0 || sh.N == 0) return y;
  const bool scalar = impl == 1;
  if (scales.scalar_type() == at::kHalf) {
    if (biases.has_value()) run_q8<c10::Half, true>(x, qw, scales, biases, scalar, y);
    else run_q8<c10::Half, false>(x, qw, scales, biases, scalar, y);
  } else {
    if (biases.has_value()) run_q8<float, true>(x, qw, scales, biases, scalar, y);
    else run_q8<float, false>(x, qw, scales, biases, scalar, y);
  }
  return y;
}

// W = q * scale (+ bias) as float32 [N, K]: the dense (prefill) path's weight, one pass (PyTorch's
// int8 -> float, multiply, add took ~15x longer per 4864 x 896 matrix).
template <typename S>
void run_dequant_q8(const int8_t* w, const S* sc, const S* bi, int64_t N, int64_t K, bool r8, float* o) {
  const int64_t G = K / kGroup;
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / K), [&](int64_t n0, int64_t n1) {
    int8_t row[kGroup];  // a rows8 group of one row, gathered into code order
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t g = 0; g < G; ++g) {
        const int64_t si = q4_sidx(r8, G, n, g);
        const float s = to_f(sc[si]), b = bi ? to_f(bi[si]) : 0.f;
        const int8_t* wg = w + n * K + g * kGroup;
        if (r8) {
          const int8_t* src = w + ((n >> 3) * G + g) * 256 + 4 * (n & 7);
          for (int c = 0; c < 8; ++c) std::memcpy(row + 4 * c, src + 32 * c, 4);
          wg = row;
        }
        float* og = o + n * K + g * kGroup;
        int i = 0;
#if PVLM_AVX2
        const __m256 sv = _mm256_set1_ps(s), bv = _mm256_set1_ps(b);
        for (; i < kGroup; i += 8) {
          const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(wg + i));
          // one rounding: with float16 scales q * s is exact in float32, so this equals PyTorch's q * s + b
          // bit for bit; with float32 scales it is the exactly rounded q * s + b (PyTorch rounds twice)
          _mm256_storeu_ps(og + i, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), sv, bv));
        }
#endif
        for (; i < kGroup; ++i) og[i] = std::fma(float(wg[i]), s, b);
      }
  });
}

at::Tensor q8_dequantize(const at::Tensor& qw, const at::Tensor& scales, const c10::optional<at::Tensor>& biases) {
  const auto [N, K, r8, q5_unused] = check_q8_args(qw, scales, biases);
  at::Tensor out = at::empty({N, K}, qw.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  if (scales.scalar_type() == at::kHalf)
    run_dequant_q8<c10::Half>(qw.data_ptr<int8_t>(), scales.data_ptr<c10::Half>(),
                              biases.has_value() ? biases->data_ptr<c10::Half>() : nullptr, N, K, r8, out.data_ptr<float>());
  else
    run_dequant_q8<float>(qw.data_ptr<int8_t>(), scales.data_ptr<float>(),
                          biases.has_value() ? biases->data_ptr<float>() : nullptr, N, K, r8, out.data_ptr<float>());
  return out;
}

at::Tensor q8_dequantize_meta(const at::Tensor& qw, const at::Tensor& scales, const c10::optional<at::Tensor>& biases) {
  const Q4Shape sh = q8_shape(qw);
  return at::empty({sh.N, sh.K}, qw.options().dtype(at::kFloat));
}

at::Tensor q8_linear_meta(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& scales,
                          const c10::optional<at::Tensor>& biases, int64_t impl) {
  return at::empty({x.size(0), q8_shape(qw).N}, x.options());
}

bool has_avx2() { return PVLM_AVX2 != 0; }

// Reads every byte of buf once on torch's intra-op threads (the memory-bandwidth probe of
// ``pocketvlm bench``); returns a checksum so the compiler cannot drop the loads.
int64_t stream_read(const at::Tensor& buf) {
  TORCH_CHECK(buf.device().is_cpu() && buf.is_contiguous() && buf.scalar_type() == at::kByte,
              "stream_read: buf must be a contiguous CPU uint8 tensor");
  const uint8_t* p = buf.data_ptr<uint8_t>();
  const int64_t n = buf.numel() / 64;  // 64-byte lines
  std::atomic<int64_t> total{0};
  at::parallel_for(0, n, 1 << 14, [&](int64_t a, int64_t b) {
#if PVLM_AVX2
    __m256i acc = _mm256_setzero_si256();
    for (int64_t i = a; i < b; ++i) {
      acc = _mm256_xor_si256(acc, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * i)));
      acc = _mm256_xor_si256(acc, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * i + 32)));
    }
    total += _mm256_extract_epi64(acc, 0) ^ _mm256_extract_epi64(acc, 3);
#else
    int64_t acc = 0;
    for (int64_t i = a; i < b; ++i)
      for (int j = 0; j < 8; ++j) {
        int64_t v;
        std::memcpy(&v, p + 64 * i + 8 * j, 8);
        acc ^= v;
      }
    total += acc;
#endif
  });
  return total.load();
}

// Shape-only versions so torch.compile (fake tensors) can trace through the ops without a graph break.
at::Tensor q4_linear_meta(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                          const c10::optional<at::Tensor>& biases, double offset, bool int8_act, int64_t impl) {
  return at::empty({x.size(0), q4_shape(packed).N}, x.options());
}

at::Tensor q4_dequantize_meta(const at::Tensor& packed, const at::Tensor& scales,
                              const c10::optional<at::Tensor>& biases, double offset) {
  const Q4Shape sh = q4_shape(packed);
  return at::empty({sh.N, sh.K}, packed.options().dtype(at::kFloat));
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Several layers sharing one input token (the fused decode step, decode_cpu.cpp).
namespace pvlm {

LinRef make_linref(const at::Tensor& w, const at::Tensor& scales, const c10::optional<at::Tensor>& biases,
                   double offset, const c10::optional<at::Tensor>& bias) {
  LinRef r;
  r.q8 = w.scalar_type() == at::kChar;
  if (r.q8) {
    const Q4Shape sh = check_q8_args(w, scales, biases);
    r.N = sh.N;
    r.K = sh.K;
    r.r8 = sh.r8;
  } else {
    const Q4Shape sh = check_args(w, scales, biases);
    r.N = sh.N;
    r.K = sh.K;
    r.r8 = sh.r8;
    r.q5 = sh.q5;
  }
  r.w = w;
  r.scales = scales;
  if (biases.has_value()) r.biases = *biases;
  r.offset = offset;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == r.N &&
                    bias->device().is_cpu(),
                "linear bias must be a contiguous CPU float32 [N] tensor");
    r.bias = *bias;
  }
  return r;
}

namespace {

template <typename S, bool AFFINE>
void q4_blocks(const QuantX& q, const PairVecs& pv, const LinRef& l, float* y, int64_t b0, int64_t b1) {
  q4_i8_blocks<S, AFFINE>(q, pv, l.K, l.w.data_ptr<uint8_t>(), l.scales.data_ptr<S>(),
                          AFFINE ? l.biases.data_ptr<S>() : nullptr, float(l.offset), y, l.N, b0, b1, false, l.r8, l.q5);
}

template <typename S, bool AFFINE>
void q8_blocks(const QuantX& q, const LinRef& l, float* y, int64_t b0, int64_t b1) {
  q8_i8_blocks<S, AFFINE>(q, l.K, l.w.data_ptr<int8_t>(), l.scales.data_ptr<S>(),
                          AFFINE ? l.biases.data_ptr<S>() : nullptr, y, l.N, b0, b1, false, l.r8);
}

// xpair: activations in the q4 pair layout (q4 rows); xnat: natural order (q8, q4 rows8)
void lin_blocks(const QuantX& xpair, const PairVecs& pv, const QuantX& xnat, const LinRef& l, float* y, int64_t b0,
                int64_t b1) {
  const bool half = l.scales.scalar_type() == at::kHalf, affine = l.biases.defined();
  if (l.q8) {
    if (half) affine ? q8_blocks<c10::Half, true>(xnat, l, y, b0, b1) : q8_blocks<c10::Half, false>(xnat, l, y, b0, b1);
    else affine ? q8_blocks<float, true>(xnat, l, y, b0, b1) : q8_blocks<float, false>(xnat, l, y, b0, b1);
  } else {
    const QuantX& qx = l.paired_x() ? xpair : xnat;
    if (half) affine ? q4_blocks<c10::Half, true>(qx, pv, l, y, b0, b1) : q4_blocks<c10::Half, false>(qx, pv, l, y, b0, b1);
    else affine ? q4_blocks<float, true>(qx, pv, l, y, b0, b1) : q4_blocks<float, false>(qx, pv, l, y, b0, b1);
  }
}

}  // namespace

struct MultiLinear::Impl {
  std::vector<const LinRef*> lins;
  std::vector<int64_t> first, yoff;  // first block / first output row of each layer
  QuantX xpair, xnat;  // the token's activations in the two int8 layouts (each only when a layer reads it)
  std::vector<PairVecs> pv;
};

MultiLinear::MultiLinear() : impl_(new Impl) {}
MultiLinear::~MultiLinear() { delete impl_; }

void MultiLinear::prepare(const float* x, const std::vector<const LinRef*>& lins) {
  Impl& m = *impl_;
  const int64_t n = static_cast<int64_t>(lins.size());
  TORCH_CHECK(n > 0, "multi_linear: no layers");
  const int64_t K = lins[0]->K;
  m.lins = lins;
  m.first.assign(n + 1, 0);
  m.yoff.assign(n + 1, 0);
  m.pv.resize(n);
  bool need_pair = false, need_nat = false;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(lins[i]->K == K, "multi_linear: layers with different input sizes");
    need_pair |= lins[i]->paired_x();
    need_nat |= !lins[i]->paired_x();
    const int64_t rpb = rows_per_block(lins[i]->r8);
    m.first[i + 1] = m.first[i] + (lins[i]->N + rpb - 1) / rpb;
    m.yoff[i + 1] = m.yoff[i] + lins[i]->N;
  }
  if (need_pair) quantize_x(x, 1, K, m.xpair, /*paired=*/true);
  if (need_nat) quantize_x(x, 1, K, m.xnat, /*paired=*/false);
#if PVLM_AVX2
  for (int64_t i = 0; i < n; ++i)
    if (lins[i]->paired_x()) make_pair_vecs(m.xpair, float(lins[i]->offset), lins[i]->biases.defined(), m.pv[i]);
#endif
}

int64_t MultiLinear::blocks() const { return impl_->first.empty() ? 0 : impl_->first.back(); }

void MultiLinear::run(int64_t b0, int64_t b1, float* y) const {
  const Impl& m = *impl_;
  int64_t i = 0;
  while (b0 < b1) {
    while (m.first[i + 1] <= b0) ++i;
    const LinRef& l = *m.lins[i];
    const int64_t e = std::min(b1, m.first[i + 1]);
    float* yi = y + m.yoff[i];
    lin_blocks(m.xpair, m.pv[i], m.xnat, l, yi, b0 - m.first[i], e - m.first[i]);
    if (l.bias.defined()) {
      const float* bias = l.bias.data_ptr<float>();
      const int64_t rpb = rows_per_block(l.r8);
      for (int64_t r = (b0 - m.first[i]) * rpb, r1 = std::min(l.N, (e - m.first[i]) * rpb); r < r1; ++r)
        yi[r] += bias[r];
    }
    b0 = e;
  }
}

void dequantize_row(const LinRef& l, int64_t n, float mul, float* out) {
  TORCH_CHECK(n >= 0 && n < l.N, "token id ", n, " is outside the embedding table [0, ", l.N, ")");
  const int64_t G = l.K / kGroup;
  const bool half = l.scales.scalar_type() == at::kHalf, affine = l.biases.defined();
  auto val = [&](const at::Tensor& t, int64_t g) {
    const int64_t i = q4_sidx(l.r8, G, n, g);
    return half ? static_cast<float>(t.data_ptr<c10::Half>()[i]) : t.data_ptr<float>()[i];
  };
  for (int64_t g = 0; g < G; ++g) {
    const float s = val(l.scales, g);
    const float b = affine ? val(l.biases, g) : 0.f;
    float* o = out + g * kGroup;
    if (l.q8) {
      const int8_t* w = l.w.data_ptr<int8_t>();
      for (int i = 0; i < kGroup; ++i) o[i] = (float(q8_code(l.r8, w, l.K, n, g * kGroup + i)) * s + b) * mul;
    } else if (l.r8) {
      const uint8_t* w = l.w.data_ptr<uint8_t>();
      const float off = affine ? 0.f : float(l.offset);
      for (int i = 0; i < kGroup; ++i) o[i] = ((float(q4_code(true, w, l.K, n, g * kGroup + i, l.q5)) - off) * s + b) * mul;
    } else {
      const uint8_t* q = l.w.data_ptr<uint8_t>() + n * (l.K / 2) + g * 16;
      const float off = affine ? 0.f : float(l.offset);
      for (int j = 0; j < 16; ++j) {
        o[j] = ((float(q[j] & 15) - off) * s + b) * mul;
        o[j + 16] = ((float(q[j] >> 4) - off) * s + b) * mul;
      }
    }
  }
}


}  // namespace pvlm

TORCH_LIBRARY(pocketvlm_q4, m) {
  m.def("q4_linear(Tensor x, Tensor packed, Tensor scales, Tensor? biases, float offset, bool int8_act, int impl) -> Tensor");
  m.def("q4_dequantize(Tensor packed, Tensor scales, Tensor? biases, float offset) -> Tensor");
  m.def("q8_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? biases, int impl) -> Tensor");
  m.def("q8_dequantize(Tensor qweight, Tensor scales, Tensor? biases) -> Tensor");
  m.def("simd() -> bool", &has_avx2);
  m.def("stream_read(Tensor buf) -> int", &stream_read);
}

TORCH_LIBRARY_IMPL(pocketvlm_q4, CPU, m) {
  m.impl("q4_linear", &q4_linear);
  m.impl("q4_dequantize", &q4_dequantize);
  m.impl("q8_linear", &q8_linear);
  m.impl("q8_dequantize", &q8_dequantize);
}

TORCH_LIBRARY_IMPL(pocketvlm_q4, Meta, m) {
  m.impl("q4_linear", &q4_linear_meta);
  m.impl("q4_dequantize", &q4_dequantize_meta);
  m.impl("q8_linear", &q8_linear_meta);
  m.impl("q8_dequantize", &q8_dequantize_meta);
}
