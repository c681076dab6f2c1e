// pocketvlm's CPU kernels: the weight layouts they read (described here and nowhere else) and what each
// translation unit offers the others. One library, built by pocketvlm/quant/cpu_kernel.py:
//   matvec_common.cpp  int8 activations and argument checks shared by the matrix-vector kernels (matvec.h)
//   matvec_q4.cpp      4- and 5-bit matrix-vector / small-matrix products and dequantize
//   matvec_q8.cpp      8-bit matrix-vector / small-matrix products and dequantize
//   multi_linear.cpp   several layers sharing one input token (the decode step's matrix phases)
//   decode_step.cpp    the fused single-token decode step (DecodePlan; its vector helpers and thread team in
//                      decode_math.h)
//   gemm_q4.cpp        rows8 (4-, 5-, 8-bit) x int8 GEMM of the prefill path (AVX-512 VNNI; decode's arithmetic)
//   gemm_i8.cpp        int8 x int8 GEMM of the vision tower (AVX-512 VNNI), with its own packed layout
//   attention_bf16.cpp the vision tower's bidirectional attention in bf16 (AVX-512 BF16)
//   ops.cpp            every op's registration, in the torch.ops.pocketvlm namespace
//
// ---- 4-bit and 5-bit weights (q4: MLC q4f16_1, GGUF Q4_0/Q4_1/Q4_K; 5-bit: GGUF Q5_0) ----
// Written by cpu_kernel.pack_q4 / pack_q5 (and stored as is in packages: quantization.kernel_layout "q4-own-v1").
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
//
// ---- 8-bit weights (MLC q8f16_1, GGUF Q8_0): cpu_kernel.pack_q8 ----
//  rows:  qweight [N, K] natural order, scales/biases [N, K/32];
//  rows8 (N % 8 == 0): qweight [N/8, K/32, 256]: row block b, group g, chunk c = 0..7 of 4 codes: byte
//         32c + 4r + j holds q[8b+r][32g+4c+j]; scales/biases [N/8, K/32, 8]. As for q4, one 32-byte load
//         then feeds 8 rows (vpmaddubsw against 4 activation bytes broadcast to all lanes) and the block is
//         one contiguous stream: 12 -> 2x GB/s on the 151936 x 896 LM head (see block_q8_r8).
// Int8 activations only (x quantized per 32-block exactly as in the q4 int8 path).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace torch { class Library; }

namespace pvlm {
#if defined(__AVX2__)
// sum of the 8 lanes
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// One quantized linear layer as the kernels read it (a q4, 5-bit or q8 weight in one of the layouts above,
// scales/biases float16|float32, biases optional) and an optional float32 layer bias [N].
struct LinRef {
  at::Tensor w, scales, biases, bias;  // biases/bias undefined when absent
  double offset = 7.0;                 // symmetric q4: W = (q - offset) * scale
  int64_t N = 0, K = 0;
  bool q8 = false;
  bool r8 = false;  // rows8 layout (q4: [N/8, K/32, 128 or 160]; q8: [N/8, K/32, 256])
  bool q5 = false;  // rows8 with 5-bit codes ([N/8, K/32, 160])
  bool paired_x() const { return !q8 && !r8; }  // reads int8 x in the q4 pair layout (else natural order)
};

// Build a LinRef, checking dtypes and shapes (a clear error instead of a crash on bad input).
LinRef make_linref(const at::Tensor& w, const at::Tensor& scales, const c10::optional<at::Tensor>& biases,
                   double offset, const c10::optional<at::Tensor>& bias);

// y = W_i x (+ bias_i) for every layer i of a group sharing one input (a q/k/v or gate/up group: every W_i has
// the same K), int8 activations, for M rows of x [M, K]. One object per thread: prepare() quantizes x once for
// all the layers, then run() computes any range of the group's row blocks (kRows = 4 rows each, numbered across
// the layers in order; a q4 rows8 layer's blocks are 8 rows), so threads can share the rows of several layers in
// one parallel phase. y is layer-major: layer i's [M, N_i] rows start at M * (N_0 + ... + N_{i-1}) (for M = 1,
// the concatenation of the layers' outputs). Each row's result does not depend on the other rows.
class MultiLinear {
 public:
  MultiLinear();
  ~MultiLinear();
  MultiLinear(const MultiLinear&) = delete;
  MultiLinear& operator=(const MultiLinear&) = delete;
  void prepare(const float* x, const std::vector<const LinRef*>& lins);  // one row
  void prepare(const float* x, int64_t M, const std::vector<const LinRef*>& lins);
  int64_t blocks() const;
  void run(int64_t b0, int64_t b1, float* y) const;  // rows of blocks [b0, b1), layer biases added

 private:
  struct Impl;
  Impl* impl_;
};

// Row n of a q4/q8 weight as float32 (an embedding lookup), times mul.
void dequantize_row(const LinRef& l, int64_t n, float mul, float* out);


// ---- the ops (registered in ops.cpp; schemas there) ----
at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                     const c10::optional<at::Tensor>& biases, double offset, bool int8_act, int64_t impl);
at::Tensor q4_dequantize(const at::Tensor& packed, const at::Tensor& scales, const c10::optional<at::Tensor>& biases,
                         double offset);
at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& scales,
                     const c10::optional<at::Tensor>& biases, int64_t impl);
at::Tensor q8_dequantize(const at::Tensor& qw, const at::Tensor& scales, const c10::optional<at::Tensor>& biases);
bool has_avx2();
// shape-only (Meta) versions, so torch.compile can trace through the ops
at::Tensor q4_linear_meta(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                          const c10::optional<at::Tensor>& biases, double offset, bool int8_act, int64_t impl);
at::Tensor q4_dequantize_meta(const at::Tensor& packed, const at::Tensor& scales,
                              const c10::optional<at::Tensor>& biases, double offset);
at::Tensor q8_linear_meta(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& scales,
                          const c10::optional<at::Tensor>& biases, int64_t impl);
at::Tensor q8_dequantize_meta(const at::Tensor& qw, const at::Tensor& scales, const c10::optional<at::Tensor>& biases);

at::Tensor q4_gemm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                   const c10::optional<at::Tensor>& biases, double offset, int64_t impl);
at::Tensor q4_gemm_meta(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                        const c10::optional<at::Tensor>& biases, double offset, int64_t impl);
at::Tensor i8_pack(const at::Tensor& qw);
at::Tensor i8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& wscale,
                     const c10::optional<at::Tensor>& bias, int64_t N, int64_t act, int64_t impl);
at::Tensor i8_linear_meta(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& wscale,
                          const c10::optional<at::Tensor>& bias, int64_t N, int64_t act, int64_t impl);
bool i8_vnni();
at::Tensor attention_bf16(const at::Tensor& qkv, int64_t B, int64_t heads);
bool bf16_cpu();

void register_decode_plan(torch::Library& m);  // the DecodePlan class (decode_step.cpp)

}  // namespace pvlm
