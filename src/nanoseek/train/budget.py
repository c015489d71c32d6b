"""A time-budgeted run's step count: measured after a few steps, re-planned as the machine's speed drifts.

    budget = StepBudget(cfg, start_step, elapsed_before, info)     # cfg.time_budget_min is set
    planned = budget.replan(step, train_s, planned_steps)          # after each step: a new count, or None

The planned count sets the learning-rate schedule's length (lr_at's total_steps) and is kept in checkpoints,
so a resumed run follows the same schedule.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from nanoseek.parallel import DistInfo
from nanoseek.train.config import TrainConfig

CALIBRATION_STEPS = 20  # a time-budgeted run measures this many steps before fixing its step count


def replan_due(planned_steps: int | None, step: int) -> bool:
    """Plan once after calibration, then again every tenth of the plan: a shared machine's speed drifts,
    and a plan that is too long would be cut by the budget before the learning rate has decayed."""
    if planned_steps is None:
        return True
    every = max(CALIBRATION_STEPS, planned_steps // 10)
    return step % every == 0 and step < planned_steps - every


class StepBudget:
    """Measures the steps of this process from the third one on, and plans how many fit the time budget."""

    def __init__(self, cfg: TrainConfig, start_step: int, elapsed_before: float, info: DistInfo):
        self.cfg, self.start_step, self.elapsed_before, self.info = cfg, start_step, elapsed_before, info
        self.measured_from: tuple[int, float] | None = None  # (step, train_s) where the measurement starts

    def replan(self, step: int, train_s: float, planned_steps: int | None) -> int | None:
        """After optimizer step `step` (train_s: seconds of training in this process so far): the new planned
        step count when a plan is due, else None."""
        if step - self.start_step == 2:
            self.measured_from = (step, train_s)
            return None
        start = self.measured_from
        if start and step - start[0] >= CALIBRATION_STEPS and replan_due(planned_steps, step):
            return self.plan(step, train_s, train_s - start[1], step - start[0])
        return None

    def plan(self, step: int, train_s: float, measured_s: float, measured_steps: int) -> int:
        """Steps that fit the time budget, from the measured speed (the same number on every rank)."""
        cfg = self.cfg
        budget = cfg.time_budget_min * 60.0
        per_step = measured_s / max(1, measured_steps)
        fit = step + int(max(0.0, budget - self.elapsed_before - train_s) / per_step)
        planned = min(cfg.max_steps, max(step + 1, fit))
        if self.info.distributed:
            t = torch.tensor([planned], dtype=torch.long, device=self.info.device)
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            planned = int(t)
        return planned
