// 4-bit (and 5-bit) matrix-vector / small-matrix products: y = W x for a q4 weight in the rows or rows8 layout
// (kernels.h), with int8 activations (llama.cpp-style, vpmaddubsw) or exact fp32 ones, and the one-pass
// dequantize of the dense (prefill) path. AVX2/FMA/F16C when built with them; every op also has a portable
// scalar path (impl = 1, or no AVX2), which is also the reference the vector paths are tested against.
#include "matvec.h"

namespace pvlm {
namespace {

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
#endif  // PVLM_AVX2

#if PVLM_HAVE_VNNI256
// Row block b of the rows8 layout with int8 activations, on AVX-512 VNNI: vpdpbusd adds 4 code x activation
// products per lane straight into int32. Those group sums are exact, as block_i8_r8's are (its int16 partial sums
// never saturate), and the float steps run in the same order, so every output is bit-identical to it. A group's
// codes are unpacked once for up to 4 rows of x (R), which is what makes several rows (a batch of sequences,
// draft tokens to verify) cheaper than as many single-row calls.
template <typename S, bool AFFINE, int R>
PVLM_VNNI256 inline void r8_vnni_rows(const QuantX& q, int64_t m0, int64_t G, const uint8_t* wb, const S* sb,
                                      const S* bb, float off, float* y, int64_t N, int64_t b) {
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* wg = wb + g * 128;
    _mm_prefetch(reinterpret_cast<const char*>(wg + kPrefetchR8), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wg + kPrefetchR8 + 64), _MM_HINT_T0);
    __m256i lo[4], hi[4];
    for (int c = 0; c < 4; ++c) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + 32 * c));
      lo[c] = _mm256_and_si256(v, m4);
      hi[c] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
    }
    const __m256 sv = load8(sb + g * 8);
    for (int r = 0; r < R; ++r) {
      const int64_t m = m0 + r;
      int32_t xi[8];
      std::memcpy(xi, q.xq.data() + (m * G + g) * kGroup, 32);
      __m256i s32 = _mm256_setzero_si256();
      for (int c = 0; c < 4; ++c) {
        s32 = _mm256_dpbusd_epi32(s32, lo[c], _mm256_set1_epi32(xi[2 * c]));
        s32 = _mm256_dpbusd_epi32(s32, hi[c], _mm256_set1_epi32(xi[2 * c + 1]));
      }
      const __m256 dot = _mm256_cvtepi32_ps(s32);
      const float dx = q.dx[m * G + g], qs = q.qs[m * G + g];
      if (AFFINE) {
        acc[r] = _mm256_fmadd_ps(sv, _mm256_mul_ps(dot, _mm256_set1_ps(dx)), acc[r]);
        acc[r] = _mm256_fmadd_ps(load8(bb + g * 8), _mm256_set1_ps(qs), acc[r]);
      } else {
        acc[r] = _mm256_fmadd_ps(sv, _mm256_fmadd_ps(dot, _mm256_set1_ps(dx), _mm256_set1_ps(-off * qs)), acc[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(y + (m0 + r) * N + 8 * b, acc[r]);
}

template <typename S, bool AFFINE>
PVLM_VNNI256 void block_i8_r8_vnni(const QuantX& q, int64_t K, const uint8_t* w, const S* sc, const S* bi, float off,
                                   float* y, int64_t N, int64_t b) {
  const int64_t G = K / kGroup;
  const uint8_t* wb = w + b * G * 128;
  const S* sb = sc + b * G * 8;
  const S* bb = AFFINE ? bi + b * G * 8 : nullptr;
  by_row_groups(q.M, [&]<int R>(int64_t m) { r8_vnni_rows<S, AFFINE, R>(q, m, G, wb, sb, bb, off, y, N, b); });
}
#endif  // PVLM_HAVE_VNNI256

template <typename S, bool AFFINE>
void run_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                const c10::optional<at::Tensor>& biases, double offset, bool int8_act, int impl,
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
  const bool scalar = impl == 1 || !PVLM_AVX2;
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
      q4_i8_blocks<S, AFFINE>(q, pv, K, w, sc, bi, off, yp, N, b0, b1, impl, r8, q5);
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


}  // namespace

// Row blocks [b0, b1) (rows_per_block(r8) rows each) of y = W x, q4 weights, int8 activations (paired
// for rows, natural order for rows8): the AVX2 blocks, or the portable loops when scalar (forced without
// AVX2). Shared by the per-layer op and MultiLinear.
template <typename S, bool AFFINE>
void q4_i8_blocks(const QuantX& q, const PairVecs& pv, int64_t K, const uint8_t* w, const S* sc, const S* bi,
                  float off, float* y, int64_t N, int64_t b0, int64_t b1, int impl, bool r8, bool q5) {
  const bool scalar = impl == 1 || !PVLM_AVX2;
#if PVLM_HAVE_VNNI256
  if (impl == 0 && r8 && !q5 && vnni_cpu()) {
    for (int64_t b = b0; b < b1; ++b) block_i8_r8_vnni<S, AFFINE>(q, K, w, sc, bi, off, y, N, b);
    return;
  }
#endif
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

#define PVLM_INST(S, A)                                                                                          \
  template void q4_i8_blocks<S, A>(const QuantX&, const PairVecs&, int64_t, const uint8_t*, const S*, const S*, \
                                   float, float*, int64_t, int64_t, int64_t, int, bool, bool);
PVLM_INST(float, false) PVLM_INST(float, true) PVLM_INST(c10::Half, false) PVLM_INST(c10::Half, true)
#undef PVLM_INST

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
  TORCH_CHECK(impl >= 0 && impl <= 2, "q4_linear: impl must be 0 (fastest), 1 (portable) or 2 (AVX2, no VNNI)");
  const bool affine = biases.has_value();
  if (scales.scalar_type() == at::kHalf) {
    if (affine) run_linear<c10::Half, true>(x, packed, scales, biases, offset, int8_act, int(impl), y);
    else run_linear<c10::Half, false>(x, packed, scales, biases, offset, int8_act, int(impl), y);
  } else {
    if (affine) run_linear<float, true>(x, packed, scales, biases, offset, int8_act, int(impl), y);
    else run_linear<float, false>(x, packed, scales, biases, offset, int8_act, int(impl), y);
  }
  return y;
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

bool has_avx2() { return PVLM_AVX2 != 0; }

}  // namespace pvlm
