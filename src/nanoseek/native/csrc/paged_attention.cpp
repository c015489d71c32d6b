// nanoseek::paged_attention: attention of queries over their keys, read in place from the paged KV cache, for
// decode steps and prompt chunks alike. The unfused step first gathered every row's history out of the cache
// ([B, S, K, D] copies of K and V in every layer) and then ran SDPA over the copies; here each (query, head)
// walks its keys' slots directly.
//
// Inputs: q [N, H, D] (N queries), k_store and v_store [slots, K, D], fp32 or fp16 (one layer's cache; H is a
// multiple of K: grouped-query attention), slots [R, S] int64 (the cache slot of key j; R == N: one row of slots per
// query, or N = R * T: queries r * T .. r * T + T - 1 share row r, as a prompt chunk's queries do),
// mask [N, S] bool (which keys the query sees: causal, its window, its row's length; padding keys are false),
// scale.
//
// Batch invariance: every output is computed from the keys its mask allows, in key order, by one fixed
// sequence of floating-point operations that depends only on the query, those keys and D: each score is the
// same 8-lane fused multiply-add chain and the same horizontal sum (dot4), the softmax's exponentials are
// this file's own vector exp (the same bits in every lane, tails padded), its sum runs in 8 lanes then a fixed
// tree, and the output is a multiply-add chain over the allowed keys in order. So a query's numbers are the
// same alone (a decode), beside other rows, or anywhere in a prompt chunk of any length: a request's tokens do
// not depend on where its prompt chunks start or what it is batched with. (The file is built without
// -ffast-math and with -ffp-contract=off, so the compiler reassociates and fuses nothing on its own.)
//
// Speed: the queries of one row that share a KV head (a GQA group's heads, and up to kTile consecutive queries
// of a prompt chunk) are one task: each key row is read from memory once and then from L1 for every (query,
// head) pair of the task, where one query at a time streamed the whole history from L2/L3 per pair (3x
// slower than SDPA on a 256-token chunk over 1,000 keys). A decode (T = 1) splits the heads of a group into
// tasks of their own when there would be too few tasks for the threads; that changes no bits.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <memory>

namespace {

constexpr int64_t kTile = 8;       // consecutive queries of one row per task
constexpr int64_t kMaxGroup = 64;  // query heads per KV head
constexpr int64_t kKeyBytes = 16384;  // K or V rows per key block: a part of L1

// The cache holds fp32 or fp16 values (KV, one type per call: float, or uint16_t for IEEE half bits). A row is
// widened to fp32 as it is loaded (F16C's conversion is exact), and all arithmetic is the fp32 kernel's: an fp16
// cache rounds each key and value once, when it is written, and then reads the same bits in every forward.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline float load1(float x) { return x; }
inline float load1(uint16_t x) { return _cvtsh_ss(x); }

// The dot products of q with 4 keys at once: one 8-lane multiply-add chain per key, then the fixed tree
// ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)) per key. Every score of the kernel is made here (D % 8 == 0).
template <typename KV>
inline void dot4(const float* q, const KV* k0, const KV* k1, const KV* k2, const KV* k3, int64_t D, float* out) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) {
    const __m256 x = _mm256_loadu_ps(q + d);
    a0 = _mm256_fmadd_ps(x, load8(k0 + d), a0);
    a1 = _mm256_fmadd_ps(x, load8(k1 + d), a1);
    a2 = _mm256_fmadd_ps(x, load8(k2 + d), a2);
    a3 = _mm256_fmadd_ps(x, load8(k3 + d), a3);
  }
  const __m256 h01 = _mm256_hadd_ps(a0, a1), h23 = _mm256_hadd_ps(a2, a3);
  const __m256 h = _mm256_hadd_ps(h01, h23);
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}

// dot4 over 8 keys at once (8 independent chains hide the multiply-add's latency): dot4's bits for each key.
template <typename KV>
inline void dot8(const float* q, const KV* const* k, int64_t D, float* out) {
  __m256 a[8];
  for (int i = 0; i < 8; ++i) a[i] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) {
    const __m256 x = _mm256_loadu_ps(q + d);
    for (int i = 0; i < 8; ++i) a[i] = _mm256_fmadd_ps(x, load8(k[i] + d), a[i]);
  }
  const __m256 lo = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 hi = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(lo), _mm256_extractf128_ps(lo, 1)));
  _mm_storeu_ps(out + 4, _mm_add_ps(_mm256_castps256_ps128(hi), _mm256_extractf128_ps(hi, 1)));
}

// dot4 for two queries (two heads of one query) over the same 4 keys, each key row loaded once: every dot
// product is dot4's own chain and tree, so its bits are dot4's.
template <typename KV>
inline void dot4x2(const float* qa, const float* qb, const KV* k0, const KV* k1, const KV* k2, const KV* k3,
                   int64_t D, float* outa, float* outb) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps(), b2 = _mm256_setzero_ps(), b3 = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) {
    const __m256 xa = _mm256_loadu_ps(qa + d), xb = _mm256_loadu_ps(qb + d);
    const __m256 y0 = load8(k0 + d), y1 = load8(k1 + d), y2 = load8(k2 + d), y3 = load8(k3 + d);
    a0 = _mm256_fmadd_ps(xa, y0, a0);
    a1 = _mm256_fmadd_ps(xa, y1, a1);
    a2 = _mm256_fmadd_ps(xa, y2, a2);
    a3 = _mm256_fmadd_ps(xa, y3, a3);
    b0 = _mm256_fmadd_ps(xb, y0, b0);
    b1 = _mm256_fmadd_ps(xb, y1, b1);
    b2 = _mm256_fmadd_ps(xb, y2, b2);
    b3 = _mm256_fmadd_ps(xb, y3, b3);
  }
  const __m256 ha = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  const __m256 hb = _mm256_hadd_ps(_mm256_hadd_ps(b0, b1), _mm256_hadd_ps(b2, b3));
  _mm_storeu_ps(outa, _mm_add_ps(_mm256_castps256_ps128(ha), _mm256_extractf128_ps(ha, 1)));
  _mm_storeu_ps(outb, _mm_add_ps(_mm256_castps256_ps128(hb), _mm256_extractf128_ps(hb, 1)));
}

// out[a][0, D) += sum over keys i in [i0, e) of p[a][i] * v_i, for A (1 or 2) outputs that share their keys, as
// one multiply-add chain per output lane in key order (so the grouping of lanes into registers changes no bit).
// C * 8 lanes of each output stay in registers across the keys (A * C = 8 independent chains hide the
// multiply-add's latency); D % 8 == 0.
template <int A, int C, typename KV>
inline void weighted_values(const float* const* p, float* const* out, const int64_t* st, const int64_t* offset,
                            const KV* vbase, int64_t i0, int64_t e, int64_t D) {
  int64_t d = 0;
  for (; d + 8 * C <= D; d += 8 * C) {
    __m256 acc[A][C];
    for (int a = 0; a < A; ++a)
      for (int c = 0; c < C; ++c) acc[a][c] = _mm256_loadu_ps(out[a] + d + 8 * c);
    for (int64_t i = i0; i < e; ++i) {
      const KV* v = vbase + offset[st[i]] + d;
      __m256 vc[C];
      for (int c = 0; c < C; ++c) vc[c] = load8(v + 8 * c);
      for (int a = 0; a < A; ++a) {
        const __m256 w = _mm256_broadcast_ss(p[a] + i);
        for (int c = 0; c < C; ++c) acc[a][c] = _mm256_fmadd_ps(w, vc[c], acc[a][c]);
      }
    }
    for (int a = 0; a < A; ++a)
      for (int c = 0; c < C; ++c) _mm256_storeu_ps(out[a] + d + 8 * c, acc[a][c]);
  }
  for (; d < D; d += 8) {
    __m256 acc[A];
    for (int a = 0; a < A; ++a) acc[a] = _mm256_loadu_ps(out[a] + d);
    for (int64_t i = i0; i < e; ++i) {
      const __m256 v = load8(vbase + offset[st[i]] + d);
      for (int a = 0; a < A; ++a) acc[a] = _mm256_fmadd_ps(_mm256_broadcast_ss(p[a] + i), v, acc[a]);
    }
    for (int a = 0; a < A; ++a) _mm256_storeu_ps(out[a] + d, acc[a]);
  }
}

// Any other D: a plain sequential sum (no vectorization: built without -ffast-math, the loop keeps its order).
template <typename KV>
inline float dot1(const float* q, const KV* k, int64_t D) {
  float dot = 0.f;
  for (int64_t d = 0; d < D; ++d) dot += q[d] * load1(k[d]);
  return dot;
}

// exp(x) for x <= 0 in 8 lanes (Cephes' expf: range reduction by ln 2, degree-5 polynomial; ~1 ulp), 0 below
// -87.3 (where expf leaves the normal floats). Lane-wise, so a score's exponential does not depend on its
// neighbours or on where in the vector it sits.
inline __m256 exp8(__m256 x) {
  const __m256 lowest = _mm256_set1_ps(-87.33654f);
  const __m256 underflow = _mm256_cmp_ps(x, lowest, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lowest);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(pow2)));
}

// scores[0, n) (raw dot products) -> exp(scale * score - max), in place; returns their sum (8 lanes, then a
// fixed tree: the order depends on n only). Multiplying by the scale and taking the maximum round nothing
// differently in vector and scalar code, and the exponentials of the last n % 8 scores are computed in a padded
// vector: every score gets the same bits wherever it lies.
float softmax_numerators(float* scores, int64_t n, float scale) {
  const __m256 s = _mm256_set1_ps(scale);
  __m256 top8 = _mm256_set1_ps(-3.0e38f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_mul_ps(_mm256_loadu_ps(scores + i), s);
    _mm256_storeu_ps(scores + i, x);
    top8 = _mm256_max_ps(top8, x);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, top8);
  float top = lanes[0];
  for (int j = 1; j < 8; ++j) top = std::max(top, lanes[j]);
  for (; i < n; ++i) {
    scores[i] *= scale;
    top = std::max(top, scores[i]);
  }
  const __m256 t = _mm256_set1_ps(top);
  __m256 acc = _mm256_setzero_ps();
  for (i = 0; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + i), t));
    _mm256_storeu_ps(scores + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  if (i < n) {  // the tail, padded; its padding lanes add exactly 0
    const int64_t m = n - i;
    alignas(32) float x[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int64_t j = 0; j < m; ++j) x[j] = scores[i + j];
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 real = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(m)), lane));
    const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(_mm256_load_ps(x), t)), real);
    _mm256_store_ps(x, e);
    for (int64_t j = 0; j < m; ++j) scores[i + j] = x[j];
    acc = _mm256_add_ps(acc, e);
  }
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  const __m128 u = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(u) + _mm_cvtss_f32(_mm_shuffle_ps(u, u, 1));
}

// One task: queries [0, nq) of one slots row (q, mask and out point at the task's first query) with query heads
// [h0, h1) of KV head `kv`. `scores` holds nq * (h1 - h0) * S floats, `work`
// (1 + nq) * S ints.
//
// Every (query, head) pair gets its scores and its output from its own keys in key order; the task only chooses
// which pairs run between two loads of a key block, so that a block of keys (kKeyBytes of K or V rows) is read
// from memory once and from L1 for each pair, and how the dot products are grouped by 4 (which no bit depends on).
template <typename KV>
void attend_task(const float* q, const KV* k_store, const KV* v_store, const int64_t* slots, const bool* mask,
                 int64_t nq, int64_t h0, int64_t h1, int64_t kv, int64_t H, int64_t S, int64_t stride, int64_t D,
                 float scale, float* scores, int64_t* work, float* out) {
  const int64_t nh = h1 - h0;
  int64_t* offset = work;  // per key of the task (any of its queries sees it): its row's offset in the stores
  int64_t* sel = work + S;  // per query t: sel[t * S + i] is the task key of its i-th key
  int64_t n[kTile];        // keys per query
  for (int64_t t = 0; t < nq; ++t) n[t] = 0;
  int64_t nu = 0;
  for (int64_t j = 0; j < S; ++j) {
    bool any = false;
    for (int64_t t = 0; t < nq; ++t)
      if (mask[t * S + j]) {
        sel[t * S + n[t]++] = nu;
        any = true;
      }
    if (any) offset[nu++] = slots[j] * stride + kv * D;
  }
  const bool wide = D % 8 == 0;
  const int64_t block = std::max<int64_t>(16, kKeyBytes / (static_cast<int64_t>(sizeof(KV)) * D));  // keys per block
  int64_t cur[kTile];
  // pass 1: each pair's scores over its keys, in order (pair (t, h) at scores + (t * nh + h) * S)
  for (int64_t t = 0; t < nq; ++t) cur[t] = 0;
  for (int64_t ub = 0; ub < nu; ub += block) {
    for (int64_t t = 0; t < nq; ++t) {
      const int64_t* st = sel + t * S;
      int64_t e = cur[t];
      while (e < n[t] && st[e] < ub + block) ++e;
      for (int64_t h = 0; h < nh;) {
        const float* qa = q + (t * H + h0 + h) * D;
        float* sa = scores + (t * nh + h) * S;
        if (!wide) {
          for (int64_t i = cur[t]; i < e; ++i) sa[i] = dot1(qa, k_store + offset[st[i]], D);
          ++h;
          continue;
        }
        const bool two = h + 1 < nh;  // two heads share each key row's loads
        const float* qb = qa + D;
        float* sb = sa + S;
        int64_t i = cur[t];
        if (!two)
          for (; i + 8 <= e; i += 8) {
            const KV* k[8];
            for (int m = 0; m < 8; ++m) k[m] = k_store + offset[st[i + m]];
            dot8(qa, k, D, sa + i);
          }
        for (; i + 4 <= e; i += 4) {
          const KV *k0 = k_store + offset[st[i]], *k1 = k_store + offset[st[i + 1]],
                   *k2 = k_store + offset[st[i + 2]], *k3 = k_store + offset[st[i + 3]];
          if (two) {
            dot4x2(qa, qb, k0, k1, k2, k3, D, sa + i, sb + i);
          } else {
            dot4(qa, k0, k1, k2, k3, D, sa + i);
          }
        }
        if (i < e) {  // the last 1-3 keys (padded with the first of them; each key's dot is its own)
          float da[4], db[4];
          const KV* k0 = k_store + offset[st[i]];
          const KV* k1 = i + 1 < e ? k_store + offset[st[i + 1]] : k0;
          const KV* k2 = i + 2 < e ? k_store + offset[st[i + 2]] : k0;
          if (two) {
            dot4x2(qa, qb, k0, k1, k2, k0, D, da, db);
          } else {
            dot4(qa, k0, k1, k2, k0, D, da);
          }
          for (int64_t m = 0; i + m < e; ++m) {
            sa[i + m] = da[m];
            if (two) sb[i + m] = db[m];
          }
        }
        h += two ? 2 : 1;
      }
      cur[t] = e;
    }
  }
  float inv[kTile * kMaxGroup];
  for (int64_t t = 0; t < nq; ++t)
    for (int64_t h = 0; h < nh; ++h) {
      const float total = softmax_numerators(scores + (t * nh + h) * S, n[t], scale);
      inv[t * nh + h] = n[t] ? 1.f / total : 0.f;  // a query that sees no key (never made by the engine): zeros
      std::fill(out + (t * H + h0 + h) * D, out + (t * H + h0 + h + 1) * D, 0.f);
    }
  // pass 2: each output a multiply-add chain over its keys in order
  for (int64_t t = 0; t < nq; ++t) cur[t] = 0;
  for (int64_t ub = 0; ub < nu; ub += block) {
    for (int64_t t = 0; t < nq; ++t) {
      const int64_t* st = sel + t * S;
      int64_t e = cur[t];
      while (e < n[t] && st[e] < ub + block) ++e;
      for (int64_t h = 0; h < nh;) {
        const float* sp[2] = {scores + (t * nh + h) * S, scores + (t * nh + h + 1) * S};
        float* op[2] = {out + (t * H + h0 + h) * D, out + (t * H + h0 + h + 1) * D};
        if (!wide) {
          for (int64_t i = cur[t]; i < e; ++i) {
            const KV* v = v_store + offset[st[i]];
            for (int64_t d = 0; d < D; ++d) op[0][d] += sp[0][i] * load1(v[d]);
          }
          ++h;
        } else if (h + 1 < nh) {
          weighted_values<2, 4>(sp, op, st, offset, v_store, cur[t], e, D);
          h += 2;
        } else {
          weighted_values<1, 8>(sp, op, st, offset, v_store, cur[t], e, D);
          ++h;
        }
      }
      cur[t] = e;
    }
  }
  for (int64_t t = 0; t < nq; ++t)
    for (int64_t h = 0; h < nh; ++h) {
      float* op = out + (t * H + h0 + h) * D;
      const float w = inv[t * nh + h];
      for (int64_t d = 0; d < D; ++d) op[d] *= w;
    }
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_store, const at::Tensor& v_store,
                           const at::Tensor& slots, const at::Tensor& mask, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_store.dim() == 3 && v_store.dim() == 3, "q [N, H, D], stores [slots, K, D]");
  TORCH_CHECK(q.scalar_type() == at::kFloat, "paged_attention runs on fp32 queries");
  TORCH_CHECK((k_store.scalar_type() == at::kFloat || k_store.scalar_type() == at::kHalf) &&
                  v_store.scalar_type() == k_store.scalar_type(),
              "paged_attention reads fp32 or fp16 caches (K and V alike)");
  const bool half = k_store.scalar_type() == at::kHalf;
  TORCH_CHECK(slots.scalar_type() == at::kLong && mask.scalar_type() == at::kBool, "slots int64, mask bool");
  const int64_t N = q.size(0), H = q.size(1), D = q.size(2), K = k_store.size(1), S = slots.size(1);
  const int64_t R = slots.size(0);
  TORCH_CHECK(k_store.sizes() == v_store.sizes() && k_store.size(2) == D, "k and v stores must match q's D");
  TORCH_CHECK(K > 0 && H % K == 0, "the query heads must be a multiple of the cache's heads");
  TORCH_CHECK(slots.dim() == 2 && R > 0 && N % R == 0 && mask.size(0) == N && mask.size(1) == S,
              "slots must be [N, S] or [R, S] with N a multiple of R, the mask [N, S]");
  const int64_t group = H / K, stride = K * D, T = N / R;
  TORCH_CHECK(group <= kMaxGroup, "paged_attention: at most 64 query heads per KV head");
  const at::Tensor qc = q.contiguous(), kc = k_store.contiguous(), vc = v_store.contiguous();
  const at::Tensor sc = slots.contiguous(), mc = mask.contiguous();
  at::Tensor out = at::empty({N, H, D}, q.options());
  if (N == 0) return out;
  const float* qp = qc.data_ptr<float>();
  const void* kp = kc.data_ptr();
  const void* vp = vc.data_ptr();
  const int64_t* sp = sc.data_ptr<int64_t>();
  const bool* mp = mc.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  // tasks: (slots row, tile of its queries, KV head, part of the group's heads)
  const int64_t tiles = (T + kTile - 1) / kTile;
  const int64_t parts = R * tiles * K < 2 * at::get_num_threads() ? group : 1;
  const int64_t heads_per_task = group / parts;
  const int64_t tasks = R * tiles * K * parts;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    // uninitialized (a vector would clear them on every call): each task writes what it reads
    const int64_t tile_rows = std::min(kTile, T), keys = std::max<int64_t>(S, 1);
    std::unique_ptr<float[]> scores(new float[tile_rows * heads_per_task * keys]);
    std::unique_ptr<int64_t[]> work(new int64_t[(tile_rows + 1) * keys]);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t part = task % parts, kv = task / parts % K, tile = task / parts / K % tiles;
      const int64_t r = task / parts / K / tiles;
      const int64_t t0 = tile * kTile, nq = std::min(kTile, T - t0);
      const int64_t n0 = r * T + t0;  // the task's first query
      const int64_t h0 = kv * group + part * heads_per_task;
      if (half) {
        attend_task(qp + n0 * H * D, static_cast<const uint16_t*>(kp), static_cast<const uint16_t*>(vp), sp + r * S,
                    mp + n0 * S, nq, h0, h0 + heads_per_task, kv, H, S, stride, D, static_cast<float>(scale),
                    scores.get(), work.get(), op + n0 * H * D);
      } else {
        attend_task(qp + n0 * H * D, static_cast<const float*>(kp), static_cast<const float*>(vp), sp + r * S,
                    mp + n0 * S, nq, h0, h0 + heads_per_task, kv, H, S, stride, D, static_cast<float>(scale),
                    scores.get(), work.get(), op + n0 * H * D);
      }
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
