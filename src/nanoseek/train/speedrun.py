"""The speedrun: tokenizer -> pretraining -> SFT -> GRPO, each followed by a held-out evaluation -> a run
folder with the model, metrics, summary.json and a report card.

    summary = speedrun(SpeedrunOptions(out=Path("runs/x"), minutes=8.0, device="cpu", preset="tiny"))

Run folder:
    model/            final model: HF folder with tokenizer (nanoseek.load and transformers load it)
    metrics.jsonl     every step and evaluation of every stage ({"event": "stage", ...} lines separate stages)
    summary.json      {"stages": [{"name", "wall_s", "tokens", "energy_j", "eval": {task: {accuracy, ci95, n}}}],
                       "final_eval": {"stage", "wall_s", "energy_j", "greedy": {task: EvalResult.to_dict()},
                                      "sampled": {task: EvalResult.to_dict()}},
                       "energy_estimated", "cost", "device", ...}
    report.md + *.png the report card
    pretrain/         the pretraining stage's checkpoints and tokenizer

    sft/, grpo/       the later stages' folders (each with model/ and metrics.jsonl)

Stages are a list (STAGES). Pretraining learns the tasks in their bare format (`47+85=` -> `231`); SFT
(nanoseek.train.sft) teaches the chat template and the R1 format on traces of the tasks
(`<think>74+58</think><answer>231</answer>`, r1_conversations); GRPO (nanoseek.train.grpo) trains on the task
SFT left room on, with the format and accuracy rewards. Each stage gets a StageContext (the previous stage's
model folder, the StagePlan) and returns a StageResult, or None when it cannot run (then it is listed as
skipped). Pretraining is evaluated on the bare prompts (by the trainer), SFT and GRPO in the chat + R1 format
with no system prompt (by nanoseek.eval, evaluate_r1_stage).

After the last stage, the final model's report card comes from nanoseek.eval (final_evaluation): on the GRPO
tasks in the last stage's format, greedy pass@1 (the same problems and format as the stage's own evaluation,
so the same number) and FINAL_EVAL_SAMPLES sampled completions per problem for pass@1 and pass@k, each with
its 95% interval.
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from nanoseek.train.config import TrainConfig, load_train_config
from nanoseek.train.evaluate import TaskScore
from nanoseek.train.tasks import Example, Task, get_task

STAGES = ["pretrain", "sft", "grpo"]


@dataclass
class SpeedrunOptions:
    out: Path | None = None  # default runs/<timestamp>
    minutes: float | None = None  # pretraining time budget; default: the preset's (8 min for tiny)
    device: str = "cpu"
    preset: str = "tiny"
    overrides: list[str] = field(default_factory=list)  # extra TrainConfig key=value settings
    sft_overrides: list[str] = field(default_factory=list)  # extra run_sft settings (after the plan's)
    grpo_overrides: list[str] = field(default_factory=list)  # extra run_grpo settings (after the plan's)
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
    plan: StagePlan | None = None


@dataclass
class StagePlan:
    """What the stages after pretraining do: SFT data (R1-format traces of `sft_tasks`) and settings, and the
    tasks and settings of GRPO. `*_extra` are the user's overrides, applied last."""

    sft_tasks: list[str]
    sft_task_weights: list[float]
    sft_conversations: int
    sft: list[str]
    grpo_tasks: list[str]
    grpo: list[str]
    sft_extra: list[str] = field(default_factory=list)
    grpo_extra: list[str] = field(default_factory=list)


# Defaults of the speedrun on top of the preset: time-budgeted, evaluated along the way. Tasks and lr were
# chosen by measurement on the 2-core CPU (batch 256, 300 steps): add2 + sort (3:1) at lr 4e-3 reached 96.5%
# / 98% held-out; lr 2e-3 with 200 steps 19% / 99.5%; without MTP 8.5% / 100%. Sorting is learnt first, the
# carries of addition later: the mixture keeps add2 at three quarters of the rows.
SPEEDRUN_DEFAULTS = {
    "tiny": [
        "time_budget_min=5", "max_steps=100000", "eval_every=100", "ckpt_every=500", "data.eval_examples=400",
        "data.tasks=[add2,sort]", "data.task_weights=[0.75,0.25]", "optim.lr=3e-3",
    ],
}  # fmt: skip


# ---- R1-format traces of the synthetic tasks (the SFT data, and what GRPO rewards) -------------------------
def r1_thought(example: Example) -> str:
    """A short scratchpad for `example`: for addition, the operands with their digits reversed and padded to
    the same width, so digit i of the (least-significant-first) answer sits under digit i of both; for
    other tasks, the problem restated."""
    m = re.fullmatch(r"(\d+)\+(\d+)=", example.prompt)
    if m:
        width = max(len(m.group(1)), len(m.group(2)))
        a, b = (x.zfill(width)[::-1] for x in m.groups())
        return f"{a}+{b}"
    return example.prompt.rstrip("=")


def r1_answer_text(example: Example) -> str:
    return f"<think>{r1_thought(example)}</think><answer>{example.answer}</answer>"


def r1_conversations(tasks: list[Task], n: int, seed: int, weights: list[float] | None = None) -> list[dict]:
    """n training-split problems as chat conversations whose assistant turn is the R1-format trace."""
    rng = random.Random(f"sft-data/{seed}")
    out = []
    for _ in range(n):
        ex = rng.choices(tasks, weights=weights)[0].generate(rng, "train")
        out.append({"messages": [{"role": "user", "content": ex.prompt},
                                 {"role": "assistant", "content": r1_answer_text(ex)}]})  # fmt: skip
    return out


# The time split (at most 5 + 2 + 4 min of training plus the evaluations: under 15 min on the 2-core CPU):
#   pretrain  5 min: add2 + sort in the bare format (~1,400 steps; add2 was 98.8% after 600 steps, 100% after 1,500);
#   SFT     <=200 steps: the chat template and the R1 format on traces of add2, sort and add3;
#   GRPO    <=200 steps on add2 and sort (3:1), DAPO, 64 prompts x 8 samples.
# Measured by step counts (the shared machine was ~10x slower than quiet during the measurements), starting
# from a 2,235-step pretraining of this recipe (add2 100%, sort 99.8% bare):
#   after 200 SFT steps (batch 128, lr 1e-3): R1-format add2 52.0% (95% CI 45.1-58.8%, n=200), sampled at T=1
#   43.5% per sample but 79% of the problems solved within 8 samples; sort 86%; add3 1.5%. Formatting and the
#   scratchpad are learnt first (96% of add2 scratchpads correct), the answer from it later: SFT leaves room
#   on add2, and its pass@8 >> pass@1 is what GRPO sharpens.
#   GRPO from there, DAPO, 64 prompts x 8 samples, lr 2e-4: held-out add2 59.0% after 30 steps, 75.5% after 60,
#   87.5% after 90 and 90.0% (95% CI 85.1-93.4%, n=200) after 120, rollout accuracy 38% -> 83%, the
#   completion length steady at 12.5 tokens. With 16 prompts per step at lr 3e-4 it drifted down instead
#   (38% after 40 steps): too few samples per step for that rate; lr 1e-4 and 3e-4 at 64 prompts both gave
#   55.5% after 30 steps.
# A whole run of this recipe (busy machine, pretraining given 18 min for 850 steps; 200 SFT steps) gave add2
# 99.8% bare after pretraining, 26.5% (22.4-31.0%, n=400) in the R1 format after SFT, and 89.0% (85.6-91.7%)
# after 150 GRPO steps on add2 alone, but sort fell from 88.5% to 3.0%: GRPO on one task made the model forget
# the other's format. With sort in a quarter of the GRPO prompts, from that SFT model: add2 46.8% after 50
# steps, 62.7% after 100 and 76.0% (71.6-79.9%, n=400) after 150; sort 88.5% -> 90.0% (86.7-92.6%).
# The default run with this plan (`nanoseek speedrun`, shared machine at load ~2.5, 8.5 min wall in all;
# 488 pretraining steps, 200 SFT, 200 GRPO), n=400 each:
#   pretrain add2 99.2% (97.8-99.7%), sort 98.8% (97.1-99.5%)
#   SFT      add2 19.8% (16.1-23.9%), sort 79.2% (75.0-82.9%)
#   GRPO     add2 80.0% (75.8-83.6%), sort 80.5% (76.3-84.1%)
STAGE_PLANS = {
    "tiny": StagePlan(
        sft_tasks=["add2", "sort", "add3"], sft_task_weights=[0.25, 0.25, 0.5], sft_conversations=4000,
        sft=["time_budget_min=2", "max_steps=200", "batch_size=128", "optim.lr=1e-3", "optim.warmup_steps=20",
             "mtp_weight=0", "ckpt_every=0"],
        grpo_tasks=["add2", "sort"],
        grpo=["time_budget_min=4", "max_steps=200", "num_generations=8", "prompts_per_step=64", "max_new_tokens=24",
              "temperature=1.0", "loss_type=dapo", "optim.lr=2e-4", "task_weights=[0.75,0.25]", "ckpt_every=0"],
    ),
}  # fmt: skip


def stage_plan(opts: SpeedrunOptions) -> StagePlan:
    import copy

    plan = copy.deepcopy(STAGE_PLANS.get(opts.preset, STAGE_PLANS["tiny"]))
    plan.sft_extra, plan.grpo_extra = list(opts.sft_overrides), list(opts.grpo_overrides)
    return plan


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


def sft_stage(ctx: StageContext) -> StageResult | None:
    """SFT on R1-format traces of the tasks (nanoseek.train.sft.run_sft); None while that module is missing."""
    try:
        from nanoseek.train.sft import run_sft
    except ModuleNotFoundError as exc:
        if exc.name == "nanoseek.train.sft":
            return None
        raise
    plan = ctx.plan
    tasks = [get_task(t, ctx.train_config.data.heldout_fraction) for t in plan.sft_tasks]
    data = r1_conversations(tasks, plan.sft_conversations, ctx.train_config.seed, plan.sft_task_weights or None)
    start = time.perf_counter()
    result = run_sft(
        ctx.previous.model_dir, data, ctx.run_dir / "sft", [*plan.sft, *plan.sft_extra],
        show_progress=ctx.show_progress, device=ctx.device, metrics_path=ctx.metrics_path,
    )  # fmt: skip
    scores = evaluate_r1_stage(result.model_dir, ctx)
    s = result.summary
    extra = {"steps": result.steps, "final_loss": result.losses[-1] if result.losses else None,
             "tok_s": s.get("tok_s"), "mfu": s.get("mfu"), "train_s": s.get("train_s"),
             "energy_source": s.get("energy_source")}  # fmt: skip
    return StageResult(
        "sft", time.perf_counter() - start, int(result.tokens), float(result.energy_j), scores, result.model_dir, extra
    )


def grpo_stage(ctx: StageContext) -> StageResult | None:
    """GRPO on the tasks SFT left room on, from the SFT model (skipped when SFT did not run: the pretrained
    model has never seen the R1 format, so every reward would be 0)."""
    from nanoseek.train.grpo import run_grpo

    if ctx.previous.name != "sft":
        return None
    plan = ctx.plan
    start = time.perf_counter()
    result = run_grpo(
        ctx.previous.model_dir, plan.grpo_tasks, ctx.run_dir / "grpo",
        [*plan.grpo, "eval_examples=0", "system_prompt=", *plan.grpo_extra],
        show_progress=ctx.show_progress, device=ctx.device, metrics_path=ctx.metrics_path,
    )  # fmt: skip
    scores = evaluate_r1_stage(result.model_dir, ctx)
    s = result.summary
    keys = ("reward", "accuracy", "completion_len", "kl", "clip_frac", "entropy")
    # no MFU: GRPO's tokens mix sampling (inference) and training, whose FLOPs per token differ 3x; tokens/s
    # counts both, as the tokens column does (the meter's own tok_s counts the trained positions only)
    tok_s = result.tokens / s["train_s"] if s.get("train_s") else None
    extra = {"steps": result.steps, "final_loss": s.get("final_loss"), "tok_s": tok_s, "mfu": None,
             "train_s": s.get("train_s"), "energy_source": s.get("energy_source"), "tasks": list(plan.grpo_tasks),
             "history": [{k: h[k] for k in ("step", *keys) if k in h} for h in result.history]}  # fmt: skip
    return StageResult(
        "grpo", time.perf_counter() - start, int(result.tokens), float(result.energy_j), scores, result.model_dir, extra
    )


# Greedy evaluations decode 256 problems at a time (as train.grpo.evaluate_r1 does: the same engine steps, so the
# same answers to the bit).
GREEDY_EVAL_BATCH = 256


def heldout_specs(tasks: list[str], cfg: TrainConfig) -> list[Any]:
    """nanoseek.eval task specs of `tasks` on the pretraining config's held-out split."""
    from nanoseek.eval import TaskSpec

    return [TaskSpec(t, "synthetic", task=get_task(t, cfg.data.heldout_fraction)) for t in tasks]


def r1_eval_format(plan: StagePlan) -> dict[str, Any]:
    """nanoseek.eval settings of the format SFT teaches and GRPO trains with: the chat template, no system prompt
    (the R1 one would fill much of a small model's context), `<think>…</think><answer>…</answer>` with the
    answer checked exactly, GRPO's completion budget."""
    from nanoseek.train.grpo import load_grpo_config

    r1 = load_grpo_config(["system_prompt=", *plan.grpo, *plan.grpo_extra])
    return {"format": "r1", "system_prompt": r1.system_prompt, "max_new_tokens": r1.max_new_tokens}


def evaluate_r1_stage(model_dir: Path, ctx: StageContext) -> dict[str, TaskScore]:
    """Held-out accuracy of a chat-format stage's model (nanoseek.eval): greedy, in r1_eval_format."""
    import nanoseek
    from nanoseek.eval import evaluate
    from nanoseek.tokenizer import load_tokenizer

    cfg = ctx.train_config
    model = nanoseek.load(model_dir, device=ctx.device)
    results = evaluate(
        model, load_tokenizer(model_dir), heldout_specs(cfg.data.tasks, cfg), limit=cfg.data.eval_examples,
        batch_size=GREEDY_EVAL_BATCH, **r1_eval_format(ctx.plan),
    )  # fmt: skip
    scores = {name: TaskScore(sum(d["correct"][0] for d in r.details), r.n) for name, r in results.items()}
    with open(ctx.metrics_path, "a") as f:
        f.write(json.dumps({"event": "eval", "final": True, **{n: s.to_dict() for n, s in scores.items()}}) + "\n")
    return scores


LATER_STAGES = {"sft": sft_stage, "grpo": grpo_stage}

# The final model's sampled evaluation: completions per problem, at the GRPO rollouts' temperature, on the first
# FINAL_EVAL_SAMPLED_PROBLEMS of the greedy evaluation's problems, FINAL_EVAL_BATCH sequences decoded together.
# Measured on the 2-core CPU (shared with other jobs, load ~4) with a default run's GRPO model, add2 + sort: 400
# problems x 8 samples took 36-52 s at batch 512 and 80-88 s at 3,200 (the decode steps are compute-bound); with
# 200 problems sampled, the whole final_evaluation (model load, greedy on 400, sampled on 200) took 45-57 s.
FINAL_EVAL_SAMPLES = 8
FINAL_EVAL_TEMPERATURE = 1.0
FINAL_EVAL_SAMPLED_PROBLEMS = 200
FINAL_EVAL_BATCH = 512
# The MTP drafter's figure (nanoseek.eval.speculation): this many held-out problems (split over the GRPO tasks),
# each decoded alone, plain and with MTP speculation, in this many alternating rounds.
SPECULATION_PROBLEMS = 16
SPECULATION_ROUNDS = 3


def final_evaluation(
    final: StageResult, cfg: TrainConfig, plan: StagePlan, device: str, *, samples: int = FINAL_EVAL_SAMPLES
) -> dict[str, Any]:
    """The final model on the GRPO tasks' held-out problems through nanoseek.eval, in the last stage's format
    (chat + R1 with no system prompt after SFT or GRPO, as those stages evaluate; the bare prompt after
    pretraining alone): greedy pass@1 with a Wilson interval on the stages' held-out problems, then `samples`
    completions of each of the first FINAL_EVAL_SAMPLED_PROBLEMS at FINAL_EVAL_TEMPERATURE for pass@1 and
    pass@`samples` with bootstrap intervals."""
    import nanoseek
    from nanoseek.eval import evaluate
    from nanoseek.tokenizer import load_tokenizer
    from nanoseek.train.meter import make_energy_counter

    start, energy = time.perf_counter(), make_energy_counter(device, cfg.watts_per_core)
    model = nanoseek.load(final.model_dir, device=device)
    tok = load_tokenizer(final.model_dir)
    fmt = {"format": "plain"} if final.name == "pretrain" else r1_eval_format(plan)
    specs, n = heldout_specs(plan.grpo_tasks, cfg), cfg.data.eval_examples
    greedy = evaluate(model, tok, specs, limit=n, batch_size=GREEDY_EVAL_BATCH, **fmt)
    sampled = evaluate(model, tok, specs, limit=min(n, FINAL_EVAL_SAMPLED_PROBLEMS), samples=samples,
                       k=sorted({1, samples}), temperature=FINAL_EVAL_TEMPERATURE, batch_size=FINAL_EVAL_BATCH,
                       **fmt)  # fmt: skip
    speculation = speculation_figures(model, tok, specs, fmt)
    return {
        "stage": final.name,
        "wall_s": time.perf_counter() - start,
        "energy_j": float(energy.joules()),
        "greedy": {name: r.to_dict() for name, r in greedy.items()},
        "sampled": {name: r.to_dict() for name, r in sampled.items()},
        "speculation": None if speculation is None else speculation.to_dict(),
    }


def speculation_figures(model, tok, specs: list[Any], fmt: dict[str, Any]):
    """The final model's MTP module as its own drafter (nanoseek.eval.speculation) on held-out problems of the
    evaluation's tasks (`specs`) in its format, each decoded alone until its end token; None without an MTP
    module."""
    from nanoseek.eval.runner import synthetic_problems
    from nanoseek.eval.speculation import measure_mtp_speculation

    per_task = max(1, SPECULATION_PROBLEMS // len(specs))
    prompts = []
    for spec in specs:
        problems = synthetic_problems(tok, spec.task, fmt["format"], spec.task.eval_examples(per_task),
                                      fmt.get("system_prompt"))  # fmt: skip
        prompts += [p.prompt for p in problems]
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    return measure_mtp_speculation(model, prompts, eos, fmt.get("max_new_tokens", 32), rounds=SPECULATION_ROUNDS)


def speedrun(opts: SpeedrunOptions) -> dict[str, Any]:
    from nanoseek.parallel import resolve_device
    from nanoseek.train.report import write_report

    t0 = time.perf_counter()
    run_dir = Path(opts.out) if opts.out else Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    if (run_dir / "summary.json").exists():
        raise ValueError(f"{run_dir} already holds a finished speedrun (summary.json); choose another --out")
    device = str(resolve_device(opts.device))
    cfg = speedrun_config(opts, run_dir)
    plan = stage_plan(opts)
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
        ctx = StageContext(run_dir, cfg, stages[-1], metrics_path, device, opts.show_progress, plan)
        mark_stage(metrics_path, name)
        result = LATER_STAGES[name](ctx)
        if result is None:
            skipped.append(name)
            continue
        stages.append(result)

    final = stages[-1]
    model_dir = run_dir / "model"
    _copy_model(final.model_dir, model_dir)
    final_eval = final_evaluation(final, cfg, plan, device)
    with open(metrics_path, "a") as f:
        f.write(json.dumps({"event": "final_eval", **final_eval}) + "\n")
    total_wall = time.perf_counter() - t0
    price = cfg.price_per_device_hour
    from nanoseek.train.meter import make_energy_counter

    summary = {
        "stages": [s.to_summary() for s in stages],
        "final_eval": final_eval,
        "energy_estimated": make_energy_counter(device, cfg.watts_per_core).estimated,
        "cost": total_wall / 3600 * price,
        "currency": cfg.currency,
        "device": device,
        "wall_s": total_wall,
        "energy_j": sum(s.energy_j for s in stages) + final_eval["energy_j"],
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
