"""Distillation (DeepSeek-R1 §2.4): a teacher's verified reasoning traces become a student's SFT data.

    result = distill("runs/big/model", "runs/small/model", ["add3", "countdown"], "runs/distill")
    result.kept, result.traces_path, result.sft.model_dir, result.eval_after["add3"].metrics["pass@1"]

1. The teacher answers training-split problems of each task (`samples` completions per problem at a
   temperature, batched through the engine), in the R1 format by default: the R1 system prompt, the reply
   `<think>…</think><answer>…</answer>`. A `gsm8k:FILE.jsonl` task uses that file's problems. The formats and
   `system_prompt` mean what they mean to `nanoseek.eval.evaluate` (the prompts and checkers are eval's own):
   r1 reads the answer inside `<answer>`, `system_prompt` replaces the chat and r1 formats' system message
   (None: the format's default, "" for none, as the speedrun's models are trained).
2. The task's verifier keeps the correct completions (the exact checkers of the synthetic tasks, math-verify for
   math), at most `per_problem` distinct ones per problem.
3. They are written as chat conversations (`{"messages": [system, user, assistant]}`, OUT/traces.jsonl, what
   `nanoseek sft` reads; the system message is the one the teacher was prompted with, or none) and the student
   is fine-tuned on them with `nanoseek.train.sft.run_sft` into OUT/sft.
4. The student is evaluated on the held-out split of the synthetic tasks before and after (`nanoseek.eval`),
   and OUT/summary.json records the counts, the SFT run and both evaluations.

Training problems come from the training split only, so the held-out evaluation stays unseen.
"""

from __future__ import annotations

import json
import os
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from nanoseek.engine.generate import context_length
from nanoseek.engine.sampling import SamplingParams
from nanoseek.eval.data import load_math
from nanoseek.eval.runner import (
    EvalWarning,
    Problem,
    default_system_prompt,
    evaluate,
    generate_completions,
    math_problems,
    parse_spec,
    synthetic_problems,
)
from nanoseek.tasks import Task

if TYPE_CHECKING:
    from nanoseek.train.logit_distill import LogitDistillResult

# How the teacher is prompted. The conversations written are chat in every case: "plain" (a base or speedrun
# model answering the raw prompt) becomes user: prompt / assistant: answer.
DISTILL_FORMATS = ("r1", "chat", "plain")


@dataclass
class Trace:
    task: str
    question: str
    reference: str
    completion: str
    correct: bool


@dataclass
class DistillResult:
    traces_path: Path  # the kept traces as chat conversations (JSONL)
    generated: int  # completions the teacher wrote
    correct: int  # of which the verifier accepted
    kept: int  # conversations written (distinct, at most per_problem per problem)
    per_task: dict[str, dict[str, int]]
    skipped: int = 0  # problems whose prompt did not fit the teacher's context
    sft: Any = None  # nanoseek.train.sft.SFTResult, None with traces_only
    logit: LogitDistillResult | None = None  # the optional logit-distillation stage after SFT
    eval_before: dict[str, Any] = field(default_factory=dict)  # spec -> EvalResult
    eval_after: dict[str, Any] = field(default_factory=dict)
    format: str = "r1"  # how the teacher was prompted (and the student evaluated)
    system_prompt: str = ""  # the system message of the prompts and the conversations ("" for none)

    def to_summary(self) -> dict[str, Any]:
        sft = None
        if self.sft is not None:
            s = self.sft
            sft = {"model_dir": str(s.model_dir), "steps": s.steps, "tokens": s.tokens, "energy_j": s.energy_j,
                   "wall_s": s.wall_s, "final_loss": s.losses[-1] if s.losses else None}  # fmt: skip
        logit = None
        if self.logit is not None:
            lg = self.logit
            first, last = (lg.losses[0], lg.losses[-1]) if lg.losses else (None, None)  # none: resumed at the end
            logit = {"model_dir": str(lg.model_dir), "steps": lg.steps, "kl_first": first, "kl_last": last}
        return {
            "traces_path": str(self.traces_path), "generated": self.generated, "correct": self.correct,
            "kept": self.kept, "skipped": self.skipped, "per_task": self.per_task, "format": self.format,
            "system_prompt": self.system_prompt, "sft": sft, "logit": logit,
            "eval_before": {k: r.to_dict() for k, r in self.eval_before.items()},
            "eval_after": {k: r.to_dict() for k, r in self.eval_after.items()},
        }  # fmt: skip


# ---- 1. traces ---------------------------------------------------------------------------------------------


def check_format(fmt: str, system_prompt: str | None = None) -> None:
    """ValueError for a format distill does not know, or a system prompt with the plain format (as eval)."""
    if fmt not in DISTILL_FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(DISTILL_FORMATS)}")
    if system_prompt and fmt == "plain":
        raise ValueError("a system prompt needs the chat or r1 format (the plain format sends the bare prompt)")


def system_message(fmt: str, system_prompt: str | None = None) -> str:
    """The system message the teacher is prompted with, and the conversations carry ("" for none)."""
    return default_system_prompt(fmt) if system_prompt is None else system_prompt


def training_examples(task: Task, n: int, seed: int) -> list:
    """Up to n distinct training-split problems of `task` (never from the held-out split)."""
    rng = random.Random(f"{task.name}/distill/{seed}")
    seen: dict[str, Any] = {}
    for _ in range(50 * n + 100):
        if len(seen) >= n:
            break
        ex = task.generate(rng, "train")
        seen.setdefault(ex.prompt, ex)
    return list(seen.values())


def _problems(tok, spec, fmt: str, n: int, seed: int, system_prompt: str | None = None) -> list[Problem]:
    if spec.kind == "synthetic":
        return synthetic_problems(tok, spec.task, fmt, training_examples(spec.task, n, seed), system_prompt)
    if spec.kind == "math":
        return math_problems(tok, load_math(spec.path, n), fmt, system_prompt)
    raise ValueError(f"{spec.name}: multiple-choice data has no answers to distill; use synthetic or gsm8k: tasks")


def generate_traces(
    teacher: nn.Module,
    tokenizer,
    specs: Sequence[str],
    *,
    problems: int = 64,
    samples: int = 4,
    temperature: float = 0.8,
    top_p: float = 1.0,
    fmt: str = "r1",
    system_prompt: str | None = None,
    max_new_tokens: int = 256,
    batch_size: int = 64,
    seed: int = 0,
) -> tuple[list[Trace], int]:
    """The teacher's completions of `problems` training problems per task, each checked by the task's verifier,
    prompted and scored as `nanoseek.eval.evaluate(format=fmt, system_prompt=system_prompt)` would.
    Returns (traces, problems skipped because the prompt did not fit the teacher's context)."""
    check_format(fmt, system_prompt)
    if samples < 1 or problems < 1:
        raise ValueError(f"problems and samples must be >= 1, got {problems} and {samples}")
    if temperature == 0 and samples > 1:
        raise ValueError("several samples per problem need a temperature > 0 (greedy samples are all the same)")
    parsed = [parse_spec(s) for s in specs]
    params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_new_tokens)
    window = context_length(teacher)
    traces, skipped = [], 0
    was_training = teacher.training
    teacher.eval()
    try:
        for spec in parsed:
            todo = _problems(tokenizer, spec, fmt, problems, seed, system_prompt)
            kept = [p for p in todo if window is None or len(p.prompt) < window]
            if len(kept) < len(todo):
                skipped += len(todo) - len(kept)
                warnings.warn(f"{spec.name}: skipped {len(todo) - len(kept)} problem(s) longer than the teacher's "
                              f"context of {window} tokens", EvalWarning, stacklevel=2)  # fmt: skip
            texts = generate_completions(teacher, tokenizer, kept, samples=samples, params=params, seed=seed,
                                         batch_size=batch_size, autocast_dtype=None, fmt=fmt)  # fmt: skip
            for problem, outs in zip(kept, texts):
                for text in outs:
                    traces.append(Trace(spec.name, problem.shown["prompt"], problem.shown["reference"], text,
                                        bool(problem.check(text))))  # fmt: skip
    finally:
        teacher.train(was_training)
    return traces, skipped


# ---- 2. filter, 3. conversations ---------------------------------------------------------------------------


def select_traces(traces: Sequence[Trace], per_problem: int = 1) -> list[Trace]:
    """The verified traces, at most `per_problem` distinct completions per (task, question), in order."""
    if per_problem < 1:
        raise ValueError(f"per_problem must be >= 1, got {per_problem}")
    chosen: dict[tuple[str, str], list[str]] = {}
    kept = []
    for t in traces:
        seen = chosen.setdefault((t.task, t.question), [])
        text = t.completion.strip()
        if t.correct and len(seen) < per_problem and text not in seen:
            seen.append(text)
            kept.append(t)
    return kept


def conversation(trace: Trace, fmt: str = "r1", system_prompt: str | None = None) -> dict[str, Any]:
    """The chat conversation SFT trains on: (the system message the teacher saw,) the question, the teacher's
    verified reply. `system_prompt` as in generate_traces (None: the R1 prompt for r1, none otherwise)."""
    check_format(fmt, system_prompt)
    text = system_message(fmt, system_prompt)
    system = [{"role": "system", "content": text}] if text else []
    return {"messages": [*system, {"role": "user", "content": trace.question},
                         {"role": "assistant", "content": trace.completion.strip()}]}  # fmt: skip


def write_conversations(
    path: str | os.PathLike, traces: Sequence[Trace], fmt: str = "r1", system_prompt: str | None = None
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for t in traces:
            f.write(json.dumps(conversation(t, fmt, system_prompt), ensure_ascii=False) + "\n")
    tmp.replace(path)  # a crash never leaves half a file under the final name
    return path


def per_task_counts(traces: Sequence[Trace], kept: Sequence[Trace]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for t in traces:
        c = counts.setdefault(t.task, {"problems": 0, "generated": 0, "correct": 0, "kept": 0})
        c["generated"] += 1
        c["correct"] += t.correct
    for name in counts:
        counts[name]["problems"] = len({t.question for t in traces if t.task == name})
    for t in kept:
        counts[t.task]["kept"] += 1
    return counts


# ---- the whole recipe --------------------------------------------------------------------------------------


def _load(model, device: str = "cpu"):
    """(model, tokenizer, path or None) from a loadable name/path (loaded on `device`), or an (nn.Module,
    tokenizer) pair as it is."""
    if isinstance(model, tuple):
        return model[0], model[1], None
    import nanoseek
    from nanoseek.assets import resolve_model

    path = resolve_model(str(model))
    return nanoseek.load(path, device=device), nanoseek.load_tokenizer(path), path


def distill(
    teacher,
    student,
    specs: Sequence[str],
    out: str | os.PathLike,
    overrides: Sequence[str] = (),
    *,
    problems: int = 64,
    samples: int = 4,
    temperature: float = 0.8,
    fmt: str = "r1",
    system_prompt: str | None = None,
    per_problem: int = 1,
    max_new_tokens: int = 256,
    eval_limit: int = 200,
    traces_only: bool = False,
    logit_kl_steps: int = 0,
    logit_kl_lr: float = 5e-5,
    device: str = "cpu",
    show_progress: bool = True,
    seed: int = 0,
    parallel: str = "auto",
    resume: bool = False,
) -> DistillResult:
    """Teacher traces -> verifier -> student SFT (see the module docstring). `teacher` and `student`: anything
    `nanoseek.load` reads, or (model, tokenizer) pairs. `overrides` go to `run_sft` ("max_steps=50", …).
    traces_only: stop after writing OUT/traces.jsonl. logit_kl_steps > 0: after SFT, that many steps of logit
    distillation (KL to the teacher's next-token distributions on the traces; same vocabulary needed) into
    OUT/kl/model, which is then the model evaluated. `fmt` and `system_prompt` mean what they mean to
    `nanoseek.eval.evaluate`; the conversations carry the system message the teacher was prompted with.
    parallel, resume: the SFT and logit-distillation runs' (as run_sft's). Under torchrun every rank generates
    the same traces (seeded) and rank 0 writes the files."""
    from nanoseek.parallel import barrier, init_distributed

    out = Path(out)
    info = init_distributed(device)
    check_format(fmt, system_prompt)
    parsed = [parse_spec(s) for s in specs]  # bad specs fail before any model loads
    t_model, t_tok, _ = _load(teacher, device)
    traces, skipped = generate_traces(
        t_model, t_tok, [s.name for s in parsed], problems=problems, samples=samples, temperature=temperature,
        fmt=fmt, system_prompt=system_prompt, max_new_tokens=max_new_tokens, seed=seed,
    )  # fmt: skip
    del t_model
    kept = select_traces(traces, per_problem)
    path = out / "traces.jsonl"
    if info.is_main:
        write_conversations(path, kept, fmt, system_prompt)
    barrier()  # the other ranks read it
    result = DistillResult(path, len(traces), sum(t.correct for t in traces), len(kept),
                           per_task_counts(traces, kept), skipped, format=fmt,
                           system_prompt=system_message(fmt, system_prompt))  # fmt: skip
    if not traces_only:
        if not kept:
            raise ValueError(
                f"the teacher got none of its {len(traces)} completions right: no traces to train the student on "
                f"(wrote an empty {path})"
            )
        kl = dict(teacher=teacher, steps=logit_kl_steps, lr=logit_kl_lr, traces=kept)
        _train_student(result, student, parsed, out, overrides, fmt=fmt, system_prompt=system_prompt,
                       max_new_tokens=max_new_tokens, eval_limit=eval_limit, device=device,
                       show_progress=show_progress, seed=seed, kl=kl, parallel=parallel, resume=resume)  # fmt: skip
    if info.is_main:
        (out / "summary.json").write_text(json.dumps(result.to_summary(), indent=2) + "\n")
    return result


def _train_student(result: DistillResult, student, parsed, out: Path, overrides, *, fmt, system_prompt,
                   max_new_tokens, eval_limit, device, show_progress, seed, kl, parallel, resume) -> None:  # fmt: skip
    try:
        from nanoseek.train.logit_distill import logit_distill, same_vocabulary
        from nanoseek.train.sft import run_sft
    except ModuleNotFoundError as exc:
        if exc.name != "nanoseek.train.sft":
            raise
        raise ValueError(f"SFT is not part of this build; the traces are in {result.traces_path}") from None
    import nanoseek
    from nanoseek.parallel import barrier

    s_model, s_tok, s_path = _load(student, device)
    t_model, t_tok, _ = _load(kl["teacher"], device) if kl["steps"] else (None, None, None)
    if kl["steps"] and not same_vocabulary(t_tok, s_tok, t_model, s_model):  # before any training
        raise ValueError("logit distillation needs teacher and student with the same vocabulary (token table and "
                         "logit width); drop --logit-kl-steps to distill the traces alone")  # fmt: skip
    held_out = [s.name for s in parsed if s.kind == "synthetic"]  # a math file trained on is no test set
    # the student is evaluated the way it is trained: chat conversations with the system message the teacher
    # saw (the plain format's conversations have none)
    eval_fmt = "r1" if fmt == "r1" else "chat"
    settings = dict(limit=eval_limit, format=eval_fmt, system_prompt=result.system_prompt,
                    max_new_tokens=max_new_tokens if fmt == "r1" else None, seed=seed)  # fmt: skip
    if held_out:
        result.eval_before = evaluate(s_model, s_tok, held_out, **settings)
    result.sft = run_sft(s_path or s_model, result.traces_path, out / "sft", overrides, tokenizer=s_tok,
                         show_progress=show_progress, device=device, parallel=parallel, resume=resume)  # fmt: skip
    barrier()  # under torchrun rank 0 writes the model the ranks read next
    final_dir = result.sft.model_dir
    if kl["steps"]:
        result.logit = logit_distill(
            nanoseek.load(final_dir, dtype="float32", device=device), t_model, nanoseek.load_tokenizer(final_dir),
            [conversation(t, fmt, system_prompt) for t in kl["traces"]], out / "kl", teacher_tokenizer=t_tok,
            steps=kl["steps"], lr=kl["lr"], seed=seed, parallel=parallel, resume=resume,
        )  # fmt: skip
        barrier()
        final_dir = result.logit.model_dir or out / "kl" / "model"  # (None on the ranks that did not write it)
    if held_out:
        after = nanoseek.load(final_dir, device=device)
        result.eval_after = evaluate(after, nanoseek.load_tokenizer(final_dir), held_out, **settings)
