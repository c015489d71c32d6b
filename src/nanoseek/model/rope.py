"""Rotary position embeddings: inverse frequencies for default / linear / llama3 / YaRN scaling, and
the two layouts (rotate-half, and DeepSeek's interleaved pairs).

Formulas follow transformers' `modeling_rope_utils` so logits match it; see REFERENCE §1 for YaRN.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def rope_inv_freq(
    dim: int, theta: float, scaling: dict[str, Any] | None = None, max_position_embeddings: int | None = None
) -> tuple[torch.Tensor, float]:
    """Return (inv_freq [dim/2], attention_factor applied to cos/sin), on the CPU whatever the default device:
    a model built on the meta device recomputes them once loaded, and this math on meta tensors would import
    torch._dynamo (~70 MB of RSS) through torch's Python decompositions."""
    with torch.device("cpu"):
        return _rope_inv_freq(dim, theta, scaling, max_position_embeddings)


def _rope_inv_freq(dim, theta, scaling, max_position_embeddings) -> tuple[torch.Tensor, float]:
    base_inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if not scaling or kind == "default":
        return base_inv, 1.0
    if kind == "linear":
        return base_inv / float(scaling["factor"]), 1.0
    if kind == "llama3":
        return _llama3_inv_freq(base_inv, scaling), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(dim, theta, scaling, max_position_embeddings)
    raise ValueError(f"rope scaling type {kind!r} is not supported (default, linear, llama3, yarn)")


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    factor = float(s["factor"])
    low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old_len = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction for a context stretched `scale` times (1 when not stretched)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_softmax_scale_factor(scaling: dict[str, Any] | None) -> float:
    """What DeepSeek (and transformers' DeepseekV2/V3 attention) multiplies the softmax scale by under YaRN:
    mscale(factor, mscale_all_dim)^2, or 1 without YaRN or without `mscale_all_dim`.

    The cos/sin attention factor is the ratio mscale(factor, mscale) / mscale(factor, mscale_all_dim)
    (see `_yarn_inv_freq`); with mscale == mscale_all_dim, as in DeepSeek-V3, it is 1 and only this
    factor remains."""
    if not scaling or scaling.get("rope_type", scaling.get("type", "default")) == "default":
        return 1.0
    mscale_all_dim = scaling.get("mscale_all_dim", 0)
    if not mscale_all_dim:
        return 1.0
    m = yarn_get_mscale(float(scaling["factor"]), float(mscale_all_dim))
    return m * m


def _yarn_inv_freq(dim: int, theta: float, s: dict[str, Any], max_pos: int | None) -> tuple[torch.Tensor, float]:
    orig = s.get("original_max_position_embeddings") or max_pos
    factor = s.get("factor")
    if factor is None:
        factor = max_pos / orig
    factor = float(factor)
    attention_factor = s.get("attention_factor")
    mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_get_mscale(factor)
    beta_fast = s.get("beta_fast") or 32
    beta_slow = s.get("beta_slow") or 1

    def correction_dim(n_rot: float) -> float:
        return (dim * math.log(orig / (n_rot * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation_weight = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (1.0 / pos_freqs) * extrapolation_weight
    return inv_freq, float(attention_factor)


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, attention_factor: float = 1.0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [*positions.shape, dim/2] (half width: one angle per rotated pair)."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)
    return (freqs.cos() * attention_factor).to(dtype), (freqs.sin() * attention_factor).to(dtype)


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half layout (Llama/HF): pairs are (i, i + d/2). x [..., T, d], cos/sin [..., T, d/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """DeepSeek's interleaved pairs (2i, 2i+1); the output is de-interleaved ([evens | odds] rotated),
    exactly as transformers returns it. Queries and keys both go through this, so dot products agree."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
