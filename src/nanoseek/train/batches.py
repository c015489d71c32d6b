"""Pretraining's batch source: a step's micro-batches of synthetic task rows or packed text, per rank.

For synthetic tasks every rank draws the same global batch (a pure function of seed and step) and takes
its own slice; the loss curve then does not depend on the number of processes. Rows are cut to the
longest example of the global batch (one example per row leaves most of seq_len as padding).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from nanoseek.model.loss import IGNORE_INDEX
from nanoseek.parallel import DistInfo
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.build import build_tasks
from nanoseek.train.config import TrainConfig
from nanoseek.train.data import PackedTextDataset, TaskBatcher


def trim_shared_padding(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut the positions after the last target of the whole batch (padding every row has). Exact: under
    causal attention later positions cannot change earlier ones, and the cut positions have no target."""
    has_target = (y != IGNORE_INDEX).any(0).nonzero()
    length = int(has_target[-1]) + 1 if len(has_target) else y.shape[1]
    return x[:, :length], y[:, :length]


class BatchSource:
    """This rank's micro-batches for optimizer step `step`: a list of grad_accum (input_ids, targets)."""

    def __init__(self, cfg: TrainConfig, tok: Tokenizer, info: DistInfo):
        self.cfg, self.info = cfg, info
        self.rows = cfg.batch_size  # per micro-batch per rank
        self.n_micro = cfg.grad_accum
        if cfg.data.files:
            self.kind = "text"
            self.text = PackedTextDataset(
                cfg.data.files, tok, cfg.seq_len, cfg.data.text_field, rank=info.rank, world_size=info.world_size
            )
        else:
            self.kind = "tasks"
            weights = cfg.data.task_weights or None
            # The whole step's global batch, identical on every rank (rank 0 of 1): each rank slices it.
            self.tasks = TaskBatcher(
                build_tasks(cfg), tok, batch_size=self.rows * self.n_micro * info.world_size,
                seq_len=cfg.seq_len, seed=cfg.seed, weights=weights,
                loss_on_answer_only=cfg.data.loss_on_answer_only, fmt=cfg.data.format,
                thinking=cfg.data.thinking_tasks,
            )  # fmt: skip

    def batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self.kind == "text":
            return [self.text.next_batch(self.rows) for _ in range(self.n_micro)]
        x, y = self.tasks.batch_at(step)
        self.tasks.step = step + 1
        # The same cut on every rank keeps the MoE load counts equal to those of one process.
        x, y = trim_shared_padding(x, y)
        out = []
        for m in range(self.n_micro):
            start = (m * self.info.world_size + self.info.rank) * self.rows
            out.append((x[start : start + self.rows], y[start : start + self.rows]))
        return out

    def state_dict(self) -> Any:
        if self.kind == "tasks":
            return self.tasks.state_dict()
        state = self.text.state_dict()
        if not self.info.distributed:
            return [state]
        states: list[Any] = [None] * self.info.world_size
        dist.all_gather_object(states, state)
        return states

    def load_state_dict(self, state: Any) -> None:
        if self.kind == "tasks":
            self.tasks.load_state_dict(state)
            return
        if not isinstance(state, list) or len(state) != self.info.world_size:
            n = len(state) if isinstance(state, list) else "?"
            raise ValueError(
                f"checkpoint holds data positions for {n} ranks; this run has {self.info.world_size} "
                f"(resume text runs with the same number of processes)"
            )
        self.text.load_state_dict(state[self.info.rank])
