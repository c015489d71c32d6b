"""Training configuration: one dataclass, read from TOML/YAML, overridden from the command line.

    cfg = load_train_config("run.toml", preset="tiny", overrides=["optim.lr=3e-3", "model.hidden_size=96"])
    model_cfg = cfg.model_config(vocab_size=tokenizer.vocab_size)   # a validated DeepseekV3Config
    lr = lr_at(step, cfg)                                            # warmup + cosine | WSD
    cfg2 = train_config_from_dict(cfg.to_dict())                    # e.g. from a checkpoint's train_config.json

Layers, later ones win: dataclass defaults < preset < file < overrides. Presets are files in the package
(train/presets/NAME.yaml, in a config file's format); the override grammar is train/overrides.py's, and the
whole run's tree (pretraining + the sft and grpo sections) is train/run_config.py's RunConfig. A file is a
mapping with the same sections as `TrainConfig` (top-level scalars plus `[model]`, `[data]`, `[optim]`,
`[tokenizer]`, `[eval]`), e.g.

    preset = "tiny"            # optional; a `preset` argument to load_train_config wins over it
    batch_size = 128
    [model]
    size = "test-tiny"          # a name in nanoseek.model.config.NAMED_CONFIGS
    hidden_size = 128           # any other key is a DeepseekV3Config field overriding that size
    [optim]
    lr = 2e-3

Unknown keys raise ValueError naming the key (with a "did you mean"); values are coerced to the field's
type (so "3e-4" from the command line becomes a float) and rejected with a clear message when they do
not fit. The model config is built once during loading so impossible shapes (heads not dividing a width,
top-k above the expert count...) are reported before anything runs.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoseek.model.config import NAMED_CONFIGS, ConfigError, DeepseekV3Config
from nanoseek.train.overrides import apply_mapping, apply_overrides, coerce, read_config_file, suggest


@dataclass
class ModelSpec:
    size: str = "test-tiny"  # a name in nanoseek.model.config.NAMED_CONFIGS
    overrides: dict[str, Any] = field(default_factory=dict)  # DeepseekV3Config fields over that size

    def _apply_key(self, key: str, value: Any, dotted: str, where: str) -> bool:
        """Settings reach a model's fields directly: `model.hidden_size=96` (or `overrides: {...}` in a file)."""
        if key == "size":
            return False
        if key == "overrides":
            apply_mapping(self, dict(value), where, dotted[: -len(key)])
            return True
        if key not in _MODEL_FIELDS:
            raise ValueError(
                f"{where}: unknown model field {dotted!r}{suggest(key, _MODEL_FIELDS)}; model keys are "
                f"'size' and DeepseekV3Config fields"
            )
        self.overrides[key] = coerce(value, _model_hints()[key], dotted, where)
        return True


_MODEL_FIELDS = {f.name: f for f in dataclasses.fields(DeepseekV3Config) if f.init}


def _model_hints() -> dict[str, Any]:
    return typing.get_type_hints(DeepseekV3Config)


TASK_FORMATS = ("plain", "r1")
SCHEDULES = ("cosine", "wsd", "constant")


@dataclass
class DataSpec:
    # Synthetic tasks (nanoseek.tasks): names and optional mixture weights (default: uniform).
    tasks: list[str] = field(default_factory=lambda: ["add2"])
    task_weights: list[float] = field(default_factory=list)
    loss_on_answer_only: bool = True  # task rows: loss on the answer tokens (and the eos after them) only
    heldout_fraction: float = 0.1  # share of each task's problem space kept out of training
    # How task rows are written (and evaluated): "plain", the bare problem and answer (`<bos>47+85=231<eos>`);
    # "r1", the chat template's user turn and a direct answer in the R1 format with an empty thought
    # (`<think></think><answer>231</answer>`), what `nanoseek eval --format r1 --system-prompt ''` asks.
    format: str = "plain"
    # r1 only: tasks whose rows work the problem out in the thought instead of an empty one (additions column by
    # column, demonstrations.r1_thought), e.g. the speedrun's add2, so SFT's longer additions extend a procedure
    # pretraining taught instead of replacing its direct answers.
    thinking_tasks: list[str] = field(default_factory=list)
    # User text (nanoseek.train.data.PackedTextDataset): .txt / .jsonl / .parquet; used instead of tasks.
    files: list[str] = field(default_factory=list)
    text_field: str = "text"  # JSONL key / parquet column holding the text


@dataclass
class EvalConfig:
    """Held-out evaluation, the `eval` section (GRPO's section has its own: `grpo.eval.*`). Answers are greedy
    and scored in the stage's prompt format (data.format; GRPO: R1 with its system prompt; the speedrun:
    scoring.SCORING_FORMATS): the format is the stage's, not a setting. The sampled figures are the speedrun's
    final model's (final_eval.py). Old spellings, kept as aliases: `data.eval_examples` and `eval_every` (GRPO:
    `eval_examples`, `eval_every`) are `eval.examples` and `eval.every`."""

    examples: int = 200  # held-out problems per task at each evaluation (0: none)
    every: int = 0  # steps between evaluations inside the loop; 0: at the end only (GRPO: before and after)
    samples: int = 8  # sampled completions per problem (pass@1 and pass@samples with bootstrap intervals)
    temperature: float = 1.0  # their temperature (the speedrun's GRPO rollouts')
    sampled_examples: int = 200  # sampled on the first this-many of the greedy evaluation's problems

    def validate(self, where: str = "eval") -> None:
        for name in ("examples", "every", "sampled_examples"):
            if getattr(self, name) < 0:
                raise ValueError(f"{where}.{name} must be >= 0, got {getattr(self, name)}")
        if self.samples < 1:
            raise ValueError(f"{where}.samples must be >= 1, got {self.samples}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"{where}.temperature must be > 0 (the sampled figures sample), got {self.temperature}")


# The eval section's old spellings (documented aliases, README "Settings"): key -> the `eval` key it sets.
TRAIN_EVAL_ALIASES = {"eval_every": "every", "data.eval_examples": "examples"}


def apply_eval_alias(cfg: Any, key: str, value: Any, where: str, aliases: dict[str, str]) -> bool:
    """`_apply_key` hook of a dataclass with an `eval` section: an old spelling of one of its keys (`aliases`)
    lands there; so does `data: {eval_examples: ...}`, the rest of `data` as given. True when handled."""
    if key == "data" and isinstance(value, dict) and "eval_examples" in value and "data.eval_examples" in aliases:
        apply_mapping(cfg.data, {k: v for k, v in value.items() if k != "eval_examples"}, where, "data.")
        key, value = "data.eval_examples", value["eval_examples"]
    elif key not in aliases or "." in key:
        return False
    apply_mapping(cfg.eval, {aliases[key]: value}, where, "eval.")
    return True


@dataclass
class TokenizerSpec:
    path: str | None = None  # an existing tokenizer folder; None: train one at the start of the run
    vocab_size: int = 512
    train_texts: int = 20000  # texts sampled (tasks) or read (files) to train it


@dataclass
class OptimConfig:
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant (after the warmup)
    decay_fraction: float = 0.2  # WSD: share of the steps spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class TrainConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = 256  # rows per optimizer step per device, before gradient accumulation
    seq_len: int = 32
    grad_accum: int = 1
    max_steps: int = 1000
    time_budget_min: float | None = None  # stop at whichever comes first: max_steps or this budget
    mtp_weight: float = 0.3
    router_bias_gamma: float = 1e-3  # aux-loss-free balancing: bias update speed (0 disables)
    balance_alpha: float = 1e-4  # sequence-wise balance loss weight
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"  # float32 | bfloat16 | float16 (autocast dtype on GPU; stay fp32 on CPU)
    compile: bool = False
    seed: int = 1337
    out_dir: str = "runs/nanoseek"
    ckpt_every: int = 500  # steps; 0 disables periodic checkpoints (a final one is still written)
    keep_last: int = 3
    log_every: int = 10
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Money per device-hour for the meter's cost line. Default: an on-demand 2-vCPU cloud VM (~0.10 USD/h);
    # the GPU preset uses a typical H100 rental price. Set your own (`--set price_per_device_hour=...`).
    price_per_device_hour: float = 0.10
    currency: str = "USD"
    watts_per_core: float = 10.0  # CPU energy estimate when no RAPL/NVML counter exists (an assumption)
    peak_flops: float | None = None  # device peak FLOP/s for MFU; None: from the spec table or a CPU probe

    def _apply_key(self, key: str, value: Any, dotted: str, where: str) -> bool:
        return apply_eval_alias(self, key, value, where, TRAIN_EVAL_ALIASES)  # `eval_every`, `data.eval_examples`

    # ---- derived ---------------------------------------------------------------------------------------
    def model_config(self, vocab_size: int | None = None) -> DeepseekV3Config:
        """The DeepseekV3Config this run trains (vocab_size from the tokenizer when given)."""
        overrides = dict(self.model.overrides)
        if vocab_size is not None:
            overrides["vocab_size"] = vocab_size
        if self.model.size not in NAMED_CONFIGS:
            raise ValueError(
                f"model.size {self.model.size!r} is not a known size; known: {', '.join(sorted(NAMED_CONFIGS))}"
            )
        try:
            return DeepseekV3Config(**{**NAMED_CONFIGS[self.model.size], **overrides})
        except ConfigError as exc:
            raise ConfigError(f"model config (size {self.model.size!r} + overrides): {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def validate(self, *, check_model: bool = True) -> None:
        """Cross-field checks; raises ValueError (ConfigError for model shapes) with the field's name.
        check_model=False skips the [model] section and seq_len's bound from it (fine-tuning loads its model)."""
        positive = {
            "batch_size": self.batch_size, "seq_len": self.seq_len, "grad_accum": self.grad_accum,
            "max_steps": self.max_steps, "keep_last": self.keep_last, "log_every": self.log_every,
            "tokenizer.vocab_size": self.tokenizer.vocab_size,
        }  # fmt: skip
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        non_negative = {
            "ckpt_every": self.ckpt_every,
            "optim.warmup_steps": self.optim.warmup_steps,
            "optim.weight_decay": self.optim.weight_decay, "optim.grad_clip": self.optim.grad_clip,
            "mtp_weight": self.mtp_weight, "router_bias_gamma": self.router_bias_gamma,
            "balance_alpha": self.balance_alpha, "price_per_device_hour": self.price_per_device_hour,
            "watts_per_core": self.watts_per_core,
        }  # fmt: skip
        for name, value in non_negative.items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.eval.validate()
        if self.optim.lr <= 0:
            raise ValueError(f"optim.lr must be positive, got {self.optim.lr}")
        if self.optim.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {self.optim.schedule!r}")
        if not 0.0 <= self.optim.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must lie in [0, 1], got {self.optim.min_lr_ratio}")
        if not 0.0 < self.optim.decay_fraction <= 1.0:
            raise ValueError(f"optim.decay_fraction must lie in (0, 1], got {self.optim.decay_fraction}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self.optim, name) < 1.0:
                raise ValueError(f"optim.{name} must lie in [0, 1), got {getattr(self.optim, name)}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if not (self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        if self.time_budget_min is not None and self.time_budget_min <= 0:
            raise ValueError(f"time_budget_min must be positive or null, got {self.time_budget_min}")
        if self.data.format not in TASK_FORMATS:
            raise ValueError(f"data.format must be one of {', '.join(TASK_FORMATS)}, got {self.data.format!r}")
        if not 0.0 < self.data.heldout_fraction < 1.0:
            raise ValueError(f"data.heldout_fraction must lie in (0, 1), got {self.data.heldout_fraction}")
        if not self.data.tasks and not self.data.files:
            raise ValueError("data: give synthetic tasks (data.tasks) or text files (data.files); both are empty")
        if self.data.task_weights:
            if len(self.data.task_weights) != len(self.data.tasks):
                raise ValueError(
                    f"data.task_weights has {len(self.data.task_weights)} entries for {len(self.data.tasks)} tasks"
                )
            if any(w < 0 for w in self.data.task_weights) or sum(self.data.task_weights) <= 0:
                raise ValueError("data.task_weights must be >= 0 with a positive sum")
        if self.data.files:
            from nanoseek.train.data import expand_data_files  # missing files fail now, not mid-run

            expand_data_files(self.data.files)
        if self.data.tasks and not self.data.files:
            from nanoseek.tasks import get_task  # a typo in a task name is a config error

            for name in self.data.tasks:
                get_task(name)
        unknown = [t for t in self.data.thinking_tasks if t not in self.data.tasks]
        if unknown:
            raise ValueError(f"data.thinking_tasks {unknown} are not among data.tasks {self.data.tasks}")
        if self.data.thinking_tasks and self.data.format != "r1":
            raise ValueError("data.thinking_tasks needs data.format=r1: plain rows have no thought")
        if not check_model:
            return
        mc = self.model_config(vocab_size=self.tokenizer.vocab_size if self.tokenizer.path is None else None)
        if self.seq_len > mc.max_position_embeddings:
            raise ValueError(
                f"seq_len={self.seq_len} exceeds the model's max_position_embeddings={mc.max_position_embeddings}"
            )


# ---- presets ------------------------------------------------------------------------------------------
# Presets are files in the package, train/presets/NAME.yaml (pyproject's package-data ships them): a layer of
# settings in a config file's format, read as one. tiny.yaml is the speedrun's model, with its calibration.
PRESET_DIR = Path(__file__).with_name("presets")
PRESET_ORDER = ("tiny", "small", "gpt2-small-moe")  # listed first, in this order; any other file after, by name


class PresetFiles(Mapping[str, dict[str, Any]]):
    """The preset files by name (`PRESETS["tiny"]`: a fresh dict of its settings, the file read once)."""

    def __init__(self, folder: Path):
        self.folder, self._read = folder, {}

    def _names(self) -> list[str]:
        found = sorted(p.stem for p in self.folder.glob("*.yaml"))
        return [n for n in PRESET_ORDER if n in found] + [n for n in found if n not in PRESET_ORDER]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def __getitem__(self, name: str) -> dict[str, Any]:
        if name not in self._read:
            if name not in self._names():
                raise KeyError(name)
            self._read[name] = read_config_file(self.folder / f"{name}.yaml")
        return copy.deepcopy(self._read[name])


PRESETS = PresetFiles(PRESET_DIR)


# ---- loading ------------------------------------------------------------------------------------------
def load_train_config(
    path: str | Path | None = None,
    preset: str | None = None,
    overrides: list[str] | None = None,
    *,
    base: dict[str, Any] | None = None,
    check_model: bool = True,
) -> TrainConfig:
    """Build and validate a TrainConfig: defaults < base < preset < file (TOML/YAML) < `key=value` overrides.
    base: another layer of defaults (SFT's); check_model: see TrainConfig.validate."""
    file_data: dict[str, Any] = read_config_file(Path(path)) if path is not None else {}
    file_preset = file_data.pop("preset", None)
    preset = preset if preset is not None else file_preset
    cfg = TrainConfig()
    if base:
        apply_mapping(cfg, base, where="defaults")
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}{suggest(preset, PRESETS)}")
        apply_mapping(cfg, PRESETS[preset], where=f"preset {preset!r}")
    apply_mapping(cfg, file_data, where=str(path))
    apply_overrides(cfg, overrides or [])
    cfg.validate(check_model=check_model)
    return cfg


def train_config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Rebuild a TrainConfig from `to_dict()` output (e.g. a checkpoint's train_config.json), checked
    like a config file."""
    cfg = TrainConfig()
    apply_mapping(cfg, dict(data), where="config dict")
    cfg.validate()
    return cfg


# ---- learning-rate schedule ---------------------------------------------------------------------------
def lr_at(step: int, cfg: TrainConfig, total_steps: int | None = None) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup to optim.lr, then
    cosine:  cosine decay to lr*min_lr_ratio at total_steps;
    wsd:     constant until the last decay_fraction of the steps, then linear decay to lr*min_lr_ratio;
    constant: optim.lr (fine-tuning from trained weights: logit distillation).
    total_steps defaults to cfg.max_steps (a time-budgeted run can pass its own estimate)."""
    o = cfg.optim
    total = max(1, total_steps if total_steps is not None else cfg.max_steps)
    lo = o.lr * o.min_lr_ratio
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    if step >= total:
        return lo
    if o.schedule == "cosine":
        span = max(1, total - o.warmup_steps)
        progress = min(1.0, (step - o.warmup_steps) / span)
        return lo + (o.lr - lo) * 0.5 * (1.0 + math.cos(math.pi * progress))
    decay_start = max(o.warmup_steps, int(total * (1.0 - o.decay_fraction)))
    if step < decay_start:
        return o.lr
    progress = (step - decay_start) / max(1, total - decay_start)
    return o.lr + (lo - o.lr) * progress
