"""`nanoseek speedrun [--out DIR] [--minutes M] [--device cpu|cuda] [--preset P] [--set K=V] [--sft-control]`
(what `make run` runs)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "speedrun",
        help="tokenizer + pretraining + SFT + GRPO + held-out eval + report card, in minutes on a CPU",
        description=(
            "Train a small DeepSeek-V3-style model (MLA + MoE + MTP) from scratch on verifiable synthetic "
            "tasks, evaluate it on held-out problems and write a run folder: model/, metrics.jsonl, "
            "summary.json and report.md with plots."
        ),
    )
    p.add_argument("--out", help="run folder (default runs/<timestamp>)")
    p.add_argument("--minutes", type=float, help="pretraining time budget in minutes (default: the plan's)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--preset", default="tiny", help="model/training preset (tiny, small, gpt2-small-moe)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="a setting (repeatable): pretraining's as `nanoseek train` takes them (--set data.tasks=[add2,sort]), "
        "the later stages' as sft.KEY and grpo.KEY (--set grpo.max_steps=20 --set sft.optim.lr=1e-3), as "
        "nanoseek sft / grpo --set take them bare; eval.examples=N: the problems per task every stage is scored "
        "on; seed=N seeds every stage",
    )  # fmt: skip
    p.add_argument(
        "--sft-control", action="store_true",
        help="also run the stage sft-control: SFT continued from the SFT model on the same demonstrations with the "
        "same settings for as long as GRPO trained, to compare RL with more SFT (may take the run past 15 min)",
    )  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nanoseek.train.speedrun import SpeedrunOptions, speedrun

    if args.minutes is not None and args.minutes <= 0:
        raise ValueError(f"--minutes must be positive, got {args.minutes}")
    opts = SpeedrunOptions(
        out=Path(args.out) if args.out else None, minutes=args.minutes, device=args.device,
        preset=args.preset, overrides=args.overrides, sft_control=args.sft_control, show_progress=not args.quiet,
    )  # fmt: skip
    summary = speedrun(opts)
    run_dir = Path(summary["model_dir"]).parent
    print(f"\nspeedrun done in {summary['wall_s'] / 60:.1f} min -> {run_dir}")
    for stage in summary["stages"]:
        for task, e in stage["eval"].items():
            lo, hi = e["ci95"]
            print(
                f"  {stage['name']:>11} ({stage['format']:>5}) {task:>6}: {100 * e['accuracy']:.1f}% exact "
                f"(95% CI {100 * lo:.1f}-{100 * hi:.1f}%, n={e['n']})"
            )
    print(f"  report: {run_dir / 'report.md'}")
    return 0
