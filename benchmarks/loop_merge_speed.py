"""Training loop merge (issue 22): pretraining, SFT and GRPO step times before and after, same work.

    python benchmarks/loop_merge_speed.py --old /tmp/loopbench/old --new /tmp/loopbench/new \\
        [--rounds 3 --threads 1 --pretrain-steps 40 --sft-steps 30 --grpo-steps 8 --warmup 3 --plot loop.png]

--old and --new are two checkouts' roots (e.g. `git worktree add /tmp/loopbench/old abfe244`, the state before
GRPO and distillation moved onto the shared Trainer loop, and `git worktree add /tmp/loopbench/new HEAD`). Each
run is a subprocess of this venv's python with PYTHONPATH=<side>/src (the side's own nanoseek, checked) and the
torch/OpenMP threads fixed by --threads.

Set-up, once, with the --setup-side tree: a tiny model pretrained for --setup-pretrain-steps in the speedrun's
format (R1 with an empty thought, add2/sort), 512 R1 chat demonstrations written to a JSONL file (the speedrun's
r1_conversations: add3 worked out column by column, add2 and sort answered directly), and that model fine-tuned
on them for --setup-sft-steps, so that GRPO's rollouts are in the chat + R1 format and earn mixed rewards.
Then --rounds rounds; each round runs, per stage, the old and the new tree on the same work (old first in even
rounds, new first in odd ones: old new | new old | ...):

- pretrain: `Trainer(cfg).train()` on the `tiny` preset with the speedrun's data settings, --pretrain-steps
  steps, no time budget, no evaluation or checkpoint inside the loop;
- sft: `run_sft` from the set-up's pretrained model on the JSONL file, the speedrun's SFT settings (64
  conversations a step, lr 1e-3, warm-up 30, no MTP loss), --sft-steps steps, no periodic checkpoints;
- grpo: `run_grpo` from the set-up's SFT model on add2/sort/add3, speedrun-like settings (DAPO, 16 prompts x 8
  completions, at most 24 new tokens, lr 2e-4), --grpo-steps steps, no evaluation, no periodic checkpoints.

A step's time comes from the run's own metrics.jsonl (the meter's step records): wall time is the difference of
consecutive records' wall_s (the whole loop iteration, evaluation and checkpoint writes excluded: they are off
inside the loop, and the final ones come after the last step record), median over the steps after --warmup;
CPU time is the process CPU time the meter's energy estimate counts (energy_j / watts per core, where no RAPL
counter exists), summed over the same steps and divided by their count. A round's ratio is new / old (< 1:
the new loop is faster); the summary gives the median and min–max over rounds.

Same work first: every run of a stage, both trees and all rounds, must log the same per-step losses and token
counts (the refactor was guarded bit-identical; --loss-rtol relaxes it), or the benchmark stops.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("pretrain", "sft", "grpo")
RESULT_PREFIX = "LOOP_MERGE_RESULT "
SEED = 1337
GRPO_TASKS = ["add2", "sort", "add3"]
# the speedrun's pretraining data settings on the tiny preset (train/speedrun.py SPEEDRUN_DEFAULTS)
PRETRAIN_SETTINGS = ["data.tasks=[add2,sort,add3]", "data.task_weights=[0.75,0.25,0]", "data.format=r1",
                     "optim.lr=3e-3"]  # fmt: skip
# the speedrun's SFT settings (STAGE_PLANS["tiny"].sft) less its time budget
SFT_SETTINGS = ["batch_size=64", "optim.lr=1e-3", "optim.warmup_steps=30", "mtp_weight=0", "ckpt_every=0"]
# the speedrun's GRPO settings (STAGE_PLANS["tiny"].grpo, grpo_settings) at a smaller size, no time budget
GRPO_SETTINGS = ["num_generations=8", "prompts_per_step=16", "max_new_tokens=24", "temperature=1.0",
                 "loss_type=dapo", "optim.lr=2e-4", "task_weights=[0.2,0.2,0.6]", "ckpt_every=0",
                 "eval_examples=0", "system_prompt="]  # fmt: skip


# ---- the worker: one run of one stage in one tree (a subprocess, PYTHONPATH=<tree>/src) ---------------------
def pretrain_overrides(steps: int, out: Path, seed: int) -> list[str]:
    return [*PRETRAIN_SETTINGS, f"max_steps={steps}", "time_budget_min=null", "eval_every=0", "ckpt_every=0",
            "log_every=1", "data.eval_examples=1", "peak_flops=1e11", "device=cpu", f"seed={seed}",
            f"out_dir={out}"]  # fmt: skip


def step_records(metrics: Path) -> list[dict]:
    """The meter's step records of a run's metrics.jsonl, in order."""
    return [r for r in map(json.loads, metrics.read_text().splitlines()) if r.get("event") == "step"]


def worker(stage: str, out: Path, steps: int, seed: int, threads: int, setup: Path) -> dict:
    import torch

    torch.set_num_threads(threads)
    import nanoseek

    if stage == "setup":
        return setup_models(out, steps, seed)
    if stage == "pretrain":
        from nanoseek.train.config import load_train_config
        from nanoseek.train.trainer import Trainer

        Trainer(load_train_config(preset="tiny", overrides=pretrain_overrides(steps, out, seed)),
                show_progress=False).train()  # fmt: skip
    elif stage == "sft":
        from nanoseek.train.sft import run_sft

        run_sft(setup / "pretrain" / "model", setup / "sft.jsonl", out,
                [*SFT_SETTINGS, f"max_steps={steps}", f"seed={seed}", "peak_flops=1e11"],
                show_progress=False)  # fmt: skip
    elif stage == "grpo":
        from nanoseek.train.grpo import run_grpo

        run_grpo(setup / "sft" / "model", GRPO_TASKS, out, [*GRPO_SETTINGS, f"max_steps={steps}", f"seed={seed}"],
                 show_progress=False)  # fmt: skip
    else:
        raise ValueError(f"unknown stage {stage!r}")
    records = step_records(out / "metrics.jsonl")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    summary = next(r for r in map(json.loads, reversed(lines)) if r.get("event") == "summary")
    m = re.search(r"x ([0-9.eE+-]+) W per busy core", summary.get("energy_assumption") or "")
    return {
        "nanoseek": str(Path(nanoseek.__file__).resolve()),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_clock_watts": float(m.group(1)) if summary.get("energy_source") == "estimate" and m else None,
        "records": [
            {k: r.get(k) for k in ("step", "loss", "tokens", "wall_s", "energy_j", "reward") if k in r} for r in records
        ],
    }


def setup_models(out: Path, steps: str | int, seed: int) -> dict:
    """The set-up: a pretrained tiny model, the SFT demonstrations (JSONL) and an SFT model for GRPO."""
    from nanoseek.tasks import get_task
    from nanoseek.train.config import load_train_config
    from nanoseek.train.sft import run_sft
    from nanoseek.train.trainer import Trainer

    try:
        from nanoseek.tasks.demonstrations import r1_conversations
    except ImportError:  # before the demonstrations moved to tasks/
        try:
            from nanoseek.train.demonstrations import r1_conversations
        except ImportError:  # before the speedrun's split
            from nanoseek.train.speedrun import r1_conversations

    pre_steps, sft_steps = (int(s) for s in str(steps).split(","))
    cfg = load_train_config(preset="tiny", overrides=pretrain_overrides(pre_steps, out / "pretrain", seed))
    Trainer(cfg, show_progress=False).train()
    tasks = [get_task(t, cfg.data.heldout_fraction) for t in GRPO_TASKS]
    rows = r1_conversations(tasks, 512, seed, [0.25, 0.25, 0.5], ["add3"])
    (out / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = [*SFT_SETTINGS, f"max_steps={sft_steps}", f"seed={seed}", "peak_flops=1e11"]
    run_sft(out / "pretrain" / "model", out / "sft.jsonl", out / "sft", settings, show_progress=False)
    return {"records": []}


# ---- pure logic: step times, same work, ratios -------------------------------------------------------------
def step_times(records: list[dict], warmup: int, watts: float | None) -> tuple[float, float | None, int]:
    """(median wall seconds per step, mean CPU seconds per step or None, steps timed) over the steps after the
    first `warmup`. A step's wall time is its record's wall_s minus the previous record's (the first step has
    no previous record, so at least one step is always left out)."""
    skip = max(1, warmup)
    if len(records) <= skip:
        raise ValueError(f"{len(records)} step records: nothing left to time after {skip} warm-up step(s)")
    walls = [b["wall_s"] - a["wall_s"] for a, b in zip(records[skip - 1 :], records[skip:])]
    cpu = None
    if watts:
        cpu = (records[-1]["energy_j"] - records[skip - 1]["energy_j"]) / watts / len(walls)
    return statistics.median(walls), cpu, len(walls)


def work_mismatch(a: list[dict], b: list[dict], rtol: float = 0.0) -> str | None:
    """None when two runs logged the same steps with the same losses (within rtol) and token counts, else what
    differs first."""
    if [r["step"] for r in a] != [r["step"] for r in b]:
        return f"different steps logged: {len(a)} vs {len(b)} records"
    for ra, rb in zip(a, b):
        gap = abs(ra["loss"] - rb["loss"]) / max(abs(ra["loss"]), abs(rb["loss"]), 1e-30)
        if not (gap <= rtol) and ra["loss"] != rb["loss"]:
            return f"step {ra['step']}: loss {ra['loss']!r} vs {rb['loss']!r} (relative gap {gap:.2e} > {rtol:g})"
        if ra["tokens"] != rb["tokens"]:
            return f"step {ra['step']}: {ra['tokens']} vs {rb['tokens']} tokens so far"
    return None


def round_order(i: int) -> tuple[str, str]:
    """Which tree runs first in round i: old in even rounds, new in odd ones."""
    return ("old", "new") if i % 2 == 0 else ("new", "old")


def ratio_summary(ratios: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of per-round ratios."""
    if not ratios:
        raise ValueError("no rounds to summarise")
    return statistics.median(ratios), min(ratios), max(ratios)


# ---- the driver ----------------------------------------------------------------------------------------------
def run_worker(tree: Path, stage: str, out: Path, steps: str | int, args: argparse.Namespace, setup: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree / "src"), OMP_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads), TQDM_DISABLE="1")  # fmt: skip
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", stage, "--out", str(out), "--steps", str(steps),
           "--threads", str(args.threads), "--seed", str(args.seed), "--setup-dir", str(setup)]  # fmt: skip
    if stage != "setup":
        shutil.rmtree(out, ignore_errors=True)  # a fresh run (the trainers refuse a folder with checkpoints)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise SystemExit(f"{stage} in {tree} failed (exit {proc.returncode}):\n{tail}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    result = json.loads(lines[-1][len(RESULT_PREFIX) :])
    if stage != "setup" and not Path(result["nanoseek"]).is_relative_to((tree / "src").resolve()):
        raise SystemExit(f"the {stage} run for {tree} imported nanoseek from {result['nanoseek']}, not that tree")
    return result


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_head(tree: Path) -> str:
    proc = subprocess.run(["git", "-C", str(tree), "log", "-1", "--format=%h %s"], capture_output=True, text=True)
    return proc.stdout.strip()[:70] if proc.returncode == 0 else "?"


def fmt_ratio(values: list[float]) -> str:
    med, lo, hi = ratio_summary(values)
    return f"{med:.3f} ({lo:.3f}–{hi:.3f})"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", type=Path, help="root of the checkout before the merge (e.g. a worktree of abfe244)")
    ap.add_argument("--new", type=Path, help="root of the checkout after the merge")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; each runs every stage in both trees")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    ap.add_argument("--threads", type=int, default=1, help="torch and OpenMP threads of every run (default 1)")
    ap.add_argument("--pretrain-steps", type=int, default=40)
    ap.add_argument("--sft-steps", type=int, default=30)
    ap.add_argument("--grpo-steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3, help="first steps of each run left out of its timing")
    ap.add_argument("--setup-side", choices=["old", "new"], default="old", help="the tree that builds the models")
    ap.add_argument("--setup-pretrain-steps", type=int, default=250)
    ap.add_argument("--setup-sft-steps", type=int, default=60)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--loss-rtol", type=float, default=0.0, help="allowed relative loss gap (default 0: exact)")
    ap.add_argument("--work", type=Path, help="working folder (default: a temporary one; a set-up there is reused)")
    ap.add_argument("--plot", type=Path, help="write a PNG here: per stage, each round's new/old ratios, step ms")
    ap.add_argument("--worker", choices=[*STAGES, "setup"], help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--steps", help=argparse.SUPPRESS)
    ap.add_argument("--setup-dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        result = worker(args.worker, args.out, args.steps if args.worker == "setup" else int(args.steps), args.seed,
                        args.threads, args.setup_dir)  # fmt: skip
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return
    if args.old is None or args.new is None:
        ap.error("--old and --new are required")
    if min(args.rounds, args.threads, args.pretrain_steps, args.sft_steps, args.grpo_steps) < 1 or args.warmup < 0:
        ap.error("--rounds, --threads and the step counts must be >= 1, --warmup >= 0")
    for name in ("old", "new"):
        tree = getattr(args, name).resolve()
        if not (tree / "src" / "nanoseek").is_dir():
            ap.error(f"--{name} {tree}: no src/nanoseek there (give a checkout's root)")
        setattr(args, name, tree)
    work = args.work or Path(tempfile.mkdtemp(prefix="loop_merge_"))
    run(args, work)


def run(args: argparse.Namespace, work: Path) -> None:
    trees = {"old": args.old, "new": args.new}
    steps = {"pretrain": args.pretrain_steps, "sft": args.sft_steps, "grpo": args.grpo_steps}
    setup = work / "setup"
    t0 = time.perf_counter()
    if not (setup / "sft" / "model").is_dir():
        print(f"set-up in {trees[args.setup_side]}: pretraining {args.setup_pretrain_steps} steps, SFT "
              f"{args.setup_sft_steps} steps ...", flush=True)  # fmt: skip
        setup.mkdir(parents=True, exist_ok=True)
        run_worker(trees[args.setup_side], "setup", setup, f"{args.setup_pretrain_steps},{args.setup_sft_steps}",
                   args, setup)  # fmt: skip
        print(f"set-up done in {time.perf_counter() - t0:.0f} s", flush=True)
    loads = [os.getloadavg()]
    runs: dict[str, list[dict]] = {s: [] for s in args.stages}  # per stage: each round's {side: result}
    for i in range(args.rounds):
        for stage in args.stages:
            results = {}
            for side in round_order(i):
                out = work / f"r{i}-{stage}-{side}"
                t = time.perf_counter()
                results[side] = run_worker(trees[side], stage, out, steps[stage], args, setup)
                print(f"round {i + 1} {stage:8s} {side}: {time.perf_counter() - t:5.1f} s, load "
                      f"{os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
            runs[stage].append(results)
            loads.append(os.getloadavg())
    (work / "runs.json").write_text(json.dumps(runs))  # every run's step records, to look at later
    check_same_work(runs, args.loss_rtol)
    report(args, runs, loads, time.perf_counter() - t0)


def check_same_work(runs: dict[str, list[dict]], rtol: float) -> None:
    for stage, rounds in runs.items():
        ref = rounds[0]["old"]["records"]
        for i, results in enumerate(rounds):
            for side, res in results.items():
                why = work_mismatch(ref, res["records"], rtol)
                if why is not None:
                    raise SystemExit(
                        f"{stage}: round {i + 1}'s {side} run did not do the same work as round 1's old run ({why}); "
                        "the timings would compare different work, so nothing is reported"
                    )


def report(args: argparse.Namespace, runs: dict[str, list[dict]], loads: list[tuple], total_s: float) -> None:
    first = next(iter(runs.values()))[0]
    print()
    print("$ " + shlex.join([Path(sys.executable).name, *sys.argv]))
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {cpu_model()}, {os.cpu_count()} CPUs; "
          f"torch {first['old']['torch']}, {args.threads} thread(s) per run; load average (1 min) "
          f"{min(lo[0] for lo in loads):.2f}–{max(lo[0] for lo in loads):.2f} over the rounds (at the start "
          f"1/5/15 min: {loads[0][0]:.2f}/{loads[0][1]:.2f}/{loads[0][2]:.2f}); {total_s / 60:.1f} min")  # fmt: skip
    print(f"old: {args.old} ({git_head(args.old)})")
    print(f"new: {args.new} ({git_head(args.new)})")
    steps = {"pretrain": args.pretrain_steps, "sft": args.sft_steps, "grpo": args.grpo_steps}
    summary_rows = []
    ratios, absolute = {}, {}  # for --plot
    for stage, rounds in runs.items():
        recs = rounds[0]["old"]["records"]
        rewards = [r["reward"] for r in recs if r.get("reward") is not None]
        said = f", mean reward {statistics.mean(rewards):.3f}" if rewards else ""
        print(f"\n{stage}: {steps[stage]} steps a run, the first {max(1, args.warmup)} untimed; losses and tokens "
              f"equal in every run ({len(recs)} steps, final loss {recs[-1]['loss']:.6g}{said})\n")  # fmt: skip
        print("| round | order | old step (ms) | new step (ms) | new/old wall "
              "| old CPU (ms) | new CPU (ms) | new/old CPU |")  # fmt: skip
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        walls, cpus, olds, news = [], [], [], []
        for i, res in enumerate(rounds):
            (wo, co, n), (wn, cn, _) = (step_times(res[s]["records"], args.warmup, res[s]["cpu_clock_watts"])
                                        for s in ("old", "new"))  # fmt: skip
            walls.append(wn / wo)
            olds.append(wo)
            news.append(wn)
            cpu_cells = ["–", "–", "–"]
            if co and cn:
                cpus.append(cn / co)
                cpu_cells = [f"{1e3 * co:.1f}", f"{1e3 * cn:.1f}", f"{cn / co:.3f}"]
            print(f"| {i + 1} | {' → '.join(round_order(i))} | {1e3 * wo:.1f} | {1e3 * wn:.1f} | {wn / wo:.3f} | "
                  + " | ".join(cpu_cells) + " |")  # fmt: skip
        medians = [f"{1e3 * statistics.median(v):.1f}" for v in (olds, news)]
        summary_rows.append([stage, str(n), *medians, fmt_ratio(walls), fmt_ratio(cpus) if cpus else "–"])
        ratios[f"{stage}, wall"] = walls
        if cpus:
            ratios[f"{stage}, CPU"] = cpus
        absolute[f"{stage}, old"] = [1e3 * t for t in olds]
        absolute[f"{stage}, new"] = [1e3 * t for t in news]
    print(f"\nnew / old per-step time, median (min–max) over {args.rounds} rounds (< 1: the merged loop is faster)\n")
    print("| stage | steps timed | old step (ms) | new step (ms) | new/old wall | new/old CPU |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in summary_rows:
        print("| " + " | ".join(row) + " |")
    if getattr(args, "plot", None):
        plot(args, ratios, absolute)


def plot(args: argparse.Namespace, ratios: dict[str, list[float]], absolute: dict[str, list[float]]) -> None:
    """--plot: per stage, each round's new/old wall (and CPU) ratio, and the old and new median step ms."""
    from nanoseek.bench.plots import machine_note, ratio_plot

    ratio_plot(args.plot, "training loop merge: new / old per-step time, per round (< 1: the merged loop faster)",
               ratios, ylabel="new / old step time (per round)", absolute=absolute,
               absolute_ylabel="median step (ms, wall)", absolute_fmt=".0f",
               footnote=f"{machine_note(args.threads, 'wall and process CPU clocks')}; {args.rounds} rounds; "
                        f"old {git_head(args.old)[:30]}, new {git_head(args.new)[:30]}")  # fmt: skip
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
