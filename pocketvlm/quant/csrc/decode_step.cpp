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
// pvlm::MultiLinear (q4/q8 weights, int8 activations: the same arithmetic as the per-layer q4_linear /
// q8_linear ops, so fused and eager decode agree to float rounding).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#include <c10/util/Half.h>

#include "kernels.h"

#include "decode_math.h"

namespace {

using namespace pvlm;

struct Layer {
  std::vector<pvlm::LinRef> lin[4];  // qkv, o, gate_up, down
  std::vector<const pvlm::LinRef*> ref[4];  // pointers into lin, set by finalize() (what MultiLinear takes)
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
  at::Tensor final_norm;             // with head: the model's last norm, then the LM head below
  std::vector<pvlm::LinRef> head;
  std::vector<const pvlm::LinRef*> head_ref;
  std::vector<pvlm::LinRef> embedding;  // optional: the token embedding table (step_token)
  double embed_scale = 1.0;

  // shared scratch of one step (so one step at a time: `busy`)
  std::vector<float> qkv, att, o, gu, scores;
  struct Local {  // per thread: its copy of the residual stream, the normed input, its kernel state
    std::vector<float> r, h;
    pvlm::MultiLinear ml;
  };
  std::vector<std::unique_ptr<Local>> locals;
  std::unique_ptr<Team> team;
  std::unique_ptr<std::atomic<int64_t>[]> counters;
  int64_t n_counters = 0;
  std::mutex busy;

  DecodePlan(int64_t hidden_, int64_t n_heads_, int64_t n_kv_, int64_t head_dim_, int64_t inter_, double eps_,
             bool plus_one_, int64_t act_, double scale_, double softcap_)
      : hidden(hidden_), n_heads(n_heads_), n_kv(n_kv_), head_dim(head_dim_), inter(inter_), act(act_),
        eps(eps_), scale(scale_), softcap(softcap_), plus_one(plus_one_) {
    TORCH_CHECK(hidden > 0 && n_heads > 0 && n_kv > 0 && head_dim > 0 && inter > 0 && n_heads % n_kv == 0,
                "DecodePlan: bad model dimensions");
    TORCH_CHECK(act >= 0 && act <= 2, "DecodePlan: act must be 0 (silu), 1 (gelu tanh) or 2 (gelu erf)");
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
    counters.reset();  // finalize() again (see add_linear)
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

  // slot: 0 q/k/v (one fused or three separate), 1 o, 2 gate/up (one fused or two), 3 down, 4 LM head
  void add_linear(int64_t slot, at::Tensor w, at::Tensor scales, c10::optional<at::Tensor> biases, double offset,
                  c10::optional<at::Tensor> bias) {
    TORCH_CHECK(slot >= 0 && slot <= 4, "DecodePlan.add_linear: slot 0..4");
    counters.reset();  // finalize() again: it takes pointers into these vectors
    auto ref = pvlm::make_linref(w, scales, biases, offset, bias);
    if (slot == 4) {
      head.push_back(std::move(ref));
      return;
    }
    TORCH_CHECK(!layers.empty(), "DecodePlan.add_linear: add_layer first");
    layers.back().lin[slot].push_back(std::move(ref));
  }

  void set_embedding(at::Tensor w, at::Tensor scales, c10::optional<at::Tensor> biases, double offset,
                     double scale) {
    embedding.clear();
    embedding.push_back(pvlm::make_linref(w, scales, biases, offset, c10::nullopt));
    TORCH_CHECK(embedding[0].K == hidden, "DecodePlan: embedding width ", embedding[0].K, " != hidden ", hidden);
    embed_scale = scale;
  }

  bool has_embedding() const { return !embedding.empty(); }

  // step() for a token id looked up in the plan's embedding table (times embed_scale, as Gemma does)
  at::Tensor step_token(int64_t token, int64_t pos, std::vector<at::Tensor> cos, std::vector<at::Tensor> sin,
                        std::vector<at::Tensor> k_cache, std::vector<at::Tensor> v_cache) {
    TORCH_CHECK(has_embedding(), "DecodePlan.step_token: no embedding table set");
    at::Tensor x = at::empty({hidden}, at::TensorOptions().dtype(at::kFloat));
    pvlm::dequantize_row(embedding[0], token, float(embed_scale), x.data_ptr<float>());
    return step(x, pos, std::move(cos), std::move(sin), std::move(k_cache), std::move(v_cache));
  }

  void set_final_norm(at::Tensor w) {
    check_norm(w, hidden, "final norm");
    final_norm = w;
  }

  void check_slot(const std::vector<pvlm::LinRef>& lins, int64_t n, int64_t k, const char* what) const {
    int64_t total = 0;
    for (const auto& l : lins) {
      TORCH_CHECK(l.K == k, "DecodePlan: ", what, " has input size ", l.K, ", expected ", k);
      total += l.N;
    }
    TORCH_CHECK(total == n, "DecodePlan: ", what, " has ", total, " output rows, expected ", n);
  }

  static std::vector<const pvlm::LinRef*> refs(const std::vector<pvlm::LinRef>& v) {
    std::vector<const pvlm::LinRef*> r;
    for (const auto& l : v) r.push_back(&l);
    return r;
  }

  void finalize() {
    for (auto& l : layers) {
      for (int i = 0; i < 4; ++i) l.ref[i] = refs(l.lin[i]);
      check_slot(l.lin[0], (n_heads + 2 * n_kv) * head_dim, hidden, "q/k/v");
      check_slot(l.lin[1], hidden, n_heads * head_dim, "o_proj");
      check_slot(l.lin[2], 2 * inter, hidden, "gate/up");
      check_slot(l.lin[3], hidden, inter, "down_proj");
    }
    TORCH_CHECK(head.empty() == !final_norm.defined(), "DecodePlan: the LM head needs the final norm and back");
    for (const auto& l : head) TORCH_CHECK(l.K == hidden, "DecodePlan: LM head has input size ", l.K);
    head_ref = refs(head);
    n_counters = static_cast<int64_t>(layers.size()) * 5 + 1;
    counters.reset(new std::atomic<int64_t>[n_counters]);
  }

  bool has_head() const { return !head.empty(); }

  void rmsnorm(const float* x, const at::Tensor& w, float* y, int64_t n) const {
    const float r = 1.f / std::sqrt(dot(x, x, n) / float(n) + float(eps));
    const float* wp = w.data_ptr<float>();
    int64_t i = 0;
#if PVLM_DEC_AVX2
    const __m256 rv = _mm256_set1_ps(r), one = _mm256_set1_ps(1.f);
    for (; i + 8 <= n; i += 8) {
      const __m256 xr = _mm256_mul_ps(_mm256_loadu_ps(x + i), rv), wv = _mm256_loadu_ps(wp + i);
      _mm256_storeu_ps(y + i, _mm256_mul_ps(xr, plus_one ? _mm256_add_ps(one, wv) : wv));
    }
#endif
    if (plus_one) for (; i < n; ++i) y[i] = (x[i] * r) * (1.f + wp[i]);
    else for (; i < n; ++i) y[i] = wp[i] * (x[i] * r);
  }

  static void rope(float* v, const float* c, const float* s, int64_t rot) {  // rotate-half on the first rot dims
    const int64_t half = rot / 2;
    for (int64_t i = 0; i < half; ++i) {
      const float a = v[i], b = v[i + half];
      v[i] = a * c[i] - b * s[i];
      v[i + half] = b * c[i + half] + a * s[i + half];
    }
  }

  // Query heads [h0, h1) of one kv head (GQA group): K and V rows are read once per 8 positions for all
  // these heads while they sit in L1, and 8 scores come out of one transpose-reduce instead of 8
  // horizontal sums; the weighted sum of V keeps 64 outputs in registers.
  template <typename KV>
  void attend_heads(const Layer& l, int64_t h0, int64_t h1, const KV* kb, const KV* vb, int64_t max_len,
                    int64_t pos) {
    const int64_t D = head_dim, rep = n_heads / n_kv, kvh = h0 / rep;
    const int64_t t0 = l.window > 0 ? std::max<int64_t>(0, pos - l.window + 1) : 0, T = pos + 1 - t0;
    const float sc = float(scale), cap = float(softcap);
    const KV* K = kb + (kvh * max_len + t0) * D;
    const KV* V = vb + (kvh * max_len + t0) * D;
    int64_t t = 0;
#if PVLM_DEC_AVX2
    if (D % 8 == 0) {
      for (; t + 8 <= T; t += 8)
        for (int64_t hd = h0; hd < h1; ++hd) {
          const float* q = qkv.data() + hd * D;
          __m256 a[8];
          for (int u = 0; u < 8; ++u) a[u] = _mm256_setzero_ps();
          for (int64_t i = 0; i < D; i += 8) {
            const __m256 qv = _mm256_loadu_ps(q + i);
            for (int u = 0; u < 8; ++u) a[u] = _mm256_fmadd_ps(qv, kv_load8(K + (t + u) * D + i), a[u]);
          }
          const __m256 h01 = _mm256_hadd_ps(a[0], a[1]), h23 = _mm256_hadd_ps(a[2], a[3]);
          const __m256 h45 = _mm256_hadd_ps(a[4], a[5]), h67 = _mm256_hadd_ps(a[6], a[7]);
          const __m256 lo = _mm256_hadd_ps(h01, h23), hi = _mm256_hadd_ps(h45, h67);
          const __m256 dots = _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
          _mm256_storeu_ps(scores.data() + hd * max_len + t, _mm256_mul_ps(dots, _mm256_set1_ps(sc)));
        }
    }
#endif
    for (; t < T; ++t)
      for (int64_t hd = h0; hd < h1; ++hd) scores[hd * max_len + t] = dot_kv(qkv.data() + hd * D, K + t * D, D) * sc;
    for (int64_t hd = h0; hd < h1; ++hd) {
      float* s = scores.data() + hd * max_len;
      float mx = -INFINITY;
      for (int64_t u = 0; u < T; ++u) {
        if (cap > 0.f) s[u] = std::tanh(s[u] / cap) * cap;
        mx = std::max(mx, s[u]);
      }
      const float inv = 1.f / exp_shift_sum(s, T, mx);
      float* out = att.data() + hd * D;
      int64_t i = 0;
#if PVLM_DEC_AVX2
      for (; i + 64 <= D; i += 64) {
        __m256 acc[8];
        for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
        for (int64_t u = 0; u < T; ++u) {
          const __m256 p = _mm256_set1_ps(s[u]);
          for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(p, kv_load8(V + u * D + i + 8 * j), acc[j]);
        }
        for (int j = 0; j < 8; ++j) _mm256_storeu_ps(out + i + 8 * j, _mm256_mul_ps(acc[j], _mm256_set1_ps(inv)));
      }
#endif
      if (i < D) {
        std::fill(out + i, out + D, 0.f);
        for (int64_t u = 0; u < T; ++u) axpy(s[u] * inv, V + u * D + i, out + i, D - i);
      }
    }
  }

  float activate(float g) const {
    if (act == 0) return g / (1.f + std::exp(-g));
    if (act == 1) return 0.5f * g * (1.f + std::tanh(0.7978845608028654f * (g + 0.044715f * g * g * g)));
    return 0.5f * g * (1.f + std::erf(g * 0.7071067811865476f));
  }

  // gu[i] = act(gu[i]) * gu[inter + i] for i in [i0, i1). SiLU and tanh-GELU 8 at a time through exp8
  // (tanh z = 1 - 2 / (e^2z + 1)); scalar std::exp/tanh here cost ~0.35 ms per token (Qwen2.5-0.5B).
  void gated_act(int64_t i0, int64_t i1) {
    float* g = gu.data();
    const float* u = gu.data() + inter;
    int64_t i = i0;
#if PVLM_DEC_AVX2
    if (act <= 1) {
      const __m256 one = _mm256_set1_ps(1.f), half = _mm256_set1_ps(0.5f), two = _mm256_set1_ps(2.f);
      for (; i + 8 <= i1; i += 8) {
        const __m256 x = _mm256_loadu_ps(g + i);
        __m256 a;
        if (act == 0) {
          a = _mm256_div_ps(x, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
        } else {
          const __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
          const __m256 z = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f),
                                         _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), x3, x));
          const __m256 t = _mm256_sub_ps(one, _mm256_div_ps(two, _mm256_add_ps(exp8(_mm256_mul_ps(two, z)), one)));
          a = _mm256_mul_ps(_mm256_mul_ps(half, x), _mm256_add_ps(one, t));
        }
        _mm256_storeu_ps(g + i, _mm256_mul_ps(a, _mm256_loadu_ps(u + i)));
      }
    }
#endif
    for (; i < i1; ++i) g[i] = activate(g[i]) * u[i];
  }

  // One parallel phase of matrix products: every thread quantizes x itself, then claims row blocks.
  void linear_phase(Local& loc, const float* x, const std::vector<const pvlm::LinRef*>& lins, float* y,
                    int64_t& phase, int nt) {
    loc.ml.prepare(x, lins);
    const int64_t total = loc.ml.blocks();
    const int64_t chunk = std::max<int64_t>(1, total / (8 * nt));
    claim(counters[phase++], total, chunk, [&](int64_t b0, int64_t b1) { loc.ml.run(b0, b1, y); });
  }

  // The token's work on thread tid of nt.
  void work(int tid, int nt, const float* x, int64_t pos, const std::vector<at::Tensor>& cos,
            const std::vector<at::Tensor>& sin, const std::vector<at::Tensor>& k_cache,
            const std::vector<at::Tensor>& v_cache, float* out) {
    Team& team_ref = *team;
    auto barrier = [&] { if (nt > 1) team_ref.barrier(); };
    Local& loc = *locals[tid];
    float* r = loc.r.data();
    float* h = loc.h.data();
    std::copy(x, x + hidden, r);
    const int64_t D = head_dim, qn = n_heads * D, kn = n_kv * D;
    int64_t phase = 0;
    for (size_t li = 0; li < layers.size(); ++li) {
      const Layer& l = layers[li];
      rmsnorm(r, l.in_norm, h, hidden);
      linear_phase(loc, h, l.ref[0], qkv.data(), phase, nt);
      barrier();
      // q/k norm and RoPE, k/v into the cache: heads dealt out round-robin
      const float* c = cos[l.rope].data_ptr<float>();
      const float* s = sin[l.rope].data_ptr<float>();
      const int64_t rot = cos[l.rope].numel(), max_len = k_cache[li].size(2);
      const bool half = k_cache[li].scalar_type() == at::kHalf;
      void* kc = k_cache[li].data_ptr();
      void* vc = v_cache[li].data_ptr();
      for (int64_t j = tid; j < n_heads; j += nt) {
        float* q = qkv.data() + j * D;
        if (l.q_norm.defined()) rmsnorm(q, l.q_norm, q, D);
        rope(q, c, s, rot);
      }
      for (int64_t j = tid; j < n_kv; j += nt) {
        float* k = qkv.data() + qn + j * D;
        const float* v = qkv.data() + qn + kn + j * D;
        if (l.k_norm.defined()) rmsnorm(k, l.k_norm, k, D);
        rope(k, c, s, rot);
        const int64_t at = (j * max_len + pos) * D;
        if (half) {
          kv_store(static_cast<c10::Half*>(kc) + at, k, D);
          kv_store(static_cast<c10::Half*>(vc) + at, v, D);
        } else {
          kv_store(static_cast<float*>(kc) + at, k, D);
          kv_store(static_cast<float*>(vc) + at, v, D);
        }
      }
      barrier();
      // whole GQA groups per claim when there are enough for the threads, else parts of groups
      const int64_t rep = n_heads / n_kv;
      claim(counters[phase++], n_heads, n_kv >= nt ? rep : std::max<int64_t>(1, n_heads / nt), [&](int64_t h0, int64_t h1) {
        for (int64_t a = h0; a < h1;) {
          const int64_t e = std::min(h1, (a / rep + 1) * rep);  // within one kv head
          if (half) attend_heads(l, a, e, static_cast<const c10::Half*>(kc), static_cast<const c10::Half*>(vc), max_len, pos);
          else attend_heads(l, a, e, static_cast<const float*>(kc), static_cast<const float*>(vc), max_len, pos);
          a = e;
        }
      });
      barrier();
      linear_phase(loc, att.data(), l.ref[1], o.data(), phase, nt);
      barrier();
      if (l.attn_out_norm.defined()) {  // into h (o is shared and read by every thread)
        rmsnorm(o.data(), l.attn_out_norm, h, hidden);
        for (int64_t i = 0; i < hidden; ++i) r[i] += h[i];
      } else {
        for (int64_t i = 0; i < hidden; ++i) r[i] += o[i];
      }
      rmsnorm(r, l.ffn_in_norm, h, hidden);
      linear_phase(loc, h, l.ref[2], gu.data(), phase, nt);
      barrier();
      gated_act(inter * tid / nt / 8 * 8, tid + 1 == nt ? inter : inter * (tid + 1) / nt / 8 * 8);
      barrier();
      linear_phase(loc, gu.data(), l.ref[3], o.data(), phase, nt);
      barrier();
      if (l.ffn_out_norm.defined()) {
        rmsnorm(o.data(), l.ffn_out_norm, h, hidden);
        for (int64_t i = 0; i < hidden; ++i) r[i] += h[i];
      } else {
        for (int64_t i = 0; i < hidden; ++i) r[i] += o[i];
      }
      // the next layer's first phase writes qkv, which no thread reads any more; o is rewritten only
      // after two more barriers
    }
    if (has_head()) {
      rmsnorm(r, final_norm, h, hidden);
      linear_phase(loc, h, head_ref, out, phase, nt);
    } else if (tid == 0) {
      std::copy(r, r + hidden, out);
    }
  }

  // x [hidden] (the token's embedding as the model feeds it to layer 0) -> the logits [vocab] when the
  // plan has the LM head, else the last layer's output [hidden] (before the final norm).
  // k_cache/v_cache: per layer [1, n_kv, max_len, head_dim] float32 or float16, written at pos.
  at::Tensor step(at::Tensor x, int64_t pos, std::vector<at::Tensor> cos, std::vector<at::Tensor> sin,
                  std::vector<at::Tensor> k_cache, std::vector<at::Tensor> v_cache) {
    std::lock_guard<std::mutex> guard(busy);
    TORCH_CHECK(counters, "DecodePlan.step: call finalize() first");
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
    int64_t max_len = 0;
    for (int64_t i = 0; i < L; ++i) {
      for (const at::Tensor* c : {&k_cache[i], &v_cache[i]})
        TORCH_CHECK((c->scalar_type() == at::kFloat || c->scalar_type() == at::kHalf) &&
                        c->scalar_type() == k_cache[i].scalar_type() && c->is_contiguous() && c->dim() == 4 &&
                        c->size(0) == 1 && c->size(1) == n_kv && c->size(3) == head_dim && c->device().is_cpu(),
                    "DecodePlan.step: caches must be contiguous CPU float32 or float16 (k and v alike) "
                    "[1, n_kv, max_len, head_dim]");
      TORCH_CHECK(pos >= 0 && pos < k_cache[i].size(2) && v_cache[i].size(2) == k_cache[i].size(2),
                  "DecodePlan.step: position ", pos, " is outside the KV cache");
      TORCH_CHECK(layers[i].rope < static_cast<int64_t>(cos.size()), "DecodePlan.step: missing cos/sin table");
      max_len = std::max(max_len, k_cache[i].size(2));
    }
    if (static_cast<int64_t>(scores.size()) < n_heads * max_len) scores.resize(n_heads * max_len);
    const int nt = at::in_parallel_region() ? 1 : std::max(1, at::get_num_threads());
    if (!team || team->size() != nt) {
      team.reset();
      team.reset(new Team(nt));
    }
    while (static_cast<int>(locals.size()) < nt) {
      locals.emplace_back(new Local);
      locals.back()->r.resize(hidden);
      locals.back()->h.resize(std::max(hidden, 2 * inter));
    }
    for (int64_t i = 0; i < n_counters; ++i) counters[i].store(0, std::memory_order_relaxed);
    int64_t vocab = 0;
    for (const auto& l : head) vocab += l.N;
    at::Tensor out = at::empty({has_head() ? vocab : hidden}, x.options());
    const at::Tensor xc = x.reshape({hidden}).contiguous();
    const float* xp = xc.data_ptr<float>();
    float* op = out.data_ptr<float>();
    std::function<void(int, int)> job = [&](int tid, int n) { work(tid, n, xp, pos, cos, sin, k_cache, v_cache, op); };
    team->run(job);
    return out;
  }
};

}  // namespace

void pvlm::register_decode_plan(torch::Library& m) {
  m.class_<DecodePlan>("DecodePlan")
      .def(torch::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, bool, int64_t, double, double>())
      .def("add_layer", &DecodePlan::add_layer)
      .def("add_linear", &DecodePlan::add_linear)
      .def("set_final_norm", &DecodePlan::set_final_norm)
      .def("has_head", &DecodePlan::has_head)
      .def("set_embedding", &DecodePlan::set_embedding)
      .def("has_embedding", &DecodePlan::has_embedding)
      .def("step_token", &DecodePlan::step_token)
      .def("finalize", &DecodePlan::finalize)
      .def("step", &DecodePlan::step);
}
