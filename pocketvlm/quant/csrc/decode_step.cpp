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
  std::vector<float> qkv, att, o, gu, act_out, scores;
  int64_t score_len = 0;  // positions per score row (the longest cache of the step)
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
  // q: the row's query heads, sc_row: its score rows [n_heads, max_len], out: its attention output [n_heads * D].
  template <typename KV>
  void attend_heads(const Layer& l, int64_t h0, int64_t h1, const KV* kb, const KV* vb, int64_t max_len,
                    int64_t pos, const float* qrow, float* sc_row, float* out_row) {
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
          const float* q = qrow + hd * D;
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
          _mm256_storeu_ps(sc_row + hd * max_len + t, _mm256_mul_ps(dots, _mm256_set1_ps(sc)));
        }
    }
#endif
    for (; t < T; ++t)
      for (int64_t hd = h0; hd < h1; ++hd) sc_row[hd * max_len + t] = dot_kv(qrow + hd * D, K + t * D, D) * sc;
    for (int64_t hd = h0; hd < h1; ++hd) {
      float* s = sc_row + hd * max_len;
      float mx = -INFINITY;
      for (int64_t u = 0; u < T; ++u) {
        if (cap > 0.f) s[u] = std::tanh(s[u] / cap) * cap;
        mx = std::max(mx, s[u]);
      }
      const float inv = 1.f / exp_shift_sum(s, T, mx);
      float* out = out_row + hd * D;
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

  // g[i] = act(gate[i]) * up[i] for i in [i0, i1). SiLU and tanh-GELU 8 at a time through exp8
  // (tanh z = 1 - 2 / (e^2z + 1)); scalar std::exp/tanh here cost ~0.35 ms per token (Qwen2.5-0.5B).
  void gated_act(const float* g_in, const float* u, float* g, int64_t i0, int64_t i1) {
    std::copy(g_in + i0, g_in + i1, g + i0);
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


  // One parallel phase of matrix products over the step's T rows: every thread quantizes x itself, then claims
  // row blocks. y is layer-major (MultiLinear): see at().
  void linear_phase(Local& loc, const float* x, int64_t T, const std::vector<const pvlm::LinRef*>& lins, float* y,
                    int64_t& phase, int nt) {
    loc.ml.prepare(x, T, lins);
    const int64_t total = loc.ml.blocks();
    const int64_t chunk = std::max<int64_t>(1, total / (8 * nt));
    claim(counters[phase++], total, chunk, [&](int64_t b0, int64_t b1) { loc.ml.run(b0, b1, y); });
  }

  // Column col of row t of a group's output y (layer-major: layer i's [T, N_i] rows at T * its first column).
  static float* at(const std::vector<pvlm::LinRef>& lins, float* y, int64_t T, int64_t t, int64_t col) {
    int64_t first = 0;
    for (const auto& l : lins) {
      if (col < first + l.N) return y + T * first + t * l.N + (col - first);
      first += l.N;
    }
    return nullptr;  // not reached: finalize() checked the widths
  }

  // The step's work on thread tid of nt: T rows (tokens), row t at position pos[t] of cache cache_of[t].
  void work(int tid, int nt, const float* x, int64_t T, const std::vector<int64_t>& pos,
            const std::vector<int64_t>& cache_of, const std::vector<at::Tensor>& cos,
            const std::vector<at::Tensor>& sin, const std::vector<at::Tensor>& k_cache,
            const std::vector<at::Tensor>& v_cache, float* out) {
    Team& team_ref = *team;
    auto barrier = [&] { if (nt > 1) team_ref.barrier(); };
    Local& loc = *locals[tid];
    float* r = loc.r.data();
    float* h = loc.h.data();
    std::copy(x, x + T * hidden, r);
    const int64_t D = head_dim, qn = n_heads * D, kn = n_kv * D, L = static_cast<int64_t>(layers.size());
    int64_t phase = 0;
    auto add_rows = [&](const float* src, const at::Tensor& norm) {  // r += norm ? norm(src) : src, per row
      for (int64_t t = 0; t < T; ++t) {
        float* rt = r + t * hidden;
        const float* st = src + t * hidden;
        if (norm.defined()) {
          rmsnorm(st, norm, h + t * hidden, hidden);
          st = h + t * hidden;
        }
        for (int64_t i = 0; i < hidden; ++i) rt[i] += st[i];
      }
    };
    for (int64_t li = 0; li < L; ++li) {
      const Layer& l = layers[li];
      for (int64_t t = 0; t < T; ++t) rmsnorm(r + t * hidden, l.in_norm, h + t * hidden, hidden);
      linear_phase(loc, h, T, l.ref[0], qkv.data(), phase, nt);
      barrier();
      // q/k norm and RoPE, k/v into the caches: (row, head) pairs dealt out round-robin
      const int64_t rot = cos[l.rope].size(1);
      for (int64_t j = tid; j < T * (n_heads + n_kv); j += nt) {
        const int64_t t = j / (n_heads + n_kv), hd = j % (n_heads + n_kv);
        const float* c = cos[l.rope].data_ptr<float>() + t * rot;
        const float* sn = sin[l.rope].data_ptr<float>() + t * rot;
        if (hd < n_heads) {
          float* q = at(l.lin[0], qkv.data(), T, t, hd * D);
          if (l.q_norm.defined()) rmsnorm(q, l.q_norm, q, D);
          rope(q, c, sn, rot);
          continue;
        }
        const int64_t kh = hd - n_heads;
        float* k = at(l.lin[0], qkv.data(), T, t, qn + kh * D);
        const float* v = at(l.lin[0], qkv.data(), T, t, qn + kn + kh * D);
        if (l.k_norm.defined()) rmsnorm(k, l.k_norm, k, D);
        rope(k, c, sn, rot);
        const at::Tensor& kc = k_cache[cache_of[t] * L + li];
        const at::Tensor& vc = v_cache[cache_of[t] * L + li];
        const int64_t off = (kh * kc.size(2) + pos[t]) * D;
        if (kc.scalar_type() == at::kHalf) {
          kv_store(static_cast<c10::Half*>(kc.data_ptr()) + off, k, D);
          kv_store(static_cast<c10::Half*>(vc.data_ptr()) + off, v, D);
        } else {
          kv_store(static_cast<float*>(kc.data_ptr()) + off, k, D);
          kv_store(static_cast<float*>(vc.data_ptr()) + off, v, D);
        }
      }
      barrier();
      // attention: whole GQA groups per claim when there are enough for the threads, else parts of groups
      const int64_t rep = n_heads / n_kv;
      const int64_t grain = n_kv * T >= nt ? rep : std::max<int64_t>(1, n_heads * T / nt);
      claim(counters[phase++], T * n_heads, grain, [&](int64_t a0, int64_t a1) {
        for (int64_t a = a0; a < a1;) {
          const int64_t t = a / n_heads, h0 = a % n_heads;
          const int64_t e = std::min({a1, (a / rep + 1) * rep, (t + 1) * n_heads});  // one kv head of one row
          const int64_t h1 = h0 + (e - a);
          const at::Tensor& kc = k_cache[cache_of[t] * L + li];
          const at::Tensor& vc = v_cache[cache_of[t] * L + li];
          const float* qrow = at(l.lin[0], qkv.data(), T, t, 0);
          float* srow = scores.data() + t * n_heads * score_len;
          float* orow = att.data() + t * qn;
          if (kc.scalar_type() == at::kHalf)
            attend_heads(l, h0, h1, static_cast<const c10::Half*>(kc.data_ptr()),
                         static_cast<const c10::Half*>(vc.data_ptr()), kc.size(2), pos[t], qrow, srow, orow);
          else
            attend_heads(l, h0, h1, static_cast<const float*>(kc.data_ptr()), static_cast<const float*>(vc.data_ptr()),
                         kc.size(2), pos[t], qrow, srow, orow);
          a = e;
        }
      });
      barrier();
      linear_phase(loc, att.data(), T, l.ref[1], o.data(), phase, nt);
      barrier();
      add_rows(o.data(), l.attn_out_norm);  // (h, not o: o is shared and read by every thread)
      for (int64_t t = 0; t < T; ++t) rmsnorm(r + t * hidden, l.ffn_in_norm, h + t * hidden, hidden);
      linear_phase(loc, h, T, l.ref[2], gu.data(), phase, nt);
      barrier();
      {
        const int64_t i0 = inter * tid / nt / 8 * 8, i1 = tid + 1 == nt ? inter : inter * (tid + 1) / nt / 8 * 8;
        for (int64_t t = 0; t < T; ++t)
          gated_act(at(l.lin[2], gu.data(), T, t, 0), at(l.lin[2], gu.data(), T, t, inter), act_out.data() + t * inter,
                    i0, i1);
      }
      barrier();
      linear_phase(loc, act_out.data(), T, l.ref[3], o.data(), phase, nt);
      barrier();
      add_rows(o.data(), l.ffn_out_norm);
      // the next layer's first phase writes qkv, which no thread reads any more; o is rewritten only
      // after two more barriers
    }
    if (has_head()) {
      for (int64_t t = 0; t < T; ++t) rmsnorm(r + t * hidden, final_norm, h + t * hidden, hidden);
      linear_phase(loc, h, T, head_ref, out, phase, nt);
    } else if (tid == 0) {
      std::copy(r, r + T * hidden, out);
    }
  }

  void check_caches(const std::vector<at::Tensor>& k_cache, const std::vector<at::Tensor>& v_cache,
                    int64_t n_caches) const {
    const int64_t L = static_cast<int64_t>(layers.size());
    TORCH_CHECK(static_cast<int64_t>(k_cache.size()) == n_caches * L && k_cache.size() == v_cache.size(),
                "DecodePlan.step: one k and one v cache per layer (of every cache the rows use)");
    for (size_t i = 0; i < k_cache.size(); ++i)
      for (const at::Tensor* c : {&k_cache[i], &v_cache[i]})
        TORCH_CHECK((c->scalar_type() == at::kFloat || c->scalar_type() == at::kHalf) &&
                        c->scalar_type() == k_cache[i].scalar_type() && c->is_contiguous() && c->dim() == 4 &&
                        c->size(0) == 1 && c->size(1) == n_kv && c->size(3) == head_dim && c->device().is_cpu() &&
                        c->size(2) == k_cache[i].size(2),
                    "DecodePlan.step: caches must be contiguous CPU float32 or float16 (k and v alike) "
                    "[1, n_kv, max_len, head_dim]");
  }

  // T rows at once, reading every weight once: x [T, hidden] (the tokens' embeddings as the model feeds them to
  // layer 0); row t at position pos[t] of cache cache_of[t], whose layer l is k_cache/v_cache[cache_of[t] * L + l]
  // ([1, n_kv, max_len, head_dim] float32 or float16); cos/sin: per RoPE table [T, rot]. Rows of one cache at
  // consecutive positions are the tokens of one sequence (each attends to the ones before it); rows of different
  // caches are independent sequences. Each row's result equals step() of that row alone, bit for bit.
  // -> the logits [T, vocab] when the plan has the LM head, else the last layer's output [T, hidden].
  at::Tensor step_rows(at::Tensor x, std::vector<int64_t> pos, std::vector<int64_t> cache_of,
                       std::vector<at::Tensor> cos, std::vector<at::Tensor> sin, std::vector<at::Tensor> k_cache,
                       std::vector<at::Tensor> v_cache) {
    std::lock_guard<std::mutex> guard(busy);
    TORCH_CHECK(counters, "DecodePlan.step: call finalize() first");
    const int64_t L = static_cast<int64_t>(layers.size());
    const int64_t T = static_cast<int64_t>(pos.size());
    TORCH_CHECK(T > 0 && static_cast<int64_t>(cache_of.size()) == T, "DecodePlan.step: one cache index per row");
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.numel() == T * hidden && x.device().is_cpu(),
                "DecodePlan.step: x must be a CPU float32 tensor of ", T, " x ", hidden, " values");
    TORCH_CHECK(cos.size() == sin.size() && !cos.empty(), "DecodePlan.step: cos/sin lists differ");
    for (size_t i = 0; i < cos.size(); ++i)
      TORCH_CHECK(cos[i].scalar_type() == at::kFloat && sin[i].scalar_type() == at::kFloat && cos[i].is_contiguous() &&
                      sin[i].is_contiguous() && cos[i].dim() == 2 && cos[i].size(0) == T &&
                      cos[i].sizes() == sin[i].sizes() && cos[i].size(1) <= head_dim && cos[i].size(1) % 2 == 0,
                  "DecodePlan.step: cos/sin must be contiguous float32 [rows, rot] with an even rot <= head_dim");
    for (const auto& l : layers)
      TORCH_CHECK(l.rope < static_cast<int64_t>(cos.size()), "DecodePlan.step: missing cos/sin table");
    int64_t n_caches = 0;
    for (int64_t c : cache_of) {
      TORCH_CHECK(c >= 0, "DecodePlan.step: negative cache index");
      n_caches = std::max(n_caches, c + 1);
    }
    check_caches(k_cache, v_cache, n_caches);
    int64_t max_len = 0;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t len = k_cache[cache_of[t] * L].size(2);
      TORCH_CHECK(pos[t] >= 0 && pos[t] < len, "DecodePlan.step: position ", pos[t], " is outside the KV cache");
      max_len = std::max(max_len, len);
      for (int64_t u = 0; u < t; ++u)
        TORCH_CHECK(cache_of[u] != cache_of[t] || pos[u] != pos[t], "DecodePlan.step: two rows write position ",
                    pos[t], " of one cache");
    }
    score_len = max_len;
    auto grow = [](std::vector<float>& v, int64_t n) { if (static_cast<int64_t>(v.size()) < n) v.resize(n); };
    grow(scores, T * n_heads * max_len);
    grow(qkv, T * (n_heads + 2 * n_kv) * head_dim);
    grow(att, T * n_heads * head_dim);
    grow(o, T * hidden);
    grow(gu, T * 2 * inter);
    grow(act_out, T * inter);
    const int nt = at::in_parallel_region() ? 1 : std::max(1, at::get_num_threads());
    if (!team || team->size() != nt) {
      team.reset();
      team.reset(new Team(nt));
    }
    while (static_cast<int>(locals.size()) < nt) locals.emplace_back(new Local);
    for (auto& loc : locals) {
      grow(loc->r, T * hidden);
      grow(loc->h, T * hidden);
    }
    for (int64_t i = 0; i < n_counters; ++i) counters[i].store(0, std::memory_order_relaxed);
    int64_t vocab = 0;
    for (const auto& l : head) vocab += l.N;
    at::Tensor out = at::empty({T, has_head() ? vocab : hidden}, x.options());
    const at::Tensor xc = x.reshape({T, hidden}).contiguous();
    const float* xp = xc.data_ptr<float>();
    at::Tensor raw = has_head() && head.size() > 1 && T > 1 ? at::empty({T, vocab}, x.options()) : out;  // layer-major when split
    float* op = raw.data_ptr<float>();
    std::function<void(int, int)> job = [&](int tid, int n) {
      work(tid, n, xp, T, pos, cache_of, cos, sin, k_cache, v_cache, op);
    };
    team->run(job);
    if (raw.data_ptr() != out.data_ptr()) {  // an LM head in several parts: back to [T, vocab] rows
      int64_t first = 0;
      for (const auto& l : head) {
        out.narrow(1, first, l.N).copy_(raw.view({-1}).narrow(0, T * first, T * l.N).view({T, l.N}));
        first += l.N;
      }
    }
    return out;
  }

  // step_rows() of token ids looked up in the plan's embedding table (times embed_scale, as Gemma does)
  at::Tensor step_tokens(std::vector<int64_t> tokens, std::vector<int64_t> pos, std::vector<int64_t> cache_of,
                         std::vector<at::Tensor> cos, std::vector<at::Tensor> sin, std::vector<at::Tensor> k_cache,
                         std::vector<at::Tensor> v_cache) {
    TORCH_CHECK(has_embedding(), "DecodePlan.step_tokens: no embedding table set");
    const int64_t T = static_cast<int64_t>(tokens.size());
    at::Tensor x = at::empty({T, hidden}, at::TensorOptions().dtype(at::kFloat));
    for (int64_t t = 0; t < T; ++t)
      pvlm::dequantize_row(embedding[0], tokens[t], float(embed_scale), x.data_ptr<float>() + t * hidden);
    return step_rows(x, std::move(pos), std::move(cache_of), std::move(cos), std::move(sin), std::move(k_cache),
                     std::move(v_cache));
  }

  // One token of one cache: x [hidden], cos/sin per RoPE table [rot], k_cache/v_cache one per layer -> [vocab]
  // (or [hidden] without the head).
  at::Tensor step(at::Tensor x, int64_t pos, std::vector<at::Tensor> cos, std::vector<at::Tensor> sin,
                  std::vector<at::Tensor> k_cache, std::vector<at::Tensor> v_cache) {
    for (auto& c : cos) c = c.reshape({1, -1});
    for (auto& s : sin) s = s.reshape({1, -1});
    return step_rows(x.reshape({1, -1}), {pos}, {0}, std::move(cos), std::move(sin), std::move(k_cache),
                     std::move(v_cache)).reshape({-1});
  }

  at::Tensor step_token(int64_t token, int64_t pos, std::vector<at::Tensor> cos, std::vector<at::Tensor> sin,
                        std::vector<at::Tensor> k_cache, std::vector<at::Tensor> v_cache) {
    for (auto& c : cos) c = c.reshape({1, -1});
    for (auto& s : sin) s = s.reshape({1, -1});
    return step_tokens({token}, {pos}, {0}, std::move(cos), std::move(sin), std::move(k_cache),
                       std::move(v_cache)).reshape({-1});
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
      .def("step", &DecodePlan::step)
      .def("step_rows", &DecodePlan::step_rows)
      .def("step_tokens", &DecodePlan::step_tokens);
}
