"""State-dict adapter: nanoseek's DeepSeek-V3 parameters <-> the HF / DeepSeek checkpoint layout.

Native differs from HF in two places only:
- routed experts are fused: `mlp.experts.gate_up_proj [E, 2F, d]` and `mlp.experts.down_proj [E, d, F]`;
  HF checkpoints list `mlp.experts.{e}.{gate,up,down}_proj.weight` (transformers v5 may also save the
  fused names; both are read).
- MTP module k is `mtp.{k}` natively and `model.layers.{num_hidden_layers + k}` in the checkpoint, with
  `shared_head.norm` for its output norm and copies of `embed_tokens` / `shared_head.head`, as DeepSeek's
  own checkpoints store it (transformers skips those keys; vLLM/SGLang read them for MTP drafting).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from nanoseek.weights.safetensors_io import WeightsError, check_shape

_EXPERTS = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_MTP = re.compile(r"^mtp\.(\d+)\.(.*)$")


def _mtp_hf_prefix(model: nn.Module, k: int) -> str:
    return f"model.layers.{model.config.num_hidden_layers + k}"


def _mtp_native_to_hf(rest: str) -> str:
    if rest.startswith("block."):
        return rest[len("block.") :]
    if rest.startswith("norm."):
        return "shared_head." + rest
    return rest  # enorm, hnorm, eh_proj


def native_to_hf(model: nn.Module) -> dict[str, torch.Tensor]:
    cfg = model.config
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        hf = native_name_to_hf(model, name)
        if m := _EXPERTS.match(hf):  # fused experts (main layers and MTP blocks) -> one tensor per expert
            prefix, kind = m.groups()
            F = cfg.moe_intermediate_size
            for e in range(tensor.shape[0]):
                if kind == "gate_up_proj":
                    out[f"{prefix}.{e}.gate_proj.weight"] = tensor[e, :F]
                    out[f"{prefix}.{e}.up_proj.weight"] = tensor[e, F:]
                else:
                    out[f"{prefix}.{e}.down_proj.weight"] = tensor[e]
        else:
            out[hf] = tensor
    embed = model.model.embed_tokens.weight.detach()
    head = model.lm_head.weight.detach()
    for k in range(len(getattr(model, "mtp", []))):
        out[f"{_mtp_hf_prefix(model, k)}.embed_tokens.weight"] = embed.clone()
        out[f"{_mtp_hf_prefix(model, k)}.shared_head.head.weight"] = head.clone()
    return {k: v.detach().contiguous() for k, v in out.items()}


def native_name_to_hf(model: nn.Module, name: str) -> str:
    """The HF key holding (all or, for fused experts, the first part of) a native parameter."""
    if m := _MTP.match(name):
        return f"{_mtp_hf_prefix(model, int(m.group(1)))}.{_mtp_native_to_hf(m.group(2))}"
    return name


def has_mtp_weights(reader: Mapping[str, torch.Tensor], cfg) -> bool:
    return f"model.layers.{cfg.num_hidden_layers}.eh_proj.weight" in reader


def hf_to_native(reader: Mapping[str, torch.Tensor], model: nn.Module, *, source: str) -> dict[str, torch.Tensor]:
    """Fetch every native parameter/buffer of `model` (built on meta) from the HF-named `reader`,
    checking shapes; a missing or mis-shaped tensor raises WeightsError naming it."""
    cfg = model.config
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    for name, shape in expected.items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue  # tied to the embedding after loading
        hf = native_name_to_hf(model, name)
        if m := _EXPERTS.match(hf):
            tensor = _read_experts(reader, m.group(1), m.group(2), shape, source)
        elif hf not in reader and hf.endswith("e_score_correction_bias") and cfg.topk_method != "noaux_tc":
            tensor = torch.zeros(shape)  # V2 routers have no correction bias
        else:
            tensor = reader[hf]
        check_shape(hf, tensor, shape, source)
        state[name] = tensor
    if cfg.tie_word_embeddings and "lm_head.weight" in expected:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


def _read_experts(reader, prefix: str, kind: str, shape: tuple[int, ...], source: str) -> torch.Tensor:
    fused = f"{prefix}.{kind}"
    if fused in reader:
        return reader[fused]
    E = shape[0]
    if kind == "gate_up_proj":
        parts = [
            torch.cat([reader[f"{prefix}.{e}.gate_proj.weight"], reader[f"{prefix}.{e}.up_proj.weight"]], 0)
            for e in range(E)
        ]
    else:
        parts = [reader[f"{prefix}.{e}.down_proj.weight"] for e in range(E)]
    try:
        return torch.stack(parts)
    except RuntimeError as exc:
        raise WeightsError(f"{source}: experts under {prefix!r} have inconsistent shapes ({exc})") from exc
