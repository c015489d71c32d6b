"""benchmarks/distill_arms.py without running anything: its commands (the two arms differ only in who writes the
traces) and its table and plot from a fake folder of finished cells."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmark_scripts import load_script
from nanoseek.tasks import wilson_ci95


def load():
    return load_script("distill_arms")


def evaluation(correct: int, n: int = 400) -> dict:
    lo, hi = wilson_ci95(correct, n)
    return {"add2": {"task": "add2", "n": n, "metrics": {"pass@1": {"value": correct / n, "ci95": [lo, hi]}}}}


def write_cell(folder: Path, before: int, after: int, kept: int) -> None:
    folder.mkdir(parents=True)
    summary = {"generated": 4000, "correct": 2 * kept, "kept": kept, "eval_before": evaluation(before),
               "eval_after": evaluation(after)}  # fmt: skip
    (folder / "summary.json").write_text(json.dumps(summary))


def test_the_arms_differ_only_in_who_writes_the_traces(tmp_path):
    m = load()
    teacher_dir = str(tmp_path / "t" / "model")
    args = argparse.Namespace(out=str(tmp_path), teacher=teacher_dir, seeds=[0, 1], steps=[150], format="r1",
                              system_prompt="", max_tokens=32, student_steps=300, eval_limit=400)  # fmt: skip
    steps = m.commands(args)
    assert [cmd[3] for _, cmd, _ in steps] == ["eval", "train"] + ["distill"] * 4
    assert "data.format=r1" in steps[1][1] and f"out_dir={tmp_path / 'student'}" in steps[1][1]
    teacher, own = steps[2][1], steps[3][1]
    differ = [i for i, (a, b) in enumerate(zip(teacher, own, strict=True)) if a != b]
    assert [teacher[i] for i in differ] == [args.teacher, str(tmp_path / "teacher-seed0-steps150")]
    assert [own[i] for i in differ] == [str(tmp_path / "student" / "model"), str(tmp_path / "own-seed0-steps150")]


def test_table_and_plot_from_finished_cells(tmp_path, capsys):
    m = load()
    (tmp_path / "teacher_eval.json").write_text(json.dumps(evaluation(400)))
    write_cell(tmp_path / "teacher-seed0-steps150", 19, 63, 1000)
    write_cell(tmp_path / "own-seed0-steps150", 19, 40, 120)
    write_cell(tmp_path / "teacher-seed0-steps500", 19, 287, 1000)
    write_cell(tmp_path / "own-seed0-steps500", 19, 44, 120)
    write_cell(tmp_path / "teacher-seed1-steps500", 20, 300, 1000)  # its control is not finished yet
    png = tmp_path / "arms.png"
    assert m.main(["--out", str(tmp_path), "--table-only", "--seeds", "0", "1", "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"Command: `python benchmarks/distill_arms.py --out {tmp_path} --seeds 0 1 --plot {png}`")
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[1:] == [
        "| 150 | 0 | 15.8% (12.5–19.6) | 10.0% (7.4–13.3) |",  # the intervals overlap: no bold
        "| 500 | 0 | **71.8% (67.1–75.9)** | 11.0% (8.3–14.4) |",
        "| 500 | 1 | 75.0% (70.5–79.0) | – |",
    ]
    assert "teacher held-out add2: 100.0% (99.0–100.0)" in text
    assert "own traces (control): seed 0 240/4000 correct, 120 kept" in text
    assert png.stat().st_size > 10_000
