"""Evaluation data from JSONL files: GSM8K-style math problems and HellaSwag/ARC-style multiple choice.

    problems = load_math("gsm8k.jsonl")      # [MathProblem(question, reference="42")]
    items = load_choices("arc.jsonl")        # [ChoiceItem(context, continuations, gold)]

A malformed line is an error that names the file and the line number (`DataError`, a ValueError).

Multiple-choice shapes accepted, one object per line:
  - HellaSwag: {"ctx" (or "ctx_a" + "ctx_b"), "endings": [...], "label": int | "int"}
  - ARC:       {"question", "choices": {"text": [...], "label": ["A", ...]}, "answerKey": "A"}
  - MMLU-like: {"question", "choices": [...], "answer": int | "B"}
HellaSwag continues the context with " " + ending; ARC and MMLU become "Question: …\\nAnswer:" continued with
" " + choice (lm-evaluation-harness's prompts for those tasks).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """Bad evaluation data, with the file and line where it is."""


@dataclass(frozen=True)
class MathProblem:
    question: str
    reference: str  # the final answer (GSM8K: what follows "####", thousands separators removed)


@dataclass(frozen=True)
class ChoiceItem:
    context: str
    continuations: tuple[str, ...]
    gold: int  # index of the right continuation


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; DataError naming file and line for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
            yield number, obj


def gsm8k_reference(answer: str) -> str:
    """The final answer of a GSM8K solution ("… #### 1,234" -> "1234"); the whole text when it has no "####"."""
    final = answer.rsplit("####", 1)[-1] if "####" in answer else answer
    return final.strip().replace(",", "")


def load_math(path: str | os.PathLike, limit: int | None = None) -> list[MathProblem]:
    problems = []
    for number, obj in read_jsonl(path):
        question, answer = obj.get("question", obj.get("problem")), obj.get("answer", obj.get("solution"))
        if not isinstance(question, str) or not isinstance(answer, str | int | float) or isinstance(answer, bool):
            raise DataError(f'{path}:{number}: expected {{"question": str, "answer": str}} (GSM8K format)')
        reference = gsm8k_reference(str(answer))
        if not reference:
            raise DataError(f"{path}:{number}: the answer has no final value after '####'")
        problems.append(MathProblem(question, reference))
        if limit is not None and len(problems) >= limit:
            break
    return problems


def _gold_index(value: Any, labels: list[str], where: str) -> int:
    """A gold label as an index: an int, a digit string, or one of `labels` ("A", "B", …)."""
    if isinstance(value, bool):
        raise DataError(f"{where}: the gold label {value!r} is not an index or a choice label")
    if isinstance(value, int):
        index = value
    elif isinstance(value, str) and value.strip() in labels:
        index = labels.index(value.strip())
    elif isinstance(value, str) and re.fullmatch(r"\d+", value.strip()):
        index = int(value)
    else:
        raise DataError(f"{where}: the gold label {value!r} is not an index or one of {labels}")
    if not 0 <= index < len(labels):
        raise DataError(f"{where}: the gold label {value!r} is out of range for {len(labels)} choices")
    return index


def choice_item(obj: dict[str, Any], where: str) -> ChoiceItem:
    """One multiple-choice problem from any accepted shape (see the module docstring)."""
    if "endings" in obj:  # HellaSwag
        context = obj.get("ctx")
        if context is None and "ctx_a" in obj:
            ctx_b = str(obj.get("ctx_b", ""))
            context = f"{obj['ctx_a']} {ctx_b[:1].upper()}{ctx_b[1:]}".strip()
        endings, gold = obj["endings"], obj.get("label", obj.get("gold"))
        texts, labels = endings, [str(i) for i in range(len(endings) if isinstance(endings, list) else 0)]
        prompt = context
    elif "question" in obj and "choices" in obj:  # ARC ({"text", "label"}) or MMLU-like (a list)
        choices = obj["choices"]
        if isinstance(choices, dict):
            texts, labels = choices.get("text"), choices.get("label")
        else:
            texts, labels = choices, None
        if isinstance(texts, list) and labels is None:
            labels = [chr(ord("A") + i) for i in range(len(texts))]
        gold = obj.get("answerKey", obj.get("answer", obj.get("label")))
        prompt = f"Question: {obj['question']}\nAnswer:"
    else:
        raise DataError(
            f"{where}: not a multiple-choice line: expected HellaSwag fields (ctx, endings, label) or ARC fields "
            "(question, choices {text, label}, answerKey)"
        )
    if not isinstance(prompt, str) or not prompt:
        raise DataError(f"{where}: the context is missing or not a string")
    if not isinstance(texts, list) or len(texts) < 2 or not all(isinstance(t, str) and t for t in texts):
        raise DataError(f"{where}: the choices must be a list of at least 2 non-empty strings")
    if not isinstance(labels, list) or len(labels) != len(texts):
        raise DataError(f"{where}: the choice labels do not match the {len(texts)} choices")
    if gold is None:
        raise DataError(f"{where}: no gold label (label / answerKey / answer)")
    index = _gold_index(gold, [str(x) for x in labels], where)
    return ChoiceItem(prompt, tuple(" " + t for t in texts), index)


def load_choices(path: str | os.PathLike, limit: int | None = None) -> list[ChoiceItem]:
    items = []
    for number, obj in read_jsonl(path):
        items.append(choice_item(obj, f"{path}:{number}"))
        if limit is not None and len(items) >= limit:
            break
    return items
