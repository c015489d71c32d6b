"""The README's speedrun table: several seeds of `nanoseek speedrun --sft-control`, one row per seed and task.

    python benchmarks/speedrun_seeds.py --seeds 1337 1 2 --out runs/seeds        # runs them (~17 min each)
    python benchmarks/speedrun_seeds.py --seeds 1337 1 2 --out runs/seeds --table-only

Each seed is one full run (`--set seed=N`: weights, demonstrations, data order and rollouts), run one after
another so that no run shares the CPU with another. The table gives each stage's held-out accuracy with its 95%
interval, and the verdicts the runs' own summaries state (each stage against the one before it, GRPO against
the SFT control), beyond the intervals."""

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


def table(runs: dict[int, dict]) -> str:
    lines = ["| seed | task | " + " | ".join(STAGES) + " | GRPO vs control | wall (no control) |",
             "|---" * (len(STAGES) + 4) + "|"]  # fmt: skip
    for seed, summary in runs.items():
        stages = {s["name"]: s for s in summary["stages"]}
        verdicts = {(c["stage"], c["against"], c["task"]): c["verdict"] for c in summary["comparisons"]}
        wall = summary["wall_s"] - stages.get("sft-control", {"wall_s": 0.0})["wall_s"]
        for task in summary["scoring"]["tasks"]:
            cells = [cell(stages[s]["eval"][task]) if s in stages else "–" for s in STAGES]
            vs = verdicts.get(("grpo", "sft-control", task), "–")
            lines.append(f"| {seed} | {task} | " + " | ".join(cells) + f" | {vs} | {wall / 60:.1f} min |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[1337, 1, 2])
    p.add_argument("--out", default="runs/seeds")
    p.add_argument("--table-only", action="store_true", help="only print the table of runs already in --out")
    args = p.parse_args()
    runs = {}
    for seed in args.seeds:
        folder = Path(args.out) / f"seed-{seed}"
        if not args.table_only and not (folder / "summary.json").exists():
            cmd = [sys.executable, "-m", "nanoseek", "speedrun", "--out", str(folder), "--sft-control", "--quiet",
                   "--set", f"seed={seed}"]  # fmt: skip
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
        if (folder / "summary.json").exists():
            runs[seed] = json.loads((folder / "summary.json").read_text())
    print(table(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
