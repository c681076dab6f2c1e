// What q4_cpu.cpp exports to the other translation units of the library (decode_cpu.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace pvlm {

// One quantized linear layer as the kernels read it: q4 (packed uint8 [N, K/2]) or q8 (int8 [N, K]),
// scales/biases float16|float32 [N, K/32] (biases optional), an optional float32 layer bias [N].
struct LinRef {
  at::Tensor w, scales, biases, bias;  // biases/bias undefined when absent
  double offset = 7.0;                 // symmetric q4: W = (q - offset) * scale
  int64_t N = 0, K = 0;
  bool q8 = false;
};

// Build a LinRef, checking dtypes and shapes (a clear error instead of a crash on bad input).
LinRef make_linref(const at::Tensor& w, const at::Tensor& scales, const c10::optional<at::Tensor>& biases,
                   double offset, const c10::optional<at::Tensor>& bias);

// y = concat_i(W_i x (+ bias_i)) for one token x [K] (every W_i has the same K), int8 activations:
// one activation quantization and one parallel region over the row blocks of all the layers, so a
// q/k/v or gate/up group costs one thread hand-off instead of one per layer.
void multi_linear(const float* x, const std::vector<const LinRef*>& lins, float* y);

}  // namespace pvlm
