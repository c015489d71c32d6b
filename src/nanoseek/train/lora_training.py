"""LoRA in the training loop: `nanoseek sft --lora` and `nanoseek grpo --lora` (model/lora.py holds the adapter).

    settings, lora = lora_settings(overrides, DEFAULTS_SFT)   # split `lora.*` off, add the adapter's defaults
    trainer = with_lora(SFTTrainer)(cfg, ..., lora=lora, merge=True)

The mixin changes only what the loop keeps and writes, never the step: after the stage builds its model, the
target linears are wrapped (model/lora.py) and every other parameter is frozen, so the optimizer (which takes
the parameters that require gradients) holds the adapter alone and the backward computes no gradient for a
base weight. Checkpoints hold the adapter's tensors (model_state.safetensors) and its PEFT folder instead of
the model; a resume rebuilds the base from the same MODEL, wraps it the same way and loads the adapter, so it
repeats the uninterrupted run. The run writes <out>/adapter (PEFT folder + tokenizer), and with merge also
<out>/model, the full HF folder with the adapter folded into the weights.

Defaults under --lora (a layer below the user's --set): a learning rate ten times the stage's full fine-tuning
default (SFT 2e-5 -> 2e-4, GRPO 1e-6 -> 1e-5; LoRA's optimal rate is about 10x full fine-tuning's across model
sizes, for SFT and RL alike: Schulman et al., "LoRA Without Regret", 2025), and mtp_weight 0: DeepSeek-V3's MTP
modules stay as they are (transformers does not build them, so an adapter on them would load nowhere).
`lora.base_format=int4` (QLoRA-style) runs the frozen base's forward on nanoseek's 4-bit kernel (a packed copy
of each wrapped weight beside the fp32 one, not saved) while the backward takes the input's gradient from the
fp32 weights: the kernel has no backward of its own (model/lora.py). The default, auto, does so when the base's
weights are on the 4-bit grid already (a 4-bit GGUF file) and the kernel runs; the base stays fp32 otherwise.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nanoseek.model.lora import (
    LoRAConfig,
    adapter_param_count,
    adapter_state_dict,
    apply_lora,
    load_adapter_state,
    merge_lora,
    peft_would_drop,
    resolved_targets,
)
from nanoseek.parallel import print0
from nanoseek.train import checkpoint as ckpt_io
from nanoseek.train.overrides import apply_overrides, in_section, split_sections
from nanoseek.weights.peft_lora import save_adapter

SFT_DEFAULTS = ["optim.lr=2e-4", "mtp_weight=0"]
GRPO_DEFAULTS = ["optim.lr=1e-5", "mtp_weight=0"]
ADAPTER_DIR = "adapter"


def lora_settings(overrides: Sequence[str], section: str, enabled: bool, defaults: Sequence[str] = ()) -> tuple[
    list[str], LoRAConfig | None
]:  # fmt: skip
    """(the stage's settings, the LoRAConfig or None): `lora.KEY=V` (also `SECTION.lora.KEY=V`) go to the
    adapter; with LoRA on, `defaults` go first so that the user's settings win."""
    rest, parts = split_sections(in_section(overrides, section), ("lora",))
    if not enabled:
        if parts["lora"]:
            raise ValueError(f"lora.{parts['lora'][0]} needs --lora (lora=True): LoRA is off")
        return rest, None
    cfg = LoRAConfig()
    apply_overrides(cfg, parts["lora"], example="rank=8")
    cfg.validate()
    return [*defaults, *rest], cfg


def with_lora(trainer_cls: type) -> type:
    """`trainer_cls` (SFTTrainer, GRPOTrainer) training a LoRA adapter; its __init__ takes lora= and merge=."""
    return type(f"LoRA{trainer_cls.__name__}", (LoRATraining, trainer_cls), {})


class LoRATraining:
    """The mixin (first in the MRO): the model hooks of the Trainer for an adapter on a frozen base."""

    def __init__(self, *args, lora: LoRAConfig, merge: bool = False, base_name: str | None = None, **kw):
        self.lora, self.merge, self.base_name = lora, merge, base_name
        super().__init__(*args, **kw)
        if self.parallel == "fsdp" and self.info.distributed:
            raise ValueError("LoRA trains under --parallel none or ddp (the adapter is small: no need to shard it)")

    # -- the model -----------------------------------------------------------------------------------------
    def _build_model(self) -> nn.Module:
        mtp_weight = getattr(self, "grpo", self.cfg).mtp_weight
        if mtp_weight > 0 and len(getattr(self._initial_model, "mtp", ())):
            raise ValueError(f"mtp_weight={mtp_weight:g} with LoRA: the adapter leaves the MTP modules as they are "
                             f"(set mtp_weight=0)")  # fmt: skip
        model = super()._build_model()
        self.lora_paths = apply_lora(model, self.lora, seed=self.cfg.seed)
        self.base_packed = 0
        if self.lora.base_format in ("int4", "auto"):
            from nanoseek.quant import pack_lora_bases

            self.base_packed = pack_lora_bases(model, only_if_exact=self.lora.base_format == "auto")
        # the adapter's dropout draws from torch's RNG: seeded here, as pretraining's build_model seeds it, so that a
        # run repeats another of the same settings (a resume then restores the checkpoint's RNG state over this)
        torch.manual_seed(self.cfg.seed)
        dropped = peft_would_drop(model, resolved_targets(model, self.lora))
        if dropped:
            warnings.warn(
                f"LoRA on DeepSeek-V3's {', '.join(dropped)}: peft (with transformers 5) reads these names as the "
                f"routed experts and would not apply this part of the adapter; nanoseek loads it, and --merge "
                f"folds it into the weights",
                stacklevel=2,
            )
        return model

    def _load_model_state(self, model: nn.Module, state: dict) -> None:
        load_adapter_state(model, state, source=str(self.checkpoint.path))

    def _describe_model(self) -> str:
        n = adapter_param_count(self.model)
        base = f"{self.base_packed} of them 4-bit (base_format {self.lora.base_format})" if self.base_packed else "fp32"
        return (f"{super()._describe_model()}; LoRA rank {self.lora.rank} on {len(self.lora_paths)} linears: "
                f"{n / 1e6:.2f}M trained parameters, base {base}")  # fmt: skip

    def _flops_per_token(self) -> float:
        # forward (2 per weight) + backward to the activations (2), no weight gradients for the frozen base:
        # 4 of full training's 6 FLOPs per weight and token (the adapter's own are a rounding error)
        return super()._flops_per_token() * 4 / 6

    def _config_record(self) -> dict[str, Any]:
        lora = self.lora.to_dict()
        # the defaults (fp32 before auto) are not recorded, so that older checkpoints still resume
        if lora["base_format"] in ("fp32", "auto"):
            del lora["base_format"]
        return {**super()._config_record(), "lora": lora}

    # -- checkpoints and output ------------------------------------------------------------------------------
    def _full_states(self) -> tuple[dict | None, Any]:
        if hasattr(self, "_sync_rollout_model"):  # GRPO: (a no-op unless sharded, which LoRA is not)
            self._sync_rollout_model()
        return adapter_state_dict(self.model), ckpt_io.full_optimizer_state(self.model, self.optimizer, sharded=False)

    def _write_model_files(self, model: nn.Module, folder: Path) -> None:
        save_adapter(model, self.lora, folder, base=self.base_name, tok=self.tok)

    def export(self, folder: Path) -> Path | None:
        """<out>/adapter (PEFT folder + tokenizer); with merge also `folder` (<out>/model), the merged model,
        which is then returned. The merge folds the adapter into the live model (it ends as a plain one)."""
        if not self.info.is_main:
            return None
        adapter = save_adapter(self.model, self.lora, self.out_dir / ADAPTER_DIR, base=self.base_name, tok=self.tok)
        self.adapter_dir = adapter
        print0(f"adapter: {adapter}")
        if not self.merge:
            return adapter
        merge_lora(self.model)
        merged = ckpt_io.save_model(self.model, self.tok, folder)
        print0(f"merged model: {merged}")
        return merged
