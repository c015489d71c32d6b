"""How many countdown demonstrations the speedrun's cold start needs: SFT, GRPO and the SFT control run again from
one finished speedrun's pretrained model, with countdown's (--task's) share of the demonstrations changed and the other
tasks' kept (benchmarks/RESULTS.md, "Speedrun: three seeds with the SFT control").

    python benchmarks/cold_start_demos.py runs/seeds/seed-1 runs/demos/cd300 --demonstrations 300 --grpo-steps 560

The stages are the speedrun's own (train/speedrun.py: sft_stage, grpo_stage, sft_control_stage) with the run's
seed and settings; only the plan's demonstrations change, and GRPO is step-budgeted (`--grpo-steps`, its time
budget lifted) so that a busy machine runs the same steps; the control gets GRPO's wall clock, as in the
speedrun. Prints each stage's held-out accuracy and writes OUT/probe.json (the stages' summaries)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def plan_with_demonstrations(plan, task: str, count: int):
    """`plan` with `count` demonstrations of `task` and the other tasks' counts kept (the plan's total times each
    task's weight), as a new total and weights."""
    tasks = plan.sft_tasks
    if task not in tasks:
        raise ValueError(f"{task!r} is not one of the cold start's tasks: {', '.join(tasks)}")
    if count < 0:
        raise ValueError(f"the number of demonstrations must be >= 0, got {count}")
    weights = plan.sft_task_weights or [1 / len(tasks)] * len(tasks)
    counts = [count if t == task else round(plan.sft_conversations * w) for t, w in zip(tasks, weights)]
    plan.sft_conversations = sum(counts)
    plan.sft_task_weights = [c / plan.sft_conversations for c in counts]
    return plan


def main() -> None:
    import torch

    import nanoseek.train.speedrun as sr
    from nanoseek.train.scoring import stage_comparisons

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a finished speedrun folder (its pretrain/model and seed are used)")
    ap.add_argument("out", type=Path)
    ap.add_argument("--task", default="countdown")
    ap.add_argument("--demonstrations", type=int, required=True, help="demonstrations of --task")
    ap.add_argument("--grpo-steps", type=int, default=560)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-control", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seed = json.loads((args.run / "train_config.json").read_text())["seed"]
    opts = sr.SpeedrunOptions(out=args.out, show_progress=False, sft_control=not args.no_control, overrides=[
        f"seed={seed}", "grpo.time_budget_min=1000", f"grpo.max_steps={args.grpo_steps}"])  # fmt: skip
    cfg = sr.speedrun_config(opts, args.out)
    plan = plan_with_demonstrations(sr.stage_plan(opts, cfg), args.task, args.demonstrations)
    args.out.mkdir(parents=True, exist_ok=True)
    pretrain = sr.StageResult("pretrain", 0.0, 0, 0.0, {}, args.run / "pretrain" / "model")
    metrics = args.out / "metrics.jsonl"
    ctx = sr.StageContext(args.out, cfg, pretrain, metrics, "cpu", False, plan, {"pretrain": pretrain})
    _, stages, _ = sr.run_later_stages(["sft", "grpo", *([] if args.no_control else ["sft-control"])], ctx)
    for name, result in list(stages.items())[1:]:
        accuracy = {task: f"{100 * score.accuracy:.1f}%" for task, score in result.eval.items()}
        print(f"{name}: {result.extra.get('steps')} steps, {result.extra.get('train_s') or 0:.0f} s, {accuracy}")
    summaries = [s.to_summary() for n, s in stages.items() if n != "pretrain"]
    for c in stage_comparisons(summaries):
        if c["task"] == args.task:
            print(f"{c['stage']} against {c['against']} on {args.task}: {c['verdict']}")
    (args.out / "probe.json").write_text(json.dumps({"demonstrations": plan.sft_conversations,
                                                     "weights": plan.sft_task_weights, "stages": summaries},
                                                    indent=1, default=str) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
