"""A dense model's decoder layers in one native op for eager inference on CPU (native/csrc/dense_stack.cpp).

With the fused ops (engine/fused_ops.py) and the paged attention kernel, an eager decode layer of a Llama-style
model is ~10 native ops; on the 2-core CPU, SmolLM2-135M int4's 30 layers still spent ~1.5 ms of a ~10 ms token
in Python between them (module calls, getattr checks, argument parsing). `DenseStack` hands the whole stack to
one op that calls the same ops in the same order from C++, so its numbers are the module path's bit for bit
(tests/test_layer_stack.py), and the module path stays what training, torch.compile and every other model run.

It applies where every layer is Llama-shaped (pre-norms, no soft-capping, no q/k norms, no sandwich norms), its
projections fused (q/k/v, gate/up: quant.fuse_projections) and each one 4-bit panels, Q8_0 blocks or fp32, the
norms and SiLU on the fused kernels, and no LoRA adapters: Llama/SmolLM2, Qwen2, Mistral. `DenseStack.of`
returns None elsewhere, and the model runs its layers itself.
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek import native

KERNEL = native.Kernel("dense_stack.cpp", "the dense layer stack")

Q4, Q8_BLOCKS, FP32 = 0, 1, 2  # how a projection runs (dense_stack.cpp's kinds)


def _projection(module: nn.Module) -> tuple[int, torch.Tensor, int, torch.Tensor | None] | None:
    """(kind, weight, out_features, bias) of a projection the op runs, or None."""
    from nanoseek.quant import Int4Linear, Int8BlockLinear

    if type(module) is Int4Linear:
        return Q4, module.packed, module.out_features, module.bias
    if type(module) is Int8BlockLinear:
        return Q8_BLOCKS, module.packed, module.out_features, module.bias
    if type(module) is nn.Linear and module.weight.dtype == torch.float32:
        return FP32, module.weight, module.out_features, module.bias
    return None


class DenseStack:
    """Runs `model`'s decoder layers through nanoseek::dense_stack; built by `of`."""

    def __init__(self, model, projections: list, norms: list[torch.Tensor]):
        cfg = model.config
        attn = model.model.layers[0].self_attn
        self.layer_types = list(cfg.layer_types)
        self.windows = [layer.self_attn.window for layer in model.model.layers]
        self.norms = norms
        self.kinds = [p[0] for p in projections]
        self.weights = [p[1] for p in projections]
        self.out_features = [p[2] for p in projections]
        self.biases = [p[3] for p in projections]
        norm = model.model.layers[0].input_layernorm
        self.eps, self.offset = float(norm.eps), float(norm.offset)
        self.heads, self.kv_heads, self.scale = attn.n_heads, attn.n_kv, float(attn.scale)

    @classmethod
    def of(cls, model) -> DenseStack | None:
        """The stack for a dense model whose every layer it can run (see the module docstring), else None."""
        from nanoseek.model.dense import DenseDecoderLayer, DenseForCausalLM

        if not isinstance(model, DenseForCausalLM) or getattr(model, "lora_adapters", None) is not None:
            return None
        projections, norms, norm_settings = [], [], set()
        for layer in model.model.layers:
            if type(layer) is not DenseDecoderLayer or layer.sandwich:
                return None
            attn, mlp = layer.self_attn, layer.mlp
            if attn.softcap is not None or attn.qk_norm or mlp.inference_act_mul is None:
                return None
            parts = [_projection(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
            if any(p is None for p in parts):
                return None
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                if norm.inference_kernel is None:
                    return None
                norm_settings.add((norm.eps, norm.offset))
                norms.append(norm.weight)
            projections += parts
        if len(norm_settings) != 1 or not KERNEL.available():
            return None
        return cls(model, projections, norms)

    def __call__(self, h: torch.Tensor, per_type: dict, cache) -> torch.Tensor:
        """h [B, T, d] through every layer, reading and writing the paged view `cache` as each layer's
        attend_qkv would; per_type: layer type -> (cos, sin, ...) as the model computed them."""
        B, T, _ = h.shape
        k_stores, v_stores, writes, reads, masks = [], [], [], [], []
        for layer, (group, slot) in enumerate(cache.slot_of):
            read, mask = cache.kernel_inputs(layer, self.windows[layer], B * T)  # as attend_qkv's kernel reads
            k_stores.append(cache.tensors["k"][slot])
            v_stores.append(cache.tensors["v"][slot])
            writes.append(cache.write_slots[group])
            reads.append(read)
            masks.append(mask)
        cos = [per_type[kind][0] for kind in self.layer_types]
        sin = [per_type[kind][1] for kind in self.layer_types]
        return torch.ops.nanoseek.dense_stack(
            h, self.norms, self.weights, self.kinds, self.out_features, self.biases, self.eps, self.offset,
            cos, sin, k_stores, v_stores, writes, reads, masks, self.heads, self.kv_heads, self.scale,
        )  # fmt: skip
