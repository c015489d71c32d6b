"""Verifiable tasks, their prompt formats and the statistics their scores carry, below both `train/` and `eval/`.

    from nanoseek.tasks import get_task, prompt_ids, r1_reward, wilson_ci95

- `synthetic`: the synthetic tasks (add2, sort, countdown, addN, …), their held-out split and exact checkers;
- `formats`: the prompt a model is given (`prompt_ids`: <bos> + prompt) and the R1-Zero format (system prompt,
  answer extraction, rule reward);
- `stats`: pass@k and the 95% intervals (Wilson, percentile bootstrap);
- `demonstrations`: R1-format replies that work a problem out in the thought (SFT's demonstrations, r1 rows).
"""

from nanoseek.tasks.formats import R1_SYSTEM_PROMPT, extract_r1_answer, prompt_ids, r1_reward
from nanoseek.tasks.stats import bootstrap_ci95, paired_difference_ci95, pass_at_k, wilson_ci95
from nanoseek.tasks.synthetic import (
    TASKS,
    Addition,
    Countdown,
    Example,
    LinearEquation,
    Multiplication,
    Sorting,
    Task,
    evaluate_arithmetic,
    get_task,
    is_heldout,
    sample_texts,
    score,
)

__all__ = [
    "R1_SYSTEM_PROMPT", "TASKS", "Addition", "Countdown", "Example", "LinearEquation", "Multiplication", "Sorting",
    "Task", "bootstrap_ci95", "evaluate_arithmetic", "extract_r1_answer", "get_task", "is_heldout",
    "paired_difference_ci95", "pass_at_k", "prompt_ids", "r1_reward", "sample_texts", "score", "wilson_ci95",
]  # fmt: skip
