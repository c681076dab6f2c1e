// Low-bit weight x int8 activation GEMM for prefill (many rows of x against a rows8 weight: 4-bit, 5-bit or
// 8-bit codes, kernels.h), AVX-512 VNNI.
//
//   y[m, n] = sum_g dx[m, g] * ( s[n, g] * sum_i (q[n, 32g + i] - off) xq[m, 32g + i]  +  b[n, g] * sum_i xq[m, 32g + i] )
//
// with the unsigned code q and an integer offset off (MLC 4-bit: 7; Q4_0: 8; Q5_0: 16; 8-bit: the signed code
// plus 128, off = 128) and the affine biases b where the weight has them (Q4_K, Q4_1; else 0).
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
// buffer (codes as unsigned bytes in vpdpbusd's order, scales as float), then walks the rows of x kMR at a time:
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
#include "matvec.h"

namespace pvlm {
namespace {

constexpr int64_t kPanel = 32;  // output columns per panel (four rows8 blocks, two zmm of int32)
constexpr int kMR = 6;          // rows of x per micro-kernel call: 12 int32 + 12 float accumulators

enum Bits : int { kQ4 = 4, kQ5 = 5, kQ8 = 8 };

struct Args {
  int64_t M, N, K, G;
  const uint8_t* w;  // rows8 [N/8, G, 128 | 160 | 256]
  int bits;          // 4, 5 or 8
  int32_t off;       // subtracted from the unsigned code (affine 4-bit: 0)
  bool affine;
  int64_t stride() const { return bits == kQ4 ? 128 : bits == kQ5 ? 160 : 256; }
};

// unsigned code of row r (0..7) of a rows8 block, column k (0..31) of the group (kernels.h's layouts)
inline int code_at(const Args& a, const uint8_t* blk, int r, int k) {
  if (a.bits == kQ8) return int(blk[32 * (k / 4) + 4 * r + k % 4] ^ 0x80);  // int8 c -> c + 128
  const int c = k / 8, h = (k / 4) % 2, j = k % 4;
  int q = h ? blk[32 * c + 4 * r + j] >> 4 : blk[32 * c + 4 * r + j] & 15;
  if (a.bits == kQ5) q |= ((blk[128 + 4 * r + j] >> (2 * c + h)) & 1) << 4;
  return q;
}

// ---- portable path (and the reference) --------------------------------------------------------------------
template <typename S>
void gemm_scalar(const QuantX& q, const Args& a, const S* sc, const S* bi, float* y) {
  at::parallel_for(0, a.N, 8, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t b = n / 8, r = n % 8;
      for (int64_t m = 0; m < a.M; ++m) {
        float acc = 0.f;
        for (int64_t g = 0; g < a.G; ++g) {
          const uint8_t* blk = a.w + (b * a.G + g) * a.stride();
          const int8_t* xg = q.xq.data() + m * a.K + g * kGroup;
          int32_t dot = -a.off * q.xs[m * a.G + g];
          for (int k = 0; k < kGroup; ++k) dot += code_at(a, blk, int(r), k) * int32_t(xg[k]);
          const int64_t si = (b * a.G + g) * 8 + r;
          const float d = q.dx[m * a.G + g];
          acc += float(dot) * (static_cast<float>(sc[si]) * d);
          if (a.affine) acc += static_cast<float>(bi[si]) * q.qs[m * a.G + g];
        }
        y[m * a.N + n] = acc;
      }
    }
  });
}

#if PVLM_X86 && defined(__GNUC__)
// A panel's codes as unsigned bytes: [G][step s = 0..7][half h = 0..1][64]; step s holds k = 32g + 4s .. 4s+3 of
// the 16 columns 16h .. 16h+15 (lane c = column, 4 bytes each); scales (and affine biases) float [G][32]. In every
// rows8 layout one 32-byte chunk of a block is "4 consecutive codes of each of the 8 rows", so a step is two
// such chunks side by side: 4-bit chunk c gives steps 2c (low nibbles) and 2c + 1 (high nibbles), with 5-bit
// codes bit t of the plane bytes adding bit 4 to step t; 8-bit chunk c is step c.
template <typename S>
PVLM_VNNI void unpack_panel(const Args& a, const S* sc, const S* bi, int64_t p, uint8_t* codes, float* fs,
                            float* fb) {
  const int64_t nb = a.N / 8;
  const __m256i m4 = _mm256_set1_epi8(15), one = _mm256_set1_epi8(1), sign = _mm256_set1_epi8(char(0x80));
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
      const uint8_t* blk = a.w + (b * a.G + g) * a.stride();
      // (a macro, not a lambda: a lambda does not inherit PVLM_VNNI's target, and a build without -mavx2 fails)
#define PVLM_PUT(step, v) \
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + ((g * 8 + (step)) * 2 + h) * 64 + lane0), (v))
      if (a.bits == kQ8) {
        for (int c = 0; c < 8; ++c)
          PVLM_PUT(c, _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32 * c)), sign));
      } else {
        const __m256i plane = a.bits == kQ5 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 128))
                                            : _mm256_setzero_si256();
        for (int c = 0; c < 4; ++c) {  // chunk c: low nibbles k = 8c + j, high nibbles k = 8c + 4 + j
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32 * c));
          for (int hn = 0; hn < 2; ++hn) {
            const int t = 2 * c + hn;
            __m256i q = _mm256_and_si256(hn ? _mm256_srli_epi16(v, 4) : v, m4);
            if (a.bits == kQ5)  // bit t of each plane byte -> bit 4 of the same byte
              q = _mm256_or_si256(q, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(plane, t), one), 4));
            PVLM_PUT(t, q);
          }
        }
      }
#undef PVLM_PUT
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
PVLM_VNNI void micro(const QuantX& q, const Args& a, int64_t m0, const uint8_t* codes, const float* fs, const float* fb,
                     float* y, int64_t ncols) {
  static_assert(MR >= 1 && MR <= kMR);
  const int64_t G = a.G, lda = a.K / 4;
  const int32_t* x32 = reinterpret_cast<const int32_t*>(q.xq.data() + m0 * a.K);
  const float* dx = q.dx.data() + m0 * G;
  const int32_t* xs = q.xs.data() + m0 * G;
  const float* qsum = q.qs.data() + m0 * G;  // dx * xs
#define PVLM_DECL(r) __m512 f##r##a = _mm512_setzero_ps(), f##r##b = _mm512_setzero_ps();
  PVLM_ROWS(PVLM_DECL)
#undef PVLM_DECL
  for (int64_t g = 0; g < G; ++g) {
#define PVLM_INIT(r)                                                                                   \
    __m512i c##r##a, c##r##b;                                                                          \
    if constexpr (MR > r) {                                                                            \
      c##r##a = _mm512_set1_epi32(-a.off * xs[r * G + g]);                                            \
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
        const __m512 qs = _mm512_set1_ps(qsum[r * G + g]);                                     \
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

using MicroFn = void (*)(const QuantX&, const Args&, int64_t, const uint8_t*, const float*, const float*, float*, int64_t);

template <bool AFFINE, int... I>
constexpr auto micro_table(std::integer_sequence<int, I...>) {
  return std::array<MicroFn, sizeof...(I)>{&micro<I + 1, AFFINE>...};
}

template <typename S, bool AFFINE>
PVLM_VNNI void gemm_vnni(const QuantX& q, const Args& a, const S* sc, const S* bi, float* y) {
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
void run(const QuantX& q, const Args& a, const S* sc, const S* bi, float* y, bool fast) {
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
  const bool i8 = packed.scalar_type() == at::kChar;
  TORCH_CHECK(packed.dim() == 3 && packed.is_contiguous() &&
                  ((packed.scalar_type() == at::kByte && (packed.size(2) == 128 || packed.size(2) == 160)) ||
                   (i8 && packed.size(2) == 256)),
              "q4_gemm: the weight must be rows8 (uint8 [N/8, K/32, 128] 4-bit or 160 5-bit, int8 [N/8, K/32, 256] "
              "8-bit; kernels.h), got ", packed.scalar_type(), " ", packed.sizes());
  Args a;
  a.N = packed.size(0) * 8;
  a.G = packed.size(1);
  a.K = a.G * kGroup;
  a.M = x.size(0);
  a.w = static_cast<const uint8_t*>(packed.data_ptr());
  a.bits = i8 ? kQ8 : packed.size(2) == 160 ? kQ5 : kQ4;
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
  // 8-bit: signed codes read as code + 128; 4/5-bit affine: W = q * s + b (the offset is in b)
  a.off = a.bits == kQ8 ? 128 : a.affine ? 0 : static_cast<int32_t>(offset);
  at::Tensor y = at::empty({a.M, a.N}, x.options());
  if (a.M == 0) return y;
  const bool fast = impl != 1 && vnni_cpu();
  const at::Tensor xc = x.contiguous();
  QuantX q;
  quantize_x(xc.data_ptr<float>(), a.M, a.K, q, /*paired=*/false);  // decode's activation rounding, exactly
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
