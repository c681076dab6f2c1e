// What q4_cpu.cpp exports to the other translation units of the library (decode_cpu.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

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

// One quantized linear layer as the kernels read it (layouts in q4_cpu.cpp): q4 (packed uint8 [N, K/2],
// scales/biases [N, K/32]; or rows8: [N/8, K/32, 128], or 160 with 5-bit codes, and [N/8, K/32, 8]) or q8
// (int8 [N, K] or rows8 [N/8, K/32, 256], scales/biases as for q4); scales/biases float16|float32 (biases
// optional), an optional float32 layer bias [N].
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

// y = concat_i(W_i x (+ bias_i)) for one token x [K] (every W_i has the same K), int8 activations.
// One object per thread: prepare() quantizes x once for all the layers (a q/k/v or gate/up group), then
// run() computes any range of the group's row blocks (kRows = 4 rows each, numbered across the layers in
// order; a q4 rows8 layer's blocks are 8 rows), so threads can share the rows of several layers in one
// parallel phase.
class MultiLinear {
 public:
  MultiLinear();
  ~MultiLinear();
  MultiLinear(const MultiLinear&) = delete;
  MultiLinear& operator=(const MultiLinear&) = delete;
  void prepare(const float* x, const std::vector<const LinRef*>& lins);
  int64_t blocks() const;
  void run(int64_t b0, int64_t b1, float* y) const;  // rows of blocks [b0, b1), layer biases added

 private:
  struct Impl;
  Impl* impl_;
};

// Row n of a q4/q8 weight as float32 (an embedding lookup), times mul.
void dequantize_row(const LinRef& l, int64_t n, float mul, float* out);

}  // namespace pvlm
