"""Rule-based rewards for GRPO (the R1-Zero recipe): plain Python callables, pluggable by name.

    fn = REWARDS["accuracy"]                       # (completion, example, task) -> float
    fn("<think>5+7=12</think><answer>21</answer>", ex, task)      # 1.0 when the task's checker accepts
    totals, parts = score_completions([format_reward, accuracy_reward], [1.0, 1.0], completions, examples, tasks)

A reward function takes the completion text, the task's Example and the Task (whose exact checker it may
use) and returns a float. One that raises counts as 0 for that completion, with a logged warning: a buggy
reward never stops a run midway.

- format:   1.0 when the completion is exactly `<think>…</think><answer>…</answer>`, else 0.0;
- accuracy: 1.0 when the answer inside `<answer>` passes the task's exact checker, else 0.0;
- math:     1.0 when `math-verify` finds the answer equal to the reference (LaTeX, fractions, equivalent
            forms), else 0.0; for GSM8K-style data whose references are numbers or expressions;
- r1:       TinyZero's single rule: 0.0 unparsable, 0.1 well-formed but wrong, 1.0 correct.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

from nanoseek.tasks import Example, Task, extract_r1_answer, r1_reward

RewardFn = Callable[[str, Example, Task], float]

log = logging.getLogger("nanoseek.grpo")


def format_reward(completion: str, example: Example, task: Task) -> float:
    return 0.0 if extract_r1_answer(completion) is None else 1.0


def accuracy_reward(completion: str, example: Example, task: Task) -> float:
    answer = extract_r1_answer(completion)
    return 1.0 if answer is not None and task.check(answer, example) else 0.0


def math_verify_reward(completion: str, example: Example, task: Task) -> float:
    """math-verify's equivalence of the <answer> text (or the whole completion when it has no R1 format)
    with the reference answer."""
    from math_verify import parse, verify

    answer = extract_r1_answer(completion)
    predicted = answer if answer is not None else completion
    gold = parse(example.answer)
    guess = parse(predicted)
    return 1.0 if gold and guess and verify(gold, guess) else 0.0


def tinyzero_reward(completion: str, example: Example, task: Task) -> float:
    return r1_reward(completion, example, task)


REWARDS: dict[str, RewardFn] = {
    "format": format_reward,
    "accuracy": accuracy_reward,
    "math": math_verify_reward,
    "r1": tinyzero_reward,
}


def get_rewards(names: Sequence[str]) -> list[RewardFn]:
    unknown = [n for n in names if n not in REWARDS]
    if unknown:
        raise ValueError(f"unknown reward {unknown[0]!r}; known: {', '.join(REWARDS)}")
    if not names:
        raise ValueError("GRPO needs at least one reward function")
    return [REWARDS[n] for n in names]


def safe_reward(fn: RewardFn, completion: str, example: Example, task: Task) -> tuple[float, str | None]:
    """(reward, None), or (0.0, the error) when fn raises or returns something that is not a finite number."""
    name = getattr(fn, "__name__", repr(fn))
    try:
        value = float(fn(completion, example, task))
    except Exception as exc:  # any bug in a user's reward function: count 0, keep training
        return 0.0, f"reward {name} raised {type(exc).__name__}: {exc}"
    if not math.isfinite(value):
        return 0.0, f"reward {name} returned {value}"
    return value, None


def score_completions(
    fns: Sequence[RewardFn],
    weights: Sequence[float],
    completions: Sequence[str],
    examples: Sequence[Example],
    tasks: Sequence[Task],
) -> tuple[list[float], dict[str, list[float]]]:
    """Weighted sum of every reward per completion, and each reward's values by function name. A failing
    reward counts 0 and is logged once per function and call (with how many completions it failed on)."""
    if len(weights) != len(fns):
        raise ValueError(f"{len(fns)} reward functions but {len(weights)} weights")
    totals = [0.0] * len(completions)
    parts: dict[str, list[float]] = {}
    for fn, w in zip(fns, weights):
        name = getattr(fn, "__name__", repr(fn))
        values, errors = [], []
        for i, (c, ex, task) in enumerate(zip(completions, examples, tasks)):
            value, error = safe_reward(fn, c, ex, task)
            values.append(value)
            totals[i] += w * value
            if error:
                errors.append(error)
        if errors:
            log.warning("%s (on %d of %d completions; counted as 0)", errors[0], len(errors), len(completions))
        parts[name] = values
    return totals, parts
