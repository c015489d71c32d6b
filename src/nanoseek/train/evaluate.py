"""Held-out evaluation: greedy answers to task prompts, exact-match by each task's checker.

    scores = evaluate_tasks(model, tok, [get_task("add2")], n=200)
    scores["add2"].accuracy, scores["add2"].ci95, scores["add2"].n

Decoding is batched: prompts are left-padded, the model gets an attention mask and explicit positions,
and every step after the prefill feeds one token per row through the latent KV cache. All ranks of a
sharded (FSDP) model must call this with the same arguments: the decode loop is then identical
everywhere, which the shard all-gathers need.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from nanoseek.train.data import prompt_ids
from nanoseek.train.tasks import Example, Task, wilson_ci95
from nanoseek.train.tokenizer import Tokenizer


@dataclass
class TaskScore:
    correct: int
    n: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def ci95(self) -> tuple[float, float]:
        return wilson_ci95(self.correct, self.n)

    def to_dict(self) -> dict:
        lo, hi = self.ci95
        return {"accuracy": self.accuracy, "ci95": [lo, hi], "n": self.n, "correct": self.correct}


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> list[list[int]]:
    """Greedy continuations (without the eos) of token-id prompts, all in one batch.

    `model(ids, attention_mask=, position_ids=, cache=)` returns logits and `model.new_cache(B, max_len)`
    allocates its KV cache (DeepseekV3ForCausalLM, or the LossModule that parallelize() returns)."""
    device = torch.device(device)
    B = len(prompts)
    if B == 0:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("greedy_generate: every prompt needs at least one token")
    P = max(len(p) for p in prompts)
    total = P + max_new_tokens
    ids = torch.full((B, P), pad_id, dtype=torch.long)
    mask = torch.zeros((B, total), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p) : P] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask[:, :P].cumsum(-1) - 1).clamp(min=0)
    next_pos = positions[:, -1:] + 1
    cache = model.new_cache(B, total, device=device)
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    use_autocast = autocast_dtype is not None and device.type == "cuda"
    step_ids, step_pos, length = ids, positions, P
    for t in range(max_new_tokens):
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=use_autocast):
            logits = model(step_ids, attention_mask=mask[:, :length], position_ids=step_pos, cache=cache)
        token = logits[:, -1].float().argmax(-1)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        out[:, t] = token
        done |= token == eos_id
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        mask[:, length] = 1
        length += 1
        step_ids, step_pos = token[:, None], next_pos
        next_pos = next_pos + 1
    result = []
    for row in out.tolist():
        row = row[: row.index(eos_id)] if eos_id in row else row
        result.append([t for t in row if t != pad_id])
    return result


def evaluate_examples(
    model: nn.Module,
    tok: Tokenizer,
    task: Task,
    examples: Sequence[Example],
    *,
    max_new_tokens: int | None = None,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> tuple[TaskScore, list[tuple[Example, str]]]:
    """Score `examples` of `task`; also returns (example, prediction) pairs for inspection."""
    if max_new_tokens is None:  # room for the longest reference answer, its eos and a little slack
        max_new_tokens = max((len(tok.encode(ex.answer)) for ex in examples), default=1) + 2
    was_training = model.training
    model.eval()
    pairs: list[tuple[Example, str]] = []
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            answers = greedy_generate(
                model,
                [prompt_ids(tok, ex) for ex in chunk],
                max_new_tokens=max_new_tokens,
                eos_id=tok.eos_id,
                pad_id=tok.pad_id,
                device=device,
                autocast_dtype=autocast_dtype,
            )
            pairs.extend((ex, tok.decode(a, skip_special_tokens=True)) for ex, a in zip(chunk, answers))
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
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, TaskScore]:
    """Exact-match accuracy of greedy answers on up to n held-out problems per task (never seen in
    training: see tasks.is_heldout)."""
    scores = {}
    for task in tasks:
        examples = task.eval_examples(n, seed=seed)
        scores[task.name], _ = evaluate_examples(
            model, tok, task, examples, batch_size=batch_size, device=device, autocast_dtype=autocast_dtype
        )
    return scores
