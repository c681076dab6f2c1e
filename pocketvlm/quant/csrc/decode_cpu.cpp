// pocketvlm's fused single-token decode step for the llama-like decoders (pocketvlm/engine/fused.py).
//
// The eager PyTorch decode of a 24-layer model makes ~400 operator calls per token; on a 2-core CPU
// their dispatch costs about as much as reading the weights. DecodePlan holds references to one
// model's quantized weights and norms (no copies) and runs a whole token, all layers, in one call:
//
//   per layer:  h = norm(x); qkv = [Wq|Wk|Wv] h (+bias); optional per-head q/k norm; RoPE (rotate-half,
//               cos/sin given by the caller, so every RoPE scaling type is computed by the model's own
//               code); k, v written into the caller's KV cache at pos; attention over [t0, pos]
//               (t0 > 0 under a sliding window), optional tanh soft-capping of the scores;
//               o = Wo a; x += attn_out_norm ? norm(o) : o;
//               h = norm(x); g|u = [Wg|Wu] h; a = act(g) * u; d = Wd a; x += ffn_out_norm ? norm(d) : d
//
// Norms are RMSNorm, weight * n(x) or (1 + weight) * n(x) (Gemma). The matrix products go through
// pvlm::multi_linear (q4/q8 weights, int8 activations: the same arithmetic as the per-layer q4_linear /
// q8_linear ops, so fused and eager decode agree to float rounding).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <vector>

#include "kernels.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PVLM_DEC_AVX2 1
#else
#define PVLM_DEC_AVX2 0
#endif

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#if PVLM_DEC_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  const __m256 acc = _mm256_add_ps(acc0, acc1);
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  s = _mm_cvtss_f32(r);
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float a, const float* x, float* y, int64_t n) {  // y += a * x
  int64_t i = 0;
#if PVLM_DEC_AVX2
  const __m256 av = _mm256_set1_ps(a);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += a * x[i];
}

struct Layer {
  std::vector<pvlm::LinRef> lin[4];  // qkv, o, gate_up, down
  at::Tensor in_norm, attn_out_norm, ffn_in_norm, ffn_out_norm, q_norm, k_norm;  // undefined when absent
  int64_t window = 0;  // sliding window (keys t > pos - window); 0 = full causal attention
  int64_t rope = 0;    // index into step()'s cos/sin lists
};

at::Tensor opt(const c10::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

struct DecodePlan : torch::CustomClassHolder {
  int64_t hidden, n_heads, n_kv, head_dim, inter, act;
  double eps, scale, softcap;
  bool plus_one;
  std::vector<Layer> layers;
  std::vector<float> h, qkv, att, o, gu, scores;  // scratch, so one step at a time:
  std::mutex busy;

  DecodePlan(int64_t hidden_, int64_t n_heads_, int64_t n_kv_, int64_t head_dim_, int64_t inter_, double eps_,
             bool plus_one_, int64_t act_, double scale_, double softcap_)
      : hidden(hidden_), n_heads(n_heads_), n_kv(n_kv_), head_dim(head_dim_), inter(inter_), act(act_),
        eps(eps_), scale(scale_), softcap(softcap_), plus_one(plus_one_) {
    TORCH_CHECK(hidden > 0 && n_heads > 0 && n_kv > 0 && head_dim > 0 && inter > 0 && n_heads % n_kv == 0,
                "DecodePlan: bad model dimensions");
    TORCH_CHECK(act >= 0 && act <= 2, "DecodePlan: act must be 0 (silu), 1 (gelu tanh) or 2 (gelu erf)");
    h.resize(std::max(hidden, n_heads * head_dim));
    qkv.resize((n_heads + 2 * n_kv) * head_dim);
    att.resize(n_heads * head_dim);
    o.resize(hidden);
    gu.resize(2 * inter);
  }

  void check_norm(const at::Tensor& t, int64_t n, const char* what) {
    if (!t.defined()) return;
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == n && t.device().is_cpu(),
                "DecodePlan: ", what, " must be a contiguous CPU float32 tensor of ", n, " values");
  }

  void add_layer(at::Tensor in_norm, c10::optional<at::Tensor> attn_out_norm, at::Tensor ffn_in_norm,
                 c10::optional<at::Tensor> ffn_out_norm, c10::optional<at::Tensor> q_norm,
                 c10::optional<at::Tensor> k_norm, int64_t window, int64_t rope) {
    Layer l;
    l.in_norm = in_norm;
    l.attn_out_norm = opt(attn_out_norm);
    l.ffn_in_norm = ffn_in_norm;
    l.ffn_out_norm = opt(ffn_out_norm);
    l.q_norm = opt(q_norm);
    l.k_norm = opt(k_norm);
    check_norm(l.in_norm, hidden, "input norm");
    check_norm(l.attn_out_norm, hidden, "attention output norm");
    check_norm(l.ffn_in_norm, hidden, "feed-forward input norm");
    check_norm(l.ffn_out_norm, hidden, "feed-forward output norm");
    check_norm(l.q_norm, head_dim, "q norm");
    check_norm(l.k_norm, head_dim, "k norm");
    TORCH_CHECK(window >= 0 && rope >= 0, "DecodePlan: window and rope index must be >= 0");
    l.window = window;
    l.rope = rope;
    layers.push_back(std::move(l));
  }

  // slot: 0 q/k/v (one fused or three separate), 1 o, 2 gate/up (one fused or two), 3 down
  void add_linear(int64_t slot, at::Tensor w, at::Tensor scales, c10::optional<at::Tensor> biases, double offset,
                  c10::optional<at::Tensor> bias) {
    TORCH_CHECK(!layers.empty() && slot >= 0 && slot < 4, "DecodePlan.add_linear: add_layer first; slot 0..3");
    layers.back().lin[slot].push_back(pvlm::make_linref(w, scales, biases, offset, bias));
  }

  void check_slot(const std::vector<pvlm::LinRef>& lins, int64_t n, int64_t k, const char* what) const {
    int64_t total = 0;
    for (const auto& l : lins) {
      TORCH_CHECK(l.K == k, "DecodePlan: ", what, " has input size ", l.K, ", expected ", k);
      total += l.N;
    }
    TORCH_CHECK(total == n, "DecodePlan: ", what, " has ", total, " output rows, expected ", n);
  }

  void finalize() const {
    for (const auto& l : layers) {
      check_slot(l.lin[0], (n_heads + 2 * n_kv) * head_dim, hidden, "q/k/v");
      check_slot(l.lin[1], hidden, n_heads * head_dim, "o_proj");
      check_slot(l.lin[2], 2 * inter, hidden, "gate/up");
      check_slot(l.lin[3], hidden, inter, "down_proj");
    }
  }

  void rmsnorm(const float* x, const at::Tensor& w, float* y, int64_t n) const {
    double ss = 0.0;
    for (int64_t i = 0; i < n; ++i) ss += double(x[i]) * x[i];
    const float r = 1.f / std::sqrt(float(ss / n) + float(eps));
    const float* wp = w.data_ptr<float>();
    if (plus_one) for (int64_t i = 0; i < n; ++i) y[i] = (x[i] * r) * (1.f + wp[i]);
    else for (int64_t i = 0; i < n; ++i) y[i] = wp[i] * (x[i] * r);
  }

  static void rope(float* v, const float* c, const float* s, int64_t rot) {  // rotate-half on the first rot dims
    const int64_t half = rot / 2;
    for (int64_t i = 0; i < half; ++i) {
      const float a = v[i], b = v[i + half];
      v[i] = a * c[i] - b * s[i];
      v[i + half] = b * c[i + half] + a * s[i + half];
    }
  }

  void attention(const Layer& l, const at::Tensor& kc, const at::Tensor& vc, int64_t pos) {
    const int64_t max_len = kc.size(2), D = head_dim, rep = n_heads / n_kv;
    const int64_t t0 = l.window > 0 ? std::max<int64_t>(0, pos - l.window + 1) : 0, T = pos + 1 - t0;
    if (static_cast<int64_t>(scores.size()) < n_heads * max_len) scores.resize(n_heads * max_len);
    const float* kb = kc.data_ptr<float>();
    const float* vb = vc.data_ptr<float>();
    const float sc = float(scale), cap = float(softcap);
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, T * D));
    at::parallel_for(0, n_heads, grain, [&](int64_t h0, int64_t h1) {
      for (int64_t hd = h0; hd < h1; ++hd) {
        const float* q = qkv.data() + hd * D;
        const float* K = kb + (hd / rep) * max_len * D;
        const float* V = vb + (hd / rep) * max_len * D;
        float* s = scores.data() + hd * max_len;
        float mx = -INFINITY;
        for (int64_t t = 0; t < T; ++t) {
          float v = dot(q, K + (t0 + t) * D, D) * sc;
          if (cap > 0.f) v = std::tanh(v / cap) * cap;
          s[t] = v;
          mx = std::max(mx, v);
        }
        float sum = 0.f;
        for (int64_t t = 0; t < T; ++t) {
          s[t] = std::exp(s[t] - mx);
          sum += s[t];
        }
        float* out = att.data() + hd * D;
        std::fill(out, out + D, 0.f);
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < T; ++t) axpy(s[t] * inv, V + (t0 + t) * D, out, D);
      }
    });
  }

  float activate(float g) const {
    if (act == 0) return g / (1.f + std::exp(-g));
    if (act == 1) return 0.5f * g * (1.f + std::tanh(0.7978845608028654f * (g + 0.044715f * g * g * g)));
    return 0.5f * g * (1.f + std::erf(g * 0.7071067811865476f));
  }

  static std::vector<const pvlm::LinRef*> refs(const std::vector<pvlm::LinRef>& v) {
    std::vector<const pvlm::LinRef*> r;
    for (const auto& l : v) r.push_back(&l);
    return r;
  }

  // x [hidden] (the token's embedding as the model feeds it to layer 0) -> the last layer's output
  // (before the final norm). k_cache/v_cache: per layer [1, n_kv, max_len, head_dim] float32.
  at::Tensor step(at::Tensor x, int64_t pos, std::vector<at::Tensor> cos, std::vector<at::Tensor> sin,
                  std::vector<at::Tensor> k_cache, std::vector<at::Tensor> v_cache) {
    std::lock_guard<std::mutex> guard(busy);
    const int64_t L = static_cast<int64_t>(layers.size());
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.numel() == hidden && x.device().is_cpu(),
                "DecodePlan.step: x must be a CPU float32 tensor of ", hidden, " values");
    TORCH_CHECK(static_cast<int64_t>(k_cache.size()) == L && static_cast<int64_t>(v_cache.size()) == L,
                "DecodePlan.step: one k and one v cache per layer");
    TORCH_CHECK(cos.size() == sin.size() && !cos.empty(), "DecodePlan.step: cos/sin lists differ");
    for (size_t i = 0; i < cos.size(); ++i)
      TORCH_CHECK(cos[i].scalar_type() == at::kFloat && sin[i].scalar_type() == at::kFloat && cos[i].is_contiguous() &&
                      sin[i].is_contiguous() && cos[i].numel() == sin[i].numel() && cos[i].numel() <= head_dim &&
                      cos[i].numel() % 2 == 0,
                  "DecodePlan.step: cos/sin must be contiguous float32 with an even size <= head_dim");
    for (int64_t i = 0; i < L; ++i) {
      for (const at::Tensor* c : {&k_cache[i], &v_cache[i]})
        TORCH_CHECK(c->scalar_type() == at::kFloat && c->is_contiguous() && c->dim() == 4 && c->size(0) == 1 &&
                        c->size(1) == n_kv && c->size(3) == head_dim && c->device().is_cpu(),
                    "DecodePlan.step: caches must be contiguous CPU float32 [1, n_kv, max_len, head_dim]");
      TORCH_CHECK(pos >= 0 && pos < k_cache[i].size(2) && v_cache[i].size(2) == k_cache[i].size(2),
                  "DecodePlan.step: position ", pos, " is outside the KV cache");
      TORCH_CHECK(layers[i].rope < static_cast<int64_t>(cos.size()), "DecodePlan.step: missing cos/sin table");
    }
    at::Tensor out = x.reshape({hidden}).contiguous().clone();
    float* r = out.data_ptr<float>();
    const int64_t D = head_dim, qn = n_heads * D, kn = n_kv * D;
    for (int64_t li = 0; li < L; ++li) {
      const Layer& l = layers[li];
      rmsnorm(r, l.in_norm, h.data(), hidden);
      pvlm::multi_linear(h.data(), refs(l.lin[0]), qkv.data());
      float* q = qkv.data();
      float* k = q + qn;
      float* v = k + kn;
      if (l.q_norm.defined())
        for (int64_t j = 0; j < n_heads; ++j) rmsnorm(q + j * D, l.q_norm, q + j * D, D);
      if (l.k_norm.defined())
        for (int64_t j = 0; j < n_kv; ++j) rmsnorm(k + j * D, l.k_norm, k + j * D, D);
      const float* c = cos[l.rope].data_ptr<float>();
      const float* s = sin[l.rope].data_ptr<float>();
      const int64_t rot = cos[l.rope].numel();
      for (int64_t j = 0; j < n_heads; ++j) rope(q + j * D, c, s, rot);
      for (int64_t j = 0; j < n_kv; ++j) rope(k + j * D, c, s, rot);
      const int64_t max_len = k_cache[li].size(2);
      float* kc = k_cache[li].data_ptr<float>();
      float* vc = v_cache[li].data_ptr<float>();
      for (int64_t j = 0; j < n_kv; ++j) {
        std::copy(k + j * D, k + (j + 1) * D, kc + (j * max_len + pos) * D);
        std::copy(v + j * D, v + (j + 1) * D, vc + (j * max_len + pos) * D);
      }
      attention(l, k_cache[li], v_cache[li], pos);
      pvlm::multi_linear(att.data(), refs(l.lin[1]), o.data());
      if (l.attn_out_norm.defined()) rmsnorm(o.data(), l.attn_out_norm, o.data(), hidden);
      for (int64_t i = 0; i < hidden; ++i) r[i] += o[i];
      rmsnorm(r, l.ffn_in_norm, h.data(), hidden);
      pvlm::multi_linear(h.data(), refs(l.lin[2]), gu.data());
      for (int64_t i = 0; i < inter; ++i) gu[i] = activate(gu[i]) * gu[inter + i];
      pvlm::multi_linear(gu.data(), refs(l.lin[3]), o.data());
      if (l.ffn_out_norm.defined()) rmsnorm(o.data(), l.ffn_out_norm, o.data(), hidden);
      for (int64_t i = 0; i < hidden; ++i) r[i] += o[i];
    }
    return out;
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(pocketvlm_q4, m) {
  m.class_<DecodePlan>("DecodePlan")
      .def(torch::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, bool, int64_t, double, double>())
      .def("add_layer", &DecodePlan::add_layer)
      .def("add_linear", &DecodePlan::add_linear)
      .def("finalize", &DecodePlan::finalize)
      .def("step", &DecodePlan::step);
}
