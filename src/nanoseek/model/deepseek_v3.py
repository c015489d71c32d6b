"""The DeepSeek-V3 causal LM: MLA attention, DeepSeekMoE, multi-token prediction.

Parameter names follow transformers' DeepseekV3ForCausalLM (`model.embed_tokens`, `model.layers.{i}...`,
`lm_head`), except that routed experts are stored fused (`mlp.experts.gate_up_proj [E,2F,d]`, as
transformers v5 does in memory) and MTP modules live under `mtp.{k}`; `weights/deepseek_v3_hf.py` maps
these to and from the HF checkpoint layout.

The model knows nothing of parallelism, quantization or serving: those are applied from outside.
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.model.config import DeepseekV3Config
from nanoseek.model.embedding import token_embedding
from nanoseek.model.loss import IGNORE_INDEX, LossOutput, linear_cross_entropy
from nanoseek.model.mla import MultiHeadLatentAttention
from nanoseek.model.moe import DeepseekMoE, GroupedExperts, Router, SwiGLU
from nanoseek.model.mtp import MTPModule, shift_left
from nanoseek.model.norm import RMSNorm
from nanoseek.model.packing import document_causal_mask, same_document_ahead
from nanoseek.model.rope import rope_cos_sin, rope_inv_freq


class AuxLosses:
    """The MoE layers' balance losses of one forward. Not a list on purpose: FSDP2 rebuilds list, tuple and
    dict arguments of a sharded block's forward, so appends to a passed-in list would be lost."""

    def __init__(self) -> None:
        self.items: list[torch.Tensor] = []

    def append(self, loss: torch.Tensor) -> None:
        self.items.append(loss)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DeepseekV3Config, layer_idx: int, *, moe: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MultiHeadLatentAttention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = DeepseekMoE(cfg) if moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h, cos, sin, mask, cache=None, aux=None, token_mask=None) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache)
        x = self.post_attention_layernorm(h)
        if not isinstance(self.mlp, DeepseekMoE):
            return h + self.mlp(x)
        if cache is not None and cache.query_spans is not None and x.shape[0] * x.shape[1] > 1:
            # a decode-sized forward that must compute each token as if alone (PagedView.query_spans): the
            # router's fp32 matmul and the experts' grouped matmul give a token different low bits with
            # other tokens beside it, which can flip a near-tied expert choice or an int8 rounding downstream
            out = torch.zeros_like(x)
            for i, t, _ in cache.query_spans:
                out[i, t] = self.mlp(x[i : i + 1, t : t + 1], aux, None)[0, 0]
            return h + out
        return h + self.mlp(x, aux, token_mask)


class DeepseekV3Backbone(nn.Module):
    """HF's `model.*`: embeddings, decoder layers, final norm."""

    def __init__(self, cfg: DeepseekV3Config):
        super().__init__()
        self.embed_tokens = token_embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, moe=cfg.is_moe_layer(i)) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekV3ForCausalLM(nn.Module):
    def __init__(self, config: DeepseekV3Config, *, init: bool = True):
        super().__init__()
        self.config = config
        self.model = DeepseekV3Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        n = config.num_hidden_layers
        self.mtp = nn.ModuleList(
            MTPModule(config, n + k, DecoderLayer(config, n + k, moe=config.is_moe_layer(n + k)))
            for k in range(config.num_nextn_predict_layers)
        )
        self.init_buffers()
        if init:
            self.init_weights()

    # ---- set-up -------------------------------------------------------------------------------------------
    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute non-persistent buffers; call after building on the meta device and loading."""
        cfg = self.config
        if device is None:
            device = self.lm_head.weight.device
        inv_freq, attention_factor = rope_inv_freq(
            cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings
        )
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        self.rope_attention_factor = attention_factor
        for m in self.modules():
            if isinstance(m, DeepseekMoE):
                m.tokens_per_expert = torch.zeros(cfg.n_routed_experts, device=device)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, std, generator=generator)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, std, generator=generator)
            elif isinstance(m, RMSNorm):
                m.reset_parameters()
            elif isinstance(m, Router):
                nn.init.normal_(m.weight, 0.0, std, generator=generator)
                m.e_score_correction_bias.zero_()
            elif isinstance(m, GroupedExperts):
                nn.init.normal_(m.gate_up_proj, 0.0, std, generator=generator)
                nn.init.normal_(m.down_proj, 0.0, std, generator=generator)

    # ---- forward ----------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
        logits_index: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """input_ids [B,T] -> logits [B,T,vocab]. `cache` is the inference engine's paged cache view (it brings
        the new tokens' positions and the attention masks), or None. With logits_index [B], only row i's position
        logits_index[i]: [B,vocab] (prefill and decode need one position's logits, not T); with
        logits_index [B,n], row i's positions logits_index[i, j]: [B,n,vocab] (speculative verification).
        return_hidden: also the final-normed hidden states [B,T,d] (what MTP depth 1 takes)."""
        h = self.forward_hidden(input_ids, attention_mask, position_ids, cache)
        logits = self.lm_head(h if logits_index is None else gather_positions(h, logits_index))
        return (logits, h) if return_hidden else logits

    def mtp_forward(self, depth: int, h_prev: torch.Tensor, next_ids: torch.Tensor, cache) -> torch.Tensor:
        """MTP module `depth` (0-based) on the engine's paged cache, exactly as compute_loss runs it: at each
        new position t, h_prev[t] (depth 0: the main model's final-normed hidden state) and the embedding of
        next_ids[t] (the token at t+1+depth). Returns the module's block output [B,T,d]; its prediction
        (the token after next_ids[t]) is `mtp_logits(depth, out)`."""
        cos, sin = rope_cos_sin(self.inv_freq, cache.positions, self.rope_attention_factor, h_prev.dtype)
        emb = self.model.embed_tokens(next_ids)
        return self.mtp[depth](h_prev, emb, cos.unsqueeze(1), sin.unsqueeze(1), None, cache=cache)

    def mtp_logits(self, depth: int, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.mtp[depth].norm(h))

    def forward_hidden(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        cache=None,
        aux=None,
        _rope_mask_out: list | None = None,
        token_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states [B,T,d]. token_mask [B,T] marks the tokens that count as expert load
        (default: the new tokens' part of attention_mask; all tokens without one). document_ids [B,T]:
        packed rows (model/packing.py), each position attending within its own document only."""
        self._check_input(input_ids)
        B, T = input_ids.shape
        if cache is not None:  # the engine's paged view: positions and masks come with it
            position_ids, mask = cache.positions, None
        else:
            if position_ids is None:
                position_ids = torch.arange(T, device=input_ids.device).unsqueeze(0)
            if document_ids is not None:
                mask = document_causal_mask(document_ids)
            else:
                mask = attention_mask_for_sdpa(attention_mask, T, input_ids.device)
        h = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(self.inv_freq, position_ids, self.rope_attention_factor, h.dtype)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B|1, 1, T, dr/2]
        if _rope_mask_out is not None:
            _rope_mask_out.extend([cos, sin, mask])
        if token_mask is None and attention_mask is not None:
            token_mask = attention_mask[:, -T:].bool()
        for layer in self.model.layers:
            h = layer(h, cos, sin, mask, cache, aux, token_mask)
        return self.model.norm(h)

    def _check_input(self, input_ids: torch.Tensor) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError("input_ids must be a LongTensor of shape [batch, seq]")
        if input_ids.device.type == "cpu" and input_ids.numel():  # (on GPU this check would force a sync)
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(
                    f"token id {lo if lo < 0 else hi} outside the vocabulary [0, {self.config.vocab_size})"
                )

    def compute_loss(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor,
        *,
        mtp_weight: float = 0.3,
        balance_alpha: float = 0.0,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> LossOutput:
        """Next-token loss (+ MTP losses, + optional sequence-wise balance loss). targets [B,T], -100 ignored.

        MTP depth k at position t sees token t+k's embedding and predicts targets[t+k]; the last k positions
        have no such token and are ignored. A term with no target at all (say an MTP depth longer than every
        row) is 0, not NaN.

        Padding counts neither as expert load nor in the balance loss: with attention_mask, its zeros are
        padding; without one, so are the positions after a row's last target (right padding: no loss depends
        on them). Prompt positions before the first target are real tokens and count.

        Packed rows (document_ids [B,T], -1 for padding; position_ids restarting per document): attention
        stays within each document, padding is what document_ids marks, and MTP depth k at t needs t+k in t's
        document. The sequence-wise balance loss then treats a packed row as one sequence (an approximation;
        its weight balance_alpha is tiny).
        """
        aux = AuxLosses() if balance_alpha > 0 else None
        rope_mask: list = []
        if document_ids is not None:
            token_mask = document_ids >= 0
        elif attention_mask is not None:
            token_mask = attention_mask.bool()
        else:
            token_mask = up_to_last_target(targets)
        h = self.forward_hidden(
            input_ids, attention_mask, position_ids, aux=aux, _rope_mask_out=rope_mask, token_mask=token_mask,
            document_ids=document_ids,
        )  # fmt: skip
        lm_loss = linear_cross_entropy(h, self.lm_head.weight, targets)
        loss = lm_loss
        mtp_losses = []
        if self.mtp and mtp_weight > 0:
            cos, sin, mask = rope_mask
            h_prev = h
            for k, module in enumerate(self.mtp, start=1):
                emb = self.model.embed_tokens(shift_left(input_ids, k, 0))
                mtp_targets = shift_left(targets, k, IGNORE_INDEX)
                if document_ids is not None:  # t and t+k in one document; no target across a boundary
                    depth_mask = same_document_ahead(document_ids, k)
                    mtp_targets = mtp_targets.masked_fill(~depth_mask, IGNORE_INDEX)
                elif attention_mask is not None:  # the position and the token k ahead must both be real
                    depth_mask = token_mask & shift_left(token_mask, k, False)
                else:
                    depth_mask = up_to_last_target(mtp_targets)
                h_prev = module(h_prev, emb, cos, sin, mask, aux, depth_mask)
                mtp_losses.append(linear_cross_entropy(module.norm(h_prev), self.lm_head.weight, mtp_targets))
            mtp_loss = torch.stack(mtp_losses).mean()
            loss = loss + mtp_weight * mtp_loss
        else:
            mtp_loss = None
        balance = torch.stack(aux.items).mean() if aux is not None and aux.items else None
        if balance is not None:
            loss = loss + balance_alpha * balance
        return LossOutput(loss, lm_loss, mtp_loss, balance, mtp_losses)


def gather_positions(h: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """h [B,T,d] at positions index [B] -> [B,d], or index [B,n] -> [B,n,d]."""
    rows = torch.arange(h.shape[0], device=h.device)
    return h[rows if index.dim() == 1 else rows[:, None], index]


def up_to_last_target(targets: torch.Tensor) -> torch.Tensor:
    """[B,T] bool: True up to and including each row's last position with a target (!= IGNORE_INDEX)."""
    has_target = targets != IGNORE_INDEX
    return has_target.flip(1).cummax(1).values.flip(1)


def attention_mask_for_sdpa(attention_mask: torch.Tensor | None, T: int, device: torch.device) -> torch.Tensor | None:
    """Boolean causal mask [B, 1, T, T] (True: may attend) for a padded batch, or None where plain causal
    attention (SDPA's is_causal) is enough.

    Boolean, so SDPA masks with an exact -inf in whatever dtype it computes in, where an additive
    finfo(dtype).min relies on each kernel's arithmetic neither overflowing nor leaking weight. A query with
    no real key to attend to (a left-pad position) would get an empty softmax, i.e. NaN, which would spread
    through the next layers' attention and the MoE's routing; such a query sees its own key instead. Its
    output is never used.
    """
    if attention_mask is None:
        return None
    if attention_mask.shape[-1] != T:
        raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, expected {T}")
    keys = torch.arange(T, device=device)[None, :]
    queries = torch.arange(T, device=device)[:, None]
    allowed = ((keys <= queries)[None] & attention_mask.bool()[:, None, :]) | (keys == queries)[None]
    return allowed.unsqueeze(1)
