"""The speedrun: tokenizer -> pretraining -> (SFT -> GRPO when those stages exist) -> held-out evaluation ->
a run folder with the model, metrics, summary.json and a report card.

    summary = speedrun(SpeedrunOptions(out=Path("runs/x"), minutes=8.0, device="cpu", preset="tiny"))

Run folder:
    model/            final model: HF folder with tokenizer (nanoseek.load and transformers load it)
    metrics.jsonl     every step and evaluation of every stage ({"event": "stage", ...} lines separate stages)
    summary.json      {"stages": [{"name", "wall_s", "tokens", "energy_j", "eval": {task: {accuracy, ci95, n}}}],
                       "energy_estimated", "cost", "device", ...}
    report.md + *.png the report card
    pretrain/         the pretraining stage's checkpoints and tokenizer

Stages are a list: a later stage (the alignment work adds "sft" and "grpo") is a module
`nanoseek.train.<name>` with `speedrun_stage(ctx: StageContext) -> StageResult`; the speedrun runs every
stage in STAGES whose module exists and says which ones it skipped.
"""

from __future__ import annotations

import importlib
import json
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from nanoseek.train.config import TrainConfig, load_train_config
from nanoseek.train.evaluate import TaskScore

STAGES = ["pretrain", "sft", "grpo"]


@dataclass
class SpeedrunOptions:
    out: Path | None = None  # default runs/<timestamp>
    minutes: float | None = None  # pretraining time budget; default: the preset's (8 min for tiny)
    device: str = "cpu"
    preset: str = "tiny"
    overrides: list[str] = field(default_factory=list)  # extra TrainConfig key=value settings
    show_progress: bool = True


@dataclass
class StageResult:
    name: str
    wall_s: float
    tokens: int
    energy_j: float
    eval: dict[str, TaskScore]
    model_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # steps, losses, tok_s, mfu... (reported as given)

    def to_summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "wall_s": self.wall_s,
            "tokens": self.tokens,
            "energy_j": self.energy_j,
            "eval": {task: s.to_dict() for task, s in self.eval.items()},
            **self.extra,
        }


@dataclass
class StageContext:
    """What a stage gets: the run folder, the pretraining config, the previous stage's result (its model_dir
    is the model to start from), and a metrics.jsonl to append to."""

    run_dir: Path
    train_config: TrainConfig
    previous: StageResult
    metrics_path: Path
    device: str
    show_progress: bool = True


# Defaults of the speedrun on top of the preset: time-budgeted, evaluated along the way. Tasks and lr were
# chosen by measurement on the 2-core CPU (batch 256, 300 steps): add2 + sort (3:1) at lr 4e-3 reached 96.5%
# / 98% held-out; lr 2e-3 with 200 steps 19% / 99.5%; without MTP 8.5% / 100%. Sorting is learnt first, the
# carries of addition later: the mixture keeps add2 at three quarters of the rows.
SPEEDRUN_DEFAULTS = {
    "tiny": [
        "time_budget_min=8", "max_steps=100000", "eval_every=100", "ckpt_every=500", "data.eval_examples=400",
        "data.tasks=[add2,sort]", "data.task_weights=[0.75,0.25]", "optim.lr=3e-3",
    ],
}  # fmt: skip


def speedrun_config(opts: SpeedrunOptions, run_dir: Path) -> TrainConfig:
    overrides = [*SPEEDRUN_DEFAULTS.get(opts.preset, []), f"out_dir={run_dir / 'pretrain'}", f"device={opts.device}"]
    if opts.minutes is not None:
        overrides.append(f"time_budget_min={opts.minutes}")
    if opts.device.startswith("cuda") and opts.preset == "tiny":
        overrides.append("dtype=bfloat16")
    return load_train_config(preset=opts.preset, overrides=[*overrides, *opts.overrides])


def mark_stage(metrics_path: Path, name: str) -> None:
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    with open(metrics_path, "a") as f:
        f.write(json.dumps({"event": "stage", "name": name, "time": time.time()}) + "\n")


def run_pretrain(cfg: TrainConfig, run_dir: Path, show_progress: bool) -> StageResult:
    from nanoseek.train.trainer import Trainer

    start = time.perf_counter()
    result = Trainer(cfg, show_progress=show_progress, tune_threads=True).train()
    s = result.summary
    extra = {
        "steps": result.steps,
        "final_loss": s.get("final_loss"),
        "tok_s": s.get("tok_s"),
        "mfu": s.get("mfu"),
        "train_s": s.get("train_s"),
        "energy_source": s.get("energy_source"),
        "eval_history": s.get("eval_history", []),
    }
    return StageResult(
        "pretrain", time.perf_counter() - start, int(s["tokens"]), float(s["energy_j"]), result.eval,
        result.model_dir, extra,
    )  # fmt: skip


def later_stage(name: str):
    """`speedrun_stage` of nanoseek.train.<name>, or None while that stage does not exist."""
    try:
        module = importlib.import_module(f"nanoseek.train.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"nanoseek.train.{name}":
            return None
        raise
    return getattr(module, "speedrun_stage", None)


def speedrun(opts: SpeedrunOptions) -> dict[str, Any]:
    from nanoseek.parallel import resolve_device
    from nanoseek.train.report import write_report

    t0 = time.perf_counter()
    run_dir = Path(opts.out) if opts.out else Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    if (run_dir / "summary.json").exists():
        raise ValueError(f"{run_dir} already holds a finished speedrun (summary.json); choose another --out")
    device = str(resolve_device(opts.device))
    cfg = speedrun_config(opts, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = run_dir / "metrics.jsonl"
    (run_dir / "train_config.json").write_text(cfg.to_json() + "\n")

    mark_stage(metrics_path, "pretrain")
    # The trainer writes its metrics next to its checkpoints; the run folder's metrics.jsonl gathers all stages.
    stage = run_pretrain(cfg, run_dir, opts.show_progress)
    _append_metrics(Path(cfg.out_dir) / "metrics.jsonl", metrics_path)
    stages = [stage]
    skipped = []
    for name in STAGES[1:]:
        fn = later_stage(name)
        if fn is None:
            skipped.append(name)
            continue
        mark_stage(metrics_path, name)
        ctx = StageContext(run_dir, cfg, stages[-1], metrics_path, device, opts.show_progress)
        stages.append(fn(ctx))

    final = stages[-1]
    model_dir = run_dir / "model"
    _copy_model(final.model_dir, model_dir)
    total_wall = time.perf_counter() - t0
    price = cfg.price_per_device_hour
    from nanoseek.train.meter import make_energy_counter

    summary = {
        "stages": [s.to_summary() for s in stages],
        "energy_estimated": make_energy_counter(device, cfg.watts_per_core).estimated,
        "cost": total_wall / 3600 * price,
        "currency": cfg.currency,
        "device": device,
        "wall_s": total_wall,
        "energy_j": sum(s.energy_j for s in stages),
        "tokens": sum(s.tokens for s in stages),
        "skipped_stages": skipped,
        "model_dir": str(model_dir),
        "preset": opts.preset,
        "tasks": cfg.data.tasks if not cfg.data.files else [],
        "training": training_facts(cfg),
        "model": _model_facts(model_dir),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_report(run_dir, summary, cfg)
    return summary


def training_facts(cfg: TrainConfig) -> dict[str, Any]:
    """What the pretraining started from and read (the report says it as it was)."""
    return {
        "seed": cfg.seed,  # of the initial weights: the trainer always starts from a random model
        "data_files": list(cfg.data.files),
        "tasks": [] if cfg.data.files else list(cfg.data.tasks),
        "tokenizer_path": cfg.tokenizer.path,
    }


def _append_metrics(src: Path, dst: Path) -> None:
    if src.is_file():
        with open(dst, "a") as out:
            out.write(src.read_text())


def _copy_model(src: Path | None, dst: Path) -> None:
    import shutil

    if src is None or not src.is_dir():
        raise ValueError("the last stage produced no model folder")
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)


def _model_facts(model_dir: Path) -> dict[str, Any]:
    from nanoseek.config import DeepseekV3Config

    cfg = DeepseekV3Config.from_dict(json.loads((model_dir / "config.json").read_text()))
    counts = cfg.param_counts()
    return {
        "params": counts["total"],
        "active_params": counts["active"],
        "hidden_size": cfg.hidden_size,
        "layers": cfg.num_hidden_layers,
        "routed_experts": cfg.n_routed_experts,
        "experts_per_token": cfg.num_experts_per_tok,
        "shared_experts": cfg.n_shared_experts,
        "kv_lora_rank": cfg.kv_lora_rank,
        "mtp_depth": cfg.num_nextn_predict_layers,
        "vocab_size": cfg.vocab_size,
    }
