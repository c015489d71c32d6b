"""Model configuration: the DeepSeek-V3 architecture with transformers' field names.

Field names, defaults and meaning follow `transformers.DeepseekV3Config` so a `config.json` moves both ways
between nanoseek, transformers, vLLM and SGLang. Nothing here runs at import time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from nanoseek.model.rope import yarn_softmax_scale_factor


class ConfigError(ValueError):
    """A configuration that cannot describe a working model (the message says which field and why)."""


@dataclass
class DeepseekV3Config:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense MLP width (first_k_dense_replace layers)
    moe_intermediate_size: int = 2048  # width of one routed / shared expert
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    num_attention_heads: int = 128
    num_key_value_heads: int = 128  # kept for HF compatibility; MLA has no separate KV heads
    q_lora_rank: int | None = 1536  # None: plain q_proj (V2-Lite style)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    n_shared_experts: int = 1
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"  # V3: sigmoid; V2/V2-Lite: softmax
    topk_method: str = "noaux_tc"  # V3: noaux_tc (biased, top-2-sum groups); V2: greedy | group_limited_greedy
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = (
        None  # YaRN: {"type": "yarn", "factor", "original_max_position_embeddings", ...}
    )
    rope_interleave: bool = True
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    num_nextn_predict_layers: int = 0  # MTP depth
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    torch_dtype: str = "float32"
    model_type: str = field(default="deepseek_v3", init=False)

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """(dn+dr)^-0.5, times mscale^2 when YaRN with mscale_all_dim is on (as DeepSeek and transformers do)."""
        return self.qk_head_dim**-0.5 * yarn_softmax_scale_factor(self.rope_scaling)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace and self.n_routed_experts > 0

    # ---- validation ----------------------------------------------------------------------------------
    def validate(self) -> None:
        positive = [
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
            "qk_rope_head_dim", "v_head_dim", "max_position_embeddings",
        ]  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.qk_nope_head_dim < 0:
            raise ConfigError(f"qk_nope_head_dim must be >= 0, got {self.qk_nope_head_dim}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ConfigError(f"q_lora_rank must be a positive integer or null, got {self.q_lora_rank}")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ConfigError(
                f"first_k_dense_replace={self.first_k_dense_replace} must lie in [0, num_hidden_layers="
                f"{self.num_hidden_layers}]"
            )
        if self.first_k_dense_replace > 0 and self.intermediate_size <= 0:
            raise ConfigError("intermediate_size must be positive when there are dense layers")
        if self.first_k_dense_replace < self.num_hidden_layers and self.n_routed_experts > 0:
            if self.moe_intermediate_size <= 0:
                raise ConfigError("moe_intermediate_size must be positive for MoE layers")
            if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
                raise ConfigError(
                    f"num_experts_per_tok={self.num_experts_per_tok} must lie in [1, n_routed_experts="
                    f"{self.n_routed_experts}]"
                )
            if self.n_group <= 0 or self.n_routed_experts % self.n_group:
                raise ConfigError(f"n_group={self.n_group} must divide n_routed_experts={self.n_routed_experts}")
            if self.n_routed_experts // self.n_group < 2 and self.n_group > 1:
                raise ConfigError("each expert group needs >= 2 experts (group score = sum of its top-2)")
            if not 1 <= self.topk_group <= self.n_group:
                raise ConfigError(f"topk_group={self.topk_group} must lie in [1, n_group={self.n_group}]")
            if self.num_experts_per_tok > self.topk_group * (self.n_routed_experts // self.n_group):
                raise ConfigError("num_experts_per_tok exceeds the experts available in the topk_group selected groups")
        if self.scoring_func not in ("sigmoid", "softmax"):
            raise ConfigError(f"scoring_func {self.scoring_func!r} is not supported (sigmoid, softmax)")
        if self.topk_method not in ("noaux_tc", "greedy", "group_limited_greedy"):
            raise ConfigError(f"topk_method {self.topk_method!r} is not supported")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (DeepSeek-V3 uses 'silu')")
        if self.num_nextn_predict_layers < 0:
            raise ConfigError("num_nextn_predict_layers must be >= 0")
        rs = self.rope_scaling
        if rs:
            kind = rs.get("rope_type", rs.get("type"))
            if kind not in ("yarn", "default", None):
                raise ConfigError(f"rope_scaling type {kind!r} is not supported (only 'yarn')")
            if kind == "yarn" and "factor" not in rs:
                raise ConfigError("rope_scaling of type 'yarn' needs a 'factor'")

    # ---- (de)serialization in HF's config.json format --------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], *, strict: bool = False) -> DeepseekV3Config:
        """Build from a HF config.json dict. Unknown keys are ignored unless strict (then a ConfigError)."""
        data = dict(data)
        model_type = data.pop("model_type", "deepseek_v3")
        if model_type not in ("deepseek_v3", "deepseek_v2", "nanoseek"):
            raise ConfigError(f"model_type {model_type!r} is not a DeepSeek-V3 config")
        if model_type == "deepseek_v2":  # V2 defaults differ from V3's where the file is silent
            data.setdefault("scoring_func", "softmax")
            data.setdefault("topk_method", "greedy")
            data.setdefault("norm_topk_prob", False)
            data.setdefault("routed_scaling_factor", 1.0)
        for key in ("n_group", "topk_group"):  # null means "no grouping"
            if key in data and data[key] is None:
                data[key] = 1
        # transformers v5 writes rope settings as `rope_parameters`; older files use rope_theta + rope_scaling.
        rope_params = data.pop("rope_parameters", None)
        if rope_params:
            rope_params = dict(rope_params)
            data.setdefault("rope_theta", rope_params.pop("rope_theta", 10000.0))
            if rope_params.get("rope_type", rope_params.get("type", "default")) != "default":
                data.setdefault("rope_scaling", rope_params)
        if "dtype" in data and "torch_dtype" not in data:
            data["torch_dtype"] = data["dtype"]
        if "num_mtp_layers" in data and "num_nextn_predict_layers" not in data:
            data["num_nextn_predict_layers"] = data["num_mtp_layers"]
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - names)
        if strict and unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        kwargs = {k: v for k, v in data.items() if k in names}
        if kwargs.get("torch_dtype") is None:
            kwargs.pop("torch_dtype", None)
        try:
            return cls(**kwargs)
        except TypeError as exc:  # wrong value types surface as a config problem, not a traceback
            raise ConfigError(str(exc)) from exc

    def to_dict(self) -> dict[str, Any]:
        """A config.json that transformers (AutoConfig), vLLM and SGLang read as DeepseekV3."""
        out = dataclasses.asdict(self)
        out["model_type"] = "deepseek_v3"
        out["architectures"] = ["DeepseekV3ForCausalLM"]
        out["head_dim"] = self.qk_rope_head_dim  # what transformers derives; vLLM reads qk_* fields
        out["moe_layer_freq"] = 1
        out["ep_size"] = 1
        out["use_cache"] = True
        out["attention_dropout"] = 0.0
        return out

    def replace(self, **changes: Any) -> DeepseekV3Config:
        return dataclasses.replace(self, **changes)

    # ---- size accounting (used by the meter and the report card) ----------------------------------------
    def param_counts(self) -> dict[str, int]:
        """Parameter counts: total, active per token (only the routed experts a token uses), embedding."""
        d, H = self.hidden_size, self.num_attention_heads
        if self.q_lora_rank is None:
            attn = d * H * self.qk_head_dim
        else:
            attn = d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * H * self.qk_head_dim
        attn += d * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        attn += self.kv_lora_rank * H * (self.qk_nope_head_dim + self.v_head_dim) + H * self.v_head_dim * d
        dense_mlp = 3 * d * self.intermediate_size
        expert = 3 * d * self.moe_intermediate_size
        moe_total = expert * (self.n_routed_experts + self.n_shared_experts) + self.n_routed_experts * d
        moe_active = expert * (self.num_experts_per_tok + self.n_shared_experts) + self.n_routed_experts * d
        n_dense = self.first_k_dense_replace
        n_moe = self.num_hidden_layers - n_dense
        norms = 2 * d
        body_total = self.num_hidden_layers * (attn + norms) + n_dense * dense_mlp + n_moe * moe_total
        body_active = self.num_hidden_layers * (attn + norms) + n_dense * dense_mlp + n_moe * moe_active
        embed = self.vocab_size * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        mtp_block_total = attn + norms + (moe_total if n_moe else dense_mlp)
        mtp_block_active = attn + norms + (moe_active if n_moe else dense_mlp)
        mtp_extra = 2 * d * d + 3 * d
        mtp_total = self.num_nextn_predict_layers * (mtp_block_total + mtp_extra)
        mtp_active = self.num_nextn_predict_layers * (mtp_block_active + mtp_extra)
        return {
            "total": embed + head + body_total + d + mtp_total,
            "active": embed + head + body_active + d + mtp_active,
            "embedding": embed,
            "mtp": mtp_total,
        }

    def flops_per_token(self, seq_len: int, *, training: bool = True, include_mtp: bool = True) -> float:
        """Model FLOPs per token: 2 per active weight (matmuls only, embeddings excluded) plus attention
        scores/values, times 3 for forward+backward when training (PaLM-style MFU accounting)."""
        d, H = self.hidden_size, self.num_attention_heads
        counts = self.param_counts()
        matmul_params = counts["active"] - counts["embedding"]
        if self.tie_word_embeddings:
            matmul_params += self.vocab_size * d  # the tied head still does a matmul
        n_attn_layers = self.num_hidden_layers + (self.num_nextn_predict_layers if include_mtp else 0)
        if not include_mtp:
            matmul_params -= counts["mtp"]
        # causal attention: on average each query sees seq_len/2 keys; QK^T uses dn+dr, PV uses dv.
        attn = n_attn_layers * 2 * H * (self.qk_head_dim + self.v_head_dim) * seq_len / 2
        if include_mtp and self.num_nextn_predict_layers:
            matmul_params += self.num_nextn_predict_layers * self.vocab_size * d  # each depth runs the head
        fwd = 2 * matmul_params + attn
        return 3 * fwd if training else fwd


# Named sizes (gpt-fast style): `from_name("tiny")`.
NAMED_CONFIGS: dict[str, dict[str, Any]] = {
    # The tiny config of REFERENCE §1: exercises every feature, used in the equivalence tests.
    "test-tiny": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        max_position_embeddings=128,
        rope_interleave=True,
        tie_word_embeddings=False,
    ),  # fmt: skip
    # ~20M params MoE used by the MoE step benchmark.
    "bench-20m": dict(
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=1024,
        moe_intermediate_size=256,
        num_hidden_layers=6,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=128,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=16,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        max_position_embeddings=1024,
    ),  # fmt: skip
}


def from_name(name: str, **overrides: Any) -> DeepseekV3Config:
    if name not in NAMED_CONFIGS:
        raise ConfigError(f"unknown model size {name!r}; known: {', '.join(sorted(NAMED_CONFIGS))}")
    return DeepseekV3Config(**{**NAMED_CONFIGS[name], **overrides})
