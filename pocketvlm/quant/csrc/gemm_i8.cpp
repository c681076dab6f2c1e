// int8 x int8 GEMM for compute-bound layers (the vision tower: hundreds of tokens per tile), with AVX-512
// VNNI (see pocketvlm/quant/vision_fast.py for the numbers that decided it).
//
//   y[m, n] = act( sa[m] * ws[n] * sum_k qa[m, k] * qw[n, k] + bias[n] )
//
// qw: int8 weights, symmetric per output channel (ws[n] = max|W[n]| / 127), packed once by i8_pack.
// qa: x quantized per row (token) at call time: sa[m] = max|x[m]| / 127, qa = rint(x * (127 / max|x[m]|)).
// The only errors are those two roundings; the integer sums are exact (int32).
//
// VNNI's vpdpbusd multiplies unsigned by signed bytes and adds 4 products into each int32 lane. The
// weights are the unsigned side (stored as qw + 128, so they sit in registers), the activations the signed
// side (4 bytes of a row broadcast to all lanes straight from memory), and the +128 is taken back out with
// the row sums of qa: sum (qw + 128) qa = sum qw qa + 128 sum qa.
//
// Packed layout (i8_pack): uint8 [Np / 32, Kp / 4, 128] with Np = N rounded up to 32, Kp = K rounded up to 4:
// panel p (columns 32p .. 32p+31), step s (k = 4s .. 4s+3): byte 64h + 4c + j holds qw[32p + 16h + c][4s + j]
// + 128 (h = 0, 1; c = 0..15), padding 128 (times a zero activation: nothing). One step of a panel is two
// 64-byte loads that feed 2 x MR vpdpbusd for MR rows of x (MR = 12: 24 accumulators in registers).
//
// Threads: torch's intra-op threads split the panels; each walks the rows in chunks that stay in L2.
// Every op also has a portable scalar path (impl = 1, or a CPU without AVX-512 VNNI) so it runs anywhere.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

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

constexpr int64_t kPanel = 32;  // output columns per panel (two zmm of int32)
constexpr int kMR = 12;         // rows of x per micro-kernel call
constexpr int64_t kRowChunk = 96;

enum Act : int64_t { kNone = 0, kQuickGelu = 1, kGeluTanh = 2 };

inline float act_scalar(float v, int64_t act) {
  if (act == kQuickGelu) return v / (1.f + std::exp(-1.702f * v));
  if (act == kGeluTanh) {
    const float u = 0.7978845608028654f * (v + 0.044715f * v * v * v);
    return 0.5f * v * (1.f + std::tanh(u));
  }
  return v;
}

struct Shape {
  int64_t N, Np, Kp;  // output columns, and both padded sizes of the packed weight
};

Shape packed_shape(const at::Tensor& packed, int64_t N) {
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == 128 && packed.scalar_type() == at::kByte,
              "i8_linear: packed weight must be uint8 [N/32, K/4, 128] from i8_pack, got ", packed.sizes());
  Shape s;
  s.Np = packed.size(0) * kPanel;
  s.Kp = packed.size(1) * 4;
  s.N = N;
  TORCH_CHECK(N > s.Np - kPanel && N <= s.Np, "i8_linear: N = ", N, " does not match the packed weight's ", s.Np,
              " (padded) columns");
  return s;
}

// ---- x -> int8 rows ------------------------------------------------------------------------------------
// one value: round to nearest even (as the vector path's MXCSR default), clamp to the symmetric range
inline int32_t q8_round(float v, float inv) { return std::clamp(static_cast<int32_t>(std::nearbyint(v * inv)), -127, 127); }

// qa [M, Kp] (zero padded), sa [M], rowsum [M]
void quantize_rows_scalar(const float* x, int64_t M, int64_t K, int64_t Kp, int8_t* qa, float* sa, int32_t* rs) {
  for (int64_t m = 0; m < M; ++m) {
    const float* r = x + m * K;
    float mx = 0.f;
    for (int64_t k = 0; k < K; ++k) mx = std::max(mx, std::fabs(r[k]));
    const float inv = mx > 0.f ? 127.f / mx : 0.f;
    sa[m] = mx / 127.f;
    int32_t s = 0;
    int8_t* q = qa + m * Kp;
    for (int64_t k = 0; k < K; ++k) {
      q[k] = static_cast<int8_t>(q8_round(r[k], inv));
      s += q[k];
    }
    for (int64_t k = K; k < Kp; ++k) q[k] = 0;
    rs[m] = s;
  }
}

#if PVLM_X86 && defined(__GNUC__)

PVLM_VNNI void quantize_rows_vnni_range(const float* x, int64_t m0, int64_t m1, int64_t K, int64_t Kp, int8_t* qa,
                                        float* sa, int32_t* rs) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* r = x + m * K;
    __m512 vmax = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(r + k)));
    float mx = _mm512_reduce_max_ps(vmax);
    for (; k < K; ++k) mx = std::max(mx, std::fabs(r[k]));
    const float inv = mx > 0.f ? 127.f / mx : 0.f;
    sa[m] = mx / 127.f;
    const __m512 vinv = _mm512_set1_ps(inv);
    int8_t* q = qa + m * Kp;
    __m512i vsum = _mm512_setzero_si512();
    for (k = 0; k + 16 <= K; k += 16) {
      // round to nearest even (MXCSR default), as std::nearbyint; |v| <= 127 by construction
      __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(r + k), vinv));
      v = _mm512_max_epi32(_mm512_min_epi32(v, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
      vsum = _mm512_add_epi32(vsum, v);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtsepi32_epi8(v));
    }
    int32_t s = _mm512_reduce_add_epi32(vsum);
    for (; k < K; ++k) {
      q[k] = static_cast<int8_t>(q8_round(r[k], inv));
      s += q[k];
    }
    for (k = K; k < Kp; ++k) q[k] = 0;
    rs[m] = s;
  }
}

void quantize_rows_vnni(const float* x, int64_t M, int64_t K, int64_t Kp, int8_t* qa, float* sa, int32_t* rs) {
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) { quantize_rows_vnni_range(x, m0, m1, K, Kp, qa, sa, rs); });
}

PVLM_VNNI inline __m512 act512(__m512 v, int64_t act) {
  if (act == kQuickGelu) {  // v * sigmoid(1.702 v)
    const __m512 e = exp512(_mm512_mul_ps(v, _mm512_set1_ps(-1.702f)));
    return _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.f), e));
  }
  if (act == kGeluTanh) {  // 0.5 v (1 + tanh(u)) = v * sigmoid(2u)
    const __m512 v3 = _mm512_mul_ps(_mm512_mul_ps(v, v), v);
    const __m512 u = _mm512_mul_ps(_mm512_fmadd_ps(v3, _mm512_set1_ps(0.044715f), v),
                                   _mm512_set1_ps(-2.f * 0.7978845608028654f));
    return _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.f), exp512(u)));
  }
  return v;
}

// MR rows of qa against one panel (32 columns), the whole of K; epilogue into y. The 2 x MR accumulators are
// named variables (an array of them made GCC spill to the stack inside the k loop).
#define PVLM_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
template <int MR>
PVLM_VNNI void micro(const int8_t* qa, int64_t Kp, const uint8_t* panel, const float* sa, const int32_t* rs,
                     const float* ws, const float* bias, int64_t ncols, float* y, int64_t ldy, int64_t act) {
  static_assert(MR >= 1 && MR <= kMR);
#define PVLM_DECL(r) __m512i c##r##a = _mm512_setzero_si512(), c##r##b = _mm512_setzero_si512();
  PVLM_ROWS(PVLM_DECL)
#undef PVLM_DECL
  const int64_t steps = Kp / 4;
  const int32_t* a32 = reinterpret_cast<const int32_t*>(qa);  // rows are Kp bytes, Kp % 4 == 0
  const int64_t lda = Kp / 4;
  for (int64_t s = 0; s < steps; ++s) {
    const __m512i b0 = _mm512_loadu_si512(panel + 128 * s);
    const __m512i b1 = _mm512_loadu_si512(panel + 128 * s + 64);
    _mm_prefetch(reinterpret_cast<const char*>(panel + 128 * s + 1024), _MM_HINT_T0);
#define PVLM_STEP(r)                                            \
    if constexpr (MR > r) {                                     \
      const __m512i a = _mm512_set1_epi32(a32[r * lda + s]);    \
      c##r##a = _mm512_dpbusd_epi32(c##r##a, b0, a);            \
      c##r##b = _mm512_dpbusd_epi32(c##r##b, b1, a);            \
    }
    PVLM_ROWS(PVLM_STEP)
#undef PVLM_STEP
  }
  __m512i acc[kMR][2];
#define PVLM_SAVE(r) if constexpr (MR > r) { acc[r][0] = c##r##a; acc[r][1] = c##r##b; }
  PVLM_ROWS(PVLM_SAVE)
#undef PVLM_SAVE
  for (int h = 0; h < 2; ++h) {
    const int64_t c0 = 16 * h;
    if (c0 >= ncols) break;
    const __mmask16 mask = ncols - c0 >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (ncols - c0)) - 1);
    const __m512 vws = _mm512_maskz_loadu_ps(mask, ws + c0);
    const __m512 vb = bias ? _mm512_maskz_loadu_ps(mask, bias + c0) : _mm512_setzero_ps();
    for (int r = 0; r < MR; ++r) {
      const __m512i corr = _mm512_sub_epi32(acc[r][h], _mm512_set1_epi32(128 * rs[r]));
      const __m512 sc = _mm512_mul_ps(_mm512_set1_ps(sa[r]), vws);
      __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(corr), sc, vb);
      v = act512(v, act);
      _mm512_mask_storeu_ps(y + r * ldy + c0, mask, v);
    }
  }
}
#undef PVLM_ROWS

using MicroFn = void (*)(const int8_t*, int64_t, const uint8_t*, const float*, const int32_t*, const float*,
                         const float*, int64_t, float*, int64_t, int64_t);

template <int... I>
constexpr auto micro_table(std::integer_sequence<int, I...>) {
  return std::array<MicroFn, sizeof...(I)>{&micro<I + 1>...};
}

PVLM_VNNI void gemm_vnni_panels(const int8_t* qa, const float* sa, const int32_t* rs, int64_t M, const Shape& sh,
                                const uint8_t* packed, const float* ws, const float* bias, float* y, int64_t act,
                                int64_t p0, int64_t p1) {
  static constexpr auto table = micro_table(std::make_integer_sequence<int, kMR>{});
  for (int64_t m0 = 0; m0 < M; m0 += kRowChunk) {
    const int64_t m1 = std::min(M, m0 + kRowChunk);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * kPanel;
      const int64_t nc = std::min<int64_t>(kPanel, sh.N - n0);
      const uint8_t* panel = packed + p * (sh.Kp / 4) * 128;
      for (int64_t m = m0; m < m1; m += kMR) {
        const int mr = static_cast<int>(std::min<int64_t>(kMR, m1 - m));
        table[mr - 1](qa + m * sh.Kp, sh.Kp, panel, sa + m, rs + m, ws + n0, bias ? bias + n0 : nullptr, nc,
                      y + m * sh.N + n0, sh.N, act);
      }
    }
  }
}

void gemm_vnni(const int8_t* qa, const float* sa, const int32_t* rs, int64_t M, const Shape& sh,
               const uint8_t* packed, const float* ws, const float* bias, float* y, int64_t act) {
  at::parallel_for(0, sh.Np / kPanel, 1, [&](int64_t p0, int64_t p1) {
    gemm_vnni_panels(qa, sa, rs, M, sh, packed, ws, bias, y, act, p0, p1);
  });
}
#endif

void gemm_scalar(const int8_t* qa, const float* sa, const int32_t* rs, int64_t M, const Shape& sh,
                 const uint8_t* packed, const float* ws, const float* bias, float* y, int64_t act) {
  at::parallel_for(0, sh.N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t p = n / kPanel, h = (n % kPanel) / 16, c = n % 16;
      const uint8_t* col = packed + p * (sh.Kp / 4) * 128 + 64 * h + 4 * c;
      for (int64_t m = 0; m < M; ++m) {
        const int8_t* a = qa + m * sh.Kp;
        int32_t acc = 0;
        for (int64_t s = 0; s < sh.Kp / 4; ++s)
          for (int j = 0; j < 4; ++j) acc += int32_t(col[128 * s + j]) * int32_t(a[4 * s + j]);
        const float v = std::fma(float(acc - 128 * rs[m]), sa[m] * ws[n], bias ? bias[n] : 0.f);
        y[m * sh.N + n] = act_scalar(v, act);
      }
    }
  });
}

}  // namespace

// ---- ops ----------------------------------------------------------------------------------------------
at::Tensor i8_pack(const at::Tensor& qw) {
  TORCH_CHECK(qw.dim() == 2 && qw.scalar_type() == at::kChar && qw.device().is_cpu(),
              "i8_pack: weight codes must be a CPU int8 [N, K] tensor, got ", qw.scalar_type(), " ", qw.sizes());
  const at::Tensor w = qw.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  const int64_t Np = (N + kPanel - 1) / kPanel * kPanel, Kp = (K + 3) / 4 * 4;
  at::Tensor out = at::empty({Np / kPanel, Kp / 4, 128}, w.options().dtype(at::kByte));
  uint8_t* o = out.data_ptr<uint8_t>();
  const int8_t* src = w.data_ptr<int8_t>();
  std::memset(o, 128, out.numel());
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t p = n / kPanel, h = (n % kPanel) / 16, c = n % 16;
      uint8_t* col = o + p * (Kp / 4) * 128 + 64 * h + 4 * c;
      for (int64_t k = 0; k < K; ++k) col[128 * (k / 4) + (k % 4)] = static_cast<uint8_t>(int32_t(src[n * K + k]) + 128);
    }
  });
  return out;
}

at::Tensor i8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& wscale,
                     const c10::optional<at::Tensor>& bias, int64_t N, int64_t act, int64_t impl) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2,
              "i8_linear: x must be a CPU float32 [M, K] tensor, got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(act >= 0 && act <= 2, "i8_linear: act must be 0 (none), 1 (quick_gelu) or 2 (gelu_tanh)");
  const Shape sh = packed_shape(packed, N);
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K <= sh.Kp && K > sh.Kp - 4, "i8_linear: x has K = ", K, " but the weight was packed for ", sh.Kp,
              " (padded)");
  TORCH_CHECK(wscale.scalar_type() == at::kFloat && wscale.numel() == N && wscale.is_contiguous(),
              "i8_linear: wscale must be contiguous float32 [N]");
  const float* bp = nullptr;
  at::Tensor b;
  if (bias && bias->defined()) {
    b = bias->contiguous();
    TORCH_CHECK(b.scalar_type() == at::kFloat && b.numel() == N, "i8_linear: bias must be float32 [N]");
    bp = b.data_ptr<float>();
  }
  const at::Tensor xc = x.contiguous();
  at::Tensor qa = at::empty({M, sh.Kp}, x.options().dtype(at::kChar));
  at::Tensor sa = at::empty({M}, x.options());
  at::Tensor rs = at::empty({M}, x.options().dtype(at::kInt));
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  const bool fast = impl != 1 && vnni_cpu();
#if PVLM_X86 && defined(__GNUC__)
  if (fast) {
    quantize_rows_vnni(xc.data_ptr<float>(), M, K, sh.Kp, qa.data_ptr<int8_t>(), sa.data_ptr<float>(),
                       rs.data_ptr<int32_t>());
    gemm_vnni(qa.data_ptr<int8_t>(), sa.data_ptr<float>(), rs.data_ptr<int32_t>(), M, sh, packed.data_ptr<uint8_t>(),
              wscale.data_ptr<float>(), bp, y.data_ptr<float>(), act);
    return y;
  }
#endif
  quantize_rows_scalar(xc.data_ptr<float>(), M, K, sh.Kp, qa.data_ptr<int8_t>(), sa.data_ptr<float>(),
                       rs.data_ptr<int32_t>());
  gemm_scalar(qa.data_ptr<int8_t>(), sa.data_ptr<float>(), rs.data_ptr<int32_t>(), M, sh, packed.data_ptr<uint8_t>(),
              wscale.data_ptr<float>(), bp, y.data_ptr<float>(), act);
  return y;
}

at::Tensor i8_linear_meta(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& wscale,
                          const c10::optional<at::Tensor>& bias, int64_t N, int64_t act, int64_t impl) {
  return at::empty({x.size(0), N}, x.options());
}

bool i8_vnni() { return vnni_cpu(); }

}  // namespace pvlm
