// Every decoder layer of a dense (Llama-style) model in one op, for eager inference on CPU (engine/layer_stack.py).
//
// An eager SmolLM2-135M decode step spent ~1.5 ms of its ~10 ms in Python between the layers' ~10 native ops
// (module calls, argument parsing, dispatch from Python: 30 layers x 10 ops). This op runs the same ops in the
// same order from C++, through the dispatcher, so the numbers are the module path's bit for bit:
//
//   x = rms_norm(h);  qkv = linear(x);  q = rope_store(qkv, cos, sin -> k/v stores);
//   h = h + linear(paged_attention(q));  h = h + linear(silu_mul(linear(rms_norm(h))))
//
// nanoseek::dense_stack(h [B, T, d], norms [2L], weights [4L], kinds [4L], out_features [4L], biases [4L],
//                       eps, offset, cos [L], sin [L], k_stores [L], v_stores [L], write_slots [L],
//                       read_slots [L], masks [L], heads, kv_heads, scale) -> h [B, T, d]
//   Layer l's projections are weights[4l .. 4l+3]: q/k/v fused, o, gate/up fused, down. A projection's kind says
//   how it runs: 0 nanoseek::q4_linear on its packed 4-bit panels, 1 the same over [x | x] (Q8_0 blocks as two
//   4-bit planes: quant.Int8BlockLinear), 2 a plain fp32 linear. masks[l] is [B*T, S] over read_slots[l] [B, S].

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/add.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/linear.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>

namespace {

using OptTensor = std::optional<at::Tensor>;

// the other nanoseek ops, each found in the dispatcher on its first use (its library is loaded by then: a model
// without 4-bit weights never needs q4_linear's)
template <typename Signature>
c10::TypedOperatorHandle<Signature> find(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& packed, int64_t out_features, const OptTensor& bias) {
  static const auto op = find<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, const OptTensor&)>(
      "nanoseek::q4_linear");
  return op.call(x, packed, out_features, bias);
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, double offset) {
  static const auto op = find<at::Tensor(const at::Tensor&, const at::Tensor&, double, double)>("nanoseek::rms_norm");
  return op.call(x, weight, eps, offset);
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  static const auto op = find<at::Tensor(const at::Tensor&)>("nanoseek::silu_mul");
  return op.call(gate_up);
}

at::Tensor rope_store(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_store,
                      at::Tensor& v_store, const at::Tensor& write_slots, int64_t heads, int64_t kv_heads) {
  static const auto op = find<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&,
                                         at::Tensor&, const at::Tensor&, int64_t, int64_t)>("nanoseek::rope_store");
  return op.call(qkv, cos, sin, k_store, v_store, write_slots, heads, kv_heads);
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_store, const at::Tensor& v_store,
                           const at::Tensor& slots, const at::Tensor& mask, double scale) {
  static const auto op = find<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, double)>("nanoseek::paged_attention");
  return op.call(q, k_store, v_store, slots, mask, scale);
}

at::Tensor project(const at::Tensor& x, const at::Tensor& weight, int64_t kind, int64_t out_features,
                   const OptTensor& bias) {
  if (kind == 0) return q4_linear(x, weight, out_features, bias);
  if (kind == 1) return q4_linear(at::cat({x, x}, -1), weight, out_features, bias);
  return at::linear(x, weight, bias);
}

at::Tensor dense_stack(const at::Tensor& h_in, at::TensorList norms, at::TensorList weights, at::IntArrayRef kinds,
                       at::IntArrayRef out_features, const c10::List<OptTensor>& biases, double eps, double offset,
                       at::TensorList cos, at::TensorList sin, at::TensorList k_stores, at::TensorList v_stores,
                       at::TensorList write_slots, at::TensorList read_slots, at::TensorList masks, int64_t heads,
                       int64_t kv_heads, double scale) {
  const int64_t L = static_cast<int64_t>(k_stores.size());
  TORCH_CHECK(h_in.dim() == 3, "dense_stack: h must be [B, T, d]");
  TORCH_CHECK(static_cast<int64_t>(norms.size()) == 2 * L && static_cast<int64_t>(weights.size()) == 4 * L &&
                  static_cast<int64_t>(kinds.size()) == 4 * L && static_cast<int64_t>(out_features.size()) == 4 * L &&
                  static_cast<int64_t>(biases.size()) == 4 * L,
              "dense_stack: 2 norms and 4 projections a layer");
  TORCH_CHECK(static_cast<int64_t>(cos.size()) == L && static_cast<int64_t>(sin.size()) == L &&
                  static_cast<int64_t>(v_stores.size()) == L && static_cast<int64_t>(write_slots.size()) == L &&
                  static_cast<int64_t>(read_slots.size()) == L && static_cast<int64_t>(masks.size()) == L,
              "dense_stack: one rotary table, store pair, slot set and mask a layer");
  const int64_t B = h_in.size(0), T = h_in.size(1);
  at::Tensor h = h_in;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t p = 4 * l;
    const at::Tensor x = rms_norm(h, norms[2 * l], eps, offset);
    const at::Tensor qkv = project(x, weights[p], kinds[p], out_features[p], biases.get(p));
    at::Tensor k_store = k_stores[l], v_store = v_stores[l];
    const at::Tensor q = rope_store(qkv, cos[l], sin[l], k_store, v_store, write_slots[l], heads, kv_heads);
    const at::Tensor attn = paged_attention(q, k_store, v_store, read_slots[l], masks[l], scale);
    const at::Tensor o = project(attn.view({B, T, heads, -1}).reshape({B, T, -1}), weights[p + 1], kinds[p + 1],
                                 out_features[p + 1], biases.get(p + 1));
    h = at::add(h, o);
    const at::Tensor gate_up = project(rms_norm(h, norms[2 * l + 1], eps, offset), weights[p + 2], kinds[p + 2],
                                       out_features[p + 2], biases.get(p + 2));
    const at::Tensor down = project(silu_mul(gate_up), weights[p + 3], kinds[p + 3], out_features[p + 3],
                                    biases.get(p + 3));
    h = at::add(h, down);
  }
  return h;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nanoseek, m) {
  m.def(
      "dense_stack(Tensor h, Tensor[] norms, Tensor[] weights, int[] kinds, int[] out_features, Tensor?[] biases,"
      " float eps, float offset, Tensor[] cos, Tensor[] sin, Tensor(a!)[] k_stores, Tensor(b!)[] v_stores,"
      " Tensor[] write_slots, Tensor[] read_slots, Tensor[] masks, int heads, int kv_heads, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(nanoseek, CPU, m) { m.impl("dense_stack", dense_stack); }
