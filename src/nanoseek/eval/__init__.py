"""Evaluation: held-out synthetic tasks, GSM8K-style math, multiple choice; pass@k with 95% intervals.

    from nanoseek.eval import evaluate
    results = evaluate(model, tokenizer, ["add2", "gsm8k:test.jsonl", "mc:arc.jsonl"])
    print(format_table(results))

See `nanoseek.eval.runner` for the task specs, formats and intervals.
"""

from nanoseek.eval.data import DataError
from nanoseek.eval.runner import EvalResult, EvalWarning, Metric, TaskSpec, evaluate, format_table, parse_spec
from nanoseek.tasks import bootstrap_ci95, pass_at_k, wilson_ci95

__all__ = [
    "DataError", "EvalResult", "EvalWarning", "Metric", "TaskSpec", "bootstrap_ci95", "evaluate", "format_table",
    "parse_spec", "pass_at_k", "wilson_ci95",
]  # fmt: skip
