"""`evaluate(model, tokenizer, specs)`: held-out synthetic tasks, GSM8K-style math and multiple choice.

    results = evaluate(model, tok, ["add2", "gsm8k:test.jsonl", "mc:arc.jsonl"], samples=8, k=(1, 8),
                       temperature=0.8)
    results["add2"].metrics["pass@1"].value, results["add2"].metrics["pass@1"].ci95

Task specs: a synthetic task name (`nanoseek.tasks`: add2, sort, countdown, addN, …; its held-out
split), `gsm8k:PATH.jsonl` (or `math:`), `mc:PATH.jsonl` (HellaSwag/ARC shapes, see `eval.data`).

Generation tasks are answered through the inference engine (batched, continuous; `samples` completions per
problem), and scored with pass@1 and pass@k (unbiased estimator). With one sample per problem each problem is one
pass/fail outcome and the 95% interval is Wilson's; with several, it is a percentile bootstrap over problems.
Multiple choice scores every choice by the log-likelihood of its continuation, all choices of a problem in one
batched forward: `acc` picks the highest sum, `acc_norm` the highest sum per byte of continuation (as
lm-evaluation-harness does); both carry Wilson intervals.

Prompt formats (`format`): "plain" gives the raw prompt (a synthetic task's `<bos>` + prompt as in training;
GSM8K as "Question: …\\nAnswer:"), "chat" sends the question as one user message through the model's chat
template, "r1" adds the R1 system prompt and reads the answer inside `<answer>…</answer>` (a completion that is
not `<think>…</think><answer>…</answer>` counts as wrong). "auto": plain for synthetic tasks, chat for math when
the tokenizer has a chat template. `system_prompt` replaces the chat and r1 formats' system message ("" for none:
the r1 format without a system prompt is how the speedrun's small-context models are trained and evaluated).
A prompt that leaves no room in the model's context is skipped with a warning and counted in `skipped`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nanoseek.engine.generate import context_length, engine_for
from nanoseek.engine.sampling import SamplingParams
from nanoseek.eval.answers import extract_math_answer, math_equal
from nanoseek.eval.data import ChoiceItem, MathProblem, load_choices, load_math
from nanoseek.tasks import (
    R1_SYSTEM_PROMPT,
    TASKS,
    Example,
    Task,
    bootstrap_ci95,
    extract_r1_answer,
    get_task,
    pass_at_k,
    prompt_ids,
    wilson_ci95,
)

FORMATS = ("auto", "plain", "chat", "r1")
FILE_KINDS = {"gsm8k": "math", "math": "math", "mc": "mc"}
SPEC_HELP = (
    "a synthetic task name (" + ", ".join(TASKS) + ", or addN/mulN/sortN/countdownN), gsm8k:PATH.jsonl (math "
    "problems, GSM8K format) or mc:PATH.jsonl (multiple choice, HellaSwag/ARC format)"
)


class EvalWarning(UserWarning):
    """Something skipped during an evaluation (e.g. a prompt longer than the model's context)."""


@dataclass(frozen=True)
class TaskSpec:
    name: str  # the spec as given, the key of its result
    kind: str  # "synthetic" | "math" | "mc"
    task: Task | None = None
    path: Path | None = None


def parse_spec(spec: str | TaskSpec) -> TaskSpec:
    """A task spec from its text; ValueError listing the accepted forms for anything else."""
    if isinstance(spec, TaskSpec):
        return spec
    prefix, sep, rest = spec.partition(":")
    if sep:
        if prefix not in FILE_KINDS:
            message = f"unknown task spec {spec!r}: the prefix must be gsm8k:, math: or mc:"
            raise ValueError(f"{message}; a task is {SPEC_HELP}")
        if not rest:
            raise ValueError(f"task spec {spec!r} needs a JSONL path after {prefix}:")
        path = Path(rest)
        if not path.is_file():
            raise FileNotFoundError(f"task spec {spec!r}: {path}: no such file")
        return TaskSpec(spec, FILE_KINDS[prefix], path=path)
    try:
        return TaskSpec(spec, "synthetic", task=get_task(spec))
    except ValueError as exc:
        raise ValueError(f"{exc}; a task is {SPEC_HELP}") from None


@dataclass
class Metric:
    value: float
    ci95: tuple[float, float]
    ci_method: str  # "wilson" | "bootstrap"

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "ci95": list(self.ci95), "ci_method": self.ci_method}


@dataclass
class EvalResult:
    task: str
    kind: str  # "generate" | "multiple_choice"
    n: int  # problems scored
    skipped: int  # problems skipped (prompt longer than the context)
    metrics: dict[str, Metric]
    samples: int = 1  # completions per problem (generation) or 1
    settings: dict[str, Any] = field(default_factory=dict)  # format, temperature, max_new_tokens
    details: list[dict[str, Any]] = field(default_factory=list, repr=False)  # per problem, for inspection

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task, "kind": self.kind, "n": self.n, "skipped": self.skipped, "samples": self.samples,
            "settings": self.settings, "metrics": {k: m.to_dict() for k, m in self.metrics.items()},
        }  # fmt: skip


# ---- generation tasks --------------------------------------------------------------------------------------


@dataclass
class Problem:
    prompt: list[int]
    check: Callable[[str], bool]
    shown: dict[str, Any]  # what the details record says about the problem


def _bos(tok) -> list[int]:
    return [tok.bos_token_id] if tok.bos_token_id is not None else []


def _bare_ids(tok, text: str) -> list[int]:
    return _bos(tok) + tok.encode(text, add_special_tokens=False)


def default_system_prompt(fmt: str) -> str:
    """The system message a format sends when none is given: the R1 prompt for r1, none for chat."""
    return R1_SYSTEM_PROMPT if fmt == "r1" else ""


def _chat_ids(tok, question: str, system_prompt: str) -> list[int]:
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return tok.encode_chat([*system, {"role": "user", "content": question}])


def completion_text(tok, token_ids: Sequence[int], fmt: str) -> str:
    """A completion's text for its checker. In the r1 format special tokens are kept: a trained tokenizer makes
    <think>, </think>, <answer>, </answer> special tokens, and the format check needs them; only the bos, eos and
    pad markers are dropped, as GRPO's rewards read a completion (train.grpo_rollouts.decode_completion). (The stop
    token that ended the completion is not among the ids.)"""
    if fmt != "r1":
        return tok.decode(token_ids, skip_special_tokens=True)
    text = tok.decode(token_ids, skip_special_tokens=False)
    for marker in (getattr(tok, "bos_token", None), getattr(tok, "eos_token", None), getattr(tok, "pad_token", None)):
        if marker:
            text = text.replace(marker, "")
    return text


def synthetic_problems(
    tok, task: Task, fmt: str, examples: Sequence[Example], system_prompt: str | None = None
) -> list[Problem]:
    """Prompts and checkers for `examples` of a synthetic task in a format ("plain", "chat" or "r1"); the chat
    formats' system message is `system_prompt` (None: the format's default)."""
    system = default_system_prompt(fmt) if system_prompt is None else system_prompt
    problems = []
    for ex in examples:
        if fmt == "plain":
            ids, check = prompt_ids(tok, ex), (lambda text, ex=ex: task.check(text, ex))
        elif fmt == "chat":
            ids, check = _chat_ids(tok, ex.prompt, system), (lambda text, ex=ex: task.check(text, ex))
        else:  # r1; a tokenizer without a chat template gets <bos> + the problem (as GRPO trains such a model)
            ids = _chat_ids(tok, ex.prompt, system) if tok.chat_template else _bare_ids(tok, ex.prompt)

            def check(text: str, ex=ex) -> bool:
                answer = extract_r1_answer(text)
                return answer is not None and task.check(answer, ex)

        problems.append(Problem(ids, check, {"prompt": ex.prompt, "reference": ex.answer}))
    return problems


def _plain_math_answer(text: str) -> str | None:
    # a base model given "Question: …\nAnswer:" goes on to invent the next question: cut it there
    for marker in ("\nQuestion:", "\n\n\n"):
        text = text.split(marker, 1)[0]
    return extract_math_answer(text)


def math_problems(tok, problems_in: Sequence[MathProblem], fmt: str, system_prompt: str | None = None) -> list[Problem]:
    """Prompts and checkers for GSM8K-style problems in a format ("plain", "chat" or "r1"); the chat formats'
    system message is `system_prompt` (None: the format's default)."""
    system = default_system_prompt(fmt) if system_prompt is None else system_prompt
    problems = []
    for p in problems_in:
        if fmt == "plain":
            ids = _bos(tok) + tok.encode(f"Question: {p.question}\nAnswer:", add_special_tokens=False)
            check = lambda text, ref=p.reference: math_equal(_plain_math_answer(text), ref)  # noqa: E731
        elif fmt == "chat":
            ids = _chat_ids(tok, p.question, system)
            check = lambda text, ref=p.reference: math_equal(extract_math_answer(text), ref)  # noqa: E731
        else:
            ids = _chat_ids(tok, p.question, system)
            check = lambda text, ref=p.reference: math_equal(extract_r1_answer(text), ref)  # noqa: E731
        problems.append(Problem(ids, check, {"prompt": p.question, "reference": p.reference}))
    return problems


def _default_max_new_tokens(spec: TaskSpec, fmt: str, tok) -> int:
    if spec.kind == "synthetic" and fmt in ("plain", "chat"):
        # room for the longest reference answer, its end token and a little slack (as eval/held_out.py does)
        longest = max(len(tok.encode(ex.answer, add_special_tokens=False)) for ex in spec.task.eval_examples(50))
        return longest + 4
    return 128 if spec.kind == "synthetic" else 256


def _fits(prompt_len: int, limit: int | None) -> bool:
    return limit is None or prompt_len < limit  # the engine needs room for at least one new token


def generate_completions(
    model: nn.Module,
    tok,
    problems: list[Problem],
    *,
    samples: int,
    params: SamplingParams,
    seed: int,
    batch_size: int,
    autocast_dtype: torch.dtype | None,
    fmt: str = "plain",
) -> list[list[str]]:
    """`samples` completions of every problem, decoded; sampled ones seeded per (problem, sample)."""
    requests = [(i, j) for i in range(len(problems)) for j in range(samples)]
    if not requests:
        return []
    limit = context_length(model)
    span = max(len(p.prompt) for p in problems) + params.max_tokens
    engine = engine_for(
        model, span if limit is None else min(span, limit), max_num_seqs=min(batch_size, len(requests)),
        stop_ids=tok.stop_token_ids, autocast_dtype=autocast_dtype,
    )  # fmt: skip
    texts: list[list[str]] = [[] for _ in problems]
    for start in range(0, len(requests), batch_size):
        chunk = requests[start : start + batch_size]
        settings = [
            params if params.greedy else _with_seed(params, (seed * 1_000_003 + i * samples + j) % 2**63)
            for i, j in chunk
        ]
        done = engine.generate([problems[i].prompt for i, _ in chunk], settings)
        for (i, _), completion in zip(chunk, done):
            texts[i].append(completion_text(tok, completion.token_ids, fmt))
    return texts


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    from dataclasses import replace

    return replace(params, seed=seed)


def _pass_metrics(correct: list[int], samples: int, ks: Sequence[int], seed: int) -> dict[str, Metric]:
    metrics = {}
    for k in ks:
        per_problem = [pass_at_k(samples, c, k) for c in correct]
        value = sum(per_problem) / len(per_problem) if per_problem else 0.0
        if samples == 1:  # one pass/fail outcome per problem
            metrics[f"pass@{k}"] = Metric(value, wilson_ci95(sum(correct), len(correct)), "wilson")
        else:
            metrics[f"pass@{k}"] = Metric(value, bootstrap_ci95(per_problem, seed=seed), "bootstrap")
    return metrics


# ---- multiple choice ---------------------------------------------------------------------------------------


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids as lm-evaluation-harness splits them: trailing spaces of the context move
    to the continuation, the pair is encoded whole, and the continuation is what follows the context's ids.
    The context starts with <bos> when the tokenizer has one."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tok.encode(context + continuation, add_special_tokens=False)
    context_ids = tok.encode(context, add_special_tokens=False)
    return _bos(tok) + context_ids, whole[len(context_ids) :]


@torch.inference_mode()
def choice_loglikelihoods(
    model: nn.Module,
    context_ids: list[int],
    continuations: Sequence[list[int]],
    pad_id: int = 0,
    autocast_dtype: torch.dtype | None = None,
) -> list[float]:
    """Summed log-probability of each continuation after the context: one forward of all of them, right-padded
    (a causal model's real tokens never see the padding after them)."""
    rows = [context_ids + c for c in continuations]
    width = max(len(r) for r in rows)
    device = next(model.parameters()).device
    batch = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        batch[i, : len(r)] = torch.tensor(r, device=device)
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits = model(batch)
    logprobs = logits[:, :-1].float().log_softmax(-1)
    picked = logprobs.gather(-1, batch[:, 1:, None]).squeeze(-1)  # [C, T-1]: log p(token t+1 | ..t)
    start = len(context_ids) - 1
    return [float(picked[i, start : start + len(c)].sum()) for i, c in enumerate(continuations)]


def _multiple_choice(model, tok, items: list[ChoiceItem], name: str, autocast_dtype) -> tuple[EvalResult, int]:
    limit = context_length(model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    correct = correct_norm = 0
    skipped, details = 0, []
    for item in items:
        pairs = [encode_pair(tok, item.context, c) for c in item.continuations]
        context_ids = pairs[0][0]
        continuations = [c for _, c in pairs]
        longest = len(context_ids) + max(len(c) for c in continuations)
        if not context_ids or any(not c for c in continuations) or (limit is not None and longest > limit):
            skipped += 1
            continue
        scores = choice_loglikelihoods(model, context_ids, continuations, pad, autocast_dtype)
        normed = [s / len(t.encode()) for s, t in zip(scores, item.continuations)]
        pick, pick_norm = scores.index(max(scores)), normed.index(max(normed))
        correct += pick == item.gold
        correct_norm += pick_norm == item.gold
        details.append({"context": item.context, "gold": item.gold, "loglikelihoods": scores, "pick": pick})
    n = len(details)
    metrics = {
        "acc": Metric(correct / n if n else 0.0, wilson_ci95(correct, n), "wilson"),
        "acc_norm": Metric(correct_norm / n if n else 0.0, wilson_ci95(correct_norm, n), "wilson"),
    }
    return EvalResult(name, "multiple_choice", n, skipped, metrics, 1, {}, details), skipped


# ---- the entry point ---------------------------------------------------------------------------------------


def evaluate(
    model: nn.Module,
    tokenizer,
    specs: Sequence[str | TaskSpec],
    *,
    limit: int | None = None,
    samples: int = 1,
    k: Sequence[int] = (1,),
    temperature: float = 0.0,
    top_p: float = 1.0,
    format: str = "auto",
    system_prompt: str | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, EvalResult]:
    """Evaluate `model` on each task spec; results keyed by spec. `limit`: problems per task (default: 200 for a
    synthetic task, every line of a file). `system_prompt`: the chat and r1 formats' system message (None: the
    format's default, "" for none). See the module docstring for formats, metrics and intervals."""
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if system_prompt and format == "plain":
        raise ValueError("a system prompt needs the chat or r1 format (the plain format sends the bare prompt)")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if temperature == 0 and samples > 1:
        raise ValueError("several samples per problem need a temperature > 0 (greedy samples are all the same)")
    ks = sorted(set(k)) or [1]
    if any(x < 1 or x > samples for x in ks):
        raise ValueError(f"pass@k needs 1 <= k <= samples ({samples}), got k={ks}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    parsed = [parse_spec(s) for s in specs]  # every spec is checked before any work starts
    names = [s.name for s in parsed]
    if len(set(names)) != len(names):
        raise ValueError(f"a task is listed twice: {names}")

    was_training = model.training
    model.eval()
    results = {}
    try:
        for spec in parsed:
            if spec.kind == "mc":
                result, skipped = _multiple_choice(model, tokenizer, load_choices(spec.path, limit), spec.name,
                                                   autocast_dtype)  # fmt: skip
            else:
                result, skipped = _generation_task(
                    model, tokenizer, spec, limit=limit, samples=samples, ks=ks, temperature=temperature,
                    top_p=top_p, fmt=format, system_prompt=system_prompt, max_new_tokens=max_new_tokens,
                    batch_size=batch_size, seed=seed, autocast_dtype=autocast_dtype,
                )  # fmt: skip
            if skipped:
                warnings.warn(
                    f"{spec.name}: skipped {skipped} problem(s) longer than the model's context of "
                    f"{context_length(model)} tokens", EvalWarning, stacklevel=2,
                )  # fmt: skip
            results[spec.name] = result
    finally:
        model.train(was_training)
    return results


def _generation_task(
    model, tok, spec: TaskSpec, *, limit, samples, ks, temperature, top_p, fmt, system_prompt, max_new_tokens,
    batch_size, seed, autocast_dtype,
) -> tuple[EvalResult, int]:  # fmt: skip
    if fmt == "auto":
        fmt = "plain" if spec.kind == "synthetic" or not tok.chat_template else "chat"
    if spec.kind == "synthetic":
        problems = synthetic_problems(tok, spec.task, fmt, spec.task.eval_examples(limit or 200, seed=seed),
                                      system_prompt)  # fmt: skip
    else:
        problems = math_problems(tok, load_math(spec.path, limit), fmt, system_prompt)
    if max_new_tokens is None:
        max_new_tokens = _default_max_new_tokens(spec, fmt, tok)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    window = context_length(model)
    kept = [p for p in problems if _fits(len(p.prompt), window)]
    params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_new_tokens)
    texts = generate_completions(model, tok, kept, samples=samples, params=params, seed=seed, batch_size=batch_size,
                                 autocast_dtype=autocast_dtype, fmt=fmt)  # fmt: skip
    correct, details = [], []
    for problem, outs in zip(kept, texts):
        verdicts = [bool(problem.check(t)) for t in outs]
        correct.append(sum(verdicts))
        details.append({**problem.shown, "completions": outs, "correct": verdicts})
    settings = {"format": fmt, "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens}
    if fmt != "plain":
        settings["system_prompt"] = default_system_prompt(fmt) if system_prompt is None else system_prompt
    metrics = _pass_metrics(correct, samples, ks, seed)
    skipped = len(problems) - len(kept)
    return EvalResult(spec.name, "generate", len(kept), skipped, metrics, samples, settings, details), skipped


# ---- output ------------------------------------------------------------------------------------------------


def format_table(results: dict[str, EvalResult]) -> str:
    """A plain-text table: one row per task and metric."""
    header = ("task", "metric", "value", "95% CI", "CI", "n", "skipped", "samples")
    rows = [header]
    for name, r in results.items():
        for metric, m in r.metrics.items():
            rows.append((name, metric, f"{m.value:.4f}", f"[{m.ci95[0]:.4f}, {m.ci95[1]:.4f}]", m.ci_method,
                         str(r.n), str(r.skipped), str(r.samples)))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
