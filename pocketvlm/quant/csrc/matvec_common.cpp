// The int8 activations of the matrix-vector kernels (quantize_x, make_pair_vecs) and the argument checks they
// share. See matvec.h.
#include "matvec.h"

namespace pvlm {

namespace {

// One group of 32: dst[0..15] = x0..15, dst[hi_off..hi_off+15] = x16..31 as int8 (round to nearest even);
// returns the step d = max|x| / 127 and the sum of the codes.
inline void quantize_group(const float* xg, int8_t* dst, int hi_off, float& d_out, int32_t& s_out) {
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
  d_out = d;
  s_out = s;
}

}  // namespace

void quantize_x(const float* x, int64_t M, int64_t K, QuantX& q, bool paired) {
  q.M = M;
  q.paired = paired;
  q.G = K / kGroup;
  q.P = (q.G + 1) / 2;
  q.xq.resize(M * q.P * 64);
  q.dx.resize(M * q.G);
  q.qs.resize(M * q.G);
  q.xs.resize(M * q.G);
  if (paired && (q.G & 1))  // the odd last group's partner half stays zero
    for (int64_t m = 0; m < M; ++m) {
      int8_t* last = q.xq.data() + (m * q.P + q.P - 1) * 64;
      std::memset(last + 16, 0, 16);
      std::memset(last + 48, 0, 16);
    }
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {  // one row (decode) stays on this thread
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t g = 0; g < q.G; ++g) {
        const int64_t i = m * q.G + g;
        int8_t* dst = paired ? q.xq.data() + (m * q.P + g / 2) * 64 + (g & 1) * 16 : q.xq.data() + i * 32;
        quantize_group(x + m * K + g * kGroup, dst, paired ? 32 : 16, q.dx[i], q.xs[i]);  // x16..31 at hi_off
        q.qs[i] = q.dx[i] * static_cast<float>(q.xs[i]);
      }
  });
}

#if PVLM_AVX2
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
#endif  // PVLM_AVX2

Q4Shape q8_shape(const at::Tensor& qw) {
  if (qw.dim() == 3) return {qw.size(0) * 8, qw.size(1) * kGroup, true, false};
  return {qw.size(0), qw.size(1), false, false};
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

}  // namespace pvlm
