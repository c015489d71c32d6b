"""PEFT LoRA adapter folders, read and written as peft writes them: `adapter_config.json` + `adapter_model.safetensors`.

    adapter = read_peft_adapter("my-adapter")        # LoraAdapterWeights: per module, A [r, in], B [out, r], scale
    adapter.modules["model.layers.0.self_attn.q_proj"]  # -> LoraModule(a, b, scale)
    save_adapter(model, cfg, "runs/x/adapter", base="HuggingFaceTB/SmolLM2-135M-Instruct")  # model/lora.py's layers
    attach_adapter(nanoseek.load(base), "runs/x/adapter")             # the same model again, from the folder

peft stores `base_model.model.<module path>.lora_A.weight` and `.lora_B.weight` (the adapter's own name,
"default", is dropped when saving); `<module path>` is the transformers model's module name, which is the
dense nanoseek model's own (model/dense.py keeps transformers' names). A module's update is
W x + scale * B (A x) with scale = lora_alpha / r, or lora_alpha / sqrt(r) with `use_rslora`; `rank_pattern`
and `alpha_pattern` override r and alpha per module (peft matches a pattern against the module name's tail).
What changes the math in ways nanoseek does not serve is refused with the reason: DoRA, LoRA biases,
`modules_to_save` (whole replaced modules), fan_in_fan_out layouts (GPT-2's Conv1D), embedding adapters, and
other PEFT methods than LoRA.

save_adapter writes what `peft` writes (checked against peft 0.21.2 in tests/test_lora.py): LoraConfig's fields
in adapter_config.json, and `PeftModel.from_pretrained(transformers_model, folder)` loads it. attach_adapter
puts a folder back on a model as training's LoRALinear layers (exactly, or a ValueError: no rank_pattern etc.).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nanoseek.model.lora import LoRAConfig, adapter_state_dict, apply_lora, load_adapter_state, lora_modules
from nanoseek.weights.safetensors_io import WeightsError

PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


@dataclass
class LoraModule:
    a: torch.Tensor  # [r, in] fp32
    b: torch.Tensor  # [out, r] fp32
    scale: float  # the update is scale * b @ a

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class LoraAdapterWeights:
    path: Path
    base_model: str | None  # adapter_config.json's base_model_name_or_path (informational)
    modules: dict[str, LoraModule] = field(default_factory=dict)  # transformers module name -> its update


def _pattern_value(patterns: dict, module: str, default):
    """peft's rule for rank_pattern / alpha_pattern: a key matches a module whose name is the key or ends in
    '.' + key (keys may be regular expressions); the first match wins."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(key, module) or re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def _check_config(cfg: dict, where: Path) -> None:
    def refuse(why: str) -> None:
        raise WeightsError(f"{where}: {why}; nanoseek serves plain LoRA adapters (peft LoraConfig)")

    if cfg.get("peft_type", "LORA") != "LORA":
        refuse(f"peft_type is {cfg.get('peft_type')!r}, not LORA")
    if cfg.get("use_dora"):
        refuse("use_dora is set (DoRA rescales the weight's columns)")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        refuse("the adapter trains biases (bias / lora_bias)")
    if cfg.get("modules_to_save"):
        refuse(f"modules_to_save replaces whole modules ({cfg['modules_to_save']})")
    if cfg.get("fan_in_fan_out"):
        refuse("fan_in_fan_out is set (a GPT-2 Conv1D layout)")
    if cfg.get("layer_replication"):
        refuse("layer_replication changes the model's layers")
    if not isinstance(cfg.get("r"), int) or cfg["r"] < 1:
        refuse(f"r must be a positive integer, got {cfg.get('r')!r}")


def read_peft_adapter(path: str | Path) -> LoraAdapterWeights:
    """The adapter at `path` (a folder peft's save_pretrained wrote), fp32. WeightsError / FileNotFoundError
    name the file and what is wrong with it."""
    from safetensors.torch import load_file

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such adapter folder (want {CONFIG_FILE} + {WEIGHTS_FILE})")
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: missing: {folder} is not a PEFT adapter folder")
    if not weights_path.is_file():
        pickled = (folder / "adapter_model.bin").exists()
        old = " (adapter_model.bin is a pickle; save with safe_serialization=True)" if pickled else ""
        raise FileNotFoundError(f"{weights_path}: missing{old}")
    try:
        cfg = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WeightsError(f"{config_path}: not valid JSON ({exc})") from None
    _check_config(cfg, config_path)
    tensors = load_file(str(weights_path))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            raise WeightsError(f"{weights_path}: tensor {key!r} is not under {PREFIX!r} (not a peft LoRA file)")
        # (peft's in-memory names carry the adapter's name: lora_A.default.weight)
        name = key[len(PREFIX) :].replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        if ".lora_embedding_" in name:
            raise WeightsError(f"{weights_path}: {key!r}: LoRA on embeddings is not served (linear layers only)")
        match = re.fullmatch(r"(.+)\.lora_([AB])\.weight", name)
        if match is None:
            raise WeightsError(f"{weights_path}: tensor {key!r} is not a lora_A / lora_B weight")
        pairs.setdefault(match.group(1), {})[match.group(2)] = tensor
    if not pairs:
        raise WeightsError(f"{weights_path}: no LoRA weights in it")
    adapter = LoraAdapterWeights(folder, cfg.get("base_model_name_or_path"))
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise WeightsError(f"{weights_path}: {module} has lora_{''.join(ab)} without its pair")
        a, b = ab["A"].float(), ab["B"].float()
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise WeightsError(
                f"{weights_path}: {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not [r, in] "
                "and [out, r]"
            )
        r = a.shape[0]
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", 8)))
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        adapter.modules[module] = LoraModule(a.contiguous(), b.contiguous(), scale)
    return adapter


def peft_config(cfg: LoRAConfig, targets: Sequence[str], base: str | None) -> dict[str, Any]:
    """adapter_config.json as peft 0.21.2's LoraConfig(...).save_pretrained writes it (every field, in its key
    order), with this run's rank, alpha, dropout, targets and base."""
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
    fields = {
        "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
        "base_model_name_or_path": base, "bias": "none", "corda_config": None, "ensure_weight_tying": False,
        "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "kasa_config": None, "layer_replication": None, "layers_pattern": None,
        "layers_to_transform": None, "loftq_config": {}, "lora_alpha": alpha, "lora_bias": False,
        "lora_dropout": cfg.dropout, "lora_ga_config": None, "megatron_config": None,
        "megatron_core": "megatron.core", "modules_to_save": None, "monteclora_config": None, "peft_type": "LORA",
        "peft_version": "0.21.2", "qalora_group_size": 16, "r": cfg.rank, "rank_pattern": {}, "revision": None,
        "target_modules": sorted(targets), "target_parameters": None, "task_type": "CAUSAL_LM",
        "trainable_token_indices": None, "use_bdlora": None, "use_dora": False, "use_qalora": False,
        "use_rslora": False, "velora_config": None,
    }  # fmt: skip
    return fields


def save_adapter(model: nn.Module, cfg: LoRAConfig, folder: str | os.PathLike, base: str | None = None,
                 tok=None) -> Path:  # fmt: skip
    """Write the model's adapter as a PEFT folder (and the tokenizer with its chat template, when given)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA layers to save")
    targets = sorted({p.rsplit(".", 1)[-1] for p in modules})
    tensors = {PREFIX + k: v.to("cpu").contiguous() for k, v in adapter_state_dict(model).items()}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(peft_config(cfg, targets, base), indent=2) + "\n")
    if tok is not None:
        tok.save(folder)
    return folder


def attach_adapter(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """Wrap `model` (in place) with the adapter of a PEFT folder (read as read_peft_adapter reads it, with its
    checks), in eval mode (no dropout); returns it. Training's LoRALinear layers share one rank and scale, so an
    adapter whose modules differ in them (rank_pattern / alpha_pattern) is refused; `nanoseek serve --lora`
    serves such adapters."""
    adapter = read_peft_adapter(folder)
    ranks = sorted({m.rank for m in adapter.modules.values()})
    scales = sorted({m.scale for m in adapter.modules.values()})
    if len(ranks) > 1 or len(scales) > 1:
        raise WeightsError(f"{folder}: its modules differ in rank ({ranks}) or scale ({scales}); attach_adapter "
                           f"applies one to every module (nanoseek serve --lora takes such adapters)")  # fmt: skip
    paths = sorted(adapter.modules)
    rank = ranks[0]
    cfg = LoRAConfig(rank=rank, alpha=scales[0] * rank, target_modules=sorted({p.rsplit(".", 1)[-1] for p in paths}))
    wrapped = apply_lora(model, cfg)
    if sorted(wrapped) != paths:
        raise ValueError(f"{folder}: the adapter's modules do not match this model's (e.g. "
                         f"{sorted(set(paths) ^ set(wrapped))[:3]})")  # fmt: skip
    dtype = next(model.parameters()).dtype
    tensors = {
        f"{p}.lora_{ab}.weight": t.to(dtype) for p, m in adapter.modules.items() for ab, t in (("A", m.a), ("B", m.b))
    }
    load_adapter_state(model, tensors, str(folder))
    for layer in lora_modules(model).values():
        layer.scaling = scales[0]  # the file's scale itself (alpha / rank above may round it: rsLoRA's alpha / sqrt(r))
    return model.eval()
