// nanoseek::q4_linear: y = x @ W.T with W in 4-bit blocks (GGUF Q4_1's grid: w = d * q + m, q in 0..15, one
// fp16 d and m per 32 inputs) and x rounded to int8 per block of 32 inputs, as llama.cpp's Q4_1 x Q8 dot
// products do. Two code paths, picked at run time by what the CPU has:
// - AVX512-VNNI: one vpdpbusd multiplies 64 weight nibbles by 64 int8 activations, so decoding one token
//   stays bound by reading the weights (5 bits each), not by unpacking them;
// - AVX2 (with FMA and F16C: every AVX2 CPU from 2013 on): vpmaddubsw multiplies 32 nibbles by 32 int8
//   activations into 16-bit pair sums, as llama.cpp's AVX2 code does. The 16-bit sums of one block cannot
//   overflow (16 products of |q| <= 15 and |x| <= 127: at most 30,480), so the integer dot products, and
//   then every floating-point operation, are the AVX512 path's: both give the same bits.
//
// Packed layout (made by nanoseek/engine/q4_kernel.py's `pack`): output rows in panels of 16, and for each
// (panel, block of 32 inputs) 320 contiguous bytes:
//   [0, 256)   nibbles: byte 64 * L + 4 * j + r holds q[row j, input 8 * L + r] (low nibble) and
//              q[row j, input 8 * L + 4 + r] (high nibble), for L in 0..3, j in 0..15, r in 0..3;
//   [256, 288) d of the 16 rows (fp16);
//   [288, 320) m of the 16 rows (fp16).
// A 64-byte load thus gives, masked and shifted, two registers that hold 4 consecutive inputs of each of
// the 16 rows: vpdpbusd against those 4 activations broadcast accumulates one int32 per row. AVX2 reads the
// same bytes as two 32-byte halves (rows 0-7, rows 8-15).
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
#include <optional>
#include <string>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kBlock = 32;        // inputs per block (Q4_1's)
constexpr int64_t kPanel = 16;        // output rows per panel: one zmm of int32 / fp32
constexpr int64_t kPanelBytes = 320;  // per (panel, block)
constexpr int64_t kRowTile = 4;       // activation rows that share one unpacking of a block
// Blocks ahead to prefetch: the hardware prefetcher alone left one-row products (decoding) ~25% short of
// this (measured on SmolLM2's shapes, weights from memory: 2, 4, 8 and 16 blocks ahead; 8 was best). A setting
// (q4_use_prefetch) so that benchmarks/int4_kernels.py --prefetch-blocks can measure other distances; 0: none.
constexpr int64_t kDefaultPrefetchBlocks = 8;
int64_t g_prefetch_blocks = kDefaultPrefetchBlocks;

enum class Isa { kNone, kAvx2, kAvx512Vnni };

const char* isa_name(Isa isa) {
  return isa == Isa::kAvx512Vnni ? "avx512vnni" : isa == Isa::kAvx2 ? "avx2" : "none";
}

Isa best_isa() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vnni"))
    return Isa::kAvx512Vnni;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::kAvx2;
#endif
  return Isa::kNone;
}

// The code path q4_linear takes: the best this CPU has, unless q4_use_isa picked another (tests and
// benchmarks run the AVX2 path on a CPU with AVX512 this way).
Isa g_isa = best_isa();

#if defined(__x86_64__)
// The 5 cache lines of the block g_prefetch_blocks after `blk` (the panels lie one after another, so near a
// panel's end this prefetches the next panel's first blocks; past the end of the weights it is a no-op).
__attribute__((always_inline)) inline void prefetch_ahead(const uint8_t* blk) {
  if (g_prefetch_blocks == 0) return;
  const char* ahead = reinterpret_cast<const char*>(blk + g_prefetch_blocks * kPanelBytes);
  for (int64_t line = 0; line < kPanelBytes; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
}

// The sum of 8 int32 (exact, so in any order).
__attribute__((target("avx2"))) inline int32_t sum8_epi32(__m256i v) {
  const __m128i t = _mm_add_epi32(_mm256_extracti128_si256(v, 1), _mm256_castsi256_si128(v));
  const __m128i u = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(u, _mm_shuffle_epi32(u, 0xB1)));
}

// x [rows, k] fp32 -> q (int8, per block of 32: round(x * 127 / max|x|), ties to even), d = max|x| / 127,
// and the block's sum of the ROUNDED activations, d * sum_k q_k, which multiplies m: the kernel computes
// sum_k (d_w q_k + m) (d x_q,k) = d_w d sum_k q_k x_q,k + m d sum_k x_q,k, the weight times the rounded
// activations, as llama.cpp's Q8_1 blocks do (their s = d * sum q). The sum of the unrounded x instead would
// leave the rounding error multiplied by d_w q_k alone, which is not centred (q in 0..15; m ~ -8 d_w): on
// SmolLM2's Q4_1 linears it doubled each product's relative error (0.5% -> 1.1% on random inputs) and
// held int4's mean KL to the file's model at 0.0187 instead of 0.0074 (benchmarks/RESULTS.md, "Quality at
// equal bits": one chunk, lm_head still int8 rows in both).
// Vectorized: for one decoding row this runs on one thread while the others wait, in every linear.
__attribute__((target("avx512f,avx512bw"))) void quantize_row_avx512(const float* x, int64_t k, int8_t* q,
                                                                      float* d, float* sum) {
  for (int64_t b = 0; b < k / kBlock; ++b) {
    const float* xb = x + b * kBlock;
    const __m512 lo = _mm512_loadu_ps(xb), hi = _mm512_loadu_ps(xb + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    const __m512 scale = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    // the default rounding mode (MXCSR): to nearest, ties to even
    const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, scale));
    const __m512i qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, scale));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + b * kBlock), _mm512_cvtepi32_epi8(qlo));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + b * kBlock + 16), _mm512_cvtepi32_epi8(qhi));
    d[b] = amax / 127.f;
    sum[b] = d[b] * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi)));
  }
}

__attribute__((target("avx2,fma"))) void quantize_row_avx2(const float* x, int64_t k, int8_t* q, float* d,
                                                            float* sum) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the packs' lane interleaving
  for (int64_t b = 0; b < k / kBlock; ++b) {
    const float* xb = x + b * kBlock;
    __m256 a[4];
    for (int j = 0; j < 4; ++j) a[j] = _mm256_loadu_ps(xb + 8 * j);
    __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, a[0]), _mm256_andnot_ps(sign, a[1])),
                             _mm256_max_ps(_mm256_andnot_ps(sign, a[2]), _mm256_andnot_ps(sign, a[3])));
    __m128 m4 = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    const float amax = std::max(_mm_cvtss_f32(m4), _mm_cvtss_f32(_mm_shuffle_ps(m4, m4, 1)));
    const __m256 scale = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    __m256i i[4];
    for (int j = 0; j < 4; ++j) i[j] = _mm256_cvtps_epi32(_mm256_mul_ps(a[j], scale));  // ties to even
    // the values lie in [-127, 127]: the saturating packs keep them
    const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * kBlock), _mm256_permutevar8x32_epi32(packed, order));
    d[b] = amax / 127.f;
    // an exact integer sum, then the AVX512 path's one multiplication: the same bits
    const __m256i qsum = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
    sum[b] = d[b] * static_cast<float>(sum8_epi32(qsum));
  }
}

void quantize_rows(Isa isa, const float* x, int64_t rows, int64_t k, int8_t* q, float* d, float* sum) {
  const int64_t blocks = k / kBlock;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (isa == Isa::kAvx512Vnni) {
        quantize_row_avx512(x + i * k, k, q + i * k, d + i * blocks, sum + i * blocks);
      } else {
        quantize_row_avx2(x + i * k, k, q + i * k, d + i * blocks, sum + i * blocks);
      }
    }
  });
}

// y[rows, n] for panels [p_begin, p_end): for each panel, tiles of up to 4 activation rows share each
// block's unpacked nibbles (the weights are read from memory once per panel and from L1 per extra tile).
__attribute__((target("avx512f,avx512bw,avx512vnni,f16c,fma"))) void q4_panels_avx512(
    const uint8_t* packed, const int8_t* xq, const float* xd, const float* xs, const float* bias, float* y,
    int64_t rows, int64_t k, int64_t n, int64_t p_begin, int64_t p_end) {
  const int64_t blocks = k / kBlock;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int64_t p = p_begin; p < p_end; ++p) {
    const uint8_t* panel = packed + p * blocks * kPanelBytes;
    const int64_t valid = std::min<int64_t>(kPanel, n - p * kPanel);
    const __mmask16 store_mask = static_cast<__mmask16>((1u << valid) - 1u);
    const __m512 b_out = bias ? _mm512_maskz_loadu_ps(store_mask, bias + p * kPanel) : _mm512_setzero_ps();
    for (int64_t i0 = 0; i0 < rows; i0 += kRowTile) {
      const int64_t tile = std::min<int64_t>(kRowTile, rows - i0);
      __m512 acc[kRowTile];
      for (int64_t t = 0; t < kRowTile; ++t) acc[t] = _mm512_setzero_ps();
      for (int64_t b = 0; b < blocks; ++b) {
        const uint8_t* blk = panel + b * kPanelBytes;
        prefetch_ahead(blk);
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
      for (int64_t t = 0; t < tile; ++t) {
        // + bias as a separate rounding, as `out + bias` after the matmul would add it
        const __m512 out = bias ? _mm512_add_ps(acc[t], b_out) : acc[t];
        _mm512_mask_storeu_ps(y + (i0 + t) * n + p * kPanel, store_mask, out);
      }
    }
  }
}

// The same with 256-bit registers: each panel as two halves of 8 rows, the second half's bytes read from L1
// (a panel of SmolLM2's widest input, 1536, is 15 KB). Rows rows [i0, i0 + T) of y for one half panel: each
// 32-byte load of nibbles is unpacked once and multiplied by T rows' activations (a template, so that the
// T accumulators stay in registers).
template <int T>
__attribute__((target("avx2,fma,f16c"))) inline void q4_half_panel_avx2(const uint8_t* panel, int64_t half,
                                                                         const int8_t* xq, const float* xd,
                                                                         const float* xs, const float* bias,
                                                                         float* y, int64_t i0, int64_t blocks,
                                                                         int64_t n, __m256i store_mask) {
  const int64_t k = blocks * kBlock;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* blk = panel + b * kPanelBytes;
    if (half == 0) prefetch_ahead(blk);  // the second half reads the panel from L1
    // 16-bit pair sums, added in 16 bits (no overflow: see the top of the file), then to 32 bits
    __m256i s[T];
    for (int t = 0; t < T; ++t) s[t] = _mm256_setzero_si256();
    for (int L = 0; L < 4; ++L) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 64 * L + 32 * half));
      const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
      for (int t = 0; t < T; ++t) {
        int32_t x2[2];
        std::memcpy(x2, xq + (i0 + t) * k + b * kBlock + 8 * L, sizeof(x2));
        s[t] = _mm256_add_epi16(s[t], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(x2[0])));
        s[t] = _mm256_add_epi16(s[t], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(x2[1])));
      }
    }
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 256 + 16 * half)));
    const __m256 mw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 288 + 16 * half)));
    for (int t = 0; t < T; ++t) {
      const int64_t i = i0 + t;
      const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(s[t], ones));
      acc[t] = _mm256_fmadd_ps(dot, _mm256_mul_ps(dw, _mm256_set1_ps(xd[i * blocks + b])), acc[t]);
      acc[t] = _mm256_fmadd_ps(mw, _mm256_set1_ps(xs[i * blocks + b]), acc[t]);
    }
  }
  const __m256 b_out = bias ? _mm256_maskload_ps(bias + 8 * half, store_mask) : _mm256_setzero_ps();
  for (int t = 0; t < T; ++t) {
    _mm256_maskstore_ps(y + (i0 + t) * n + 8 * half, store_mask, bias ? _mm256_add_ps(acc[t], b_out) : acc[t]);
  }
}

__attribute__((target("avx2,fma,f16c"))) void q4_panels_avx2(const uint8_t* packed, const int8_t* xq,
                                                              const float* xd, const float* xs, const float* bias,
                                                              float* y, int64_t rows, int64_t k, int64_t n,
                                                              int64_t p_begin, int64_t p_end) {
  const int64_t blocks = k / kBlock;
  for (int64_t p = p_begin; p < p_end; ++p) {
    const uint8_t* panel = packed + p * blocks * kPanelBytes;
    float* yp = y + p * kPanel;
    const float* bp = bias ? bias + p * kPanel : nullptr;
    for (int64_t half = 0; half < 2; ++half) {
      const int64_t valid = std::min<int64_t>(8, n - p * kPanel - 8 * half);
      if (valid <= 0) break;
      const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(valid)),
                                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
      int64_t i0 = 0;
      for (; i0 + kRowTile <= rows; i0 += kRowTile) {
        q4_half_panel_avx2<kRowTile>(panel, half, xq, xd, xs, bp, yp, i0, blocks, n, mask);
      }
      switch (rows - i0) {
        case 3: q4_half_panel_avx2<3>(panel, half, xq, xd, xs, bp, yp, i0, blocks, n, mask); break;
        case 2: q4_half_panel_avx2<2>(panel, half, xq, xd, xs, bp, yp, i0, blocks, n, mask); break;
        case 1: q4_half_panel_avx2<1>(panel, half, xq, xd, xs, bp, yp, i0, blocks, n, mask); break;
        default: break;
      }
    }
  }
}
#endif

// x [..., k] (fp32, or converted to it) -> [..., out_features] fp32, + bias [out_features] when given.
at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                     const std::optional<at::Tensor>& bias) {
  const Isa isa = g_isa;
  TORCH_CHECK(isa != Isa::kNone, "nanoseek::q4_linear needs a CPU with AVX2, FMA and F16C");
  TORCH_CHECK(x.dim() >= 1 && at::isFloatingType(x.scalar_type()), "q4_linear: x must be a floating-point tensor");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.size(2) == kPanelBytes,
              "q4_linear: packed must be [panels, blocks, 320] uint8");
  const int64_t k = x.size(-1), blocks = packed.size(1), panels = packed.size(0);
  TORCH_CHECK(k == blocks * kBlock, "q4_linear: x has ", k, " inputs, the weight ", blocks * kBlock);
  TORCH_CHECK(out_features > (panels - 1) * kPanel && out_features <= panels * kPanel,
              "q4_linear: ", out_features, " outputs do not fit ", panels, " panels");
  const float* bias_ptr = nullptr;
  at::Tensor bias_c;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features && bias->scalar_type() == at::kFloat,
                "q4_linear: bias must be [", out_features, "] fp32");
    bias_c = bias->contiguous();
    bias_ptr = bias_c.data_ptr<float>();
  }
  const at::Tensor xc = x.to(at::kFloat).contiguous();
  const int64_t rows = xc.numel() / k;
  std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end());
  out_sizes.back() = out_features;
  const at::Tensor pc = packed.contiguous();
  at::Tensor y = at::empty(out_sizes, xc.options());
  if (rows == 0) return y;
#if defined(__x86_64__)
  // one workspace for the quantized activations: their scales and sums (fp32), then the int8 values
  at::Tensor work = at::empty({rows * blocks * 2 * 4 + rows * k}, xc.options().dtype(at::kByte));
  float* d = reinterpret_cast<float*>(work.data_ptr<uint8_t>());
  float* s = d + rows * blocks;
  int8_t* q = reinterpret_cast<int8_t*>(s + rows * blocks);
  quantize_rows(isa, xc.data_ptr<float>(), rows, k, q, d, s);
  const uint8_t* w = pc.data_ptr<uint8_t>();
  float* out = y.data_ptr<float>();
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    if (isa == Isa::kAvx512Vnni) {
      q4_panels_avx512(w, q, d, s, bias_ptr, out, rows, k, out_features, begin, end);
    } else {
      q4_panels_avx2(w, q, d, s, bias_ptr, out, rows, k, out_features, begin, end);
    }
  });
#endif
  return y;
}

// Symbolic sizes: torch.compile traces the decode step once for any number of rows (a concrete size(0)
// here would specialize the graph on it, and each new batch size would compile again).
at::Tensor q4_linear_meta(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                          const std::optional<at::Tensor>& bias) {
  std::vector<c10::SymInt> sizes(x.sym_sizes().begin(), x.sym_sizes().end());
  sizes.back() = c10::SymInt(out_features);
  return at::empty_symint(sizes, x.options().dtype(at::kFloat));
}

std::string q4_isa() { return isa_name(g_isa); }

// Picks the code path ("avx512vnni" or "avx2", one this CPU has) and returns the one it replaces.
std::string q4_use_isa(const std::string& name) {
  const Isa best = best_isa();
  Isa wanted = Isa::kNone;
  if (name == "avx512vnni") wanted = Isa::kAvx512Vnni;
  if (name == "avx2") wanted = Isa::kAvx2;
  TORCH_CHECK(wanted != Isa::kNone, "q4_use_isa: unknown code path '", name, "'; choose avx512vnni or avx2");
  TORCH_CHECK(best != Isa::kNone && (wanted == Isa::kAvx2 || best == Isa::kAvx512Vnni),
              "q4_use_isa: this CPU cannot run the ", name, " path (its best: ", isa_name(best), ")");
  const std::string previous = isa_name(g_isa);
  g_isa = wanted;
  return previous;
}

// Sets how many blocks ahead the kernel prefetches its weights (0: none) and returns the previous distance.
int64_t q4_use_prefetch(int64_t blocks) {
  TORCH_CHECK(blocks >= 0 && blocks <= 64, "q4_use_prefetch: blocks ahead must be in 0..64, got ", blocks);
  const int64_t previous = g_prefetch_blocks;
  g_prefetch_blocks = blocks;
  return previous;
}

}  // namespace

TORCH_LIBRARY(nanoseek, m) {
  m.def("q4_linear(Tensor x, Tensor packed, int out_features, Tensor? bias=None) -> Tensor");
  m.def("q4_isa() -> str", &q4_isa);
  m.def("q4_use_isa(str name) -> str", &q4_use_isa);
  m.def("q4_use_prefetch(int blocks) -> int", &q4_use_prefetch);
}

TORCH_LIBRARY_IMPL(nanoseek, CPU, m) { m.impl("q4_linear", q4_linear); }
TORCH_LIBRARY_IMPL(nanoseek, Meta, m) { m.impl("q4_linear", q4_linear_meta); }
