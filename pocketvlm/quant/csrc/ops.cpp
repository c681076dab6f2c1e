// Every op of the library, registered in one place: torch.ops.pocketvlm.* (and torch.classes.pocketvlm.DecodePlan).
#include <torch/library.h>

#include "kernels.h"

TORCH_LIBRARY(pocketvlm, m) {
  m.def("q4_linear(Tensor x, Tensor packed, Tensor scales, Tensor? biases, float offset, bool int8_act, int impl) -> Tensor");
  m.def("q4_dequantize(Tensor packed, Tensor scales, Tensor? biases, float offset) -> Tensor");
  m.def("q8_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? biases, int impl) -> Tensor");
  m.def("q8_dequantize(Tensor qweight, Tensor scales, Tensor? biases) -> Tensor");
  m.def("simd() -> bool", &pvlm::has_avx2);
  m.def("q4_gemm(Tensor x, Tensor packed, Tensor scales, Tensor? biases, float offset, int impl) -> Tensor");
  m.def("i8_pack(Tensor qweight) -> Tensor");
  m.def("i8_linear(Tensor x, Tensor packed, Tensor wscale, Tensor? bias, int N, int act, int impl) -> Tensor");
  m.def("i8_vnni() -> bool", &pvlm::i8_vnni);
  m.def("attention_bf16(Tensor qkv, int B, int heads) -> Tensor");
  m.def("attention_bf16_cpu() -> bool", &pvlm::bf16_cpu);
  pvlm::register_decode_plan(m);
}

TORCH_LIBRARY_IMPL(pocketvlm, CPU, m) {
  m.impl("q4_linear", &pvlm::q4_linear);
  m.impl("q4_dequantize", &pvlm::q4_dequantize);
  m.impl("q8_linear", &pvlm::q8_linear);
  m.impl("q8_dequantize", &pvlm::q8_dequantize);
  m.impl("q4_gemm", &pvlm::q4_gemm);
  m.impl("i8_pack", &pvlm::i8_pack);
  m.impl("i8_linear", &pvlm::i8_linear);
  m.impl("attention_bf16", &pvlm::attention_bf16);
}

TORCH_LIBRARY_IMPL(pocketvlm, Meta, m) {
  m.impl("q4_linear", &pvlm::q4_linear_meta);
  m.impl("q4_dequantize", &pvlm::q4_dequantize_meta);
  m.impl("q8_linear", &pvlm::q8_linear_meta);
  m.impl("q8_dequantize", &pvlm::q8_dequantize_meta);
  m.impl("i8_linear", &pvlm::i8_linear_meta);
  m.impl("q4_gemm", &pvlm::q4_gemm_meta);
}
