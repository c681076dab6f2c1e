// 8-bit matrix-vector / small-matrix products: y = W x for a q8 weight (int8 codes, W = q * scale (+ bias), rows
// or rows8 layout, kernels.h) with int8 activations, and the one-pass dequantize of the dense (prefill) path.
#include "matvec.h"

namespace pvlm {
namespace {

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

#if PVLM_HAVE_VNNI256
// Row block b of the q8 rows8 layout on AVX-512 VNNI: vpdpbusd of |w| and x with w's sign gives the same exact
// int32 sums as block_q8_r8 (whose int16 pair sums never saturate), the float steps run in the same order, so
// the outputs are bit-identical to it; |w| of a chunk is computed once for up to 4 rows of x.
template <typename S, bool AFFINE, int R>
PVLM_VNNI256 inline void q8_r8_vnni_rows(const QuantX& q, int64_t m0, int64_t G, const int8_t* wb, const S* sb,
                                         const S* bb, float* y, int64_t N, int64_t b) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const int8_t* wg = wb + g * 256;
    for (int c = 0; c < 256; c += 64) _mm_prefetch(reinterpret_cast<const char*>(wg + kPrefetchQ8R8 + c), _MM_HINT_T0);
    __m256i wv[8], wa[8];
    for (int c = 0; c < 8; ++c) {
      wv[c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + 32 * c));
      wa[c] = _mm256_sign_epi8(wv[c], wv[c]);
    }
    const __m256 sv = load8(sb + g * 8);
    for (int r = 0; r < R; ++r) {
      const int64_t m = m0 + r;
      int32_t xi[8];
      std::memcpy(xi, q.xq.data() + (m * G + g) * kGroup, 32);
      __m256i s32 = _mm256_setzero_si256();
      for (int c = 0; c < 8; ++c)
        s32 = _mm256_dpbusd_epi32(s32, wa[c], _mm256_sign_epi8(_mm256_set1_epi32(xi[c]), wv[c]));
      const __m256 dot = _mm256_cvtepi32_ps(s32);
      acc[r] = _mm256_fmadd_ps(sv, _mm256_mul_ps(dot, _mm256_set1_ps(q.dx[m * G + g])), acc[r]);
      if (AFFINE) acc[r] = _mm256_fmadd_ps(load8(bb + g * 8), _mm256_set1_ps(q.qs[m * G + g]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(y + (m0 + r) * N + 8 * b, acc[r]);
}

template <typename S, bool AFFINE>
PVLM_VNNI256 void block_q8_r8_vnni(const QuantX& q, int64_t K, const int8_t* w, const S* sc, const S* bi, float* y,
                                   int64_t N, int64_t b) {
  const int64_t G = K / kGroup;
  const int8_t* wb = w + b * G * 256;
  const S* sb = sc + b * G * 8;
  const S* bb = AFFINE ? bi + b * G * 8 : nullptr;
  by_row_groups(q.M, [&]<int R>(int64_t m) { q8_r8_vnni_rows<S, AFFINE, R>(q, m, G, wb, sb, bb, y, N, b); });
}
#endif  // PVLM_HAVE_VNNI256

template <typename S, bool AFFINE>
void run_q8(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& scales, const c10::optional<at::Tensor>& biases,
            int impl, at::Tensor& y) {
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
    q8_i8_blocks<S, AFFINE>(q, K, w, sc, bi, yp, N, b0, b1, impl, r8);
  });
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

}  // namespace


// The same for q8 weights (blocks of kRows rows, or 8 in the rows8 layout).
template <typename S, bool AFFINE>
void q8_i8_blocks(const QuantX& q, int64_t K, const int8_t* w, const S* sc, const S* bi, float* y, int64_t N,
                  int64_t b0, int64_t b1, int impl, bool r8) {
  const bool scalar = impl == 1 || !PVLM_AVX2;
#if PVLM_HAVE_VNNI256
  if (impl == 0 && r8 && vnni_cpu()) {
    for (int64_t b = b0; b < b1; ++b) block_q8_r8_vnni<S, AFFINE>(q, K, w, sc, bi, y, N, b);
    return;
  }
#endif
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

#define PVLM_INST(S, A)                                                                                          \
  template void q8_i8_blocks<S, A>(const QuantX&, int64_t, const int8_t*, const S*, const S*, float*, int64_t,  \
                                   int64_t, int64_t, int, bool);
PVLM_INST(float, false) PVLM_INST(float, true) PVLM_INST(c10::Half, false) PVLM_INST(c10::Half, true)
#undef PVLM_INST

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
  TORCH_CHECK(impl >= 0 && impl <= 2, "q8_linear: impl must be 0 (fastest), 1 (portable) or 2 (AVX2, no VNNI)");
  if (scales.scalar_type() == at::kHalf) {
    if (biases.has_value()) run_q8<c10::Half, true>(x, qw, scales, biases, int(impl), y);
    else run_q8<c10::Half, false>(x, qw, scales, biases, int(impl), y);
  } else {
    if (biases.has_value()) run_q8<float, true>(x, qw, scales, biases, int(impl), y);
    else run_q8<float, false>(x, qw, scales, biases, int(impl), y);
  }
  return y;
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

}  // namespace pvlm
