"""Loading llama.cpp's GGUF files into the dense model.

A GGUF holds metadata (architecture, sizes, tokenizer, chat template) and quantized tensors under
llama.cpp's names. Loading is: metadata -> DenseConfig, each tensor dequantized to fp32 with the `gguf`
package, renamed to transformers' names, un-permuted (Llama q/k) or un-offset (Gemma norms), and assigned
into a model built on the meta device, one tensor at a time.

Two llama.cpp conventions are undone here (REFERENCE §3):
- Llama-family q_proj/k_proj rows are permuted for llama.cpp's interleaved rope; transformers and
  nanoseek use rotate-half, so the permutation is reversed. Qwen2 and Gemma files are not permuted.
- Gemma RMSNorm weights are stored with llama.cpp's +1 already added; the (1 + w) norm wants w.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanoseek.model.dense import FULL, SLIDING, DenseConfig, DenseForCausalLM, build_on_meta
from nanoseek.weights.gguf_file import GGUFFile, TensorInfo
from nanoseek.weights.gguf_grid import FOUR_BIT_TYPES, four_bit_grid
from nanoseek.weights.gguf_tokenizer import gguf_stop_ids
from nanoseek.weights.hf_folder import load_dense_state
from nanoseek.weights.safetensors_io import WeightsError

# general.architecture values this loader serves, and the dense model_type each becomes.
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text"}
# Architectures known but not yet wired to a model: a clear error instead of "unsupported".
_NOT_YET = {"deepseek2": "DeepSeek-V2/V3 GGUF files are not supported yet; load the HF safetensors folder instead"}
_PERMUTED = {"llama"}  # llama.cpp's converter permutes q/k rows for these


def supported_quant_types() -> list[str]:
    from gguf import quants

    # F32/F16 are plain views; every other type the installed gguf can dequantize has a registered codec.
    return sorted({"F32", "F16"} | {t.name for t in getattr(quants, "_type_traits", {})})


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """The parsed GGUF (metadata + tensor index), or an error naming the file and the problem."""
    return GGUFFile(path)


def config_from_gguf(meta: dict[str, Any], tensor_names: set[str], path: Path) -> DenseConfig:
    arch = meta.get("general.architecture")
    if arch in _NOT_YET:
        raise WeightsError(f"{path}: {_NOT_YET[arch]}")
    if arch not in GGUF_ARCHITECTURES:
        raise WeightsError(
            f"{path}: unsupported GGUF architecture {arch!r}; supported: {', '.join(sorted(GGUF_ARCHITECTURES))}"
        )

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    def need(key: str) -> Any:
        if f"{arch}.{key}" not in meta:
            raise WeightsError(f"{path}: metadata key {arch}.{key} is missing")
        return meta[f"{arch}.{key}"]

    model_type = GGUF_ARCHITECTURES[arch]
    name = str(meta.get("general.name", "")).lower()
    if arch == "llama" and "mistral" in name:
        model_type = "mistral"
    hidden, n_heads, n_layers = (
        int(need("embedding_length")),
        int(need("attention.head_count")),
        int(need("block_count")),
    )
    n_kv = get("attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):  # per-layer list in some files; dense families use one value
        n_kv = max(n_kv)
    head_dim = int(get("attention.key_length", hidden // n_heads))
    rope_dim = int(get("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise WeightsError(f"{path}: partial rotary embeddings ({rope_dim} of {head_dim} dims) are not supported")
    vocab = get("vocab_size") or _vocab_size(meta, tensor_names)
    gemma = arch.startswith("gemma")
    kw: dict[str, Any] = dict(
        model_type=model_type,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=int(n_kv),
        head_dim=head_dim,
        hidden_act="gelu_pytorch_tanh" if gemma else "silu",
        max_position_embeddings=int(get("context_length", 2048)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(get),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=gguf_stop_ids(meta),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )
    if arch == "qwen2":
        kw["qkv_bias"] = "blk.0.attn_q.bias" in tensor_names
    elif arch == "llama":
        kw["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    window = get("attention.sliding_window")
    if model_type == "mistral" and window:
        kw.update(sliding_window=int(window), layer_types=[SLIDING] * n_layers)
    if gemma:
        # llama.cpp's rule: the 27B models scale queries by hidden/heads, every other size by head_dim.
        big = (arch == "gemma2" and n_layers == 46) or (arch == "gemma3" and n_layers == 62)
        kw.update(norm_offset=1.0, embed_scale=True, query_pre_attn_scalar=hidden // n_heads if big else head_dim)
    if arch == "gemma2":
        kw.update(
            sandwich_norm=True,
            sliding_window=int(window or 4096),
            layer_types=[SLIDING if (i + 1) % 2 else FULL for i in range(n_layers)],
            attn_logit_softcapping=get("attn_logit_softcapping", 50.0),
            final_logit_softcapping=get("final_logit_softcapping", 30.0),
        )
    elif arch == "gemma3":
        # Not in the metadata: llama.cpp hard-codes 5 local layers per global one and a 10k local base.
        kw.update(
            sandwich_norm=True,
            qk_norm=True,
            sliding_window=int(window or 512),
            layer_types=[SLIDING if (i + 1) % 6 else FULL for i in range(n_layers)],
            rope_local_theta=10000.0,
            final_logit_softcapping=get("final_logit_softcapping"),
        )
    return DenseConfig(**kw)


def _vocab_size(meta: dict, tensor_names: set[str]) -> int:
    if "tokenizer.ggml.tokens" in meta:
        return len(meta["tokenizer.ggml.tokens"])
    raise WeightsError("vocab size is in neither the metadata nor the tokenizer")


def _rope_scaling(get) -> dict | None:
    kind = get("rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind not in ("linear", "yarn"):
        raise WeightsError(f"rope scaling type {kind!r} in the GGUF is not supported (linear, yarn)")
    out = {"rope_type": kind, "factor": float(get("rope.scaling.factor", 1.0))}
    if get("rope.scaling.original_context_length"):
        out["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length"))
    return out


# ---- tensors ---------------------------------------------------------------------------------------------

_TOP_LEVEL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_PER_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_name(gguf_name: str, cfg: DenseConfig) -> str | None:
    """transformers' name for a GGUF tensor, or None for tensors that are not parameters."""
    if gguf_name in _TOP_LEVEL:
        return _TOP_LEVEL[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) != 4 or parts[0] != "blk":
        return None
    _, layer, kind, suffix = parts
    if kind == "ffn_norm":  # the pre-MLP norm: Llama's post_attention_layernorm, Gemma 2/3's pre_feedforward
        target = "pre_feedforward_layernorm" if cfg.sandwich_norm else "post_attention_layernorm"
    else:
        target = _PER_LAYER.get(kind)
    return None if target is None else f"model.layers.{layer}.{target}.{suffix}"


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reverse llama.cpp's q/k row permutation (interleaved rope pairs -> rotate-half halves)."""
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def dequantize_tensor(gf: GGUFFile, info: TensorInfo) -> np.ndarray:
    """A GGUF tensor as fp32 numpy in PyTorch's [out, in] layout."""
    from gguf import quants

    qtype = info.qtype
    if qtype.name not in supported_quant_types():
        raise WeightsError(
            f"{gf.path}: tensor {info.name!r} uses quantization {qtype.name}, which is not supported; "
            f"supported: {', '.join(supported_quant_types())}"
        )
    raw = gf.raw(info)
    out = np.empty((raw.shape[0], int(np.prod(info.shape)) // raw.shape[0]), dtype=np.float32)
    # A few thousand rows at a time: numpy's dequantizers make several full-size temporaries, which for
    # SmolLM2's embedding matrix alone raised the loading peak by ~400 MB.
    step = max(1, (1 << 22) // max(1, out.shape[1]))
    try:
        for start in range(0, raw.shape[0], step):
            out[start : start + step] = quants.dequantize(raw[start : start + step], qtype).reshape(-1, out.shape[1])
    except Exception as exc:
        raise WeightsError(f"{gf.path}: tensor {info.name!r} could not be dequantized ({exc})") from exc
    return out.reshape(info.shape)


class _GGUFTensors:
    """A lazy mapping HF name -> torch tensor over a GGUF file, with the llama.cpp conventions undone."""

    def __init__(self, gf: GGUFFile, cfg: DenseConfig, arch: str):
        self.gf, self.cfg, self.arch = gf, cfg, arch
        self.by_hf: dict[str, TensorInfo] = {}
        for info in gf.tensors.values():
            name = hf_name(info.name, cfg)
            if name is not None:
                self.by_hf[name] = info

    def __contains__(self, name: object) -> bool:
        return name in self.by_hf

    def qtype(self, name: str) -> str:
        """The tensor's GGUF type name (F32, Q4_K, ...)."""
        return self.by_hf[name].qtype.name

    def four_bit_grid(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """A 4-bit tensor (Q4_0/Q4_1/Q4_K) as int4's grid read from its blocks (weights/gguf_grid.py): q uint8
        [out, in], d and m fp32 [out, in / 32]; None for other types."""
        info = self.by_hf[name]
        if info.qtype.name not in FOUR_BIT_TYPES:
            return None
        grid = four_bit_grid(self.gf.raw(info), info.qtype.name, int(info.shape[-1]))
        return tuple(torch.from_numpy(np.ascontiguousarray(self._unpermuted(name, a))) for a in grid)

    def _unpermuted(self, name: str, rows: np.ndarray) -> np.ndarray:
        """A tensor's rows (or its grid's) with llama.cpp's q/k row permutation undone, where the file has it."""
        if self.arch in _PERMUTED and ".self_attn.q_proj." in name:
            return unpermute_rope_rows(rows, self.cfg.num_attention_heads)
        if self.arch in _PERMUTED and ".self_attn.k_proj." in name:
            return unpermute_rope_rows(rows, self.cfg.num_key_value_heads)
        return rows

    def __getitem__(self, name: str) -> torch.Tensor:
        w = self._unpermuted(name, dequantize_tensor(self.gf, self.by_hf[name]))
        if self.cfg.norm_offset and "norm.weight" in name:
            w = w - self.cfg.norm_offset
        return torch.from_numpy(np.require(w, np.float32, "CW"))  # writable and contiguous (a copy only if not)


def load_gguf_model(path: str | os.PathLike, dtype=None, device=None, quant: str | None = None) -> DenseForCausalLM:
    """`nanoseek.load` for a .gguf file: a dense model with dequantized weights (fp32 unless `dtype`), or with
    its projections repacked tensor by tensor into `quant`'s run format (int8 | int4 | fp16)."""
    gf = open_gguf(path)
    try:
        cfg = config_from_gguf(gf.metadata, set(gf.tensors), gf.path)
        if "rope_freqs.weight" in gf.tensors:  # llama 3.1+: per-frequency divisors in place of rope_scaling
            cfg.rope_freq_factors = dequantize_tensor(gf, gf.tensors["rope_freqs.weight"]).reshape(-1).tolist()
        model = build_on_meta(cfg)
        device = torch.device(device) if device is not None else torch.device("cpu")
        tensors = _GGUFTensors(gf, cfg, gf.metadata["general.architecture"])
        model = load_dense_state(model, tensors, str(gf.path), dtype or torch.float32, device, quant)
    except BaseException:
        with contextlib.suppress(BufferError):  # the error's frames may still hold views of the file
            gf.close()
        raise
    del tensors
    gf.close()  # every weight is a copy by now: the file's pages leave the process's RSS
    return model
