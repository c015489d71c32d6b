"""Multi-token prediction (DeepSeek-V3 §2.2).

Depth k's module combines the previous depth's hidden state h (the main model's final-normed hidden
state for k = 1) with the embedding of token t+k, runs one full transformer block, and the shared
output head predicts token t+k+1:

    h'_k = Block_k( eh_proj([enorm(emb(t+k)) ; hnorm(h_{k-1})]) )     logits_k = head(norm_k(h'_k))

HF/DeepSeek checkpoints store module k as layer `num_hidden_layers + k - 1` with keys enorm, hnorm,
eh_proj, shared_head.norm plus the block's usual weights (see weights/deepseek_v3_hf.py).
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.model.config import DeepseekV3Config
from nanoseek.model.norm import RMSNorm


class MTPModule(nn.Module):
    def __init__(self, cfg: DeepseekV3Config, layer_idx: int, block: nn.Module):
        super().__init__()
        self.layer_idx = layer_idx
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.block = block
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # HF: shared_head.norm

    def forward(
        self, h_prev: torch.Tensor, emb_next: torch.Tensor, cos, sin, mask, aux=None, token_mask=None, cache=None
    ) -> torch.Tensor:
        """cache: None in training; the engine's paged view when drafting (the block's attention then keeps
        its own keys in the cache's layer `layer_idx`)."""
        x = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))
        return self.block(x, cos, sin, mask, cache, aux, token_mask)


def shift_left(x: torch.Tensor, k: int, fill: int) -> torch.Tensor:
    """x[:, t] <- x[:, t+k]; the last k positions get `fill` (they have no token k steps ahead)."""
    out = torch.roll(x, shifts=-k, dims=1)
    out[:, -k:] = fill
    return out
