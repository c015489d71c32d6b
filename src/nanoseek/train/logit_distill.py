"""Logit distillation: a student learns the teacher's next-token distributions on the assistant tokens of
conversations (distill.py's verified traces), on the training loop (trainer.py).

    result = logit_distill(student, teacher, tok, conversations, "runs/x/kl", steps=50, lr=5e-5)
    result.model_dir, result.steps, result.losses        # losses: the KL of each step
    torchrun --nproc-per-node 2 ...  logit_distill(..., parallel="fsdp")   # tests/distill_worker.py

It is the SFT trainer with its batch source and objective replaced, so the learning-rate schedule (constant),
checkpoints and exact resume, the meter and DDP/FSDP2 are the loop's:
  - batches: a step takes `batch_size` conversations of the endless sequence epoch 0 order, epoch 1 order, ...
    (epoch e's order is the (e+1)-th shuffle of one Random(seed) stream, a pure function of seed and step, so a
    resumed run takes the same rows); rank r takes every world_size-th of them, split over grad_accum
    micro-batches, each padded to the step's longest conversation (the same width on every rank);
  - objective: forward KL(teacher || student) at the assistant positions, normalised by the whole step's count
    of them (all micro-batches and ranks), so two processes give the single-process gradient;
  - the teacher is a frozen full copy on every rank; the student runs in eval mode (no dropout in these models;
    eval mode keeps the router's balancing statistics, and so its biases, still), with its MTP modules frozen
    (no loss reaches them, and DDP would wait for their gradients);
  - a resume checks the teacher's weights and the data against the checkpoint (digests in its config).
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nanoseek.parallel import init_distributed
from nanoseek.train.chat_data import Example, tokenize_conversation
from nanoseek.train.checkpoint import weights_digest
from nanoseek.train.config import TrainConfig, load_train_config
from nanoseek.train.sft import ChatBatchSource, SFTPlan, SFTTrainer, data_digest


@dataclass
class LogitDistillResult:
    model_dir: Path | None  # None when stopped early (stop_after)
    steps: int
    losses: list[float]  # the KL per step (mean over the assistant tokens of the step)


# ---- the math ---------------------------------------------------------------------------------------------
def same_vocabulary(teacher_tok, student_tok, teacher: nn.Module, student: nn.Module) -> bool:
    """Whether teacher and student give logits over the same tokens: identical token tables and logit widths."""
    widths = (teacher.config.vocab_size, student.config.vocab_size)
    return widths[0] == widths[1] and teacher_tok.backend.get_vocab() == student_tok.backend.get_vocab()


def distillation_kl(student_logits, teacher_logits, mask, temperature: float = 1.0):
    """Forward KL(teacher || student) of the next-token distributions at the masked positions, averaged over
    them and scaled by temperature² (Hinton et al., 2015: keeps gradients comparable across temperatures)."""
    t = (teacher_logits[:, :-1][mask].float() / temperature).log_softmax(-1)
    s = (student_logits[:, :-1][mask].float() / temperature).log_softmax(-1)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature**2


class DistillLoss:
    """The loop's objective (trainer.NextTokenLoss's interface): the KL at a micro-batch's assistant positions
    (y is their mask), weighted by its share of the step's positions."""

    def __init__(self, teacher: nn.Module, temperature: float):
        self.teacher, self.temperature = teacher, temperature

    def counts(self, x: torch.Tensor, mask: torch.Tensor) -> list[int]:
        return [int(mask.sum())]

    def loss(self, module: nn.Module, x, mask, extra: dict, counts: list[int], totals: list[float], rows: int,
             total_rows: float):  # fmt: skip
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        kl = distillation_kl(module(x), teacher_logits, mask, self.temperature) * (counts[0] / totals[0])
        return kl, {"loss": kl.detach()}, {"kl": kl.detach()}


# ---- the rows ---------------------------------------------------------------------------------------------
def padded(examples: Sequence[Example], rows: Sequence[int], pad_id: int, width: int | None = None):
    """(ids [R, W], mask [R, W-1]) of the examples `rows`, right-padded to `width` (default: the longest);
    mask[r, t]: position t predicts an assistant token (t+1). Causal attention keeps the padding after a
    conversation from changing its positions."""
    width = width or max(len(examples[i].ids) for i in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width - 1, dtype=torch.bool)
    for r, i in enumerate(rows):
        ex = examples[i]
        ids[r, : len(ex.ids)] = torch.tensor(ex.ids)
        mask[r, : len(ex.ids) - 1] = torch.tensor(ex.assistant[1:])
    return ids, mask


class TeacherRows(ChatBatchSource):
    """SFT's step -> conversations mapping over another epoch order, each micro-batch padded (the teacher and
    student forwards take plain rows)."""

    def _order(self, epoch: int) -> list[int]:
        # The orders one Random(seed) gives when shuffling a fresh list for each epoch in turn (what the loop
        # drew before it could resume), replayed, so epoch e is a pure function of (seed, e).
        if epoch not in self._orders:
            rng = random.Random(self.cfg.seed)
            for _ in range(epoch + 1):
                order = list(range(len(self.examples)))
                rng.shuffle(order)
            self._orders = {epoch: order}
        return self._orders[epoch]

    def batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        chosen = self.step_indices(step)
        width = max(len(self.examples[i].ids) for i in chosen)  # the same on every rank
        mine = chosen[self.info.rank :: self.info.world_size]
        return [padded(self.examples, mine[m :: self.cfg.grad_accum], self.pad_id, width)
                for m in range(self.cfg.grad_accum)]  # fmt: skip


# ---- the trainer ------------------------------------------------------------------------------------------
class DistillTrainer(SFTTrainer):
    def __init__(self, cfg: TrainConfig, student: nn.Module, teacher: nn.Module, tok, plan: SFTPlan,
                 temperature: float, **kw):  # fmt: skip
        self.teacher, self.temperature = teacher, temperature
        self.teacher_digest = weights_digest(teacher)
        super().__init__(cfg, student, tok, plan, type(student).__name__, **kw)

    def _build_model(self) -> nn.Module:
        for p in getattr(self._initial_model, "mtp", nn.ModuleList()).parameters():
            p.requires_grad_(False)
        return self._initial_model.eval()

    def _make_source(self) -> TeacherRows:
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        return TeacherRows(self.plan.examples, self.cfg, self.info, pad)

    def _make_objective(self) -> DistillLoss:
        return DistillLoss(self.teacher.to(self.info.device).eval(), self.temperature)

    def _config_record(self) -> dict[str, Any]:
        return {**self.cfg.to_dict(), "distill": {"teacher": self.teacher_digest, "data": self.plan.data_digest,
                                                   "temperature": self.temperature}}  # fmt: skip


def distill_config(out: str | os.PathLike, device: str, batch_size: int, steps: int, lr: float, seed: int,
                   seq_len: int, overrides: Sequence[str] = ()) -> TrainConfig:  # fmt: skip
    """The loop's settings for logit distillation: a constant lr without warmup, AdamW without weight decay
    (torch's default betas), clipping at 1, no MTP, balance or router-bias terms; `overrides` as `--set`."""
    base = {
        "out_dir": str(out), "device": device, "seed": seed, "batch_size": batch_size, "max_steps": steps,
        "seq_len": seq_len, "dtype": "float32", "ckpt_every": 0, "log_every": 1, "mtp_weight": 0.0,
        "router_bias_gamma": 0.0, "balance_alpha": 0.0,
        "optim": {"lr": lr, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.0, "beta2": 0.999,
                  "grad_clip": 1.0},
    }  # fmt: skip
    return load_train_config(None, overrides=list(overrides), base=base, check_model=False)


def logit_distill(
    student: nn.Module,
    teacher: nn.Module,
    tokenizer,
    conversations: Sequence[dict],
    out: str | os.PathLike,
    *,
    teacher_tokenizer=None,
    steps: int = 50,
    batch_size: int = 4,
    lr: float = 5e-5,
    temperature: float = 1.0,
    seed: int = 0,
    overrides: Sequence[str] = (),
    parallel: str = "auto",
    resume: bool = False,
    stop_after: int | None = None,
    show_progress: bool = False,
) -> LogitDistillResult:
    """Train `student` (in place) to match the teacher's next-token distributions on the assistant tokens of
    `conversations` (the verified traces); write it as a HF folder OUT/model (and OUT/checkpoints,
    OUT/metrics.jsonl). Needs the same vocabulary. overrides: loop settings as `--set` (grad_accum,
    ckpt_every, ...). parallel, resume, stop_after: as run_sft's (DDP/FSDP2 under torchrun)."""
    if not same_vocabulary(teacher_tokenizer or tokenizer, tokenizer, teacher, student):
        raise ValueError("logit distillation needs teacher and student with the same vocabulary (token table and "
                         "logit width); use trace distillation (SFT) alone")  # fmt: skip
    if steps < 1 or batch_size < 1 or temperature <= 0:
        raise ValueError(f"steps and batch_size must be >= 1 and temperature > 0, got {steps}, {batch_size}, "
                         f"{temperature}")  # fmt: skip
    examples = [tokenize_conversation(tokenizer, c) for c in conversations]
    examples = [e for e in examples if e.n_targets > 0]
    if not examples:
        raise ValueError("no conversation with assistant tokens to distill on")
    device = str(next(student.parameters()).device)
    cfg = distill_config(out, device, batch_size, steps, lr, seed, max(e.length for e in examples), overrides)
    plan = SFTPlan(1, examples, 0, data_digest(examples))
    trainer = DistillTrainer(
        cfg, student, teacher, tokenizer, plan, temperature, parallel=parallel, resume=resume,
        show_progress=show_progress, info=init_distributed(cfg.device), stop_after=stop_after,
    )  # fmt: skip
    # the caller's modules come back as they were given, but for the student's trained weights
    modes = (student.training, teacher.training)
    grads = [(p, p.requires_grad) for p in student.parameters()]
    try:
        result = trainer.train()
    finally:
        student.train(modes[0])
        teacher.train(modes[1])
        for p, flag in grads:
            p.requires_grad_(flag)
    return LogitDistillResult(result.model_dir, result.steps, result.losses)
