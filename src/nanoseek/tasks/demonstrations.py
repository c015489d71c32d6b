"""R1-format traces of the synthetic tasks: the speedrun's SFT demonstrations (and the replies GRPO rewards).

    r1_answer_text(example)        # '<think>5005,6501,1</think><answer>511</answer>' for 65+50=
    r1_conversations(tasks, n=2000, seed=1337, weights=[.25, .25, .5], thinking=["add3"])

Additions are worked out column by column (carry_steps); countdown computes its reference expression one
operation a step (countdown_steps); other tasks restate the problem; a task outside `thinking` answers directly
after an empty thought, as data.format=r1 pretraining writes it.
"""

from __future__ import annotations

import random
import re

from nanoseek.tasks.synthetic import Example, Task


def r1_thought(example: Example) -> str:
    """The scratchpad of `example`'s demonstration: for addition, column addition written out (carry_steps); for
    countdown, the reference expression computed step by step (countdown_steps); for other tasks, the problem
    restated."""
    m = re.fullmatch(r"(\d+)\+(\d+)=", example.prompt)
    if m:
        return carry_steps(m.group(1), m.group(2))
    if example.prompt.startswith("cd:"):
        return countdown_steps(example.answer)
    return example.prompt.rstrip("=")


def countdown_steps(expression: str) -> str:
    """The countdown reference's evaluation, one operation a step: '(3+5)*7' -> '3+5=8,8*7=56'. The generator
    (tasks.Countdown) builds its expressions left to right, bracketing the left part only where precedence needs
    it, so reading the numbers and operators left to right without the brackets gives its value step by step."""
    tokens = re.findall(r"\d+|[-+*/]", expression.replace("(", "").replace(")", ""))
    value, steps = int(tokens[0]), []
    for op, n in zip(tokens[1::2], tokens[2::2]):
        new = {"+": value + int(n), "-": value - int(n), "*": value * int(n), "/": value // int(n)}[op]
        steps.append(f"{value}{op}{n}={new}")
        value = new
    return ",".join(steps)


def carry_steps(a: str, b: str) -> str:
    """Column addition of the decimal strings a and b, least significant column first, one step per column:
    the column's digit of a, of b, the carry in, the digit of the sum; then the carry out. 65+50 ->
    '5005,6501,1' (5+0+0 = 5, 6+5+0 = 11), whose sum digits read '511', the answer (115 written least
    significant digit first). Every token depends on a few tokens at fixed distances before it (the previous
    column's step) or is a digit copied from the prompt: a scratchpad a small model learns from a few thousand
    demonstrations, where computing the answer directly needs each answer digit to find its two operand
    digits at distances that change with the operands' lengths."""
    width = max(len(a), len(b))
    carry, steps = 0, []
    for da, db in zip(a.zfill(width)[::-1], b.zfill(width)[::-1]):
        total = int(da) + int(db) + carry
        steps.append(f"{da}{db}{carry}{total % 10}")
        carry = total // 10
    return ",".join([*steps, str(carry)])


def r1_answer_text(example: Example, think: bool = True) -> str:
    """The demonstration's reply: the scratchpad (r1_thought) when `think`, else an empty thought (the direct
    answer, as data.format=r1 pretraining writes it), then the answer."""
    return f"<think>{r1_thought(example) if think else ''}</think><answer>{example.answer}</answer>"


def r1_conversations(
    tasks: list[Task], n: int, seed: int, weights: list[float] | None = None, thinking: list[str] | None = None
) -> list[dict]:
    """n training-split problems as chat conversations whose assistant turn is the R1-format reply; the tasks
    named in `thinking` (None: all) work the problem out in the thought, the others answer directly."""
    rng = random.Random(f"sft-data/{seed}")
    out = []
    for _ in range(n):
        ex = rng.choices(tasks, weights=weights)[0].generate(rng, "train")
        think = thinking is None or ex.task in thinking
        out.append({"messages": [{"role": "user", "content": ex.prompt},
                                 {"role": "assistant", "content": r1_answer_text(ex, think)}]})  # fmt: skip
    return out
