// Several quantized layers sharing one input token (a q/k/v or gate/up group): pvlm::MultiLinear, the matrix
// phases of the fused decode step (decode_step.cpp), and the embedding row lookup.
#include "matvec.h"

namespace pvlm {

LinRef make_linref(const at::Tensor& w, const at::Tensor& scales, const c10::optional<at::Tensor>& biases,
                   double offset, const c10::optional<at::Tensor>& bias) {
  LinRef r;
  r.q8 = w.scalar_type() == at::kChar;
  if (r.q8) {
    const Q4Shape sh = check_q8_args(w, scales, biases);
    r.N = sh.N;
    r.K = sh.K;
    r.r8 = sh.r8;
  } else {
    const Q4Shape sh = check_args(w, scales, biases);
    r.N = sh.N;
    r.K = sh.K;
    r.r8 = sh.r8;
    r.q5 = sh.q5;
  }
  r.w = w;
  r.scales = scales;
  if (biases.has_value()) r.biases = *biases;
  r.offset = offset;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == r.N &&
                    bias->device().is_cpu(),
                "linear bias must be a contiguous CPU float32 [N] tensor");
    r.bias = *bias;
  }
  return r;
}

namespace {

template <typename S, bool AFFINE>
void q4_blocks(const QuantX& q, const PairVecs& pv, const LinRef& l, float* y, int64_t b0, int64_t b1) {
  q4_i8_blocks<S, AFFINE>(q, pv, l.K, l.w.data_ptr<uint8_t>(), l.scales.data_ptr<S>(),
                          AFFINE ? l.biases.data_ptr<S>() : nullptr, float(l.offset), y, l.N, b0, b1, 0, l.r8, l.q5);
}

template <typename S, bool AFFINE>
void q8_blocks(const QuantX& q, const LinRef& l, float* y, int64_t b0, int64_t b1) {
  q8_i8_blocks<S, AFFINE>(q, l.K, l.w.data_ptr<int8_t>(), l.scales.data_ptr<S>(),
                          AFFINE ? l.biases.data_ptr<S>() : nullptr, y, l.N, b0, b1, 0, l.r8);
}

// xpair: activations in the q4 pair layout (q4 rows); xnat: natural order (q8, q4 rows8)
void lin_blocks(const QuantX& xpair, const PairVecs& pv, const QuantX& xnat, const LinRef& l, float* y, int64_t b0,
                int64_t b1) {
  const bool half = l.scales.scalar_type() == at::kHalf, affine = l.biases.defined();
  if (l.q8) {
    if (half) affine ? q8_blocks<c10::Half, true>(xnat, l, y, b0, b1) : q8_blocks<c10::Half, false>(xnat, l, y, b0, b1);
    else affine ? q8_blocks<float, true>(xnat, l, y, b0, b1) : q8_blocks<float, false>(xnat, l, y, b0, b1);
  } else {
    const QuantX& qx = l.paired_x() ? xpair : xnat;
    if (half) affine ? q4_blocks<c10::Half, true>(qx, pv, l, y, b0, b1) : q4_blocks<c10::Half, false>(qx, pv, l, y, b0, b1);
    else affine ? q4_blocks<float, true>(qx, pv, l, y, b0, b1) : q4_blocks<float, false>(qx, pv, l, y, b0, b1);
  }
}

}  // namespace

struct MultiLinear::Impl {
  std::vector<const LinRef*> lins;
  std::vector<int64_t> first, yoff;  // first block / first output row of each layer
  int64_t M = 1;       // rows of x
  QuantX xpair, xnat;  // the rows' activations in the two int8 layouts (each only when a layer reads it)
  std::vector<PairVecs> pv;
};

MultiLinear::MultiLinear() : impl_(new Impl) {}
MultiLinear::~MultiLinear() { delete impl_; }

void MultiLinear::prepare(const float* x, const std::vector<const LinRef*>& lins) { prepare(x, 1, lins); }

void MultiLinear::prepare(const float* x, int64_t M, const std::vector<const LinRef*>& lins) {
  Impl& m = *impl_;
  m.M = M;
  const int64_t n = static_cast<int64_t>(lins.size());
  TORCH_CHECK(n > 0, "multi_linear: no layers");
  const int64_t K = lins[0]->K;
  m.lins = lins;
  m.first.assign(n + 1, 0);
  m.yoff.assign(n + 1, 0);
  m.pv.resize(n);
  bool need_pair = false, need_nat = false;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(lins[i]->K == K, "multi_linear: layers with different input sizes");
    need_pair |= lins[i]->paired_x();
    need_nat |= !lins[i]->paired_x();
    const int64_t rpb = rows_per_block(lins[i]->r8);
    m.first[i + 1] = m.first[i] + (lins[i]->N + rpb - 1) / rpb;
    m.yoff[i + 1] = m.yoff[i] + lins[i]->N;
  }
  if (need_pair) quantize_x(x, M, K, m.xpair, /*paired=*/true);
  if (need_nat) quantize_x(x, M, K, m.xnat, /*paired=*/false);
#if PVLM_AVX2
  for (int64_t i = 0; i < n; ++i)
    if (lins[i]->paired_x()) make_pair_vecs(m.xpair, float(lins[i]->offset), lins[i]->biases.defined(), m.pv[i]);
#endif
}

int64_t MultiLinear::blocks() const { return impl_->first.empty() ? 0 : impl_->first.back(); }

void MultiLinear::run(int64_t b0, int64_t b1, float* y) const {
  const Impl& m = *impl_;
  int64_t i = 0;
  while (b0 < b1) {
    while (m.first[i + 1] <= b0) ++i;
    const LinRef& l = *m.lins[i];
    const int64_t e = std::min(b1, m.first[i + 1]);
    float* yi = y + m.M * m.yoff[i];  // layer i's rows: [M, N_i]
    lin_blocks(m.xpair, m.pv[i], m.xnat, l, yi, b0 - m.first[i], e - m.first[i]);
    if (l.bias.defined()) {
      const float* bias = l.bias.data_ptr<float>();
      const int64_t rpb = rows_per_block(l.r8);
      for (int64_t row = 0; row < m.M; ++row)
        for (int64_t r = (b0 - m.first[i]) * rpb, r1 = std::min(l.N, (e - m.first[i]) * rpb); r < r1; ++r)
          yi[row * l.N + r] += bias[r];
    }
    b0 = e;
  }
}

void dequantize_row(const LinRef& l, int64_t n, float mul, float* out) {
  TORCH_CHECK(n >= 0 && n < l.N, "token id ", n, " is outside the embedding table [0, ", l.N, ")");
  const int64_t G = l.K / kGroup;
  const bool half = l.scales.scalar_type() == at::kHalf, affine = l.biases.defined();
  auto val = [&](const at::Tensor& t, int64_t g) {
    const int64_t i = q4_sidx(l.r8, G, n, g);
    return half ? static_cast<float>(t.data_ptr<c10::Half>()[i]) : t.data_ptr<float>()[i];
  };
  for (int64_t g = 0; g < G; ++g) {
    const float s = val(l.scales, g);
    const float b = affine ? val(l.biases, g) : 0.f;
    float* o = out + g * kGroup;
    if (l.q8) {
      const int8_t* w = l.w.data_ptr<int8_t>();
      for (int i = 0; i < kGroup; ++i) o[i] = (float(q8_code(l.r8, w, l.K, n, g * kGroup + i)) * s + b) * mul;
    } else if (l.r8) {
      const uint8_t* w = l.w.data_ptr<uint8_t>();
      const float off = affine ? 0.f : float(l.offset);
      for (int i = 0; i < kGroup; ++i) o[i] = ((float(q4_code(true, w, l.K, n, g * kGroup + i, l.q5)) - off) * s + b) * mul;
    } else {
      const uint8_t* q = l.w.data_ptr<uint8_t>() + n * (l.K / 2) + g * 16;
      const float off = affine ? 0.f : float(l.offset);
      for (int j = 0; j < 16; ++j) {
        o[j] = ((float(q[j] & 15) - off) * s + b) * mul;
        o[j + 16] = ((float(q[j] >> 4) - off) * s + b) * mul;
      }
    }
  }
}


}  // namespace pvlm

