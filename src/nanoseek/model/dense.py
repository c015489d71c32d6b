"""One dense decoder for the open families: Llama (SmolLM2, Llama 3.x), Mistral, Qwen2, Gemma 2 and Gemma 3.

The families differ in a handful of switches, all in `DenseConfig`:

| family  | switches                                                                                      |
|---------|-----------------------------------------------------------------------------------------------|
| llama   | GQA, optional llama3 rope scaling, optional attention/MLP bias                                |
| mistral | sliding window on every layer                                                                 |
| qwen2   | bias on q/k/v (not o), tied embeddings on small sizes, optional sliding layers                |
| gemma2  | (1+w) RMSNorm, sqrt(d) embedding scale, sandwich norms, GELU-tanh, attention and final logit  |
|         | soft-capping, local (sliding) / global layers alternating, query_pre_attn_scalar              |
| gemma3  | gemma2 minus soft-capping, plus q/k RMSNorm and a separate rope base for local layers         |

Module names are transformers' names (`model.layers.{i}.self_attn.q_proj` …), so a HF state dict loads
as is. The forward follows the interface every nanoseek model shares:
`model(input_ids, attention_mask=None, position_ids=None, cache=None, logits_index=None) -> logits`, where
`cache` is the inference engine's paged cache view (engine/kv_cache.PagedView) or None.

Shapes: B batch, T new tokens, S key positions (the rows' histories), H query heads, K kv heads, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.embedding import token_embedding
from nanoseek.model.loss import IGNORE_INDEX, LossOutput, linear_cross_entropy
from nanoseek.model.norm import RMSNorm, inference_kernel_applies
from nanoseek.model.packing import document_causal_mask
from nanoseek.model.rope import apply_rope_half, rope_cos_sin, rope_inv_freq

FULL, SLIDING = "full_attention", "sliding_attention"

# model_type values this module serves (HF config.json spelling).
DENSE_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3_text", "gemma3")


@dataclass
class DenseConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_act: str = "silu"  # "silu" or "gelu_pytorch_tanh"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # llama3 / linear / yarn, for global (full) layers
    rope_local_theta: float | None = None  # Gemma 3: local (sliding) layers use their own base, unscaled
    rope_freq_factors: list[float] | None = None  # GGUF `rope_freqs`: llama.cpp's form of llama3 scaling
    attention_bias: bool = False  # bias on q, k, v and o (Llama option)
    qkv_bias: bool = False  # bias on q, k, v only (Qwen2)
    mlp_bias: bool = False
    sliding_window: int | None = None
    layer_types: list[str] = field(default_factory=list)  # FULL / SLIDING per layer
    query_pre_attn_scalar: float | None = None  # softmax scale = this ** -0.5 (Gemma); None: head_dim
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    norm_offset: float = 0.0  # 1.0: Gemma's (1 + w) RMSNorm
    sandwich_norm: bool = False  # Gemma 2/3: norms after attention and MLP too
    qk_norm: bool = False  # Gemma 3: RMSNorm on each query and key head before rope
    embed_scale: bool = False  # Gemma: embeddings times sqrt(hidden_size)
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if not self.layer_types:
            self.layer_types = [FULL] * self.num_hidden_layers
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported ({', '.join(_ACTIVATIONS)})")

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    @property
    def softmax_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5


_ACTIVATIONS = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": lambda x: F.gelu(x, approximate="tanh"),  # Gemma 1 configs say "gelu" but mean the tanh form
}


# ---- HF config.json -> DenseConfig ---------------------------------------------------------------------


def _rope_from_hf(cfg: dict) -> tuple[float, dict | None, float | None]:
    """(global theta, global scaling, local theta) from either transformers 5 `rope_parameters` or the
    older `rope_theta` / `rope_scaling` / `rope_local_base_freq` fields."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and FULL in params:  # per layer type (Gemma 3 in transformers 5)
        full, local = params[FULL] or {}, params.get(SLIDING) or {}
        return float(full.get("rope_theta", 1e6)), _scaling_or_none(full), local.get("rope_theta")
    if isinstance(params, dict):
        return float(params.get("rope_theta", 10000.0)), _scaling_or_none(params), None
    theta = float(cfg.get("rope_theta", 10000.0))
    return theta, _scaling_or_none(cfg.get("rope_scaling")), cfg.get("rope_local_base_freq")


def _scaling_or_none(params: dict | None) -> dict | None:
    if not params:
        return None
    kind = params.get("rope_type", params.get("type", "default"))
    return None if kind == "default" else dict(params, rope_type=kind)


def dense_config_from_hf(cfg: dict) -> DenseConfig:
    """Map a transformers config.json dict (llama, mistral, qwen2, gemma, gemma2, gemma3_text) to DenseConfig."""
    model_type = cfg.get("model_type")
    if model_type == "gemma3" and "text_config" in cfg:  # multimodal wrapper: the text part only
        cfg = {**cfg["text_config"], "model_type": "gemma3_text"}
        model_type = "gemma3_text"
    if model_type not in DENSE_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not a dense family ({', '.join(DENSE_MODEL_TYPES)})")
    n_layers = int(cfg["num_hidden_layers"])
    n_heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    theta, scaling, local_theta = _rope_from_hf(cfg)
    gemma = model_type.startswith("gemma")
    kw: dict[str, Any] = dict(
        model_type=model_type,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=int(cfg.get("num_key_value_heads") or n_heads),
        head_dim=int(cfg.get("head_dim") or hidden // n_heads),
        hidden_act=cfg.get("hidden_activation") or cfg.get("hidden_act") or ("gelu_pytorch_tanh" if gemma else "silu"),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", gemma)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
        pad_token_id=cfg.get("pad_token_id"),
    )
    window = cfg.get("sliding_window")
    if model_type == "llama":
        kw.update(attention_bias=bool(cfg.get("attention_bias")), mlp_bias=bool(cfg.get("mlp_bias")))
    elif model_type == "mistral":
        kw.update(sliding_window=window, layer_types=[SLIDING if window else FULL] * n_layers)
    elif model_type == "qwen2":
        use_window = bool(cfg.get("use_sliding_window")) and window is not None
        max_window_layers = int(cfg.get("max_window_layers", n_layers))
        types = cfg.get("layer_types") or [
            SLIDING if use_window and i >= max_window_layers else FULL for i in range(n_layers)
        ]
        kw.update(qkv_bias=True, sliding_window=window if use_window else None, layer_types=types)
    else:  # Gemma family
        kw.update(norm_offset=1.0, embed_scale=True, attention_bias=bool(cfg.get("attention_bias")))
        kw["query_pre_attn_scalar"] = cfg.get("query_pre_attn_scalar")
    if model_type == "gemma2":
        types = cfg.get("layer_types") or [SLIDING if (i + 1) % 2 else FULL for i in range(n_layers)]
        kw.update(
            sandwich_norm=True,
            sliding_window=window,
            layer_types=types,
            attn_logit_softcapping=cfg.get("attn_logit_softcapping"),
            final_logit_softcapping=cfg.get("final_logit_softcapping"),
        )
    elif model_type == "gemma3_text":
        pattern = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
        types = cfg.get("layer_types") or [SLIDING if (i + 1) % pattern else FULL for i in range(n_layers)]
        kw.update(
            sandwich_norm=True,
            qk_norm=True,
            sliding_window=window,
            layer_types=types,
            rope_local_theta=float(local_theta if local_theta is not None else 10000.0),
            attn_logit_softcapping=cfg.get("attn_logit_softcapping"),
            final_logit_softcapping=cfg.get("final_logit_softcapping"),
        )
    return DenseConfig(**kw)


_HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
}  # fmt: skip


def dense_config_to_hf(cfg: DenseConfig) -> dict[str, Any]:
    """The inverse of dense_config_from_hf: a transformers config.json dict that maps back to `cfg`
    (layer types spelled out, so a GGUF's hard-coded local/global pattern survives)."""
    if cfg.rope_freq_factors is not None:
        raise ValueError(
            "the model's RoPE comes as llama.cpp per-frequency factors (a GGUF `rope_freqs` tensor), which a "
            "HF config cannot express; export is not supported for it"
        )
    model_type = "gemma3_text" if cfg.model_type == "gemma3" else cfg.model_type
    out: dict[str, Any] = {
        "architectures": [_HF_ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": "float32",
    }
    out["hidden_activation" if model_type.startswith("gemma") else "hidden_act"] = cfg.hidden_act
    if model_type == "llama":
        out.update(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias)
    elif model_type == "mistral":
        out["sliding_window"] = cfg.sliding_window
    elif model_type == "qwen2":
        out.update(
            use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window,
            max_window_layers=cfg.num_hidden_layers, layer_types=list(cfg.layer_types),
        )  # fmt: skip
    else:  # Gemma family
        out.update(attention_bias=cfg.attention_bias, query_pre_attn_scalar=cfg.query_pre_attn_scalar)
    if model_type in ("gemma2", "gemma3_text"):
        out.update(
            sliding_window=cfg.sliding_window, layer_types=list(cfg.layer_types),
            attn_logit_softcapping=cfg.attn_logit_softcapping, final_logit_softcapping=cfg.final_logit_softcapping,
        )  # fmt: skip
    if model_type == "gemma3_text":
        out["rope_local_base_freq"] = cfg.rope_local_theta
    return out


# ---- KV cache -------------------------------------------------------------------------------------------


# ---- modules --------------------------------------------------------------------------------------------


class DenseAttention(nn.Module):
    def __init__(self, cfg: DenseConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        qkv_bias = cfg.attention_bias or cfg.qkv_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=cfg.attention_bias)
        # q, k and v as one projection, set (in place of the three) by nanoseek.quant.fuse_projections for
        # inference: one matmul, and for quantized weights one activation quantization instead of three
        self.qkv_proj: nn.Module | None = None
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, offset=cfg.norm_offset)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, offset=cfg.norm_offset)
        self.qk_norm = cfg.qk_norm
        self.scale = cfg.softmax_scale
        self.softcap = cfg.attn_logit_softcapping
        self.window = cfg.sliding_window if cfg.layer_types[layer_idx] == SLIDING else None

    def forward(self, x, cos, sin, mask, is_causal: bool, cache=None):
        B, T, _ = x.shape
        if getattr(type(self.qkv_proj), "returns_parts", False):  # LoRA layers: (q, k, v) in one node (model/lora.py)
            q, k, v = self.qkv_proj(x)
        elif self.qkv_proj is not None:
            qkv = self.qkv_proj(x)
            if getattr(cache, "fused_qkv", False) and self.softcap is None and not self.qk_norm:
                # the rotary embedding, the cache write and the attention in the engine's fused ops
                out = cache.attend_qkv(self.layer_idx, qkv, cos, sin, heads=self.n_heads, kv_heads=self.n_kv,
                                       scale=self.scale, window=self.window)  # fmt: skip
                return self.o_proj(out.reshape(B, T, -1))
            sizes = [self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim]
            q, k, v = qkv.split(sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B,H,T,D]
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # [B,K,T,D]
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope_half(q, cos, sin), apply_rope_half(k, cos, sin)
        if getattr(cache, "fused_attention", False) and self.softcap is None:  # reads the paged cache in place
            q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B,T,heads,D]
            out = cache.attend(self.layer_idx, q, k, v, scale=self.scale, window=self.window)
            return self.o_proj(out.reshape(B, T, -1))
        if cache is not None:  # the engine's paged cache stores [B,T,K,D] rows, returns [B,S,K,D] histories
            k, v = (t.transpose(1, 2) for t in cache.update(self.layer_idx, k=k.transpose(1, 2), v=v.transpose(1, 2)))
            if cache.query_spans is not None:
                spans, starts = cache.query_spans, cache.key_starts[self.window]
                out = self._attend_row_wise(q, k, v, mask, spans, starts)
                return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
        out = self._attend(q, k, v, mask, is_causal)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def _attend(self, q, k, v, mask, is_causal):
        if self.softcap is not None:
            return self._softcapped_attention(q, k, v, mask, is_causal)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scale, enable_gqa=self.n_kv != self.n_heads
        )

    def _attend_row_wise(self, q, k, v, mask, spans, key_starts) -> torch.Tensor:
        """Each query over exactly the keys a one-token forward of its row alone reads, with that forward's
        (all-true) mask: keys from its window's start (0 for full attention) to itself. The view's key axis
        for row i begins at position key_starts[i] (see PagedView.query_spans)."""
        S = k.shape[2]
        out = q.new_zeros(q.shape)  # padding queries (rows shorter than T) stay 0; nothing reads them
        for i, t, end in spans:
            first = 0 if self.window is None else max(0, end - self.window)
            lo, hi = first - key_starts[i], end - key_starts[i]
            if len(spans) == 1 and q.shape[0] == q.shape[2] == 1 and (lo, hi) == (0, S):  # one query alone
                return self._attend(q, k, v, mask, False)
            query, keys, values = q[i : i + 1, :, t : t + 1], k[i : i + 1, :, lo:hi], v[i : i + 1, :, lo:hi]
            out[i, :, t] = self._attend(query, keys, values, mask[i : i + 1, :, t : t + 1, lo:hi], False)[0, :, 0]
        return out

    def _softcapped_attention(self, q, k, v, mask, is_causal):
        # SDPA has no hook between the scores and the softmax, so Gemma 2's tanh capping is spelled out.
        rep = self.n_heads // self.n_kv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = (q @ k.transpose(-1, -2)) * self.scale
        scores = torch.tanh(scores / self.softcap) * self.softcap
        if is_causal:
            mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        return probs @ v


class DenseMLP(nn.Module):
    def __init__(self, cfg: DenseConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = _ACTIVATIONS[cfg.hidden_act]
        self.gate_up_proj: nn.Module | None = None  # gate and up as one projection (see DenseAttention.qkv_proj)
        # act(gate) * up from [gate | up] in one op, where the engine sets one (see RMSNorm.inference_kernel)
        self.inference_act_mul = None

    def forward(self, x):
        if getattr(type(self.gate_up_proj), "returns_parts", False):  # LoRA layers: (gate, up) in one node
            gate, up = self.gate_up_proj(x)
            return self.down_proj(self.act(gate) * up)
        if self.gate_up_proj is not None:
            gate_up = self.gate_up_proj(x)
            if self.inference_act_mul is not None and inference_kernel_applies(gate_up):
                return self.down_proj(self.inference_act_mul(gate_up))
            gate, up = gate_up.chunk(2, dim=-1)
            return self.down_proj(self.act(gate) * up)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DenseDecoderLayer(nn.Module):
    def __init__(self, cfg: DenseConfig, layer_idx: int):
        super().__init__()
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, offset=cfg.norm_offset)  # noqa: E731
        self.self_attn = DenseAttention(cfg, layer_idx)
        self.mlp = DenseMLP(cfg)
        self.input_layernorm = norm()
        # Llama: post_attention_layernorm is the pre-MLP norm. Gemma 2/3: it normalizes the attention
        # output, and the MLP gets its own pre/post norms ("sandwich").
        self.post_attention_layernorm = norm()
        self.sandwich = cfg.sandwich_norm
        if cfg.sandwich_norm:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()

    def forward(self, h, cos, sin, mask, is_causal, cache):
        attn = self.self_attn(self.input_layernorm(h), cos, sin, mask, is_causal, cache)
        if self.sandwich:
            h = h + self.post_attention_layernorm(attn)
            return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        h = h + attn
        return h + self.mlp(self.post_attention_layernorm(h))


class DenseModel(nn.Module):
    def __init__(self, cfg: DenseConfig):
        super().__init__()
        self.embed_tokens = token_embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DenseDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, offset=cfg.norm_offset)


class DenseForCausalLM(nn.Module):
    """A dense decoder-only LM for every family in DenseConfig; see the module docstring."""

    def __init__(self, cfg: DenseConfig):
        super().__init__()
        self.config = cfg
        self.model = DenseModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        # Inverse frequencies per layer type; recomputed (not saved), so they survive meta-device building.
        self._rope: dict[tuple[str, str], tuple[torch.Tensor, float]] = {}

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _rope_for(self, layer_type: str, device) -> tuple[torch.Tensor, float]:
        key = (layer_type, str(device))  # per device, so a model moved after its first call still works
        if key not in self._rope:
            cfg = self.config
            if layer_type == SLIDING and cfg.rope_local_theta is not None:
                inv, factor = rope_inv_freq(cfg.head_dim, cfg.rope_local_theta)
            else:
                inv, factor = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
                if cfg.rope_freq_factors is not None:
                    inv = inv / torch.tensor(cfg.rope_freq_factors, dtype=torch.float32)
            self._rope[key] = (inv.to(device), factor)
        return self._rope[key]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
        logits_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [B,T] -> logits [B,T,vocab]; with logits_index [B], only row i's position
        logits_index[i]: [B,vocab]; with logits_index [B,n], row i's positions logits_index[i, j]: [B,n,vocab].
        `cache` is the engine's paged view (it brings positions and masks), or None."""
        h = self.forward_hidden(input_ids, attention_mask, position_ids, cache)
        if logits_index is not None:
            rows = torch.arange(h.shape[0], device=h.device)
            h = h[rows if logits_index.dim() == 1 else rows[:, None], logits_index]
        return self.logits(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states -> logits (soft-capped where the family caps them)."""
        logits = self.lm_head(h)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def forward_hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states [B,T,d]. document_ids [B,T]: packed rows (model/packing.py), each
        position attending within its own document only; position_ids should then restart per document."""
        cfg = self.config
        B, T = input_ids.shape
        device = input_ids.device
        if cache is not None:
            position_ids = cache.positions
        elif position_ids is None:
            position_ids = torch.arange(T, device=device).expand(B, T)
        packed = cache is None and document_ids is not None
        key_mask = None if cache is not None or packed else _key_mask(attention_mask, B, T, device)

        h = self.model.embed_tokens(input_ids)
        if cfg.embed_scale:
            h = h * torch.tensor(cfg.hidden_size**0.5, dtype=h.dtype)
        per_type = {}
        for kind in set(cfg.layer_types):
            inv, factor = self._rope_for(kind, device)
            cos, sin = rope_cos_sin(inv, position_ids, factor, dtype=h.dtype)
            cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
            window = cfg.sliding_window if kind == SLIDING else None
            if cache is not None:
                mask, is_causal = cache.mask(window), False
            elif packed:
                mask, is_causal = document_causal_mask(document_ids, window), False
            else:
                mask, is_causal = _attention_mask(key_mask, T, window, device)
            per_type[kind] = (cos, sin, mask, is_causal)
        layer_stack = getattr(cache, "layer_stack", None)  # the inference engine's: every layer in one native op
        if layer_stack is not None:
            return self.model.norm(layer_stack(h, per_type, cache))
        for layer, kind in zip(self.model.layers, cfg.layer_types):
            h = layer(h, *per_type[kind], cache)
        return self.model.norm(h)

    def compute_loss(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor,
        *,
        mtp_weight: float = 0.0,
        balance_alpha: float = 0.0,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> LossOutput:
        """Mean next-token cross-entropy over targets != -100 (the training interface DeepSeek-V3 has too; a
        dense model has no MTP or balance loss, so those arguments are accepted and unused). The fused
        linear + cross-entropy skips ignored rows and never stores logits; Gemma 2's final soft-capping sits
        between the head and the softmax, so capped models take the plain path."""
        h = self.forward_hidden(input_ids, attention_mask, position_ids, document_ids=document_ids)
        if self.config.final_logit_softcapping is None:
            lm = linear_cross_entropy(h, self.lm_head.weight, targets)
        else:
            valid = targets != IGNORE_INDEX
            total = F.cross_entropy(self.logits(h[valid]).float(), targets[valid], reduction="sum")
            lm = total / valid.sum().clamp(min=1)
        return LossOutput(lm, lm, None, None)


def _key_mask(attention_mask, B: int, T: int, device) -> torch.Tensor | None:
    """[B, T] bool of real tokens, or None when every token is real."""
    if attention_mask is None:
        return None
    if attention_mask.shape != (B, T):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected {(B, T)}")
    mask = attention_mask.to(device=device, dtype=torch.bool)
    return None if bool(mask.all()) else mask


def _attention_mask(key_mask, T: int, window: int | None, device):
    """(bool mask [B|1, 1, T, T] or None, is_causal) for a batch without a cache.

    A query sees keys at positions <= its own, within `window` positions when sliding (transformers' rule:
    key > query - window), and only real keys; it always sees itself, so a padding row never has an
    empty softmax (its output is ignored anyway)."""
    needs_window = window is not None and window < T
    if key_mask is None and not needs_window:
        return None, True
    q = torch.arange(T, device=device)[:, None]
    k = torch.arange(T, device=device)[None, :]
    allowed = k <= q
    if needs_window:
        allowed &= k > q - window
    allowed = allowed[None, None]
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
        allowed |= (k == q)[None, None]
    return allowed, False


# ---- building for loading ---------------------------------------------------------------------------


def build_on_meta(cfg: DenseConfig) -> DenseForCausalLM:
    with torch.device("meta"):
        return DenseForCausalLM(cfg)


def param_count(model: nn.Module) -> int:
    """Parameters counted once even when tied."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


__all__ = [
    "DENSE_MODEL_TYPES",
    "DenseConfig",
    "DenseForCausalLM",
    "dense_config_from_hf",
]
