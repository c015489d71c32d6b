"""RESULTS.md's distillation table: does a small student gain from a larger teacher's verified traces, beyond
the same SFT steps on its own verified traces?

    python benchmarks/distill_arms.py --teacher runs/x/pretrain/model --out runs/distill_arms --plot distill.png
    python benchmarks/distill_arms.py --out runs/distill_arms --table-only --plot distill.png  # nothing is run

The recipe, run one command after another (1 thread each by default, `--threads`):

1. `nanoseek eval TEACHER --tasks add2 --format F --limit 400 --json`: the teacher's held-out add2
   (OUT/teacher_eval.json).
2. `nanoseek train` of a student ~9x smaller than the speedrun's tiny model (hidden 64, 2 layers, MLA rank 16,
   2 heads, 4 routed experts top-2 + 1 shared: STUDENT_SETS), with the teacher's tokenizer (TEACHER/../tokenizer,
   or the teacher folder itself), for --student-steps steps on add2 + sort (0.75/0.25) in the teacher's format:
   with --format r1, the speedrun's pretraining rows (data.format=r1, add2 worked out column by column in the
   thought, seq_len 48); with --format plain, the bare rows. Into OUT/student.
3. Per seed S and SFT step count N, two arms identical but for who writes the traces, `--teacher TEACHER`
   ("teacher") and `--teacher OUT/student/model` ("own", the control): `nanoseek distill --student
   OUT/student/model --tasks add2 --format F --system-prompt S --problems 1000 --samples 4 --temperature 0.8
   --max-tokens M --eval-limit 400 --seed S --set max_steps=N --set batch_size=64 --set optim.lr=1e-3
   --set mtp_weight=0 --set ckpt_every=0`, into OUT/ARM-seedS-stepsN. 1,000 training-split problems x 4
   samples, the exact add2 verifier, one kept trace per problem, SFT on them, then held-out add2 in the same
   format, greedy, n=400 (the seed also draws the held-out problems: both arms of a seed see the same ones).

A cell whose summary.json exists is not run again (resume). The table gives each arm's held-out accuracy with its
Wilson 95% interval, the better one in bold where the two intervals do not overlap; `--plot PATH` draws
accuracy against SFT steps for both arms, one marker per seed, with the intervals as error bars.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ARMS = ("teacher", "own")
ARM_LABELS = {"teacher": "teacher's traces", "own": "own traces (control)"}
# the student: the tiny preset shrunk ~9x (152k parameters against the tiny model's 1.37M)
STUDENT_SETS = (
    "model.hidden_size=64", "model.num_hidden_layers=2", "model.intermediate_size=128",
    "model.moe_intermediate_size=32", "model.kv_lora_rank=16", "model.num_attention_heads=2",
    "model.num_key_value_heads=2", "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8",
    "model.v_head_dim=16", "model.n_routed_experts=4", "data.tasks=[add2,sort]", "data.task_weights=[0.75,0.25]",
    "optim.lr=3e-3", "ckpt_every=0",
)  # fmt: skip
# the speedrun's pretraining rows: the R1 chat format, add2 worked out in the thought
R1_SETS = ("data.format=r1", "data.thinking_tasks=[add2]", "seq_len=48")
DISTILL_ARGS = ("--tasks", "add2", "--problems", "1000", "--samples", "4", "--temperature", "0.8")
SFT_SETS = ("batch_size=64", "optim.lr=1e-3", "mtp_weight=0", "ckpt_every=0")


def cell_dir(out: Path, arm: str, seed: int, steps: int) -> Path:
    return out / f"{arm}-seed{seed}-steps{steps}"


def teacher_tokenizer(teacher: Path) -> Path:
    """The tokenizer folder a speedrun stage keeps beside its model (STAGE/tokenizer), else the model folder."""
    beside = teacher.parent / "tokenizer"
    return beside if (beside / "tokenizer.json").exists() else teacher


def _set(values) -> list[str]:
    return [a for v in values for a in ("--set", v)]


def commands(args) -> list[tuple[Path, list[str], Path | None]]:
    """(the file that marks it done, the command, where its stdout goes) for every step of the recipe, in order."""
    out, teacher = Path(args.out), Path(args.teacher)
    nanoseek = [sys.executable, "-m", "nanoseek"]
    fmt = ["--format", args.format, "--system-prompt", args.system_prompt]
    steps: list[tuple[Path, list[str], Path | None]] = [(
        out / "teacher_eval.json",
        nanoseek + ["eval", str(teacher), "--tasks", "add2", *fmt, "--limit", str(args.eval_limit),
                    "--max-tokens", str(args.max_tokens), "--json"],
        out / "teacher_eval.json",
    )]  # fmt: skip
    student_sets = [*STUDENT_SETS, *(R1_SETS if args.format == "r1" else ()), f"max_steps={args.student_steps}",
                    f"tokenizer.path={teacher_tokenizer(teacher)}", f"out_dir={out / 'student'}"]  # fmt: skip
    steps.append((out / "student" / "model" / "config.json",
                  nanoseek + ["train", "--preset", "tiny", "--quiet", *_set(student_sets)], None))  # fmt: skip
    student = out / "student" / "model"
    for n in args.steps:
        for seed in args.seeds:
            for arm in ARMS:
                folder = cell_dir(out, arm, seed, n)
                cmd = nanoseek + [
                    "distill", "--teacher", str(teacher if arm == "teacher" else student), "--student", str(student),
                    *DISTILL_ARGS, *fmt, "--max-tokens", str(args.max_tokens), "--eval-limit", str(args.eval_limit),
                    "--seed", str(seed), *_set([f"max_steps={n}", *SFT_SETS]), "--out", str(folder), "--no-progress",
                ]  # fmt: skip
                steps.append((folder / "summary.json", cmd, None))
    return steps


def run(args) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), TQDM_DISABLE="1")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for done, cmd, stdout in commands(args):
        if done.exists():
            print(f"done: {done.parent if done.name != 'teacher_eval.json' else done}", flush=True)
            continue
        print("$", " ".join(cmd), flush=True)
        if stdout is None:
            subprocess.run(cmd, check=True, env=env)
        else:
            result = subprocess.run(cmd, check=True, env=env, stdout=subprocess.PIPE, text=True)
            tmp = stdout.with_suffix(".tmp")
            tmp.write_text(result.stdout)
            tmp.replace(stdout)


def score(e: dict) -> tuple[float, float, float]:
    """(accuracy, low, high) in %, from an evaluation's add2 entry."""
    m = e["metrics"]["pass@1"]
    return 100 * m["value"], 100 * m["ci95"][0], 100 * m["ci95"][1]


def collect(out: Path) -> dict[tuple[int, int], dict[str, dict]]:
    """{(steps, seed): {arm: the cell's summary.json}} for every finished cell in `out`."""
    cells: dict[tuple[int, int], dict[str, dict]] = {}
    for path in sorted(out.glob("*-seed*-steps*/summary.json")):
        arm, rest = path.parent.name.split("-seed", 1)
        seed, steps = rest.split("-steps")
        if arm in ARMS:
            cells.setdefault((int(steps), int(seed)), {})[arm] = json.loads(path.read_text())
    return dict(sorted(cells.items()))


def fmt_cell(s: tuple[float, float, float]) -> str:
    return f"{s[0]:.1f}% ({s[1]:.1f}–{s[2]:.1f})"


def table(cells: dict[tuple[int, int], dict[str, dict]]) -> str:
    """One row per (SFT steps, seed): each arm's held-out add2 with its Wilson 95% interval; the better arm in bold
    where the two intervals do not overlap."""
    lines = ["| SFT steps | seed | " + " | ".join(ARM_LABELS[a] for a in ARMS) + " |", "|---:|---:|---|---|"]
    for (steps, seed), arms in cells.items():
        scores = {a: score(arms[a]["eval_after"]["add2"]) for a in ARMS if a in arms}
        texts = {a: fmt_cell(s) for a, s in scores.items()}
        if len(scores) == 2:
            (a, sa), (b, sb) = scores.items()
            if sa[1] > sb[2]:
                texts[a] = f"**{texts[a]}**"
            elif sb[1] > sa[2]:
                texts[b] = f"**{texts[b]}**"
        lines.append(f"| {steps} | {seed} | " + " | ".join(texts.get(a, "–") for a in ARMS) + " |")
    return "\n".join(lines)


def notes(out: Path, cells: dict[tuple[int, int], dict[str, dict]]) -> list[str]:
    """The context lines printed under the table: the teacher's and the untrained student's held-out add2, and
    how many traces each arm kept."""
    lines = []
    teacher = out / "teacher_eval.json"
    if teacher.exists():
        lines.append(f"teacher held-out add2: {fmt_cell(score(json.loads(teacher.read_text())['add2']))}")
    before = {seed: arms[a]["eval_before"]["add2"] for (_, seed), arms in cells.items() for a in arms}
    if before:
        lines.append("student before SFT: " + ", ".join(f"seed {s} {fmt_cell(score(e))}" for s, e in before.items()))
    for arm in ARMS:
        kept = {seed: (arms[arm]["kept"], arms[arm]["correct"], arms[arm]["generated"])
                for (_, seed), arms in cells.items() if arm in arms}  # fmt: skip
        if kept:
            lines.append(f"{ARM_LABELS[arm]}: " + ", ".join(
                f"seed {s} {c}/{g} correct, {k} kept" for s, (k, c, g) in kept.items()))  # fmt: skip
    return lines


def plot(out: Path, cells: dict[tuple[int, int], dict[str, dict]], path: Path, footnote: str = "") -> Path:
    """Held-out add2 accuracy (%) against SFT steps (log axis), one colour per arm and one marker per seed, each
    with its Wilson 95% interval; the untrained student's accuracy (median over seeds) and the teacher's dashed."""
    from nanoseek.bench.plots import _finish, _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    seeds = sorted({seed for _, seed in cells})
    steps = sorted({n for n, _ in cells})
    markers = "osD^vP*X"
    for a, arm in enumerate(ARMS):
        for k, seed in enumerate(seeds):
            pts = [(n, score(arms[arm]["eval_after"]["add2"])) for (n, s), arms in cells.items()
                   if s == seed and arm in arms]  # fmt: skip
            if not pts:
                continue
            shift = 1.0 + 0.035 * (k - (len(seeds) - 1) / 2) + 0.012 * (a - 0.5)  # side by side on the log axis
            xs = [n * shift for n, _ in pts]
            ys = [v for _, (v, _, _) in pts]
            err = [[v - lo for _, (v, lo, _) in pts], [hi - v for _, (v, _, hi) in pts]]
            ax.errorbar(xs, ys, yerr=err, fmt=markers[k % len(markers)], color=f"C{a}", capsize=3, markersize=5,
                        linestyle="-", linewidth=0.8, alpha=0.85, label=f"{ARM_LABELS[arm]}, seed {seed}")  # fmt: skip
    before = [score(arms[a]["eval_before"]["add2"])[0] for arms in cells.values() for a in arms]
    if before:
        ax.axhline(sorted(before)[len(before) // 2], color="gray", linestyle=":", linewidth=1,
                   label="student before SFT")  # fmt: skip
    teacher = out / "teacher_eval.json"
    if teacher.exists():
        ax.axhline(score(json.loads(teacher.read_text())["add2"])[0], color="black", linestyle="--", linewidth=1,
                   label="teacher")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xticks(steps)
    ax.set_xticklabels([str(n) for n in steps])
    ax.minorticks_off()
    ax.set_xlabel("SFT steps (batch 64)")
    ax.set_ylabel("held-out add2 accuracy (%), n=400, greedy")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    _finish(fig, "distillation: teacher's vs own verified traces, add2", footnote)
    return _save(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", help="the teacher: a trained nanoseek model folder (e.g. a speedrun's pretrain/model)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, nargs="+", default=[150, 500, 1500], help="SFT step counts")
    p.add_argument("--threads", type=int, default=1, help="torch and OpenMP threads of every command (default 1)")
    p.add_argument("--out", default="runs/distill_arms")
    p.add_argument("--format", choices=("r1", "plain"), default="r1",
                   help="the teacher's format, as nanoseek distill --format (default r1: speedrun models)")  # fmt: skip
    p.add_argument("--system-prompt", default="", help="as nanoseek distill --system-prompt (default '': none)")
    p.add_argument("--max-tokens", type=int, default=32, help="most tokens of a completion (default 32)")
    p.add_argument("--student-steps", type=int, default=300, help="the student's pretraining steps (default 300)")
    p.add_argument("--eval-limit", type=int, default=400, help="held-out add2 problems scored (default 400)")
    p.add_argument("--table-only", action="store_true", help="only the table (and plot) of the cells in --out")
    p.add_argument("--plot", help="write a PNG of accuracy against SFT steps, both arms, here")
    args = p.parse_args(argv)
    out = Path(args.out)
    if not args.table_only:
        if not args.teacher:
            p.error("--teacher is needed unless --table-only")
        run(args)
    cells = {k: v for k, v in collect(out).items() if k[0] in args.steps and k[1] in args.seeds}
    shown = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--table-only"]
    print("Command: `" + " ".join(["python benchmarks/distill_arms.py", *shown]) + "`\n")
    print(table(cells))
    for line in notes(out, cells):
        print(line)
    if args.plot and cells:
        footnote = (f"each point: held-out add2, n={args.eval_limit}, with its Wilson 95% interval; the arms of a "
                    "seed share their held-out problems and differ only in who wrote the traces")  # fmt: skip
        print(f"plot: {plot(out, cells, Path(args.plot), footnote)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
