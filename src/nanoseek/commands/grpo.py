"""`nanoseek grpo MODEL --tasks add3,sort --out DIR [--set key=value ...] [--resume] [--parallel ddp|fsdp]`: GRPO
with rule rewards.

nanoseek grpo runs/sft/model --tasks add2 --out runs/grpo --set loss_type=dapo
torchrun --nproc-per-node 8 -m nanoseek grpo runs/sft/model --tasks add2 --out runs/grpo --parallel fsdp
"""

from __future__ import annotations

import argparse

from nanoseek.commands.sft import add_lora_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "grpo",
        help="reinforcement learning with rule rewards (GRPO / Dr. GRPO / DAPO) on verifiable tasks",
        description=(
            "GRPO (the R1-Zero recipe): sample G completions per task prompt through the engine, reward them "
            "with rules (format <think>..</think><answer>..</answer>, the task's exact checker, math-verify), "
            "normalise the rewards per group and train the clipped surrogate, with an optional k3 KL to the "
            "starting model. Writes DIR/model (HF folder), DIR/metrics.jsonl and DIR/checkpoints. GRPO trains the "
            "R1 format, and its held-out accuracy is what nanoseek eval --format r1 --system-prompt S measures "
            "(the same prompt, the answer read from <answer>)."
        ),
    )
    p.add_argument("model", help="anything nanoseek.load reads: an HF folder, a .gguf file")
    p.add_argument("--tasks", required=True, help="comma-separated synthetic tasks, e.g. add3,sort,countdown")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="a GRPO setting (repeatable): loss_type=grpo|dr_grpo|dapo, num_generations, prompts_per_step, "
        "temperature, max_new_tokens, max_steps, time_budget_min, mu, beta, epsilon_low, epsilon_high, "
        "rewards=[format,accuracy,math,r1], reward_weights, system_prompt, optim.lr, ckpt_every, eval.examples, "
        "eval.every; bare or prefixed grpo.KEY as `nanoseek speedrun --set` takes them (grpo.max_steps=20 is "
        "max_steps=20)",
    )  # fmt: skip
    p.add_argument("--format", default="r1", choices=["r1"],
                   help="prompt format, as nanoseek eval --format: r1 (the only one GRPO trains: the chat template "
                   "with the system prompt, the answer read from <answer>)")  # fmt: skip
    p.add_argument("--system-prompt", default=None, metavar="TEXT",
                   help="system message, as nanoseek eval --system-prompt (default: the R1 prompt; '' for none); "
                   "the same as --set system_prompt=TEXT, and it wins over it")  # fmt: skip
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in DIR")
    p.add_argument(
        "--parallel", default="auto", choices=["auto", "none", "ddp", "fsdp"],
        help="data parallelism under torchrun (each rank samples its share of the prompts): ddp (replicas) or "
        "fsdp (FSDP2 sharding); auto = ddp",
    )  # fmt: skip
    add_lora_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import logging

    from nanoseek.parallel import is_main_process, leaving_process_group
    from nanoseek.train.grpo import run_grpo

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError("--tasks needs at least one task name")
    overrides = list(args.overrides)
    if args.system_prompt is not None:
        overrides.append(f"system_prompt={args.system_prompt}")
    with leaving_process_group():
        result = run_grpo(
            args.model, tasks, args.out, overrides, show_progress=not args.quiet, device=args.device,
            resume=args.resume, parallel=args.parallel, lora=args.lora, merge=args.merge,
        )  # fmt: skip
        main = is_main_process()  # (asked before the group is left)
    if not main:  # rank 0 reports
        return 0
    print(f"grpo: {result.steps} steps in {result.wall_s:.0f} s -> {result.model_dir}")
    for name, after in result.eval_after.items():
        before = result.eval_before.get(name)
        lo, hi = after.ci95
        was = f", before {100 * before.accuracy:.1f}%" if before else ""
        print(f"  {name}: {100 * after.accuracy:.1f}% (95% CI {100 * lo:.1f}-{100 * hi:.1f}%, n={after.n}{was})")
    return 0
