"""Fused linear + cross-entropy: the loss of `h @ W.T` against targets without materializing all logits.

The output head is the largest matmul in a small model and its [tokens, vocab] logits the largest
activation. Processing rows in chunks keeps each chunk's logits in cache, computes the softmax gradient
right away (the loss is a mean, so d loss / d logits = (softmax - onehot) / n_valid is known in the
forward pass), and never stores logits for backward. Rows whose target is ignored (-100: prompts under
answer-only loss, padding) are skipped entirely, which is most rows in the speedrun's task data.
Same idea as Liger-Kernel's and Apple's cut-cross-entropy, written for clarity.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass
class LossOutput:
    """What a model's `compute_loss` returns."""

    loss: torch.Tensor  # what to backprop: lm + mtp_weight * mean(mtp) + balance_alpha * balance
    lm_loss: torch.Tensor
    mtp_loss: torch.Tensor | None  # mean over depths
    balance_loss: torch.Tensor | None
    mtp_losses: list[torch.Tensor] = dataclasses.field(default_factory=list)


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int | None = None
) -> torch.Tensor:
    """Mean cross-entropy of logits = h @ weight.T over rows with targets != -100. h [..., d], targets [...].

    With no target at all the loss is 0 (and so are its gradients), not the NaN of a mean over nothing: an
    MTP depth longer than a batch's rows contributes nothing rather than poisoning the step.

    chunk_rows defaults to ~2M logits per chunk (8 MB in fp32: cache-sized, and few chunks for small vocabs).
    """
    h2, t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    if chunk_rows is None:
        chunk_rows = max(64, (1 << 21) // weight.shape[0])
    if h2.device.type != "cpu":  # on GPU the unfused path with a big GEMM is already efficient
        total = F.cross_entropy(F.linear(h2, weight).float(), t, ignore_index=IGNORE_INDEX, reduction="sum")
        return total / (t != IGNORE_INDEX).sum().clamp(min=1)  # (no sync: the count stays on the device)
    return _LinearCrossEntropy.apply(h2, weight, t, chunk_rows)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows):
        valid = (targets != IGNORE_INDEX).nonzero().squeeze(1)
        n_valid = valid.numel()
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        total = h.new_zeros((), dtype=torch.float32)
        for start in range(0, n_valid, chunk_rows):
            rows = valid[start : start + chunk_rows]
            h_c, t_c = h.index_select(0, rows), targets.index_select(0, rows)
            logits = (h_c @ weight.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t_c[:, None]).squeeze(1)).sum()
            if need_grad:
                # d(sum of losses)/d logits = softmax - onehot; scaled by 1/n_valid below.
                probs = logits.sub_(lse[:, None]).exp_()
                probs[torch.arange(rows.numel()), t_c] -= 1.0
                probs = probs.to(h.dtype)
                if grad_h is not None:
                    grad_h.index_copy_(0, rows, probs @ weight)
                if grad_w is not None:
                    grad_w.addmm_(probs.t(), h_c)
        scale = 1.0 / max(n_valid, 1)  # nothing to score: loss 0, gradients 0
        ctx.save_for_backward(
            grad_h.mul_(scale) if grad_h is not None else None, grad_w.mul_(scale) if grad_w is not None else None
        )
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return (
            grad_h * grad_out if grad_h is not None else None,
            grad_w * grad_out if grad_w is not None else None,
            None,
            None,
        )
