// Small fused ops for eager inference on CPU (engine/fused_ops.py). A SmolLM2 decode step runs ~70 aten ops per
// layer, most of them on a few hundred floats, where each op costs microseconds of dispatch: torch's RMSNorm
// alone is ~10 ops (17 us for 576 floats), the rotary embedding of q and k 16, the cache write 6.
//
// nanoseek::rms_norm(x [..., d], weight [d], eps, offset) -> x * rsqrt(mean(x^2) + eps) * (offset + weight)
//   (Llama's norm with offset 0, Gemma's with 1), every row on its own.
// nanoseek::silu_mul(gate_up [..., 2I]) -> silu(gate) * up: a fused gate/up projection's activation (3 ops).
// nanoseek::rope_store(qkv [N, (H + 2K) * D], cos [N, D/2], sin [N, D/2], k_store [slots, K, D],
//                      v_store [slots, K, D], write_slots [N] int64, H, K) -> q [N, H, D]
//   rotates q and k by the rotate-half rule (Llama/HF: pairs (i, i + D/2)), writes row n's k and v at cache
//   slot write_slots[n], and returns the rotated queries. The rotation is apply_rope_half's own arithmetic
//   (built with -ffp-contract=off, so no multiply-add is fused): the same bits as the unfused path.

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

// sum of x[i]^2 over d floats: 8 lanes at a time, then the tail
inline float sum_of_squares(const float* x, int64_t d) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  const __m128 pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
  float total = _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1)));
  for (; i < d; ++i) total += x[i] * x[i];
  return total;
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, double offset) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "rms_norm runs in fp32");
  const int64_t d = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == d, "rms_norm: weight must be [", d, "]");
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor out = at::empty(xc.sizes(), xc.options());
  const int64_t rows = d ? xc.numel() / d : 0;
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float off = static_cast<float>(offset), e = static_cast<float>(eps);
  // one thread below ~16k floats: a thread hand-off costs more than the work
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = xp + r * d;
      float* y = op + r * d;
      const float inv = 1.f / std::sqrt(sum_of_squares(row, d) / static_cast<float>(d) + e);
      for (int64_t i = 0; i < d; ++i) y[i] = row[i] * inv * (off + wp[i]);
    }
  });
  return out;
}

at::Tensor rms_norm_meta(const at::Tensor& x, const at::Tensor& weight, double eps, double offset) {
  return at::empty_symint(x.sym_sizes(), x.options());
}

// exp of 8 floats (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial for exp(r), times 2^n;
// ~1 ulp). The scalar std::exp would leave a prompt chunk's activation (200 tokens x 1536 x 30 layers) 10x
// slower than torch's vectorized one.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3365f)), _mm256_set1_ps(88.3762f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693359375f)));
  r = _mm256_sub_ps(r, _mm256_mul_ps(n, _mm256_set1_ps(-2.12194440e-4f)));
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(c));
  y = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(y, _mm256_mul_ps(r, r)), r), _mm256_set1_ps(1.f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
}

// silu(gate) * up for gate_up [..., 2I] = [gate | up] (a fused gate/up projection's output) -> [..., I]
at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.scalar_type() == at::kFloat, "silu_mul runs in fp32");
  const int64_t width = gate_up.size(-1), I = width / 2;
  TORCH_CHECK(width % 2 == 0, "silu_mul: the last dimension must hold gate and up, got ", width);
  const at::Tensor xc = gate_up.contiguous();
  std::vector<int64_t> sizes(xc.sizes().begin(), xc.sizes().end());
  sizes.back() = I;
  at::Tensor out = at::empty(sizes, xc.options());
  const int64_t rows = I ? out.numel() / I : 0;
  const float* xp = xc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(I, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float *g = xp + r * width, *u = g + I;
      float* y = op + r * I;
      int64_t i = 0;
      for (; i + 8 <= I; i += 8) {
        const __m256 gate = _mm256_loadu_ps(g + i);
        const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gate));
        const __m256 silu = _mm256_div_ps(gate, _mm256_add_ps(_mm256_set1_ps(1.f), e));
        _mm256_storeu_ps(y + i, _mm256_mul_ps(silu, _mm256_loadu_ps(u + i)));
      }
      for (; i < I; ++i) y[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
    }
  });
  return out;
}

at::Tensor silu_mul_meta(const at::Tensor& gate_up) {
  std::vector<c10::SymInt> sizes(gate_up.sym_sizes().begin(), gate_up.sym_sizes().end());
  sizes.back() = sizes.back() / 2;
  return at::empty_symint(sizes, gate_up.options());
}

// out[i] = x[i] cos[i] - x[i + h] sin[i], out[i + h] = x[i + h] cos[i] + x[i] sin[i], h = D / 2
inline void rotate_half(const float* x, const float* cos, const float* sin, int64_t D, float* out) {
  const int64_t h = D / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float a = x[i], b = x[i + h];
    out[i] = a * cos[i] - b * sin[i];
    out[i + h] = b * cos[i] + a * sin[i];
  }
}

// Shapes are taken by element counts, so the engine passes its tensors as the model and the view hold them
// (qkv [B, T, X], cos/sin [B, 1, T, D/2], write_slots [B, T]) without a reshape per layer: N rows = qkv's
// elements / its last dimension.
// fp32 values into a cache row: an fp32 cache keeps them, an fp16 one rounds each to nearest even (F16C; what
// torch's .to(torch.float16) gives), once, when it is written
inline void store_row(const float* x, float* dst, int64_t D) {
  for (int64_t i = 0; i < D; ++i) dst[i] = x[i];
}
inline void store_row(const float* x, uint16_t* dst, int64_t D) {
  for (int64_t i = 0; i < D; ++i) dst[i] = _cvtss_sh(x[i], _MM_FROUND_TO_NEAREST_INT);
}

template <typename KV>
void rotate_and_store(const float* xp, const float* cp, const float* sp, const int64_t* slot, float* qp, KV* kp,
                      KV* vp, int64_t N, int64_t H, int64_t K, int64_t D, int64_t slots) {
  std::vector<float> rotated(D);
  for (int64_t n = 0; n < N; ++n) {  // serial: rows may share the padding slot, and a decode step is small
    TORCH_CHECK(slot[n] >= 0 && slot[n] < slots, "rope_store: write slot ", slot[n], " outside the cache");
    const float* row = xp + n * (H + 2 * K) * D;
    const float *c = cp + n * (D / 2), *s = sp + n * (D / 2);
    for (int64_t h = 0; h < H; ++h) rotate_half(row + h * D, c, s, D, qp + (n * H + h) * D);
    for (int64_t h = 0; h < K; ++h) {
      rotate_half(row + (H + h) * D, c, s, D, rotated.data());
      store_row(rotated.data(), kp + (slot[n] * K + h) * D, D);
      store_row(row + (H + K + h) * D, vp + (slot[n] * K + h) * D, D);
    }
  }
}

at::Tensor rope_store(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_store,
                      at::Tensor& v_store, const at::Tensor& write_slots, int64_t H, int64_t K) {
  TORCH_CHECK(qkv.dim() >= 1, "rope_store: qkv [..., (H+2K)*D]");
  TORCH_CHECK(qkv.scalar_type() == at::kFloat && cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
              "rope_store runs on fp32 tensors");
  TORCH_CHECK((k_store.scalar_type() == at::kFloat || k_store.scalar_type() == at::kHalf) &&
                  v_store.scalar_type() == k_store.scalar_type(),
              "rope_store writes fp32 or fp16 caches (K and V alike)");
  TORCH_CHECK(write_slots.scalar_type() == at::kLong, "rope_store: write_slots must be int64");
  TORCH_CHECK(k_store.dim() == 3 && k_store.sizes() == v_store.sizes() && k_store.size(1) == K,
              "rope_store: stores [slots, K, D]");
  TORCH_CHECK(k_store.is_contiguous() && v_store.is_contiguous(), "rope_store writes contiguous stores in place");
  const int64_t D = k_store.size(2), slots = k_store.size(0);
  TORCH_CHECK(D % 2 == 0 && qkv.size(-1) == (H + 2 * K) * D, "rope_store: qkv width must be (H + 2K) * D");
  const int64_t N = qkv.numel() / qkv.size(-1);
  TORCH_CHECK(cos.numel() == N * (D / 2) && sin.numel() == N * (D / 2) && cos.size(-1) == D / 2 &&
                  sin.size(-1) == D / 2,
              "rope_store: cos and sin must hold D/2 values for each of the N rows");
  TORCH_CHECK(write_slots.numel() == N, "rope_store: one write slot per row");
  const at::Tensor xc = qkv.contiguous(), cc = cos.contiguous(), sc = sin.contiguous(), wc = write_slots.contiguous();
  at::Tensor q = at::empty({N, H, D}, xc.options());
  const float* xp = xc.data_ptr<float>();
  const float* cp = cc.data_ptr<float>();
  const float* sp = sc.data_ptr<float>();
  const int64_t* slot = wc.data_ptr<int64_t>();
  float* qp = q.data_ptr<float>();
  if (k_store.scalar_type() == at::kHalf) {
    rotate_and_store(xp, cp, sp, slot, qp, static_cast<uint16_t*>(k_store.data_ptr()),
                     static_cast<uint16_t*>(v_store.data_ptr()), N, H, K, D, slots);
  } else {
    rotate_and_store(xp, cp, sp, slot, qp, k_store.data_ptr<float>(), v_store.data_ptr<float>(), N, H, K, D, slots);
  }
  return q;
}

at::Tensor rope_store_meta(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_store,
                           at::Tensor& v_store, const at::Tensor& write_slots, int64_t H, int64_t K) {
  return at::empty_symint({qkv.sym_numel() / qkv.sym_size(-1), H, k_store.sym_size(2)}, qkv.options());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nanoseek, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, float offset) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("rope_store(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_store, Tensor(b!) v_store, Tensor write_slots,"
        " int H, int K) -> Tensor");
}

TORCH_LIBRARY_IMPL(nanoseek, CPU, m) {
  m.impl("rms_norm", rms_norm);
  m.impl("silu_mul", silu_mul);
  m.impl("rope_store", rope_store);
}

TORCH_LIBRARY_IMPL(nanoseek, Meta, m) {
  m.impl("rms_norm", rms_norm_meta);
  m.impl("silu_mul", silu_mul_meta);
  m.impl("rope_store", rope_store_meta);
}
