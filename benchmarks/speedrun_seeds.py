"""The README's speedrun table: several seeds of `nanoseek speedrun --sft-control`, one row per seed and task.

    python benchmarks/speedrun_seeds.py --seeds 1337 1 2 --out runs/seeds        # runs them (~17 min each)
    python benchmarks/speedrun_seeds.py --seeds 1337 1 2 --out runs/seeds --table-only
    python benchmarks/speedrun_seeds.py --seeds 1337 1 2 --out runs/seeds --rescore   # per-problem verdicts
    python benchmarks/speedrun_seeds.py --seeds 1337 1 2 --out runs/seeds --table-only --plot seeds.png

Each seed is one full run (`--set seed=N`: weights, demonstrations, data order and rollouts), run one after
another so that no run shares the CPU with another. The table gives each stage's held-out accuracy with its 95%
interval, and the verdicts the runs' own summaries state (each stage against the one before it, GRPO against
the SFT control), beyond the intervals, and GRPO minus the control compared problem by problem (the paired 95%
interval of the difference, scoring.paired). `--rescore` adds the per-problem verdicts to runs made before the
summaries kept them: it scores every stage's saved model again exactly as the run did (scoring contract: same
problems, greedy, same format) and stops unless each accuracy comes out as the run recorded it. `--plot PATH`
draws every task's stage accuracies per seed with their 95% intervals, and GRPO − control paired, from the
runs' summaries (with --table-only, from runs already in --out: nothing is run)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

STAGES = ("pretrain", "sft", "grpo", "sft-control")


def cell(e: dict) -> str:
    lo, hi = e["ci95"]
    return f"{100 * e['accuracy']:.1f} ({100 * lo:.1f}–{100 * hi:.1f})"


def paired_cell(comparison: dict | None) -> str:
    p = (comparison or {}).get("paired")
    if not p:
        return "–"
    lo, hi = p["ci95"]
    return f"{100 * p['diff']:+.1f} ({100 * lo:+.1f} to {100 * hi:+.1f}) {p['verdict']}"


def rescore(folder: Path, summary: dict) -> dict:
    """`summary` with every stage's per-problem verdicts ("solved") and the comparisons recomputed from them,
    scored again from the stage's saved model; raises when a stage's accuracy differs from the recorded one."""
    import nanoseek
    from nanoseek.eval.held_out import evaluate_in_format
    from nanoseek.tasks import get_task
    from nanoseek.tokenizer import load_tokenizer
    from nanoseek.train.scoring import GREEDY_EVAL_BATCH, stage_comparisons

    heldout = json.loads((folder / "train_config.json").read_text())["data"]["heldout_fraction"]
    scoring = summary["scoring"]
    tasks = [get_task(t, heldout) for t in scoring["tasks"]]
    for stage in summary["stages"]:
        model_dir = folder / stage["name"] / "model"
        scores = evaluate_in_format(nanoseek.load(model_dir), load_tokenizer(model_dir), tasks, scoring["problems"],
                                    stage["format"], batch_size=GREEDY_EVAL_BATCH)  # fmt: skip
        for name, score in scores.items():
            recorded = stage["eval"][name]
            if (score.correct, score.n) != (recorded["correct"], recorded["n"]):
                raise SystemExit(f"{model_dir} {name}: {score.correct}/{score.n} now, {recorded['correct']}/"
                                 f"{recorded['n']} in the run: not the run's scoring, nothing written")  # fmt: skip
            recorded["solved"] = score.solved
        print(f"{folder.name} {stage['name']}: every accuracy as recorded", flush=True)
    summary["comparisons"] = stage_comparisons(summary["stages"])
    return summary


def table(runs: dict[int, dict]) -> str:
    lines = ["| seed | task | " + " | ".join(STAGES) + " | GRPO vs control | GRPO − control, paired (95%) |"
             " wall (no control) |", "|---" * (len(STAGES) + 5) + "|"]  # fmt: skip
    for seed, summary in runs.items():
        stages = {s["name"]: s for s in summary["stages"]}
        rows = {(c["stage"], c["against"], c["task"]): c for c in summary["comparisons"]}
        wall = summary["wall_s"] - stages.get("sft-control", {"wall_s": 0.0})["wall_s"]
        for task in summary["scoring"]["tasks"]:
            cells = [cell(stages[s]["eval"][task]) if s in stages else "–" for s in STAGES]
            row = rows.get(("grpo", "sft-control", task))
            vs, paired = (row or {}).get("verdict", "–"), paired_cell(row)
            lines.append(f"| {seed} | {task} | " + " | ".join(cells) + f" | {vs} | {paired} | {wall / 60:.1f} min |")
    return "\n".join(lines)


def plot(runs: dict[int, dict], path: Path) -> Path:
    """Per task a panel, per stage each seed's accuracy (%) with its 95% interval; a last panel with GRPO − the
    SFT control per task, paired over the same problems (95%), where the runs kept per-problem verdicts."""
    from nanoseek.bench.plots import interval_plot

    first = next(iter(runs.values()))
    tasks = first["scoring"]["tasks"]
    panels: dict[str, dict[str, list[tuple[float, float, float]]]] = {}
    for task in tasks:
        groups = {}
        for stage in STAGES:
            cells = []
            for summary in runs.values():
                e = next((s["eval"][task] for s in summary["stages"] if s["name"] == stage), None)
                if e is not None:
                    cells.append((100 * e["accuracy"], 100 * e["ci95"][0], 100 * e["ci95"][1]))
            if cells:
                groups[stage] = cells
        panels[f"{task} (held-out accuracy %)"] = groups
    paired = {}
    for task in tasks:
        cells = []
        for summary in runs.values():
            row = next((c for c in summary["comparisons"] if (c["stage"], c["against"], c["task"]) ==
                        ("grpo", "sft-control", task)), None)  # fmt: skip
            p = (row or {}).get("paired")
            if p:
                cells.append((100 * p["diff"], 100 * p["ci95"][0], 100 * p["ci95"][1]))
        if cells:
            paired[task] = cells
    difference = "GRPO − control, paired (points)"
    if paired:
        panels[difference] = paired
    n = first["scoring"]["problems"]
    params = (first.get("model") or {}).get("params")
    size = f" ({params / 1e6:.2f} M parameters)" if params else ""
    return interval_plot(path, f"speedrun: {len(runs)} seeds with the SFT control, {n} held-out problems a task",
                         panels, members=[f"seed {s}" for s in runs], ylabel="%", references={difference: 0.0},
                         footnote=f"each seed's 95% interval (Wilson; paired: Newcombe, same problems); preset "
                                  f"{first.get('preset')}{size}, device {first.get('device')}; accuracies do not "
                                  "depend on machine load")  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[1337, 1, 2])
    p.add_argument("--out", default="runs/seeds")
    p.add_argument("--table-only", action="store_true", help="only print the table of runs already in --out")
    p.add_argument(
        "--rescore", action="store_true", help="add per-problem verdicts to the runs in --out, then the table"
    )
    p.add_argument("--plot", help="write a PNG of the runs' accuracies per task, stage and seed here")
    args = p.parse_args()
    runs = {}
    for seed in args.seeds:
        folder = Path(args.out) / f"seed-{seed}"
        if not (args.table_only or args.rescore) and not (folder / "summary.json").exists():
            cmd = [sys.executable, "-m", "nanoseek", "speedrun", "--out", str(folder), "--sft-control", "--quiet",
                   "--set", f"seed={seed}"]  # fmt: skip
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
        if (folder / "summary.json").exists():
            runs[seed] = json.loads((folder / "summary.json").read_text())
            if args.rescore:
                runs[seed] = rescore(folder, runs[seed])
                tmp = folder / "summary.json.tmp"
                tmp.write_text(json.dumps(runs[seed], indent=2) + "\n")
                tmp.replace(folder / "summary.json")
    print(table(runs))
    if args.plot and runs:
        print(f"plot: {plot(runs, Path(args.plot))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
