"""PEFT LoRA adapter folders, read as peft writes them: `adapter_config.json` + `adapter_model.safetensors`.

    adapter = read_peft_adapter("my-adapter")        # LoraAdapterWeights: per module, A [r, in], B [out, r], scale
    adapter.modules["model.layers.0.self_attn.q_proj"]  # -> LoraModule(a, b, scale)

peft stores `base_model.model.<module path>.lora_A.weight` and `.lora_B.weight` (the adapter's own name,
"default", is dropped when saving); `<module path>` is the transformers model's module name, which is the
dense nanoseek model's own (model/dense.py keeps transformers' names). A module's update is
W x + scale * B (A x) with scale = lora_alpha / r, or lora_alpha / sqrt(r) with `use_rslora`; `rank_pattern`
and `alpha_pattern` override r and alpha per module (peft matches a pattern against the module name's tail).
What changes the math in ways nanoseek does not serve is refused with the reason: DoRA, LoRA biases,
`modules_to_save` (whole replaced modules), fan_in_fan_out layouts (GPT-2's Conv1D), embedding adapters, and
other PEFT methods than LoRA.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

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
        name = key[len(PREFIX) :]
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
