"""The final answer of a math completion, and whether it equals the reference.

    extract_math_answer("… so she has 3 + 4 = 7 apples.\\n#### 7")    # "7"
    math_equal("7.0", "7")                                           # True

Extraction, first that applies: the text after the last "####" (GSM8K's own marker), the last \\boxed{…},
else the last number in the text. Checking uses `math-verify` (LaTeX, fractions, equivalent forms) and falls
back to an exact numeric compare, then to an exact string compare, where math-verify cannot parse either side.
"""

from __future__ import annotations

import re
import threading
from fractions import Fraction

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _boxed(text: str) -> str | None:
    """The content of the last \\boxed{…}, braces balanced; None without one."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j].strip()
    return None


def extract_math_answer(completion: str) -> str | None:
    """The completion's final answer text (see the module docstring), or None when it has none."""
    if "####" in completion:
        final = completion.rsplit("####", 1)[1].strip().splitlines()
        return final[0].strip().replace(",", "") if final else None
    boxed = _boxed(completion)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(completion)
    return numbers[-1].replace(",", "").rstrip(".") if numbers else None


def _as_number(text: str) -> Fraction | None:
    cleaned = text.strip().replace(",", "").removeprefix("$").removesuffix(".").strip()
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def math_equal(prediction: str | None, reference: str) -> bool:
    """Whether the predicted answer equals the reference: math-verify first, then exact numbers, then text."""
    if prediction is None or not prediction.strip():
        return False
    try:
        from math_verify import parse, verify

        # its time limits use SIGALRM, which only the main thread may set
        limit = 5 if threading.current_thread() is threading.main_thread() else None
        gold = parse(reference, parsing_timeout=limit)
        guess = parse(prediction, parsing_timeout=limit)
        if gold and guess and verify(gold, guess, timeout_seconds=limit):
            return True
    except Exception:  # math-verify missing, or it choked on odd text: the plain checks below still decide
        pass
    a, b = _as_number(prediction), _as_number(reference)
    if a is not None and b is not None:
        return a == b
    return prediction.strip() == reference.strip()
