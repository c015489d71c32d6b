"""Multi-head Latent Attention (MLA), DeepSeek-V2/V3.

Shapes: B batch, T new tokens, S keys (past + new), H heads, d hidden, r = kv_lora_rank,
dn/dr/dv = qk_nope/qk_rope/v head dims.

Two ways to compute the same attention:
- naive (training, no cache): expand the latent c_kv into per-head keys/values with kv_b_proj and run
  ordinary attention over head dim dn+dr.
- absorbed (inference, with a cache): fold kv_b_proj's key half into the query and its value half into
  the output. Attention then runs over the latent itself, like multi-query attention with head dim
  r+dr, and the cache holds only c_kv [r] and k_pe [dr] per token per layer (V3: 576 values instead
  of the expanded keys and values, H*(dn+dr) + H*dv = 128*192 + 128*128 = 40,960). That is the memory
  win that makes long contexts cheap.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.config import DeepseekV3Config
from nanoseek.model.fused import FusedWeight
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import apply_rope_half, apply_rope_interleaved


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, cfg: DeepseekV3Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.num_attention_heads
        self.dn, self.dr, self.dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.scale = cfg.softmax_scale
        self.rope = apply_rope_interleaved if cfg.rope_interleave else apply_rope_half
        d, H, dqk = cfg.hidden_size, cfg.num_attention_heads, cfg.qk_head_dim
        self.q_lora_rank = cfg.q_lora_rank
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(d, H * dqk, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps=1e-6)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * dqk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, cfg.kv_lora_rank + self.dr, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, eps=1e-6)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (self.dn + self.dv), bias=False)
        self.o_proj = nn.Linear(H * self.dv, d, bias=cfg.attention_bias)
        self._fused_down = FusedWeight()  # q_a_proj + kv_a_proj_with_mqa as one matmul

    # -- projections shared by both paths --------------------------------------------------------------
    def _down_projections(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """q_a_proj(x) (None without q_lora_rank) and kv_a_proj_with_mqa(x), as one matmul when possible."""
        if self.q_lora_rank is None:
            return None, self.kv_a_proj_with_mqa(x)
        if type(self.q_a_proj) is not nn.Linear or self.q_a_proj.bias is not None:  # (quantized: two calls)
            return self.q_a_proj(x), self.kv_a_proj_with_mqa(x)
        both = F.linear(x, self._fused_down(self.q_a_proj, self.kv_a_proj_with_mqa))
        return both.split([self.q_lora_rank, self.kv_lora_rank + self.dr], dim=-1)

    def _queries(self, x, q_a, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        q = self.q_proj(x) if q_a is None else self.q_b_proj(self.q_a_layernorm(q_a))
        q = q.view(B, T, self.n_heads, self.dn + self.dr).transpose(1, 2)  # [B,H,T,dn+dr]
        q_nope, q_pe = q.split([self.dn, self.dr], dim=-1)
        return q_nope, self.rope(q_pe, cos, sin)

    def _latent(self, kv_a: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        c_kv, k_pe = kv_a.split([self.kv_lora_rank, self.dr], dim=-1)
        return self.kv_a_layernorm(c_kv), self.rope(k_pe.unsqueeze(1), cos, sin).squeeze(1)  # [B,T,r], [B,T,dr]

    def forward(
        self,
        x: torch.Tensor,  # [B,T,d]
        cos: torch.Tensor,  # [B|1, 1, T, dr/2]
        sin: torch.Tensor,
        mask: torch.Tensor | None,  # bool [B|1, 1, T, S] (True: attend) or None for plain causal
        cache=None,  # the engine's paged cache view (engine/kv_cache.PagedView), or None: no cache
    ) -> torch.Tensor:
        q_a, kv_a = self._down_projections(x)
        q_nope, q_pe = self._queries(x, q_a, cos, sin)
        c_kv, k_pe = self._latent(kv_a, cos, sin)
        if cache is None:
            out = self._attend_naive(q_nope, q_pe, c_kv, k_pe, mask)
        else:  # store this step's latents, attend over the row's whole history in the absorbed form
            c_kv, k_pe = cache.update(self.layer_idx, c_kv=c_kv, k_pe=k_pe)
            if cache.query_spans is None:
                out = self._attend_absorbed(q_nope, q_pe, c_kv, k_pe, cache.mask())
            else:
                out = self._attend_row_wise(q_nope, q_pe, c_kv, k_pe, cache.query_spans)
        B, H, T, dv = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * dv))

    def _attend_naive(self, q_nope, q_pe, c_kv, k_pe, mask) -> torch.Tensor:
        B, S, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv).view(B, S, self.n_heads, self.dn + self.dv).transpose(1, 2)
        k_nope, v = kv.split([self.dn, self.dv], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(1).expand(-1, self.n_heads, -1, -1)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        # SDPA's fused (flash) CPU kernel needs equal q/k and v head dims; zero-padded v is exact. It beats
        # the math kernel from ~128 tokens on (measured 1.45x at 256), and loses on short rows.
        pad = q.shape[-1] - self.dv if S >= 128 else 0
        if pad > 0:
            v = F.pad(v, (0, pad))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale)
        return out[..., : self.dv] if pad > 0 else out

    def _attend_row_wise(self, q_nope, q_pe, c_kv, k_pe, spans) -> torch.Tensor:
        """The absorbed attention one query at a time over exactly its own keys, unmasked (see the engine's
        PagedView.query_spans): the einsums with kv_b_proj are fp32 matmuls whose results, like SDPA's, move
        with the number of rows they are given."""
        B, H, T, _ = q_nope.shape
        if len(spans) == 1 and B == T == 1 and spans[0][2] == c_kv.shape[1]:
            return self._attend_absorbed(q_nope, q_pe, c_kv, k_pe, None)
        out = q_nope.new_zeros(B, H, T, self.dv)  # padding queries stay 0; nothing reads them
        for i, t, end in spans:
            row = self._attend_absorbed(
                q_nope[i : i + 1, :, t : t + 1], q_pe[i : i + 1, :, t : t + 1], c_kv[i : i + 1, :end],
                k_pe[i : i + 1, :end], None,
            )  # fmt: skip
            out[i, :, t] = row[0, :, 0]
        return out

    def _attend_absorbed(self, q_nope, q_pe, c_kv, k_pe, mask) -> torch.Tensor:
        w = self.kv_b_proj.weight.view(self.n_heads, self.dn + self.dv, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.dn], w[:, self.dn :]  # [H,dn,r], [H,dv,r]
        q_lat = torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk)
        # One "key" per token shared by all heads: [c_kv | k_pe]; the "value" is c_kv itself.
        q = torch.cat([q_lat, q_pe], dim=-1)  # [B,H,T,r+dr]
        k = torch.cat([c_kv, k_pe], dim=-1).unsqueeze(1)  # [B,1,S,r+dr]
        v = c_kv.unsqueeze(1)  # [B,1,S,r]
        H = self.n_heads
        o_lat = F.scaled_dot_product_attention(
            q, k.expand(-1, H, -1, -1), v.expand(-1, H, -1, -1), attn_mask=mask, scale=self.scale
        )
        return torch.einsum("bhtr,hvr->bhtv", o_lat, w_uv)
