"""The speedrun's one scoring contract: every stage is scored on the same held-out problems, greedy, through
nanoseek.eval in its format, exactly as the `nanoseek eval` command scoring_command prints; a stage beats
another only beyond both 95% intervals (verdict), and stage_comparisons lists the pairs the report states, each
also compared problem by problem (paired).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from nanoseek.tasks import get_task, paired_difference_ci95
from nanoseek.train.config import TrainConfig

# The stages the final model comes through, in order (the SFT control is a side arm).
MAIN_LINE = ("pretrain", "sft", "grpo")

# Every stage is scored on the same held-out problems (the first eval.examples of each task's held-out
# split, the problems `nanoseek eval` draws with its default --seed 0) through nanoseek.eval, greedy, in its
# format: the pretrained model on the bare prompt (`47+85=`), the later ones in the chat template with no system
# prompt, answering `<think>…</think><answer>…</answer>` (the answer checked exactly). The same problems in two
# formats are two measurements: the report names each stage's format and never adds answers across formats.
SCORING_FORMATS: dict[str, dict[str, Any]] = {
    "plain": {"format": "plain"},
    "r1": {"format": "r1", "system_prompt": ""},
}
# 256 problems decoded together (greedy answers do not depend on the batch: tests/test_speedrun.py checks the
# CLI's default batch gives the same scores)
GREEDY_EVAL_BATCH = 256


def scoring_command(fmt: str, tasks: list[str], n: int) -> str:
    """The `nanoseek eval` command that scores a stage's model exactly as the run did."""
    extra = " --system-prompt ''" if fmt == "r1" else ""
    return f"nanoseek eval MODEL --tasks {' '.join(tasks)} --format {fmt}{extra} --limit {n}"


def heldout_specs(tasks: list[str], cfg: TrainConfig) -> list[Any]:
    """nanoseek.eval task specs of `tasks` on the pretraining config's held-out split."""
    from nanoseek.eval import TaskSpec

    return [TaskSpec(t, "synthetic", task=get_task(t, cfg.data.heldout_fraction)) for t in tasks]


# Which comparisons the report states (each stage against the stage it started from, the final model against
# the pretrained one, GRPO against its SFT control), and how: a difference counts only beyond both 95% intervals.
def verdict(a: dict[str, Any], b: dict[str, Any]) -> str:
    """'better' when score `a`'s interval lies wholly above `b`'s, 'worse' when wholly below, else 'same'."""
    if a["ci95"][0] > b["ci95"][1]:
        return "better"
    if a["ci95"][1] < b["ci95"][0]:
        return "worse"
    return "same"


def paired(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any] | None:
    """Two scores of the same problems compared problem by problem: how many each solved that the other did not,
    the difference of accuracies and its paired 95% interval (tasks.paired_difference_ci95), and the verdict that
    interval gives ('better' when it lies above 0). The stricter `verdict` stays the report's rule; this one
    says what the pairing adds. None when the per-problem verdicts are missing or not of the same problems."""
    sa, sb = a.get("solved"), b.get("solved")
    if not sa or not sb or len(sa) != len(sb):
        return None
    ra, rb = [c == "1" for c in sa], [c == "1" for c in sb]
    diff, lo, hi = paired_difference_ci95(ra, rb)
    word = "better" if lo > 0 else "worse" if hi < 0 else "same"
    only_stage, only_against = sum(x and not y for x, y in zip(ra, rb)), sum(y and not x for x, y in zip(ra, rb))
    return {"only_stage": only_stage, "only_against": only_against, "diff": diff, "ci95": [lo, hi], "verdict": word}


def stage_comparisons(stages: list[dict[str, Any]], main_line: Sequence[str] = MAIN_LINE) -> list[dict[str, Any]]:
    """Per task: each stage against its parent, the final main-line stage against pretraining, and GRPO against
    the SFT control, each with its verdict (`verdict`). The pairs compare the same held-out problems."""
    by_name = {s["name"]: s for s in stages}
    pairs = [(s["name"], s["parent"]) for s in stages if s.get("parent") in by_name]
    main = [s["name"] for s in stages if s["name"] in main_line]
    if len(main) > 2:
        pairs.append((main[-1], "pretrain"))
    if "grpo" in by_name and "sft-control" in by_name:
        pairs.append(("grpo", "sft-control"))
    out = []
    for a, b in pairs:
        for task in sorted(set(by_name[a]["eval"]) & set(by_name[b]["eval"])):
            sa, sb = by_name[a]["eval"][task], by_name[b]["eval"][task]
            row = {"stage": a, "against": b, "task": task, "verdict": verdict(sa, sb)}
            if (pair := paired(sa, sb)) is not None:
                row["paired"] = pair
            out.append(row)
    return out
