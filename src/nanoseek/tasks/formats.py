"""Prompt formats shared by training and evaluation: the plain prompt of a synthetic task, and the R1-Zero format.

    ids = prompt_ids(tok, example)                # what the model sees: <bos> prompt (as in training rows)
    extract_r1_answer("<think>…</think><answer>231</answer>")   # "231"; None unless exactly that shape
    r1_reward("<think>7+5=12</think><answer>231</answer>", ex)   # 1.0 / 0.1 well-formed wrong / 0.0

GRPO rewards completions in the R1 format and `nanoseek eval --format r1` scores them by the same extraction, so
a model is evaluated in the format it was trained in.
"""

from __future__ import annotations

import re
from typing import Protocol

from nanoseek.tasks.synthetic import Example, Task, get_task


class PromptTokenizer(Protocol):
    """What `prompt_ids` needs of a tokenizer (`nanoseek.tokenizer.Tokenizer` has it; tasks/ sits below it)."""

    def special_ids(self) -> tuple[int, int, int]: ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...


def prompt_ids(tok: PromptTokenizer, example: Example) -> list[int]:
    """The ids a model is given to answer `example`: <bos> + prompt (as in training rows)."""
    bos, _, _ = tok.special_ids()
    return [bos, *tok.encode(example.prompt, add_special_tokens=False)]


R1_SYSTEM_PROMPT = (
    "The assistant first thinks about the problem and then answers. The reasoning goes inside "
    "<think> </think> and the answer inside <answer> </answer>."
)
_R1_RE = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)


def extract_r1_answer(completion: str) -> str | None:
    """The text inside <answer>…</answer> when the completion is exactly `<think>…</think><answer>…</answer>`
    (whitespace around the blocks allowed), else None."""
    m = _R1_RE.fullmatch(completion)
    if m is None or "<answer>" in m.group(2) or "<think>" in m.group(1):
        return None
    return m.group(2).strip()


def r1_reward(completion: str, example: Example, task: Task | None = None) -> float:
    """TinyZero's rule reward: 0.0 unparsable, 0.1 well-formed but wrong, 1.0 correct."""
    answer = extract_r1_answer(completion)
    if answer is None:
        return 0.0
    task = task or get_task(example.task)
    return 1.0 if task.check(answer, example) else 0.1
