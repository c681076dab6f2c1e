// The per-thread building blocks of the fused decode step (decode_step.cpp): vector helpers (dot products, exp,
// float16 KV-cache reads and writes, axpy) and the thread team that runs one token's phases.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <functional>
#include <thread>

#include "kernels.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PVLM_DEC_AVX2 1
#else
#define PVLM_DEC_AVX2 0
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
inline void cpu_relax() { _mm_pause(); }
#else
inline void cpu_relax() {}
#endif

namespace pvlm {

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#if PVLM_DEC_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  s = hsum8(_mm256_add_ps(acc0, acc1));
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

#if PVLM_DEC_AVX2
// e^x for 8 floats (the Cephes single-precision method: x = n ln2 + r, a degree-6 polynomial in r, 2^n
// from the exponent bits); ~2 ulp, inputs clamped to [-87.3, 88.7]. std::exp per attention score cost
// ~1.5 ms per token at a 512-token context.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.7f));
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

// s[t] = exp(s[t] - mx) for t < n; returns the sum
inline float exp_shift_sum(float* s, int64_t n, float mx) {
  int64_t t = 0;
  float sum = 0.f;
#if PVLM_DEC_AVX2
  const __m256 m = _mm256_set1_ps(mx);
  __m256 acc = _mm256_setzero_ps();
  for (; t + 8 <= n; t += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), m));
    _mm256_storeu_ps(s + t, e);
    acc = _mm256_add_ps(acc, e);
  }
  sum = hsum8(acc);
#endif
  for (; t < n; ++t) {
    s[t] = std::exp(s[t] - mx);
    sum += s[t];
  }
  return sum;
}

// KV cache elements: float32, or float16 (half the bytes attention reads per token; llama.cpp's default)
inline float kv_at(const float* p, int64_t i) { return p[i]; }
inline float kv_at(const c10::Half* p, int64_t i) { return static_cast<float>(p[i]); }
inline void kv_store(float* dst, const float* src, int64_t n) { std::copy(src, src + n, dst); }
inline void kv_store(c10::Half* dst, const float* src, int64_t n) {
  int64_t i = 0;
#if PVLM_DEC_AVX2
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
  for (; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
}
#if PVLM_DEC_AVX2
inline __m256 kv_load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 kv_load8(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
#endif

template <typename T>
inline float dot_kv(const float* a, const T* b, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return dot(a, b, n);
  } else {
    float s = 0.f;
    for (int64_t i = 0; i < n; ++i) s += a[i] * kv_at(b, i);
    return s;
  }
}

inline void axpy(float a, const float* x, float* y, int64_t n) {  // y += a * x
  int64_t i = 0;
#if PVLM_DEC_AVX2
  const __m256 av = _mm256_set1_ps(a);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += a * x[i];
}

inline void axpy(float a, const c10::Half* x, float* y, int64_t n) {
  int64_t i = 0;
#if PVLM_DEC_AVX2
  const __m256 av = _mm256_set1_ps(a);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, kv_load8(x + i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += a * kv_at(x, i);
}

// The threads of one token: torch's own intra-op (OpenMP) threads, entered once per token through one
// at::parallel_for, with spin barriers (~1 us) between the phases instead of one parallel region per
// matrix (10-20 us each on these VMs, where the second thread often joined too late to help with the
// small matrices). Using torch's threads rather than a team of our own matters: an extra spinning team
// competes with torch's spinning workers for the cores (measured: 30 instead of 46 tokens/s on 2 cores).
// Spinning yields after a while, so an oversubscribed machine still makes progress.
class Team {
 public:
  explicit Team(int n) : n_(n) {}
  int size() const { return n_; }

  // job(tid) on n threads; if the runtime gives fewer threads than asked, thread 0 runs job alone with
  // a team of one (every participant agrees on that before any barrier).
  void run(const std::function<void(int, int)>& job) {
    if (n_ == 1) {
      job(0, 1);
      return;
    }
    arrived_.store(0, std::memory_order_relaxed);
    alone_.store(false, std::memory_order_relaxed);
    at::parallel_for(0, n_, 1, [&](int64_t b, int64_t e) {
      if (b == 0 && e != 1) {  // fewer threads than indices: run it alone
        alone_.store(true, std::memory_order_release);
        job(0, 1);
        return;
      }
      arrived_.fetch_add(1, std::memory_order_acq_rel);
      spin_until([&] { return arrived_.load(std::memory_order_acquire) == n_ || alone_.load(std::memory_order_acquire); });
      if (alone_.load(std::memory_order_acquire)) return;
      job(static_cast<int>(b), n_);
    });
  }

  void barrier() {
    const int64_t g = bar_gen_.load(std::memory_order_acquire);
    if (bar_count_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
      bar_count_.store(0, std::memory_order_relaxed);
      bar_gen_.fetch_add(1, std::memory_order_release);
    } else {
      spin_until([&] { return bar_gen_.load(std::memory_order_acquire) != g; });
    }
  }

 private:
  template <class F>
  static void spin_until(F ready) {
    for (int i = 0; !ready(); ++i) {
      if (i < 2000) cpu_relax();
      else std::this_thread::yield();
    }
  }

  const int n_;
  std::atomic<int> arrived_{0};
  std::atomic<bool> alone_{false};
  std::atomic<int> bar_count_{0};
  std::atomic<int64_t> bar_gen_{0};
};

// f(b0, b1) over chunks of [0, total) claimed first come first served by the team's threads
template <typename F>
void claim(std::atomic<int64_t>& next, int64_t total, int64_t chunk, const F& f) {
  for (;;) {
    const int64_t b = next.fetch_add(chunk, std::memory_order_relaxed);
    if (b >= total) return;
    f(b, std::min(total, b + chunk));
  }
}

}  // namespace pvlm
