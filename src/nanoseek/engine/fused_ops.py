"""Fused ops for eager inference on CPU (native/csrc/fused_ops.cpp): RMSNorm in one op, SiLU(gate) * up in one op, and
the rotary embedding of q and k together with the cache write of k and v.

An eager SmolLM2 decode step ran ~70 aten ops per layer, most on a few hundred floats, each costing
microseconds of dispatch: torch's RMSNorm is ~10 of them (17 us for one 576-wide row, twice a layer), the
rotary embedding of q and k 16, the cache write 6, the MLP's activation 3. The engine installs these where it
runs a model eagerly on CPU in fp32 (`install`); training never sees them (they are taken only without
gradients), and torch.compile traces the unfused ops, which inductor fuses with their neighbours itself.

The rotary embedding is apply_rope_half's arithmetic in the same order, built without fused multiply-adds, so
its bits equal the unfused path's: a token's key is the same whether a prompt chunk (unfused) or a decode step
(fused) wrote it. The norm's sum of squares is reduced in another order than torch's (last-bit differences).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek import native

# AVX2 + FMA for the norm's explicit vector sum, F16C to write fp16 caches; -ffp-contract=off keeps the rotation's
# a*c - b*s two rounded products, as torch computes them (a fused multiply-add would change the last bit)
FLAGS = ("-mavx2", "-mfma", "-mf16c", "-ffp-contract=off")
KERNEL = native.Kernel("fused_ops.cpp", "the fused ops library", FLAGS)
unavailable_reason, available = KERNEL.unavailable_reason, KERNEL.available


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * (offset + weight) over x's last dimension (fp32, CPU)."""
    return torch.ops.nanoseek.rms_norm(x, weight, eps, offset)


def rope_store(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_store: torch.Tensor,
    v_store: torch.Tensor,
    write_slots: torch.Tensor,
    heads: int,
    kv_heads: int,
) -> torch.Tensor:
    """qkv [N, (heads + 2 kv_heads) * D] (a fused q/k/v projection's output), cos/sin [N, D/2]: rotates q and k
    (rotate-half layout), writes row n's k and v into the stores [slots, kv_heads, D] at write_slots[n], and
    returns the rotated q [N, heads, D]. Leading dimensions are flattened by count (qkv [B, T, X], cos/sin
    [B, 1, T, D/2] and write_slots [B, T] as the model and the cache view hold them)."""
    return torch.ops.nanoseek.rope_store(qkv, cos, sin, k_store, v_store, write_slots, heads, kv_heads)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [..., 2I] = [gate | up] -> [..., I] (fp32, CPU)."""
    return torch.ops.nanoseek.silu_mul(gate_up)


def install(model: nn.Module) -> bool:
    """Give the model's RMSNorms, and its SiLU MLPs with fused gate/up projections, the fused kernels (used only
    in eager fp32 CPU inference: model/norm.inference_kernel_applies). False, changing nothing, where the ops
    cannot be built."""
    from nanoseek.model.dense import DenseMLP
    from nanoseek.model.norm import RMSNorm

    if not available():
        return False
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.inference_kernel = rms_norm
        elif isinstance(module, DenseMLP) and module.act is F.silu:
            module.inference_act_mul = silu_mul
    return True
