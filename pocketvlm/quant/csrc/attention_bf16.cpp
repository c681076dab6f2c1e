// The vision tower's bidirectional self-attention over a whole sequence in bf16 (AVX-512 BF16, vdpbf16ps).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "avx512.h"
#include "kernels.h"

namespace pvlm {
namespace {

#if PVLM_X86 && defined(__GNUC__)
// ---- attention over a whole sequence in bf16 (vdpbf16ps): the encoder's bidirectional self-attention --------
// o[b, s, h] = softmax(q k^T / sqrt(D)) v per (image b, head h), read straight from the fused q/k/v GEMM's output
// qkv [B*S, 3*H*D] (q, k, v blocks of H*D columns) and written as [B*S, H*D], the layout out_proj takes, so no
// transposes. q (pre-scaled), k, v and the softmax numerators are rounded to bf16 (8-bit mantissa), products
// accumulate in fp32; the softmax itself is fp32. Every (b, h) is one task on torch's threads.
#define PVLM_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

inline uint16_t bf16_round(float f) {  // round to nearest even, as vcvtneps2bf16 (inputs here are finite)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

PVLM_BF16 inline __m512 bf16_to_ps(__m256i v) {  // 16 bf16 -> fp32 (exact: a shift)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// out[r][0 .. 16*NZ) (masked to ncols) = rowscale[r] * sum_s A[r] . B over `steps` pairs; A rows are bf16 pairs
// (uint32) with stride lda, B packed as steps x (16*NZ columns x 2) bf16.
template <int MR, int NZ>
PVLM_BF16 void micro_bf16(const uint32_t* A, int64_t lda, const uint16_t* B, int64_t steps, float* out, int64_t ldo,
                          int64_t ncols, const float* rowscale) {
  __m512 acc[MR][NZ];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int z = 0; z < NZ; ++z) acc[r][z] = _mm512_setzero_ps();
  for (int64_t s = 0; s < steps; ++s) {
    __m512bh b[NZ];
#pragma GCC unroll 8
    for (int z = 0; z < NZ; ++z) b[z] = (__m512bh)_mm512_loadu_si512(B + (s * NZ + z) * 32);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(A[r * lda + s]));
#pragma GCC unroll 8
      for (int z = 0; z < NZ; ++z) acc[r][z] = _mm512_dpbf16_ps(acc[r][z], a, b[z]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    const __m512 sc = _mm512_set1_ps(rowscale ? rowscale[r] : 1.f);
#pragma GCC unroll 8
    for (int z = 0; z < NZ; ++z) {
      const int64_t c0 = 16 * z;
      if (c0 >= ncols) break;
      const __mmask16 m = ncols - c0 >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (ncols - c0)) - 1);
      _mm512_mask_storeu_ps(out + r * ldo + c0, m, _mm512_mul_ps(acc[r][z], sc));
    }
  }
}

template <int MR, int NZ>
PVLM_BF16 void micro_bf16_rows(int mr, const uint32_t* A, int64_t lda, const uint16_t* B, int64_t steps, float* out,
                               int64_t ldo, int64_t ncols, const float* rowscale) {
  if constexpr (MR > 1) {
    if (mr < MR) return micro_bf16_rows<MR - 1, NZ>(mr, A, lda, B, steps, out, ldo, ncols, rowscale);
  }
  micro_bf16<MR, NZ>(A, lda, B, steps, out, ldo, ncols, rowscale);
}

constexpr int kQRows = 12;  // query rows per block (scores: 12 x 2 zmm accumulators)

// P [MR, Sp] x V (packed, NZ zmm columns) for one block of query rows
template <int NZ>
PVLM_BF16 void pv_block(int mr, const uint32_t* P, int64_t ldp, const uint16_t* Vp, int64_t steps, float* o,
                        int64_t ldo, int64_t D, const float* inv) {
  constexpr int MR = 24 / NZ;  // 24 accumulators in registers
  for (int r0 = 0; r0 < mr; r0 += MR)
    micro_bf16_rows<MR, NZ>(std::min(MR, mr - r0), P + r0 * ldp, ldp, Vp, steps, o + r0 * ldo, ldo, D, inv + r0);
}

PVLM_BF16 void attention_head(const float* qkv, int64_t S, int64_t H, int64_t D, int64_t h, float* o) {
  const int64_t ld = 3 * H * D, D2 = D / 2, Sp = (S + 31) / 32 * 32, S2 = Sp / 2;
  const int NZ = static_cast<int>((D + 15) / 16);
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  std::vector<uint32_t> q(S * D2);                  // bf16 pairs of q * scale, [S, D/2]
  std::vector<uint16_t> kp(Sp * D);                 // k packed: panel (32 keys) x D/2 steps x 32 keys x 2
  std::vector<uint16_t> vp(S2 * NZ * 32, 0);        // v packed: Sp/2 steps x (16 NZ dims x 2 keys)
  std::vector<float> sc(kQRows * Sp);               // scores of one block of query rows
  std::vector<uint32_t> p(kQRows * S2);             // softmax numerators, bf16 pairs [rows, Sp/2]
  float inv[kQRows];
  // q * scale and k as bf16 pairs (32 consecutive floats -> 32 bf16 in order = 16 pairs); v interleaved by key
  // pairs: (v[t][d], v[t+1][d]) in one 32-bit word.
  std::vector<uint32_t> row(D2 + 16);
  auto to_pairs = [&](const float* src, float mul, uint32_t* dst) PVLM_BF16 {
    int64_t j = 0;
    const __m512 m = _mm512_set1_ps(mul);
    for (; j + 16 <= D2; j += 16) {
      const __m512 lo = _mm512_mul_ps(_mm512_loadu_ps(src + 2 * j), m);
      const __m512 hi = _mm512_mul_ps(_mm512_loadu_ps(src + 2 * j + 16), m);
      _mm512_storeu_si512(dst + j, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
    for (; j < D2; ++j)
      dst[j] = uint32_t(bf16_round(src[2 * j] * mul)) | (uint32_t(bf16_round(src[2 * j + 1] * mul)) << 16);
  };
  for (int64_t t = 0; t < S; ++t) to_pairs(qkv + t * ld + h * D, scale, q.data() + t * D2);
  for (int64_t t = 0; t < Sp; ++t) {
    uint32_t* dst = reinterpret_cast<uint32_t*>(kp.data()) + (t / 32) * (16 * D) + (t % 32);
    if (t < S) {
      to_pairs(qkv + t * ld + H * D + h * D, 1.f, row.data());
      for (int64_t j = 0; j < D2; ++j) dst[j * 32] = row[j];
    } else {
      for (int64_t j = 0; j < D2; ++j) dst[j * 32] = 0;
    }
  }
  for (int64_t t = 0; t < S; t += 2) {
    const float* v0 = qkv + t * ld + 2 * H * D + h * D;
    const float* v1 = t + 1 < S ? v0 + ld : nullptr;
    uint32_t* dst = reinterpret_cast<uint32_t*>(vp.data()) + (t / 2) * (NZ * 16);
    int64_t d = 0;
    for (; d + 16 <= D; d += 16) {
      const __m512i a = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(v0 + d)));
      const __m512i b = v1 ? _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(v1 + d)))
                           : _mm512_setzero_si512();
      _mm512_storeu_si512(dst + d, _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
    }
    for (; d < D; ++d) dst[d] = uint32_t(bf16_round(v0[d])) | (v1 ? uint32_t(bf16_round(v1[d])) << 16 : 0u);
  }
  const int64_t panels = Sp / 32;
  for (int64_t r0 = 0; r0 < S; r0 += kQRows) {
    const int mr = static_cast<int>(std::min<int64_t>(kQRows, S - r0));
    for (int64_t pn = 0; pn < panels; ++pn)
      micro_bf16_rows<kQRows, 2>(mr, q.data() + r0 * D2, D2, kp.data() + pn * 32 * D, D2, sc.data() + pn * 32, Sp,
                                 32, nullptr);
    for (int r = 0; r < mr; ++r) {
      float* row = sc.data() + r * Sp;
      __m512 vmax = _mm512_set1_ps(-INFINITY);
      int64_t k = 0;
      for (; k + 16 <= S; k += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(row + k));
      float mx = _mm512_reduce_max_ps(vmax);
      for (; k < S; ++k) mx = std::max(mx, row[k]);
      const __m512 vm = _mm512_set1_ps(mx);
      __m512 vsum = _mm512_setzero_ps();
      uint32_t* pr = p.data() + r * S2;
      for (k = 0; k + 32 <= Sp; k += 32) {
        const __mmask16 m0 = k + 16 <= S ? __mmask16(0xFFFF) : (k < S ? __mmask16((1u << (S - k)) - 1) : 0);
        const __mmask16 m1 = k + 32 <= S ? __mmask16(0xFFFF) : (k + 16 < S ? __mmask16((1u << (S - k - 16)) - 1) : 0);
        const __m512 e0 = _mm512_maskz_mov_ps(m0, exp512(_mm512_sub_ps(_mm512_loadu_ps(row + k), vm)));
        const __m512 e1 = _mm512_maskz_mov_ps(m1, exp512(_mm512_sub_ps(_mm512_loadu_ps(row + k + 16), vm)));
        const __m512bh pb = _mm512_cvtne2ps_pbh(e1, e0);  // e0 in the low half: keys k .. k+31 in order
        // sum what is multiplied: the bf16-rounded numerators
        const __m512i pi = (__m512i)pb;
        vsum = _mm512_add_ps(vsum, bf16_to_ps(_mm512_castsi512_si256(pi)));
        vsum = _mm512_add_ps(vsum, bf16_to_ps(_mm512_extracti64x4_epi64(pi, 1)));
        _mm512_storeu_si512(pr + k / 2, (__m512i)pb);
      }
      inv[r] = 1.f / _mm512_reduce_add_ps(vsum);
    }
    float* orow = o + r0 * H * D + h * D;
    switch (NZ) {
      case 1: pv_block<1>(mr, p.data(), S2, vp.data(), S2, orow, H * D, D, inv); break;
      case 2: pv_block<2>(mr, p.data(), S2, vp.data(), S2, orow, H * D, D, inv); break;
      case 3: pv_block<3>(mr, p.data(), S2, vp.data(), S2, orow, H * D, D, inv); break;
      case 4: pv_block<4>(mr, p.data(), S2, vp.data(), S2, orow, H * D, D, inv); break;
      case 5: pv_block<5>(mr, p.data(), S2, vp.data(), S2, orow, H * D, D, inv); break;
      case 6: pv_block<6>(mr, p.data(), S2, vp.data(), S2, orow, H * D, D, inv); break;
      case 7: pv_block<7>(mr, p.data(), S2, vp.data(), S2, orow, H * D, D, inv); break;
      default: pv_block<8>(mr, p.data(), S2, vp.data(), S2, orow, H * D, D, inv); break;
    }
  }
}
#endif

}  // namespace

bool bf16_cpu() {
#if PVLM_X86 && defined(__GNUC__)
  static const bool ok = vnni_cpu() && __builtin_cpu_supports("avx512bf16");
  return ok;
#else
  return false;
#endif
}

at::Tensor attention_bf16(const at::Tensor& qkv, int64_t B, int64_t heads) {
  TORCH_CHECK(bf16_cpu(), "attention_bf16: this CPU has no AVX-512 BF16");
  TORCH_CHECK(qkv.device().is_cpu() && qkv.scalar_type() == at::kFloat && qkv.dim() == 2 && qkv.is_contiguous(),
              "attention_bf16: qkv must be a contiguous CPU float32 [B*S, 3*H*D] tensor");
  TORCH_CHECK(B > 0 && heads > 0 && qkv.size(0) % B == 0 && qkv.size(1) % (3 * heads) == 0,
              "attention_bf16: qkv ", qkv.sizes(), " does not split into ", B, " images and 3 x ", heads, " heads");
  const int64_t S = qkv.size(0) / B, D = qkv.size(1) / (3 * heads);
  TORCH_CHECK(D % 2 == 0 && D <= 128, "attention_bf16: head dim must be even and at most 128, got ", D);
  at::Tensor o = at::empty({B * S, heads * D}, qkv.options());
  const float* x = qkv.data_ptr<float>();
  float* out = o.data_ptr<float>();
#if PVLM_X86 && defined(__GNUC__)
  at::parallel_for(0, B * heads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / heads, h = t % heads;
      attention_head(x + b * S * 3 * heads * D, S, heads, D, h, out + b * S * heads * D);
    }
  });
#else
  (void)x, (void)out, (void)S;
#endif
  return o;
}

}  // namespace pvlm
