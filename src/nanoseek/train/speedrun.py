"""The speedrun: tokenizer -> pretraining -> SFT (cold start) -> GRPO [-> sft-control], every stage scored on
the same held-out problems -> a run folder with the model, metrics, summary.json and a report card.

    summary = speedrun(SpeedrunOptions(out=Path("runs/x"), minutes=4.5, sft_control=True))

Run folder:
    model/            final model (GRPO's): HF folder with tokenizer (nanoseek.load and transformers load it)
    metrics.jsonl     every step and evaluation of every stage ({"event": "stage", ...} lines separate stages)
    summary.json      {"stages": [{"name", "parent", "format", "wall_s", "tokens", "energy_j",
                                   "eval": {task: {accuracy, ci95, n, correct}}, ...}],
                       "comparisons": [{"stage", "against", "task", "verdict"}], "scoring": {...},
                       "final_eval": {"stage", "wall_s", "energy_j", "greedy": {...}, "sampled": {...}, ...},
                       "energy_estimated", "cost", "device", ...}
    report.md + *.png the report card
    pretrain/         the pretraining stage's checkpoints, tokenizer and model/
    sft/              data.jsonl (the demonstrations), settings.json (the command that reruns it), model/
    grpo/, sft-control/   settings.json, metrics, model/

Stages (STAGES, then LATER_STAGES by name): pretraining writes each problem in the chat template with a direct
answer in the R1 format (data.format=r1: `<think></think><answer>231</answer>`); SFT, the cold start, trains on
demonstrations (r1_conversations) that work the thinking tasks out in the thought (carry_steps) and answer the
others directly; GRPO (nanoseek.train.grpo) trains on all tasks with rule rewards; `sft-control` (with
SpeedrunOptions.sft_control) continues SFT from the SFT model on the same demonstrations for as long as GRPO
trained. Each stage gets a StageContext (the stage it starts from, the StagePlan, the stages so far) and
returns a StageResult, or None when it cannot run (listed as skipped).

One scoring contract: score_stage scores every stage's model through nanoseek.eval on the same held-out
problems, greedy, in its format (SCORING_FORMATS), exactly as the `nanoseek eval` command in
summary["scoring"] does; stage_comparisons states which stage beats which beyond the 95% intervals. The final
model's report card adds sampled pass@1 and pass@k and the MTP module as a drafter (final_evaluation).
The demonstrations live in tasks/demonstrations.py, the scoring contract in train/scoring.py, the final
model's figures in train/final_eval.py; this file runs the stages.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from nanoseek.eval.held_out import TaskScore
from nanoseek.tasks import get_task
from nanoseek.tasks.demonstrations import r1_conversations
from nanoseek.train.config import TrainConfig
from nanoseek.train.final_eval import final_evaluation
from nanoseek.train.overrides import split_sections
from nanoseek.train.run_config import SECTIONS, load_run_config
from nanoseek.train.scoring import (
    GREEDY_EVAL_BATCH,
    MAIN_LINE,
    SCORING_FORMATS,
    heldout_specs,
    scoring_command,
    stage_comparisons,
)

STAGES = list(MAIN_LINE)


@dataclass
class SpeedrunOptions:
    out: Path | None = None  # default runs/<timestamp>
    minutes: float | None = None  # pretraining time budget; default: the preset's (8 min for tiny)
    device: str = "cpu"
    preset: str = "tiny"
    # KEY=VALUE settings: pretraining's TrainConfig keys as they are, the later stages' as `sft.KEY` (SFT and the
    # SFT control) and `grpo.KEY`; `seed=N` seeds every stage
    overrides: list[str] = field(default_factory=list)
    sft_control: bool = False  # also run the `sft-control` arm: more SFT for as long as GRPO ran
    show_progress: bool = True


def split_overrides(overrides: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """`sft.KEY=V` and `grpo.KEY=V` (the run's settings tree, train/run_config.py) go to those stages (as
    KEY=V), every other setting to pretraining."""
    return split_sections(overrides, SECTIONS)


@dataclass
class StageResult:
    name: str
    wall_s: float
    tokens: int
    energy_j: float
    eval: dict[str, TaskScore]
    model_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # steps, losses, tok_s, mfu... (reported as given)
    format: str = "r1"  # the prompt format `eval` was scored in (SCORING_FORMATS)
    parent: str | None = None  # the stage whose model this one started from (None: from scratch)

    def to_summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "parent": self.parent,
            "wall_s": self.wall_s,
            "tokens": self.tokens,
            "energy_j": self.energy_j,
            "format": self.format,
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
    plan: StagePlan | None = None
    stages: dict[str, StageResult] = field(default_factory=dict)  # every stage run so far, by name


@dataclass
class StagePlan:
    """What the stages after pretraining do: the SFT stage's cold-start demonstrations (`sft_conversations`
    R1-format traces of `sft_tasks`, mixed by `sft_task_weights`) and settings, and GRPO's tasks and settings.
    Tasks left None are the run's (pretraining's data.tasks). `*_extra` are the user's `sft.*` / `grpo.*`
    settings, applied last."""

    sft_conversations: int
    sft: list[str]
    grpo: list[str]
    sft_tasks: list[str] | None = None
    sft_task_weights: list[float] | None = None
    thinking_tasks: list[str] | None = None  # whose demonstrations think (r1_thought); None: all
    grpo_tasks: list[str] | None = None
    sft_extra: list[str] = field(default_factory=list)
    grpo_extra: list[str] = field(default_factory=list)


# Defaults of the speedrun on top of the preset: pretraining in the R1 format on 2-digit addition, worked out
# column by column in the thought (data.thinking_tasks), and sorting, answered directly. Two tasks have weight 0
# in pretraining, so every stage is scored on them but only the later stages train on them: 3-digit addition,
# the same procedure one column longer, and countdown (make a target from three numbers with + - * /), where any
# correct expression counts. Time-budgeted; lr and the add2:sort mixture (3:1) are the measured ones.
SPEEDRUN_DEFAULTS = {
    "tiny": [
        "time_budget_min=4.5", "max_steps=100000", "eval_every=250", "ckpt_every=500", "data.eval_examples=400",
        "data.tasks=[add2,sort,add3,countdown]", "data.task_weights=[0.75,0.25,0,0]", "data.format=r1",
        "data.thinking_tasks=[add2]", "seq_len=48", "optim.lr=3e-3",
    ],
}  # fmt: skip


# The plan after pretraining (at most 4.5 + 2 + 5.5 min of training, plus the evaluations: under 15 min on the
# 2-core CPU):
#   SFT, the cold start: 2,300 demonstrations, drawn 10:5:5:3: ~1,000 3-digit additions and ~500 2-digit ones,
#     worked out in the thought as pretraining wrote add2; ~500 sortings, direct as pretraining wrote it; ~300
#     countdown, each with one solution (the one the problem was generated from; many problems have several),
#     computed a step at a time in the thought. At most 900 steps of 64 conversations, lr 1e-3. add3 gets the
#     most: only SFT teaches its extra column (GRPO cannot, below). Countdown gets what teaches the format and the
#     step-by-step thought; GRPO, whose prompts cost nothing, gets the minutes.
#   GRPO, DAPO, 64 prompts x 8 samples, lr 1e-4, three quarters of the prompts countdown, the rest the other
#     tasks so that they are not forgotten. Countdown is where RL has something SFT lacks: a rule that accepts
#     every correct expression, where the demonstrations teach one answer per problem.
# Why this shape (measured on the 2-core CPU, see README "The speedrun"):
#   - a model pretrained on bare prompts (`47+85=231`) lost most of its skill when SFT moved it to the chat + R1
#     format (add2 99.8% bare -> 31-95% in R1 after 300-900 SFT steps): its circuits were tied to where the answer
#     sat. Pretrained in the R1 format, the format does not move.
#   - add2 answered directly in pretraining, then add3 worked out in SFT: SFT disturbed the direct add2 answers
#     (add2 100% -> 83-97% after 600 steps, back to ~98% only after 1,200) and reached add3 40-94% by seed. With
#     add2 worked out in pretraining, add3 extends a procedure the model has (seed 1: add3 97.8% and add2 98.8%
#     after 300 SFT steps).
#   - GRPO from the SFT model on add3 did not learn in 60-77 steps at any lr (its mistakes are confident and
#     systematic); on countdown the rollouts' accuracy rose 0.14 -> 0.28 in 60 steps, where 600 more SFT steps on
#     the same demonstrations left held-out countdown at 15-20%.
#   - countdown's demonstrations: SFT continued on them (the control) gains 1-8 points whatever their number, GRPO
#     tops out near 40% (its rollouts' entropy collapses within ~100 steps). With ~300 and 5.5 min of GRPO, GRPO
#     beats the control beyond the intervals in every seed; with 500, not in seed 1337 (benchmarks/RESULTS.md,
#     "How many countdown demonstrations").
STAGE_PLANS = {
    "tiny": StagePlan(
        sft_conversations=2300, sft_task_weights=[5 / 23, 5 / 23, 10 / 23, 3 / 23], thinking_tasks=["add2", "add3"],
        sft=["time_budget_min=2", "max_steps=900", "batch_size=64", "optim.lr=1e-3", "optim.warmup_steps=30",
             "mtp_weight=0", "ckpt_every=0"],
        grpo=["time_budget_min=5.5", "max_steps=600", "num_generations=8", "prompts_per_step=64",
              "max_new_tokens=40", "temperature=1.0", "loss_type=dapo", "optim.lr=1e-4",
              "task_weights=[0.05,0.1,0.1,0.75]", "ckpt_every=0"],
    ),
}  # fmt: skip


def stage_plan(opts: SpeedrunOptions, cfg: TrainConfig) -> StagePlan:
    """The preset's plan, the run's tasks where it names none, the user's `sft.*` / `grpo.*` settings."""
    import copy

    plan = copy.deepcopy(STAGE_PLANS.get(opts.preset, STAGE_PLANS["tiny"]))
    _, by_stage = split_overrides(opts.overrides)
    plan.sft_extra, plan.grpo_extra = by_stage["sft"], by_stage["grpo"]
    plan.sft_tasks = plan.sft_tasks or list(cfg.data.tasks)
    plan.grpo_tasks = plan.grpo_tasks or list(cfg.data.tasks)
    if plan.sft_task_weights is not None and len(plan.sft_task_weights) != len(plan.sft_tasks):
        plan.sft_task_weights = None  # the preset's mixture was for other tasks: uniform
    return plan


def speedrun_config(opts: SpeedrunOptions, run_dir: Path) -> TrainConfig:
    overrides = [*SPEEDRUN_DEFAULTS.get(opts.preset, []), f"out_dir={run_dir / 'pretrain'}", f"device={opts.device}"]
    if opts.minutes is not None:
        overrides.append(f"time_budget_min={opts.minutes}")
    if opts.device.startswith("cuda") and opts.preset == "tiny":
        overrides.append("dtype=bfloat16")
    # the run's tree: pretraining's TrainConfig; the stages' `sft.*` / `grpo.*` keys are checked now, used later
    return load_run_config(preset=opts.preset, overrides=[*overrides, *opts.overrides]).train


def mark_stage(metrics_path: Path, name: str) -> None:
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    with open(metrics_path, "a") as f:
        f.write(json.dumps({"event": "stage", "name": name, "time": time.time()}) + "\n")


def run_pretrain(ctx: StageContext) -> StageResult:
    from nanoseek.train.trainer import Trainer

    cfg = ctx.train_config
    start = time.perf_counter()
    # scored once, by score_stage (the scoring contract), not also by the trainer's own final evaluation
    result = Trainer(cfg, show_progress=ctx.show_progress, tune_threads=True, evaluate_at_end=False).train()
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
    scores = score_stage(result.model_dir, cfg.data.format, ctx)
    return StageResult(
        "pretrain", time.perf_counter() - start, int(s["tokens"]), float(s["energy_j"]), scores, result.model_dir,
        extra, format=cfg.data.format,
    )  # fmt: skip


def sft_settings(ctx: StageContext) -> list[str]:
    """The SFT stage's `nanoseek sft --set` settings: the plan's, the run's seed, the user's `sft.*` last."""
    return [*ctx.plan.sft, f"seed={ctx.train_config.seed}", *ctx.plan.sft_extra]


def write_demonstrations(ctx: StageContext, folder: Path) -> Path:
    """The cold-start demonstrations (sft_conversations R1-format traces of the plan's SFT tasks, drawn with the
    run's seed) as chat JSONL in `folder`/data.jsonl, the file the SFT stage and its control train on."""
    plan = ctx.plan
    tasks = [get_task(t, ctx.train_config.data.heldout_fraction) for t in plan.sft_tasks]
    data = r1_conversations(tasks, plan.sft_conversations, ctx.train_config.seed, plan.sft_task_weights or None,
                            plan.thinking_tasks)  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in data))
    return path


def write_settings(folder: Path, command: str, overrides: list[str], **facts: Any) -> None:
    """`folder`/settings.json: the stage's resolved settings and the command that reruns it by hand."""
    folder.mkdir(parents=True, exist_ok=True)
    set_args = " ".join(f"--set {shlex.quote(o)}" for o in overrides)
    record = {"command": f"{command} {set_args}".strip(), "overrides": overrides, **facts}
    (folder / "settings.json").write_text(json.dumps(record, indent=2) + "\n")


def sft_stage(ctx: StageContext) -> StageResult:
    """SFT from the pretrained model on the cold-start demonstrations (nanoseek.train.sft.run_sft)."""
    folder = ctx.run_dir / "sft"
    data = write_demonstrations(ctx, folder)
    settings = sft_settings(ctx)
    write_settings(
        folder, f"nanoseek sft {ctx.previous.model_dir} {data} --out {folder}", settings,
        demonstrations=ctx.plan.sft_conversations, tasks=ctx.plan.sft_tasks, task_weights=ctx.plan.sft_task_weights,
        thinking_tasks=ctx.plan.thinking_tasks,
    )  # fmt: skip
    return run_sft_stage("sft", ctx.previous, data, folder, settings, ctx)


def sft_control_stage(ctx: StageContext) -> StageResult | None:
    """The control arm of GRPO: SFT continued from the SFT model on the same demonstrations with the same
    settings, for as long as GRPO trained (its wall clock), so GRPO's gain is measured against what more
    supervised training on the same data buys. None unless both SFT and GRPO ran."""
    sft, grpo = ctx.stages.get("sft"), ctx.stages.get("grpo")
    if sft is None or grpo is None or not grpo.extra.get("train_s"):
        return None
    folder = ctx.run_dir / "sft-control"
    data = ctx.run_dir / "sft" / "data.jsonl"
    minutes = grpo.extra["train_s"] / 60
    # the time budget replaces the step count: the trainer plans its steps (and the schedule) from it
    settings = [*sft_settings(ctx), f"time_budget_min={minutes:.6g}", f"max_steps={CONTROL_MAX_STEPS}"]
    write_settings(
        folder, f"nanoseek sft {sft.model_dir} {data} --out {folder}", settings, matched_to="grpo",
        grpo_train_s=grpo.extra["train_s"],
    )  # fmt: skip
    return run_sft_stage("sft-control", sft, data, folder, settings, ctx)


# The control's step count comes from its time budget; this cap is never reached in practice.
CONTROL_MAX_STEPS = 1_000_000


def run_sft_stage(
    name: str, start_from: StageResult, data: Path, folder: Path, settings: list[str], ctx: StageContext
) -> StageResult:
    from nanoseek.train.sft import run_sft

    start = time.perf_counter()
    result = run_sft(
        start_from.model_dir, data, folder, settings, show_progress=ctx.show_progress, device=ctx.device,
        metrics_path=ctx.metrics_path,
    )  # fmt: skip
    scores = score_stage(result.model_dir, "r1", ctx)
    s = result.summary
    extra = {"steps": result.steps, "final_loss": result.losses[-1] if result.losses else None,
             "tok_s": s.get("tok_s"), "mfu": s.get("mfu"), "train_s": s.get("train_s"),
             "energy_source": s.get("energy_source")}  # fmt: skip
    return StageResult(
        name, time.perf_counter() - start, int(result.tokens), float(result.energy_j), scores, result.model_dir,
        extra, parent=start_from.name,
    )  # fmt: skip


def grpo_settings(ctx: StageContext) -> list[str]:
    """GRPO's `nanoseek grpo --set` settings: the plan's, the run's seed and held-out split (its prompts must come
    from the problems every stage is scored without), no evaluation of its own (the run scores every stage alike),
    no system prompt (the demonstrations have none), the user's `grpo.*` last."""
    cfg = ctx.train_config
    return [*ctx.plan.grpo, f"seed={cfg.seed}", f"heldout_fraction={cfg.data.heldout_fraction}", "eval.examples=0",
            "system_prompt=", *ctx.plan.grpo_extra]  # fmt: skip


def grpo_stage(ctx: StageContext) -> StageResult | None:
    """GRPO from the SFT model (skipped when SFT did not run: the pretrained model has never seen the R1
    format, so every reward would be 0)."""
    from nanoseek.train.grpo import run_grpo

    if ctx.previous.name != "sft":
        return None
    plan, folder = ctx.plan, ctx.run_dir / "grpo"
    settings = grpo_settings(ctx)
    write_settings(folder, f"nanoseek grpo {ctx.previous.model_dir} --tasks {','.join(plan.grpo_tasks)} --out {folder}",
                   settings)  # fmt: skip
    start = time.perf_counter()
    result = run_grpo(
        ctx.previous.model_dir, plan.grpo_tasks, folder, settings, show_progress=ctx.show_progress,
        device=ctx.device, metrics_path=ctx.metrics_path,
    )  # fmt: skip
    scores = score_stage(result.model_dir, "r1", ctx)
    s = result.summary
    keys = ("reward", "accuracy", "completion_len", "kl", "clip_frac", "entropy")
    # no MFU: GRPO's tokens mix sampling (inference) and training, whose FLOPs per token differ 3x; tokens/s
    # counts both, as the tokens column does (the meter's own tok_s counts the trained positions only)
    tok_s = result.tokens / s["train_s"] if s.get("train_s") else None
    extra = {"steps": result.steps, "final_loss": s.get("final_loss"), "tok_s": tok_s, "mfu": None,
             "train_s": s.get("train_s"), "energy_source": s.get("energy_source"), "tasks": list(plan.grpo_tasks),
             "history": [{k: h[k] for k in ("step", *keys) if k in h} for h in result.history]}  # fmt: skip
    return StageResult(
        "grpo", time.perf_counter() - start, int(result.tokens), float(result.energy_j), scores, result.model_dir,
        extra, parent="sft",
    )  # fmt: skip


def score_stage(model_dir: Path, fmt: str, ctx: StageContext) -> dict[str, TaskScore]:
    """Held-out accuracy of a stage's model on every task of the run, greedy, in `fmt` (SCORING_FORMATS)."""
    import nanoseek
    from nanoseek.eval.held_out import evaluate_in_format
    from nanoseek.tokenizer import load_tokenizer

    cfg = ctx.train_config
    tasks = [spec.task for spec in heldout_specs(cfg.data.tasks, cfg)]
    scores = evaluate_in_format(
        nanoseek.load(model_dir, device=ctx.device), load_tokenizer(model_dir), tasks, cfg.eval.examples, fmt,
        batch_size=GREEDY_EVAL_BATCH,
    )  # fmt: skip
    with open(ctx.metrics_path, "a") as f:
        record = {"event": "eval", "final": True, "format": fmt, **{n: s.to_dict() for n, s in scores.items()}}
        f.write(json.dumps(record) + "\n")
    return scores


LATER_STAGES = {"sft": sft_stage, "grpo": grpo_stage, "sft-control": sft_control_stage}


def run_later_stages(names: list[str], ctx: StageContext) -> tuple[StageResult, dict[str, StageResult], list[str]]:
    """Run the LATER_STAGES `names` in order, each from the main line's last model (`ctx.previous` first; the
    control is a side arm), marking each in the metrics. Returns (the main line's last stage, every stage by name,
    `ctx.stages` first, the names skipped)."""
    main_line, stages, skipped = ctx.previous, dict(ctx.stages), []
    for name in names:
        mark_stage(ctx.metrics_path, name)
        result = LATER_STAGES[name](replace(ctx, previous=main_line, stages=dict(stages)))
        if result is None:
            skipped.append(name)
            continue
        stages[name] = result
        if name in STAGES:
            main_line = result
    return main_line, stages, skipped


def speedrun(opts: SpeedrunOptions) -> dict[str, Any]:
    from nanoseek.eval.report import write_report
    from nanoseek.parallel import resolve_device

    t0 = time.perf_counter()
    run_dir = Path(opts.out) if opts.out else Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    if (run_dir / "summary.json").exists():
        raise ValueError(f"{run_dir} already holds a finished speedrun (summary.json); choose another --out")
    device = str(resolve_device(opts.device))
    cfg = speedrun_config(opts, run_dir)
    plan = stage_plan(opts, cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = run_dir / "metrics.jsonl"
    (run_dir / "train_config.json").write_text(cfg.to_json() + "\n")

    mark_stage(metrics_path, "pretrain")
    # The trainer writes its metrics next to its checkpoints; the run folder's metrics.jsonl gathers all stages.
    start = StageResult("scratch", 0.0, 0, 0.0, {})
    stage = run_pretrain(StageContext(run_dir, cfg, start, metrics_path, device, opts.show_progress, plan))
    _append_metrics(Path(cfg.out_dir) / "metrics.jsonl", metrics_path)
    names = [*STAGES[1:], *(["sft-control"] if opts.sft_control else [])]
    after = StageContext(run_dir, cfg, stage, metrics_path, device, opts.show_progress, plan, {"pretrain": stage})
    final, stages, skipped = run_later_stages(names, after)
    model_dir = run_dir / "model"
    _copy_model(final.model_dir, model_dir)
    ctx = StageContext(run_dir, cfg, final, metrics_path, device, opts.show_progress, plan, dict(stages))
    final_eval = final_evaluation(final, ctx)
    with open(metrics_path, "a") as f:
        f.write(json.dumps({"event": "final_eval", **final_eval}) + "\n")
    total_wall = time.perf_counter() - t0
    price = cfg.price_per_device_hour
    from nanoseek.meter import make_energy_counter

    summary = {
        "stages": [s.to_summary() for s in stages.values()],
        "final_eval": final_eval,
        "scoring": {
            "problems": cfg.eval.examples,
            "tasks": list(cfg.data.tasks),
            "commands": {fmt: scoring_command(fmt, list(cfg.data.tasks), cfg.eval.examples) for fmt in SCORING_FORMATS},
        },  # fmt: skip
        "comparisons": stage_comparisons([s.to_summary() for s in stages.values()]),
        "energy_estimated": make_energy_counter(device, cfg.watts_per_core).estimated,
        "cost": total_wall / 3600 * price,
        "currency": cfg.currency,
        "device": device,
        "wall_s": total_wall,
        "energy_j": sum(s.energy_j for s in stages.values()) + final_eval["energy_j"],
        "tokens": sum(s.tokens for s in stages.values()),
        "skipped_stages": skipped,
        "model_dir": str(model_dir),
        "preset": opts.preset,
        "tasks": cfg.data.tasks if not cfg.data.files else [],
        "training": training_facts(cfg),
        "demonstrations": plan.sft_conversations,
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
    from nanoseek.model.config import DeepseekV3Config

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
