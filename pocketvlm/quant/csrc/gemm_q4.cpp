// 4-bit weight x int8 activation GEMM for prefill (many rows of x against a q4 rows8 weight), AVX-512 VNNI.
//
//   y[m, n] = sum_g dx[m, g] * ( s[n, g] * sum_i q[n, 32g + i] xq[m, 32g + i]  +  c[n, g] * sum_i xq[m, 32g + i] )
//
// with c = -offset * s (symmetric: MLC offset 7, Q4_0 offset 8) or c = biases / dx-scaled (affine: Q4_K, Q4_1).
// That is the arithmetic of the decode kernels' int8 path (matvec_q4.cpp, kernels.h): x quantized per group of
// 32 (dx = max|x| / 127, round to nearest even), exact int32 sums per group, one float multiply-add per group.
// So the only error against the exact product is the activation rounding, the same as decode's, and the same
// prompt gives the same answer whichever path reads it (up to the order of float additions).
//
// Why: the dense prefill path dequantizes each weight to bf16/fp32 and runs a float GEMM. On CPUs with AVX-512
// VNNI the int8 dot product (vpdpbusd: 64 multiply-adds per instruction) has about twice the bf16 peak and four
// times fp32's (benchmarks/isa_peak.py), and the weights stay 4-bit until they sit in L2.
//
// How: the output columns go in panels of 32 (four rows8 blocks). A thread unpacks its panel once into a
// buffer (codes as bytes 0..15 in vpdpbusd's order, scales as float), then walks the rows of x kMR at a time:
// per group, 8 steps of one 64-byte code load per 16 columns and one 4-byte x broadcast per row, 2 x kMR
// vpdpbusd; then per row and 16 columns one int->float, one multiply and one fused multiply-add (affine: one
// more). The codes are the unsigned side of vpdpbusd, x the signed side, so no +128 correction is needed; the
// symmetric offset starts each group's int32 sum at -offset * sum(xq) instead of 0.
//
// impl = 1 (or a CPU without AVX-512 VNNI) runs the portable loops, the reference the tests hold the vector
// path to.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "avx512.h"
#include "kernels.h"

namespace pvlm {
namespace {

constexpr int64_t kG = 32;      // codes per group
constexpr int64_t kPanel = 32;  // output columns per panel (four rows8 blocks, two zmm of int32)
constexpr int kMR = 6;          // rows of x per micro-kernel call: 12 int32 + 12 float accumulators

// x quantized per group of 32 in natural order: xq [M, K], dx [M, G], xs [M, G] = sum of the group's codes
struct QX {
  std::vector<int8_t> xq;
  std::vector<float> dx;
  std::vector<int32_t> xs;
};

inline int8_t q8(float v, float id) { return static_cast<int8_t>(std::clamp<int32_t>(std::nearbyint(v * id), -127, 127)); }

void quantize_group_scalar(const float* xg, int8_t* q, float* dx, int32_t* xs) {
  float mx = 0.f;
  for (int i = 0; i < kG; ++i) mx = std::max(mx, std::fabs(xg[i]));
  const float d = mx / 127.f;
  const float id = d > 0.f ? 1.f / d : 0.f;  // as quantize_x (matvec_common.cpp): multiply by the inverse
  int32_t s = 0;
  for (int i = 0; i < kG; ++i) s += (q[i] = q8(xg[i], id));
  *dx = d;
  *xs = s;
}

#if PVLM_X86 && defined(__GNUC__)
PVLM_VNNI void quantize_group_vnni(const float* xg, int8_t* q, float* dx, int32_t* xs) {
  const __m512 a = _mm512_loadu_ps(xg), b = _mm512_loadu_ps(xg + 16);
  const float d = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b))) / 127.f;
  const __m512 id = _mm512_set1_ps(d > 0.f ? 1.f / d : 0.f);
  const __m512i ia = _mm512_cvtps_epi32(_mm512_mul_ps(a, id)), ib = _mm512_cvtps_epi32(_mm512_mul_ps(b, id));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtsepi32_epi8(ia));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtsepi32_epi8(ib));
  *dx = d;
  *xs = _mm512_reduce_add_epi32(_mm512_add_epi32(ia, ib));
}
#endif

void quantize(const float* x, int64_t M, int64_t K, bool fast, QX& q) {
  const int64_t G = K / kG;
  q.xq.resize(M * K);
  q.dx.resize(M * G);
  q.xs.resize(M * G);
  at::parallel_for(0, M, 8, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t g = 0; g < G; ++g) {
        const int64_t i = m * G + g;
#if PVLM_X86 && defined(__GNUC__)
        if (fast) {
          quantize_group_vnni(x + m * K + g * kG, q.xq.data() + m * K + g * kG, &q.dx[i], &q.xs[i]);
          continue;
        }
#endif
        quantize_group_scalar(x + m * K + g * kG, q.xq.data() + m * K + g * kG, &q.dx[i], &q.xs[i]);
      }
  });
}

struct Args {
  int64_t M, N, K, G;
  const uint8_t* w;  // rows8 [N/8, G, 128]
  int32_t off;       // symmetric offset (affine: 0)
  bool affine;
};

// ---- portable path (and the reference) --------------------------------------------------------------------
template <typename S>
void gemm_scalar(const QX& q, const Args& a, const S* sc, const S* bi, float* y) {
  at::parallel_for(0, a.N, 8, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t b = n / 8, r = n % 8;
      for (int64_t m = 0; m < a.M; ++m) {
        float acc = 0.f;
        for (int64_t g = 0; g < a.G; ++g) {
          const uint8_t* blk = a.w + (b * a.G + g) * 128;
          const int8_t* xg = q.xq.data() + m * a.K + g * kG;
          int32_t dot = a.affine ? 0 : -a.off * q.xs[m * a.G + g];
          for (int c = 0; c < 4; ++c)
            for (int j = 0; j < 4; ++j) {
              const uint8_t byte = blk[32 * c + 4 * r + j];
              dot += int32_t(byte & 15) * xg[8 * c + j] + int32_t(byte >> 4) * xg[8 * c + 4 + j];
            }
          const int64_t si = (b * a.G + g) * 8 + r;
          const float d = q.dx[m * a.G + g];
          acc += float(dot) * (static_cast<float>(sc[si]) * d);
          if (a.affine) acc += static_cast<float>(bi[si]) * (d * float(q.xs[m * a.G + g]));
        }
        y[m * a.N + n] = acc;
      }
    }
  });
}

#if PVLM_X86 && defined(__GNUC__)
// A panel's codes as bytes: [G][step s = 0..7][half h = 0..1][64]; step s holds k = 32g + 4s .. 4s+3 of the 16
// columns 16h .. 16h+15 (lane c = column, 4 bytes each); scales (and affine biases) float [G][32].
template <typename S>
PVLM_VNNI void unpack_panel(const Args& a, const S* sc, const S* bi, int64_t p, uint8_t* codes, float* fs,
                            float* fb) {
  const int64_t nb = a.N / 8;
  const __m256i m4 = _mm256_set1_epi8(15);
  for (int64_t g = 0; g < a.G; ++g) {
    for (int64_t sub = 0; sub < 4; ++sub) {  // block 4p + sub: columns 8 sub .. 8 sub + 7
      const int64_t b = 4 * p + sub;
      const int64_t h = sub / 2, lane0 = 32 * (sub % 2);  // which zmm half, which 32 bytes of it
      float* fsd = fs + g * kPanel + 8 * sub;
      float* fbd = fb + g * kPanel + 8 * sub;
      if (b >= nb) {  // past the last column: zero codes and scales contribute nothing
        for (int s = 0; s < 8; ++s) std::memset(codes + ((g * 8 + s) * 2 + h) * 64 + lane0, 0, 32);
        for (int r = 0; r < 8; ++r) fsd[r] = fbd[r] = 0.f;
        continue;
      }
      const uint8_t* blk = a.w + (b * a.G + g) * 128;
      for (int c = 0; c < 4; ++c) {  // chunk c: low nibbles k = 8c + j, high nibbles k = 8c + 4 + j
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32 * c));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + ((g * 8 + 2 * c) * 2 + h) * 64 + lane0),
                            _mm256_and_si256(v, m4));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + ((g * 8 + 2 * c + 1) * 2 + h) * 64 + lane0),
                            _mm256_and_si256(_mm256_srli_epi16(v, 4), m4));
      }
      const int64_t si = (b * a.G + g) * 8;
      for (int r = 0; r < 8; ++r) {
        fsd[r] = static_cast<float>(sc[si + r]);
        fbd[r] = bi ? static_cast<float>(bi[si + r]) : 0.f;
      }
    }
  }
}

// MR rows of x against one unpacked panel, all of K. The accumulators are named variables (arrays of them made
// GCC spill inside the loops, as in gemm_i8.cpp).
#define PVLM_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)
template <int MR, bool AFFINE>
PVLM_VNNI void micro(const QX& q, const Args& a, int64_t m0, const uint8_t* codes, const float* fs, const float* fb,
                     float* y, int64_t ncols) {
  static_assert(MR >= 1 && MR <= kMR);
  const int64_t G = a.G, lda = a.K / 4;
  const int32_t* x32 = reinterpret_cast<const int32_t*>(q.xq.data() + m0 * a.K);
  const float* dx = q.dx.data() + m0 * G;
  const int32_t* xs = q.xs.data() + m0 * G;
#define PVLM_DECL(r) __m512 f##r##a = _mm512_setzero_ps(), f##r##b = _mm512_setzero_ps();
  PVLM_ROWS(PVLM_DECL)
#undef PVLM_DECL
  for (int64_t g = 0; g < G; ++g) {
#define PVLM_INIT(r)                                                                                   \
    __m512i c##r##a, c##r##b;                                                                          \
    if constexpr (MR > r) {                                                                            \
      c##r##a = AFFINE ? _mm512_setzero_si512() : _mm512_set1_epi32(-a.off * xs[r * G + g]);          \
      c##r##b = c##r##a;                                                                               \
    }
    PVLM_ROWS(PVLM_INIT)
#undef PVLM_INIT
    const uint8_t* cg = codes + g * 8 * 128;
    for (int s = 0; s < 8; ++s) {
      const __m512i b0 = _mm512_loadu_si512(cg + 128 * s);
      const __m512i b1 = _mm512_loadu_si512(cg + 128 * s + 64);
#define PVLM_STEP(r)                                                   \
      if constexpr (MR > r) {                                          \
        const __m512i xa = _mm512_set1_epi32(x32[r * lda + 8 * g + s]); \
        c##r##a = _mm512_dpbusd_epi32(c##r##a, b0, xa);                \
        c##r##b = _mm512_dpbusd_epi32(c##r##b, b1, xa);                \
      }
      PVLM_ROWS(PVLM_STEP)
#undef PVLM_STEP
    }
    const __m512 s0 = _mm512_loadu_ps(fs + g * kPanel), s1 = _mm512_loadu_ps(fs + g * kPanel + 16);
    __m512 z0 = _mm512_setzero_ps(), z1 = _mm512_setzero_ps();
    if constexpr (AFFINE) {
      z0 = _mm512_loadu_ps(fb + g * kPanel);
      z1 = _mm512_loadu_ps(fb + g * kPanel + 16);
    }
#define PVLM_FLUSH(r)                                                                          \
    if constexpr (MR > r) {                                                                    \
      const __m512 d = _mm512_set1_ps(dx[r * G + g]);                                          \
      f##r##a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c##r##a), _mm512_mul_ps(s0, d), f##r##a);   \
      f##r##b = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c##r##b), _mm512_mul_ps(s1, d), f##r##b);   \
      if constexpr (AFFINE) {                                                                  \
        const __m512 qs = _mm512_set1_ps(dx[r * G + g] * float(xs[r * G + g]));                \
        f##r##a = _mm512_fmadd_ps(z0, qs, f##r##a);                                            \
        f##r##b = _mm512_fmadd_ps(z1, qs, f##r##b);                                            \
      }                                                                                        \
    }
    PVLM_ROWS(PVLM_FLUSH)
#undef PVLM_FLUSH
  }
  const __mmask16 ma = ncols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << ncols) - 1);
  const __mmask16 mb = ncols >= 32 ? __mmask16(0xFFFF) : ncols <= 16 ? __mmask16(0) : __mmask16((1u << (ncols - 16)) - 1);
#define PVLM_STORE(r)                                                 \
  if constexpr (MR > r) {                                             \
    _mm512_mask_storeu_ps(y + (m0 + r) * a.N, ma, f##r##a);           \
    _mm512_mask_storeu_ps(y + (m0 + r) * a.N + 16, mb, f##r##b);      \
  }
  PVLM_ROWS(PVLM_STORE)
#undef PVLM_STORE
}
#undef PVLM_ROWS

using MicroFn = void (*)(const QX&, const Args&, int64_t, const uint8_t*, const float*, const float*, float*, int64_t);

template <bool AFFINE, int... I>
constexpr auto micro_table(std::integer_sequence<int, I...>) {
  return std::array<MicroFn, sizeof...(I)>{&micro<I + 1, AFFINE>...};
}

template <typename S, bool AFFINE>
PVLM_VNNI void gemm_vnni(const QX& q, const Args& a, const S* sc, const S* bi, float* y) {
  static constexpr auto table = micro_table<AFFINE>(std::make_integer_sequence<int, kMR>{});
  const int64_t panels = (a.N + kPanel - 1) / kPanel;
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    std::vector<uint8_t> codes(a.G * 8 * 128 + 64);
    std::vector<float> fs(a.G * kPanel), fb(a.G * kPanel);
    for (int64_t p = p0; p < p1; ++p) {
      unpack_panel(a, sc, bi, p, codes.data(), fs.data(), fb.data());
      const int64_t ncols = std::min<int64_t>(kPanel, a.N - p * kPanel);
      float* yp = y + p * kPanel;
      for (int64_t m = 0; m < a.M; m += kMR) {
        const int mr = static_cast<int>(std::min<int64_t>(kMR, a.M - m));
        table[mr - 1](q, a, m, codes.data(), fs.data(), fb.data(), yp, ncols);
      }
    }
  });
}
#endif

template <typename S>
void run(const QX& q, const Args& a, const S* sc, const S* bi, float* y, bool fast) {
#if PVLM_X86 && defined(__GNUC__)
  if (fast) {
    if (a.affine) gemm_vnni<S, true>(q, a, sc, bi, y);
    else gemm_vnni<S, false>(q, a, sc, bi, y);
    return;
  }
#endif
  gemm_scalar(q, a, sc, bi, y);
}

}  // namespace

at::Tensor q4_gemm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                   const c10::optional<at::Tensor>& biases, double offset, int64_t impl) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2,
              "q4_gemm: x must be a CPU float32 [M, K] tensor, got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == 128 && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "q4_gemm: the weight must be 4-bit rows8 (uint8 [N/8, K/32, 128], kernels.h), got ", packed.sizes());
  Args a;
  a.N = packed.size(0) * 8;
  a.G = packed.size(1);
  a.K = a.G * kG;
  a.M = x.size(0);
  a.w = packed.data_ptr<uint8_t>();
  TORCH_CHECK(x.size(1) == a.K, "q4_gemm: x has K = ", x.size(1), " but the weight has ", a.K);
  TORCH_CHECK(scales.is_contiguous() && scales.numel() == a.N * a.G &&
                  (scales.scalar_type() == at::kHalf || scales.scalar_type() == at::kFloat),
              "q4_gemm: scales must be contiguous float16/float32 [N/8, K/32, 8]");
  a.affine = biases && biases->defined();
  if (a.affine) {
    TORCH_CHECK(biases->is_contiguous() && biases->numel() == a.N * a.G && biases->scalar_type() == scales.scalar_type(),
                "q4_gemm: biases must be like scales");
  } else {
    TORCH_CHECK(offset == std::nearbyint(offset) && std::fabs(offset) <= 16,
                "q4_gemm: a symmetric weight needs an integer offset, got ", offset);
  }
  a.off = a.affine ? 0 : static_cast<int32_t>(offset);
  at::Tensor y = at::empty({a.M, a.N}, x.options());
  if (a.M == 0) return y;
  const bool fast = impl != 1 && vnni_cpu();
  const at::Tensor xc = x.contiguous();
  QX q;
  quantize(xc.data_ptr<float>(), a.M, a.K, fast, q);
  if (scales.scalar_type() == at::kHalf)
    run(q, a, scales.data_ptr<c10::Half>(), a.affine ? biases->data_ptr<c10::Half>() : nullptr, y.data_ptr<float>(),
        fast);
  else
    run(q, a, scales.data_ptr<float>(), a.affine ? biases->data_ptr<float>() : nullptr, y.data_ptr<float>(), fast);
  return y;
}

at::Tensor q4_gemm_meta(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                        const c10::optional<at::Tensor>& biases, double offset, int64_t impl) {
  return at::empty({x.size(0), packed.size(0) * 8}, x.options());
}

}  // namespace pvlm
