// nanoseek::paged_attention: attention of queries over their keys, read in place from the paged KV cache
// (decode steps: one query per row). The unfused decode step first gathered every row's history out of the
// cache ([B, S, K, D] copies of K and V in every layer) and then ran SDPA over the copies, one small
// matrix-vector product per head; here each (query, head) walks its keys' slots directly.
//
// Inputs: q [N, H, D] (N queries), k_store and v_store [slots, K, D] (one layer's cache; H is a multiple of
// K: grouped-query attention), slots [N, S] int64 (the cache slot of each query's key j), mask [N, S] bool
// (which keys the query sees: causal, its window, its row's length; padding keys are false), scale.
//
// Each output is computed from the keys its mask allows, in key order, by the same operations whatever the
// batch (a shorter row's padding keys are skipped, not reduced as zeros): a request decodes the same alone or
// beside others, and a speculative verification's query j the same as a lone decode of it. Built with -ffast-math: the reductions are vectorized and expf is glibc's vector expf,
// which changes the last bits against torch's SDPA but not from one call to the next.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

// The dot products of q with 4 keys at once (4 independent accumulator chains, one horizontal sum), AVX2.
inline void dot4(const float* q, const float* k0, const float* k1, const float* k2, const float* k3, int64_t D,
                 float* out) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) {
    const __m256 x = _mm256_loadu_ps(q + d);
    a0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k0 + d), a0);
    a1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k1 + d), a1);
    a2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k2 + d), a2);
    a3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k3 + d), a3);
  }
  // [a0 a1 a2 a3] -> their 4 sums
  const __m256 h01 = _mm256_hadd_ps(a0, a1), h23 = _mm256_hadd_ps(a2, a3);
  const __m256 h = _mm256_hadd_ps(h01, h23);
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}

inline float dot1(const float* q, const float* k, int64_t D) {
  float dot = 0.f;
#pragma omp simd reduction(+ : dot)
  for (int64_t d = 0; d < D; ++d) dot += q[d] * k[d];
  return dot;
}

// One query head over its keys: two passes (scores, then the weighted sum of values). The keys the mask
// allows are listed first (`offsets` into the stores), so that each 4 of them go through the same dot4 and
// the same accumulation step whatever the padding.
void attend_one(const float* q, const float* k_store, const float* v_store, const int64_t* slots,
                const bool* mask, int64_t S, int64_t stride, int64_t D, float scale, float* scores,
                int64_t* offsets, float* out) {
  int64_t n = 0;
  for (int64_t j = 0; j < S; ++j)
    if (mask[j]) offsets[n++] = slots[j] * stride;
  const bool wide = D % 8 == 0;
  int64_t i = 0;
  if (wide)
    for (; i + 4 <= n; i += 4)
      dot4(q, k_store + offsets[i], k_store + offsets[i + 1], k_store + offsets[i + 2], k_store + offsets[i + 3], D,
           scores + i);
  for (; i < n; ++i) scores[i] = dot1(q, k_store + offsets[i], D);
  float top = -3.0e38f;
  for (i = 0; i < n; ++i) {
    scores[i] *= scale;
    top = scores[i] > top ? scores[i] : top;
  }
  float total = 0.f;
#pragma omp simd reduction(+ : total)
  for (i = 0; i < n; ++i) {
    scores[i] = expf(scores[i] - top);
    total += scores[i];
  }
  for (int64_t d = 0; d < D; ++d) out[d] = 0.f;
  i = 0;
  if (wide)
    for (; i + 4 <= n; i += 4) {
      const float *v0 = v_store + offsets[i], *v1 = v_store + offsets[i + 1], *v2 = v_store + offsets[i + 2],
                  *v3 = v_store + offsets[i + 3];
      const __m256 p0 = _mm256_set1_ps(scores[i]), p1 = _mm256_set1_ps(scores[i + 1]),
                   p2 = _mm256_set1_ps(scores[i + 2]), p3 = _mm256_set1_ps(scores[i + 3]);
      for (int64_t d = 0; d < D; d += 8) {
        __m256 acc = _mm256_loadu_ps(out + d);
        acc = _mm256_fmadd_ps(p0, _mm256_loadu_ps(v0 + d), acc);
        acc = _mm256_fmadd_ps(p1, _mm256_loadu_ps(v1 + d), acc);
        acc = _mm256_fmadd_ps(p2, _mm256_loadu_ps(v2 + d), acc);
        acc = _mm256_fmadd_ps(p3, _mm256_loadu_ps(v3 + d), acc);
        _mm256_storeu_ps(out + d, acc);
      }
    }
  for (; i < n; ++i) {
    const float* value = v_store + offsets[i];
    const float p = scores[i];
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) out[d] += p * value[d];
  }
  const float inv = n ? 1.f / total : 0.f;  // a query that sees no key (never made by the engine): zeros
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) out[d] *= inv;
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_store, const at::Tensor& v_store,
                                  const at::Tensor& slots, const at::Tensor& mask, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_store.dim() == 3 && v_store.dim() == 3, "q [N, H, D], stores [slots, K, D]");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_store.scalar_type() == at::kFloat &&
                  v_store.scalar_type() == at::kFloat,
              "paged_attention runs on fp32 queries and caches");
  TORCH_CHECK(slots.scalar_type() == at::kLong && mask.scalar_type() == at::kBool, "slots int64, mask bool");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), K = k_store.size(1), S = slots.size(1);
  TORCH_CHECK(k_store.sizes() == v_store.sizes() && k_store.size(2) == D, "k and v stores must match q's D");
  TORCH_CHECK(K > 0 && H % K == 0, "the query heads must be a multiple of the cache's heads");
  TORCH_CHECK(slots.size(0) == B && mask.size(0) == B && mask.size(1) == S, "slots and mask must be [N, S]");
  const at::Tensor qc = q.contiguous(), kc = k_store.contiguous(), vc = v_store.contiguous();
  const at::Tensor sc = slots.contiguous(), mc = mask.contiguous();
  at::Tensor out = at::empty({B, H, D}, q.options());
  const float* qp = qc.data_ptr<float>();
  const float* kp = kc.data_ptr<float>();
  const float* vp = vc.data_ptr<float>();
  const int64_t* sp = sc.data_ptr<int64_t>();
  const bool* mp = mc.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  const int64_t group = H / K, stride = K * D;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(S > 0 ? S : 1);
    std::vector<int64_t> offsets(S > 0 ? S : 1);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, kv = (task % H) / group;
      attend_one(qp + task * D, kp + kv * D, vp + kv * D, sp + b * S, mp + b * S, S, stride, D,
                 static_cast<float>(scale), scores.data(), offsets.data(), op + task * D);
    }
  });
  return out;
}

at::Tensor paged_attention_meta(const at::Tensor& q, const at::Tensor& k_store, const at::Tensor& v_store,
                                       const at::Tensor& slots, const at::Tensor& mask, double scale) {
  return at::empty_symint(q.sym_sizes(), q.options());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nanoseek, m) {
  m.def("paged_attention(Tensor q, Tensor k_store, Tensor v_store, Tensor slots, Tensor mask, float scale)"
        " -> Tensor");
}

TORCH_LIBRARY_IMPL(nanoseek, CPU, m) { m.impl("paged_attention", paged_attention); }
TORCH_LIBRARY_IMPL(nanoseek, Meta, m) { m.impl("paged_attention", paged_attention_meta); }
