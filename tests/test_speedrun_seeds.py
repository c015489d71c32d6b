"""benchmarks/speedrun_seeds.py's table (no runs): each stage's interval, the run's verdict and GRPO minus the
control compared problem by problem."""

from __future__ import annotations

from benchmark_scripts import load_script


def load():
    return load_script("speedrun_seeds")


def test_table_shows_the_paired_difference_where_the_runs_kept_per_problem_verdicts():
    from nanoseek.tasks import wilson_ci95
    from nanoseek.train.scoring import stage_comparisons

    def score(solved: str) -> dict:
        k, n = solved.count("1"), len(solved)
        return {"accuracy": k / n, "ci95": list(wilson_ci95(k, n)), "n": n, "correct": k, "solved": solved}

    grpo, control = "1" * 160 + "0" * 240, "1" * 86 + "0" * 74 + "1" * 50 + "0" * 190
    stages = [
        {"name": "sft", "wall_s": 60.0, "eval": {"countdown": score("1" * 127 + "0" * 273)}},
        {"name": "grpo", "parent": "sft", "wall_s": 200.0, "eval": {"countdown": score(grpo)}},
        {"name": "sft-control", "parent": "sft", "wall_s": 200.0, "eval": {"countdown": score(control)}},
    ]
    summary = {"stages": stages, "comparisons": stage_comparisons(stages), "wall_s": 460.0,
               "scoring": {"tasks": ["countdown"], "problems": 400}}  # fmt: skip
    text = load().table({1: summary})
    row = text.splitlines()[-1]
    assert row.startswith("| 1 | countdown | – | 31.8 (27.4–36.5) | 40.0 (35.3–44.9) | 34.0 (29.5–38.8) | same |")
    assert row.endswith("| +6.0 (+0.6 to +11.4) better | 4.3 min |")
    for stage in stages:  # a run from before the summaries kept per-problem verdicts: no paired cell
        del stage["eval"]["countdown"]["solved"]
    summary["comparisons"] = stage_comparisons(stages)
    assert load().table({1: summary}).splitlines()[-1].endswith("| same | – | 4.3 min |")


def test_cold_start_probe_changes_one_tasks_demonstrations_and_keeps_the_others():
    import copy

    import pytest

    from nanoseek.train.speedrun import STAGE_PLANS

    change = load_script("cold_start_demos").plan_with_demonstrations
    plan = copy.deepcopy(STAGE_PLANS["tiny"])
    plan.sft_tasks = ["add2", "sort", "add3", "countdown"]
    assert plan.sft_conversations == 2300 and [round(2300 * w) for w in plan.sft_task_weights] == [500, 500, 1000, 300]
    before = change(copy.deepcopy(plan), "countdown", 1000)  # the recipe before 2026-12-07, draw for draw
    assert before.sft_conversations == 3000 and before.sft_task_weights == [1 / 6, 1 / 6, 1 / 3, 1 / 3]
    fewer = change(copy.deepcopy(plan), "countdown", 200)
    assert fewer.sft_conversations == 2200
    assert [round(2200 * w) for w in fewer.sft_task_weights] == [500, 500, 1000, 200]
    with pytest.raises(ValueError, match="not one of the cold start's tasks"):
        change(copy.deepcopy(plan), "mul", 10)
