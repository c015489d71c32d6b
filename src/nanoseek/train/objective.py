"""Pretraining's (and SFT's) objective: next-token cross-entropy with the MTP depths and the balance loss."""

from __future__ import annotations

import math

import torch
from torch import nn

from nanoseek.model.loss import IGNORE_INDEX
from nanoseek.model.mtp import shift_left


def diverged_message(step: int, loss: float, terms: dict[str, float]) -> str:
    """Which loss terms went non-finite, so a NaN points at its source (the main head, an MTP depth, the
    balance loss) rather than at "the loss"."""
    bad = [f"{name} = {value}" for name, value in terms.items() if not math.isfinite(value)]
    source = f"from {', '.join(bad)}" if bad else "although every loss term is finite"
    return f"step {step}: loss is {loss} ({source}); lower optim.lr or raise optim.warmup_steps"


def target_counts(y: torch.Tensor, mtp_depth: int) -> list[int]:
    """Target tokens of the next-token loss and of each MTP depth (which drops each row's last k)."""
    counts = [int((y != IGNORE_INDEX).sum())]
    for k in range(1, mtp_depth + 1):
        counts.append(int((shift_left(y, k, IGNORE_INDEX) != IGNORE_INDEX).sum()))
    return counts


class NextTokenLoss:
    """The pretraining and SFT objective: next-token cross-entropy, plus each MTP depth's (weighted by
    mtp_weight) and the MoE sequence-wise balance loss (balance_alpha), in one forward of the wrapped model.

    An objective gives the loop two things: `counts(x, y)`, the micro-batch's normalisers (the loop sums them
    over the step's micro-batches and ranks; the first must be > 0), and `loss(...)`, the micro-batch's share
    of the step's loss with its logged parts and its named terms (what a non-finite loss is traced back to)."""

    def __init__(self, mtp_weight: float, balance_alpha: float, depth: int):
        self.mtp_weight, self.balance_alpha, self.depth = mtp_weight, balance_alpha, depth

    def counts(self, x: torch.Tensor, y: torch.Tensor) -> list[int]:
        return target_counts(y, self.depth)

    def loss(self, module: nn.Module, x, y, extra: dict, counts: list[int], totals: list[float], rows: int,
             total_rows: float):  # fmt: skip
        """Token-weighted: each term's mean over this micro-batch's targets times its share of the step's."""
        out = module(x, y, mtp_weight=self.mtp_weight, balance_alpha=self.balance_alpha, **extra)
        lm = out["lm"] * (counts[0] / totals[0])
        loss, parts, terms = lm, {"lm": lm.detach()}, {"lm": lm.detach()}
        if out["mtp"] is not None and self.mtp_weight > 0:
            shares = [out["mtp"][k] * (counts[k + 1] / max(totals[k + 1], 1)) for k in range(len(out["mtp"]))]
            mtp = torch.stack(shares).mean()
            loss = loss + self.mtp_weight * mtp
            parts["mtp"] = mtp.detach()
            terms.update({f"mtp depth {k}": share.detach() for k, share in enumerate(shares, start=1)})
        if out["balance"] is not None:
            bal = out["balance"] * (rows / total_rows)
            loss = loss + self.balance_alpha * bal
            parts["balance"] = bal.detach()
            terms["balance"] = bal.detach()
        parts["loss"] = loss.detach()
        return loss, parts, terms
