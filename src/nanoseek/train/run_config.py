"""One settings tree for a whole run (pretraining -> SFT -> GRPO), one override grammar for every command.

    run = load_run_config(preset="tiny", overrides=["seed=3", "optim.lr=3e-3", "sft.optim.lr=2e-3",
                                                    "grpo.max_steps=20"])
    run.train                     # pretraining's TrainConfig: `model`, `data`, `tokenizer`, `optim` and the loop keys
    run.sft, run.grpo             # the stages' settings, as `nanoseek sft --set` / `nanoseek grpo --set` take them
    run.grpo_config(device="cpu") # GRPOConfig of those settings

The tree, as `--set KEY=VALUE` addresses it (train/overrides.py: dotted keys, typed values, "did you mean"):
    <root>   TrainConfig           model.*, data.*, tokenizer.*, optim.*, batch_size, max_steps, seed, ...
    sft.*    SFTConfig             TrainConfig's loop keys (optim.*, max_steps, batch_size, ...) + epochs;
                                   model/data/tokenizer come from the fine-tuned model and the chat data
    grpo.*   GRPOConfig            loss_type, num_generations, optim.*, max_steps, ...

Each command reads its own section's keys bare or prefixed: `nanoseek sft --set optim.lr=1e-3` and
`--set sft.optim.lr=1e-3` are one setting, as are `nanoseek grpo --set max_steps=20` and
`--set grpo.max_steps=20`; the speedrun takes the whole tree. The stages' sections are kept as their settings
and resolved when the stage runs (SFT's defaults depend on the model's context and the device), but their
keys and value types are checked when the run's settings are read, so a typo fails before pretraining.
Presets are files in the package (train/presets/*.yaml; `nanoseek train --preset NAME`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoseek.train.config import TRAIN_EVAL_ALIASES, TrainConfig, load_train_config
from nanoseek.train.overrides import apply_overrides, in_section, parse_override, split_sections, suggest

SECTIONS = ("sft", "grpo")  # the stages' sections under the root (pretraining's TrainConfig)
SFT_REFUSED = ("model", "data", "tokenizer")  # fine-tuning's model, tokenizer and data are its arguments


@dataclass
class SFTConfig(TrainConfig):
    """The keys `nanoseek sft --set` takes: the loop's (TrainConfig's) plus `epochs` (None: sft.DEFAULT_EPOCHS)."""

    epochs: int | None = None


@dataclass
class RunConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: list[str] = field(default_factory=list)  # `sft.KEY=V` settings, as KEY=V
    grpo: list[str] = field(default_factory=list)  # `grpo.KEY=V` settings, as KEY=V

    def grpo_config(self, device: str = "cpu", before: Sequence[str] = ()) -> Any:
        """The GRPOConfig of the `grpo` section (over `before`, e.g. a plan's settings), validated."""
        from nanoseek.train.grpo import load_grpo_config

        return load_grpo_config([f"device={device}", *before, *self.grpo])

    def to_dict(self) -> dict[str, Any]:
        return {**self.train.to_dict(), "sft": list(self.sft), "grpo": list(self.grpo)}


def load_run_config(
    path: str | Path | None = None, preset: str | None = None, overrides: Sequence[str] = ()
) -> RunConfig:
    """The run's tree: pretraining's TrainConfig (defaults < preset < file < root overrides) and the stages'
    sections (`sft.*`, `grpo.*`), each checked for known keys and value types."""
    root, sections = split_sections(overrides, SECTIONS)
    _check_root_keys(root)
    check_section("sft", sections["sft"])
    check_section("grpo", sections["grpo"])
    train = load_train_config(path, preset=preset, overrides=root)
    return RunConfig(train, sections["sft"], sections["grpo"])


def check_section(name: str, overrides: Sequence[str]) -> None:
    """Raise ValueError (naming the key, with a suggestion) unless every setting is a key of section `name`
    with a value of its type. Cross-field checks run when the stage resolves its settings."""
    if name == "sft":
        rest, _, _ = sft_split(overrides)
        apply_overrides(SFTConfig(), rest, example="optim.lr=3e-5")
    elif name == "grpo":
        from nanoseek.train.grpo import GRPOConfig

        apply_overrides(GRPOConfig(), overrides, example="loss_type=dapo")
    else:
        raise ValueError(f"unknown section {name!r}{suggest(name, SECTIONS)}")


def sft_split(overrides: Sequence[str]) -> tuple[list[str], int | None, set[str]]:
    """SFT's settings (bare or `sft.`-prefixed) -> (the TrainConfig overrides, epochs or None, the keys given)."""
    rest, epochs, keys = [], None, set()
    for item in in_section(overrides, "sft"):
        key, raw = parse_override(item, example="optim.lr=3e-5")
        if key.startswith(tuple(f"{s}." for s in SFT_REFUSED)):
            raise ValueError(
                f"override {item!r}: {key.split('.')[0]}.* settings do not apply to fine-tuning (the model, its "
                f"tokenizer and the data come from the MODEL and DATA arguments)"
            )
        keys.add(key)
        if key == "epochs":
            try:
                epochs = int(raw)
            except ValueError:
                raise ValueError(f"override {item!r}: epochs must be an integer") from None
            if epochs < 1:
                raise ValueError(f"override {item!r}: epochs must be >= 1")
        else:
            rest.append(item)
    return rest, epochs, keys


def _check_root_keys(root: Sequence[str]) -> None:
    """An unknown top-level key names the stages' sections among its suggestions (`grpoo.max_steps`)."""
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    for item in root:
        key, _ = parse_override(item)
        head = key.split(".")[0]
        if head not in names and key not in TRAIN_EVAL_ALIASES:
            raise ValueError(f"override {item!r}: unknown config key {head!r}{suggest(head, [*names, *SECTIONS])}")
