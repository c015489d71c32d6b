"""Held-out evaluation: greedy answers to task prompts, exact-match by each task's checker.

    scores = evaluate_tasks(model, tok, [get_task("add2")], n=200)
    scores["add2"].accuracy, scores["add2"].ci95, scores["add2"].n

Decoding runs on the inference engine (`nanoseek.engine.generate.generate_batch`: paged cache, continuous
batching, in eval mode so the router's balancing statistics never move), greedy, stopping at the
tokenizer's stop ids, on the model's own device. All ranks of a sharded (FSDP) model must call this with
the same arguments: the engine's steps are then identical everywhere, which the shard all-gathers need.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from nanoseek.engine.generate import generate_batch
from nanoseek.engine.sampling import SamplingParams
from nanoseek.tasks import Example, Task, prompt_ids, wilson_ci95
from nanoseek.tokenizer import Tokenizer


@dataclass
class TaskScore:
    correct: int
    n: int
    # the nanoseek.eval EvalResult the score was read from (evaluate_in_format), for a caller that reports it whole
    result: Any = field(default=None, compare=False, repr=False)

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def ci95(self) -> tuple[float, float]:
        return wilson_ci95(self.correct, self.n)

    @property
    def solved(self) -> str | None:
        """Which problems were answered right, in the evaluation's order ("1" right, "0" wrong; None when the
        per-problem verdicts were not kept): two stages scored on the same problems compare pairwise."""
        if self.result is None:
            return None
        return "".join("1" if d["correct"][0] else "0" for d in self.result.details)

    def to_dict(self) -> dict:
        lo, hi = self.ci95
        out = {"accuracy": self.accuracy, "ci95": [lo, hi], "n": self.n, "correct": self.correct}
        if (solved := self.solved) is not None:
            out["solved"] = solved
        return out


def evaluate_examples(
    model: nn.Module,
    tok: Tokenizer,
    task: Task,
    examples: Sequence[Example],
    *,
    max_new_tokens: int | None = None,
    batch_size: int = 256,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[TaskScore, list[tuple[Example, str]]]:
    """Score `examples` of `task`; also returns (example, prediction) pairs for inspection."""
    if max_new_tokens is None:  # room for the longest reference answer, its eos and a little slack
        max_new_tokens = max((len(tok.encode(ex.answer, add_special_tokens=False)) for ex in examples), default=1) + 2
    was_training = model.training
    model.eval()
    pairs: list[tuple[Example, str]] = []
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            answers = generate_batch(
                model,
                [prompt_ids(tok, ex) for ex in chunk],
                max_new_tokens,
                SamplingParams(temperature=0),
                tok.stop_token_ids,
                autocast_dtype=autocast_dtype,
            )
            pairs.extend((ex, tok.decode(a.token_ids, skip_special_tokens=True)) for ex, a in zip(chunk, answers))
    finally:
        model.train(was_training)
    correct = sum(task.check(pred, ex) for ex, pred in pairs)
    return TaskScore(correct, len(pairs)), pairs


def evaluate_tasks(
    model: nn.Module,
    tok: Tokenizer,
    tasks: Sequence[Task],
    n: int = 200,
    *,
    seed: int = 0,
    batch_size: int = 256,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, TaskScore]:
    """Exact-match accuracy of greedy answers on up to n held-out problems per task (never seen in
    training: see tasks.is_heldout)."""
    scores = {}
    for task in tasks:
        examples = task.eval_examples(n, seed=seed)
        scores[task.name], _ = evaluate_examples(
            model, tok, task, examples, batch_size=batch_size, autocast_dtype=autocast_dtype
        )
    return scores


def evaluate_in_format(
    model: nn.Module,
    tok: Tokenizer,
    tasks: Sequence[Task],
    n: int = 200,
    fmt: str = "r1",
    *,
    system_prompt: str = "",
    max_new_tokens: int | None = None,
    batch_size: int = 256,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, TaskScore]:
    """Greedy accuracy on up to n held-out problems per task through nanoseek.eval in `fmt` ("plain", or "r1"
    with `system_prompt`, none by default): the scores `nanoseek eval --format FMT [--system-prompt S]
    [--max-tokens N]` gives (the speedrun's stages, data.format=r1 runs, GRPO's held-out accuracy)."""
    from nanoseek.eval import TaskSpec, evaluate

    specs = [TaskSpec(t.name, "synthetic", task=t) for t in tasks]
    results = evaluate(model, tok, specs, limit=n, format=fmt, system_prompt=system_prompt if fmt != "plain" else "",
                       max_new_tokens=max_new_tokens, batch_size=batch_size, autocast_dtype=autocast_dtype)  # fmt: skip
    return {name: TaskScore(sum(d["correct"][0] for d in r.details), r.n, r) for name, r in results.items()}
