// nanoseek::q4_linear: y = x @ W.T with W in 4-bit blocks (GGUF Q4_1's grid: w = d * q + m, q in 0..15, one
// fp16 d and m per 32 inputs) and x rounded to int8 per block of 32 inputs, as llama.cpp's Q4_1 x Q8 dot
// products do. AVX512-VNNI: one vpdpbusd multiplies 64 weight nibbles by 64 int8 activations, so decoding
// one token stays bound by reading the weights (5 bits each), not by unpacking them.
//
// Packed layout (made by nanoseek/engine/q4_kernel.py's `pack`): output rows in panels of 16, and for each
// (panel, block of 32 inputs) 320 contiguous bytes:
//   [0, 256)   nibbles: byte 64 * L + 4 * j + r holds q[row j, input 8 * L + r] (low nibble) and
//              q[row j, input 8 * L + 4 + r] (high nibble), for L in 0..3, j in 0..15, r in 0..3;
//   [256, 288) d of the 16 rows (fp16);
//   [288, 320) m of the 16 rows (fp16).
// A 64-byte load thus gives, masked and shifted, two registers that hold 4 consecutive inputs of each of
// the 16 rows: vpdpbusd against those 4 activations broadcast accumulates one int32 per row.
//
// Each output y[i, n] is computed by the same sequence of operations whatever the number of rows and
// threads, so a request's logits do not depend on the batch it runs in.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kBlock = 32;        // inputs per block (Q4_1's)
constexpr int64_t kPanel = 16;        // output rows per panel: one zmm of int32 / fp32
constexpr int64_t kPanelBytes = 320;  // per (panel, block)
constexpr int64_t kRowTile = 4;       // activation rows that share one unpacking of a block

bool cpu_has_vnni() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

// x [rows, k] fp32 -> q (int8, per block of 32: round(x * 127 / max|x|), ties to even), d = max|x| / 127,
// and the block's sum of x, which multiplies m: sum_k (d_w q_k + m) x_k = d_w sum_k q_k x_k + m sum_k x_k.
// Vectorized: for one decoding row this runs on one thread while the others wait, in every linear.
#if defined(__x86_64__)
__attribute__((target("avx512f,avx512bw"))) void quantize_row(const float* x, int64_t k, int8_t* q, float* d,
                                                               float* sum) {
  for (int64_t b = 0; b < k / kBlock; ++b) {
    const float* xb = x + b * kBlock;
    const __m512 lo = _mm512_loadu_ps(xb), hi = _mm512_loadu_ps(xb + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    const __m512 scale = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    // the default rounding mode (MXCSR): to nearest, ties to even
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + b * kBlock),
                     _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(lo, scale))));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + b * kBlock + 16),
                     _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(hi, scale))));
    d[b] = amax / 127.f;
    sum[b] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
  }
}

void quantize_rows(const float* x, int64_t rows, int64_t k, int8_t* q, float* d, float* sum) {
  const int64_t blocks = k / kBlock;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) quantize_row(x + i * k, k, q + i * k, d + i * blocks, sum + i * blocks);
  });
}
#endif

#if defined(__x86_64__)
// y[rows, n] for panels [p_begin, p_end): for each panel, tiles of up to 4 activation rows share each
// block's unpacked nibbles (the weights are read from memory once per panel and from L1 per extra tile).
__attribute__((target("avx512f,avx512bw,avx512vnni,f16c,fma"))) void q4_panels(
    const uint8_t* packed, const int8_t* xq, const float* xd, const float* xs, float* y, int64_t rows, int64_t k,
    int64_t n, int64_t p_begin, int64_t p_end) {
  const int64_t blocks = k / kBlock;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int64_t p = p_begin; p < p_end; ++p) {
    const uint8_t* panel = packed + p * blocks * kPanelBytes;
    const int64_t valid = std::min<int64_t>(kPanel, n - p * kPanel);
    const __mmask16 store_mask = static_cast<__mmask16>((1u << valid) - 1u);
    for (int64_t i0 = 0; i0 < rows; i0 += kRowTile) {
      const int64_t tile = std::min<int64_t>(kRowTile, rows - i0);
      __m512 acc[kRowTile];
      for (int64_t t = 0; t < kRowTile; ++t) acc[t] = _mm512_setzero_ps();
      for (int64_t b = 0; b < blocks; ++b) {
        const uint8_t* blk = panel + b * kPanelBytes;
        __m512i w[8];
        for (int L = 0; L < 4; ++L) {
          const __m512i v = _mm512_loadu_si512(blk + 64 * L);
          w[2 * L] = _mm512_and_si512(v, low4);
          w[2 * L + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        }
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 256)));
        const __m512 mw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 288)));
        for (int64_t t = 0; t < tile; ++t) {
          const int64_t i = i0 + t;
          const int8_t* xb = xq + i * k + b * kBlock;
          int32_t x4[8];
          std::memcpy(x4, xb, sizeof(x4));
          // two independent chains halve the dependency on vpdpbusd's latency
          __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
          for (int u = 0; u < 8; u += 2) {
            s0 = _mm512_dpbusd_epi32(s0, w[u], _mm512_set1_epi32(x4[u]));
            s1 = _mm512_dpbusd_epi32(s1, w[u + 1], _mm512_set1_epi32(x4[u + 1]));
          }
          const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
          acc[t] = _mm512_fmadd_ps(dot, _mm512_mul_ps(dw, _mm512_set1_ps(xd[i * blocks + b])), acc[t]);
          acc[t] = _mm512_fmadd_ps(mw, _mm512_set1_ps(xs[i * blocks + b]), acc[t]);
        }
      }
      for (int64_t t = 0; t < tile; ++t) _mm512_mask_storeu_ps(y + (i0 + t) * n + p * kPanel, store_mask, acc[t]);
    }
  }
}
#endif

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& packed, int64_t out_features) {
  TORCH_CHECK(cpu_has_vnni(), "nanoseek::q4_linear needs a CPU with AVX512-VNNI");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "q4_linear: x must be a 2-d fp32 tensor");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.size(2) == kPanelBytes,
              "q4_linear: packed must be [panels, blocks, 320] uint8");
  const int64_t rows = x.size(0), k = x.size(1), blocks = packed.size(1), panels = packed.size(0);
  TORCH_CHECK(k == blocks * kBlock, "q4_linear: x has ", k, " inputs, the weight ", blocks * kBlock);
  TORCH_CHECK(out_features > (panels - 1) * kPanel && out_features <= panels * kPanel,
              "q4_linear: ", out_features, " outputs do not fit ", panels, " panels");
  const at::Tensor xc = x.contiguous();
  const at::Tensor pc = packed.contiguous();
  at::Tensor y = at::empty({rows, out_features}, x.options());
  if (rows == 0) return y;
#if defined(__x86_64__)
  // one workspace for the quantized activations: their scales and sums (fp32), then the int8 values
  at::Tensor work = at::empty({rows * blocks * 2 * 4 + rows * k}, x.options().dtype(at::kByte));
  float* d = reinterpret_cast<float*>(work.data_ptr<uint8_t>());
  float* s = d + rows * blocks;
  int8_t* q = reinterpret_cast<int8_t*>(s + rows * blocks);
  quantize_rows(xc.data_ptr<float>(), rows, k, q, d, s);
  const uint8_t* w = pc.data_ptr<uint8_t>();
  float* out = y.data_ptr<float>();
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    q4_panels(w, q, d, s, out, rows, k, out_features, begin, end);
  });
#endif
  return y;
}

// Symbolic sizes: torch.compile traces the decode step once for any number of rows (a concrete size(0)
// here would specialize the graph on it, and each new batch size would compile again).
at::Tensor q4_linear_meta(const at::Tensor& x, const at::Tensor& packed, int64_t out_features) {
  return at::empty_symint({x.sym_size(0), c10::SymInt(out_features)}, x.options());
}

bool q4_supported() { return cpu_has_vnni(); }

}  // namespace

TORCH_LIBRARY(nanoseek, m) {
  m.def("q4_linear(Tensor x, Tensor packed, int out_features) -> Tensor");
  m.def("q4_supported() -> bool", &q4_supported);
}

TORCH_LIBRARY_IMPL(nanoseek, CPU, m) { m.impl("q4_linear", q4_linear); }
TORCH_LIBRARY_IMPL(nanoseek, Meta, m) { m.impl("q4_linear", q4_linear_meta); }
