"""Verifiable synthetic tasks: generators, a held-out split disjoint from training, exact checkers (their
R1-format reward is `nanoseek.tasks.formats.r1_reward`).

    task = get_task("add2")                       # names: see TASKS ("add3", "add4"... also work)
    ex = task.generate(random.Random(0))          # Example(prompt="47+85=", answer="231", task="add2")
    task.check("231", ex)                         # True: exact checker on the bare answer text
    heldout = task.eval_examples(200, seed=0)     # distinct held-out problems, never produced for training

Formats are short and character-level friendly so a ~1-5M-parameter model learns them in CPU minutes
(REFERENCE §2): results are written least-significant digit first ("47+85=" -> "231" for 132), because
a left-to-right model then produces each digit after the digits it depends on. The tokenizer splits
digits into single tokens.

Held-out split: a problem is held out when a hash of its canonical key (the prompt) falls below
`heldout_fraction`; training generation rejects those problems, evaluation draws only them, so the two
are disjoint by construction for every seed.
"""

from __future__ import annotations

import ast
import hashlib
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from nanoseek.tasks.stats import wilson_ci95


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str  # the reference answer (for countdown: one valid expression among possibly many)
    task: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def is_heldout(key: str, fraction: float) -> bool:
    """Deterministic membership of a problem in the held-out split (independent of any seed)."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    return h / 2**64 < fraction


class Task:
    """Base class: subclasses set `name` and implement `_sample(rng) -> Example`; `check` defaults to exact
    match of the stripped prediction with the answer."""

    name: str = "task"
    space_size: int | None = None  # number of distinct problems, when small enough to matter

    def __init__(self, heldout_fraction: float = 0.1):
        self.heldout_fraction = heldout_fraction

    def _sample(self, rng: random.Random) -> Example:
        raise NotImplementedError

    def generate(self, rng: random.Random, split: str = "train") -> Example:
        """One problem from `split` ("train" or "heldout"), drawn with `rng` (rejection sampling)."""
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        want_heldout = split == "heldout"
        for _ in range(100_000):
            ex = self._sample(rng)
            if is_heldout(ex.prompt, self.heldout_fraction) == want_heldout:
                return ex
        raise RuntimeError(f"task {self.name}: could not draw a {split} problem (split fraction too extreme?)")

    def eval_examples(self, n: int, seed: int = 0) -> list[Example]:
        """Up to n distinct held-out problems, the same for the same (n, seed). Fewer when the held-out
        space is smaller than n."""
        rng = random.Random(f"{self.name}/eval/{seed}")
        seen: dict[str, Example] = {}
        limit = n
        if self.space_size is not None:
            limit = min(n, max(1, int(self.space_size * self.heldout_fraction * 0.9)))
        tries = 0
        while len(seen) < limit and tries < 50 * n + 1000:
            ex = self.generate(rng, "heldout")
            seen.setdefault(ex.prompt, ex)
            tries += 1
        return list(seen.values())

    def check(self, prediction: str, example: Example) -> bool:
        """Exact checker on the bare answer text (whitespace around it ignored)."""
        return prediction.strip() == example.answer


def _rev(n: int) -> str:
    return str(n)[::-1]


class Addition(Task):
    """'a+b=' -> digits of a+b, least significant first. Operands uniform in [0, 10**digits)."""

    def __init__(self, digits: int = 2, heldout_fraction: float = 0.1):
        super().__init__(heldout_fraction)
        if digits < 1:
            raise ValueError(f"addition needs digits >= 1, got {digits}")
        self.digits = digits
        self.name = f"add{digits}"
        self.space_size = 10 ** (2 * digits)

    def _sample(self, rng: random.Random) -> Example:
        a, b = rng.randrange(10**self.digits), rng.randrange(10**self.digits)
        return Example(f"{a}+{b}=", _rev(a + b), self.name)


class Multiplication(Task):
    """'a*b=' with a of `digits` digits and b one digit -> product, least significant digit first."""

    def __init__(self, digits: int = 2, heldout_fraction: float = 0.1):
        super().__init__(heldout_fraction)
        self.digits = digits
        self.name = "mul" if digits == 2 else f"mul{digits}"
        self.space_size = 10**digits * 10

    def _sample(self, rng: random.Random) -> Example:
        a, b = rng.randrange(10**self.digits), rng.randrange(10)
        return Example(f"{a}*{b}=", _rev(a * b), self.name)


class Sorting(Task):
    """'s:53819=' -> '13589': sort a short list of digits ascending."""

    def __init__(self, length: int = 5, heldout_fraction: float = 0.1):
        super().__init__(heldout_fraction)
        self.length = length
        self.name = "sort" if length == 5 else f"sort{length}"
        self.space_size = 10**length

    def _sample(self, rng: random.Random) -> Example:
        digits = [rng.randrange(10) for _ in range(self.length)]
        return Example(f"s:{''.join(map(str, digits))}=", "".join(map(str, sorted(digits))), self.name)


class LinearEquation(Task):
    """'3x+5=26;x=' -> '7': solve a*x+b=c for a single-digit x (a in 1..9, b in 0..9, x in 0..9)."""

    name = "linear"
    space_size = 9 * 10 * 10

    def _sample(self, rng: random.Random) -> Example:
        a, x, b = rng.randrange(1, 10), rng.randrange(10), rng.randrange(10)
        return Example(f"{a}x+{b}={a * x + b};x=", str(x), self.name)


class Countdown(Task):
    """TinyZero's countdown: 'cd:3,5,7>22=' -> an expression using each number exactly once with + - * /
    and parentheses that equals the target (e.g. '3*5+7'). Any valid expression is correct."""

    def __init__(self, count: int = 3, max_number: int = 9, heldout_fraction: float = 0.1):
        super().__init__(heldout_fraction)
        if count < 2:
            raise ValueError(f"countdown needs at least 2 numbers, got {count}")
        self.count, self.max_number = count, max_number
        self.name = "countdown" if count == 3 else f"countdown{count}"

    def _sample(self, rng: random.Random) -> Example:
        while True:
            numbers = [rng.randint(1, self.max_number) for _ in range(self.count)]
            order = numbers[:]
            rng.shuffle(order)
            expr, value = str(order[0]), Fraction(order[0])
            for n in order[1:]:
                op = rng.choice("+-*/")
                if op == "/" and (n == 0 or (value / n).denominator != 1):
                    op = "+"
                new = {"+": value + n, "-": value - n, "*": value * n, "/": value / n}[op]
                # keep precedence explicit only where it matters
                left = f"({expr})" if op in "*/" and any(c in expr for c in "+-") else expr
                expr, value = f"{left}{op}{n}", new
            if value.denominator == 1 and value > 0:
                target = int(value)
                prompt = f"cd:{','.join(map(str, numbers))}>{target}="
                return Example(prompt, expr, self.name, {"numbers": numbers, "target": target})

    def check(self, prediction: str, example: Example) -> bool:
        numbers, target = example.meta.get("numbers"), example.meta.get("target")
        if numbers is None:  # an Example rebuilt from text only: recover from the prompt
            m = re.fullmatch(r"cd:([\d,]+)>(\d+)=", example.prompt)
            if not m:
                return False
            numbers, target = [int(x) for x in m.group(1).split(",")], int(m.group(2))
        value, used = evaluate_arithmetic(prediction.strip())
        return value is not None and value == target and sorted(used) == sorted(numbers)


def evaluate_arithmetic(expr: str) -> tuple[Fraction | None, list[int]]:
    """Safely evaluate an expression of non-negative integers, + - * / and parentheses (exact fractions).
    Returns (value or None when not a valid expression / division by zero, the integer literals used)."""
    if not expr or len(expr) > 200 or not re.fullmatch(r"[\d+\-*/() ]+", expr):
        return None, []
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        return None, []
    used: list[int] = []

    def ev(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Sub | ast.Mult | ast.Div):
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Add):
                return a + b
            if isinstance(node.op, ast.Sub):
                return a - b
            if isinstance(node.op, ast.Mult):
                return a * b
            if b == 0:
                raise ZeroDivisionError
            return a / b
        raise ValueError("unsupported syntax")

    try:
        return ev(tree), used
    except (ValueError, ZeroDivisionError):
        return None, []


# ---- registry -----------------------------------------------------------------------------------------
TASKS: dict[str, type[Task] | Any] = {
    "add2": lambda **kw: Addition(2, **kw),
    "add3": lambda **kw: Addition(3, **kw),
    "add4": lambda **kw: Addition(4, **kw),
    "mul": lambda **kw: Multiplication(2, **kw),
    "sort": lambda **kw: Sorting(5, **kw),
    "linear": lambda **kw: LinearEquation(**kw),
    "countdown": lambda **kw: Countdown(3, **kw),
}
_PATTERNS = [
    (re.compile(r"add(\d+)"), lambda n, **kw: Addition(n, **kw)),
    (re.compile(r"mul(\d+)"), lambda n, **kw: Multiplication(n, **kw)),
    (re.compile(r"sort(\d+)"), lambda n, **kw: Sorting(n, **kw)),
    (re.compile(r"countdown(\d+)"), lambda n, **kw: Countdown(n, **kw)),
]


def get_task(name: str, heldout_fraction: float = 0.1) -> Task:
    """A task by name: those in TASKS, or addN / mulN / sortN / countdownN for other sizes."""
    if name in TASKS:
        return TASKS[name](heldout_fraction=heldout_fraction)
    for pattern, make in _PATTERNS:
        m = pattern.fullmatch(name)
        if m and 1 <= int(m.group(1)) <= 12:
            return make(int(m.group(1)), heldout_fraction=heldout_fraction)
    import difflib

    close = difflib.get_close_matches(name, list(TASKS), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"unknown task {name!r}{hint}; known: {', '.join(TASKS)} (or addN, mulN, sortN, countdownN)")


# ---- helpers for the trainer ----------------------------------------------------------------------------
def sample_texts(tasks: list[Task], n: int, seed: int = 0) -> Iterator[str]:
    """n training-split problems as `prompt + answer` strings (round-robin over tasks), e.g. to train a
    tokenizer; a few R1-format strings are mixed in so the markers' neighbours get merges too."""
    rng = random.Random(f"texts/{seed}")
    for i in range(n):
        ex = tasks[i % len(tasks)].generate(rng, "train")
        if i % 10 == 9:
            yield f"{ex.prompt}<think>{ex.prompt}</think><answer>{ex.answer}</answer>"
        else:
            yield ex.prompt + ex.answer


def score(task: Task, examples: list[Example], predictions: list[str]) -> dict[str, Any]:
    """Exact-match accuracy with its 95% Wilson interval: {"accuracy", "ci95": [lo, hi], "n"} (the
    per-task entry of a speedrun summary's "eval")."""
    if len(examples) != len(predictions):
        raise ValueError(f"{len(examples)} examples but {len(predictions)} predictions")
    k = sum(task.check(p, e) for p, e in zip(predictions, examples))
    n = len(examples)
    lo, hi = wilson_ci95(k, n)
    return {"accuracy": k / n if n else 0.0, "ci95": [lo, hi], "n": n}
