"""GRPO's math: group advantages, the k3 KL, token weights per loss type, the clipped surrogate, the padded
prompt + completion batches and their log-probs, the MTP module's loss on rollouts, and the loop's objective
(GRPOLoss: a step's micro-batches and their losses; train/grpo.py runs it, the loss types are described there).

    w = token_weights(batch.mask, "dapo", max_new_tokens)
    out = clipped_loss(logp, old_logp, advantages, w, eps_low=0.2, eps_high=0.28, beta=0.04, ref_logp=ref)
    out.loss.backward()
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")


def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """rewards [P, G] (G completions of each of P prompts) -> advantages [P, G]: r - mean(group), divided by
    the group's standard deviation (unbiased, + eps) when `scale` (GRPO, DAPO; Dr. GRPO does not)."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [prompts, generations >= 2], got {tuple(rewards.shape)}")
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale:
        return centered
    return centered / (rewards.std(dim=1, keepdim=True) + eps)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate, k3 = exp(ref - pi) - (ref - pi) - 1 (>= 0, unbiased)."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def token_weights(
    mask: torch.Tensor, loss_type: str, max_new_tokens: int, *, rows: float | None = None, tokens: float | None = None
) -> torch.Tensor:
    """Each token's weight in the batch loss [B, L], so the loss is sum(weights x per-token loss) and can be
    split over micro-batches (weights computed on the whole batch). rows, tokens: the whole step's completion
    and token counts when `mask` is only a part of it (one rank's rows under torchrun); default: mask's own."""
    mask = mask.float()
    B = mask.shape[0] if rows is None else rows
    if loss_type == "grpo":  # mean over each sequence, then over sequences
        return mask / mask.sum(1, keepdim=True).clamp(min=1) / B
    if loss_type == "dr_grpo":  # a constant normaliser: no bias towards short or long answers
        return mask / (B * max_new_tokens)
    if loss_type == "dapo":  # token-level: every token of the batch counts the same
        return mask / (mask.sum().clamp(min=1) if tokens is None else max(tokens, 1))
    raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")


@dataclass
class LossParts:
    loss: torch.Tensor  # scalar, with gradient
    kl: float  # weighted mean k3 KL (0 without a reference)
    clip_fraction: float  # share of tokens whose clipped term was the active (smaller) one


def clipped_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
) -> LossParts:
    """PPO-style clipped surrogate per token (+ beta x k3 KL), summed with `weights` (token_weights).
    logp/old_logp/ref_logp/weights: [B, L]; advantages: [B] (one per completion)."""
    A = advantages[:, None]
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * A
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * A
    per_token = -torch.min(unclipped, clipped)
    kl_value = 0.0
    if beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs the reference log-probs")
        kl = k3_kl(logp, ref_logp)
        per_token = per_token + beta * kl
        kl_value = float((kl.detach() * weights).sum() / weights.sum().clamp(min=1e-12))
    real = weights > 0
    is_clipped = ((ratio < 1 - eps_low) & (A < 0)) | ((ratio > 1 + eps_high) & (A > 0))
    clip_fraction = float((is_clipped & real).sum() / real.sum().clamp(min=1))
    return LossParts((per_token * weights).sum(), kl_value, clip_fraction)


@dataclass
class Batch:
    """Prompt + completion rows, right-padded: input_ids [B, T], attention_mask [B, T]; completion token
    j of row i sits at position prompt_lens[i] + j; targets [B, L] and mask [B, L] over completions."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_lens: torch.Tensor  # [B]
    targets: torch.Tensor  # [B, L] completion tokens (0 where masked)
    mask: torch.Tensor  # [B, L] real completion tokens

    def rows(self, index: slice) -> Batch:
        return Batch(*(t[index] for t in (self.input_ids, self.attention_mask, self.prompt_lens, self.targets,
                                          self.mask)))  # fmt: skip


def make_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int = 0) -> Batch:
    if len(prompts) != len(completions) or not prompts:
        raise ValueError(f"{len(prompts)} prompts and {len(completions)} completions: need equal, non-zero counts")
    T = max(len(p) + len(c) for p, c in zip(prompts, completions))
    L = max(1, max(len(c) for c in completions))
    B = len(prompts)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros(B, T, dtype=torch.long)
    targets = torch.zeros(B, L, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        row = [*p, *c]
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attn[i, : len(row)] = 1
        if c:
            targets[i, : len(c)] = torch.tensor(list(c), dtype=torch.long)
            mask[i, : len(c)] = True
    return Batch(ids, attn, torch.tensor([len(p) for p in prompts]), targets, mask)


def completion_logprobs(
    model: nn.Module, batch: Batch, temperature: float = 1.0, *, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(completion token | everything before it) [B, L] under logits / temperature (the distribution
    the rollouts sampled from), and optionally the entropy of that distribution at each position [B, L].
    Only the completion positions' logits are computed (logits_index), not the prompt's."""
    device = next(model.parameters()).device
    L = batch.targets.shape[1]
    T = batch.input_ids.shape[1]
    # the logits predicting completion token j are at position prompt_len - 1 + j
    index = (batch.prompt_lens[:, None] - 1 + torch.arange(L)[None, :]).clamp(max=T - 1).to(device)
    logits = model(batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), logits_index=index)
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    logp = logp_all.gather(-1, batch.targets.to(device)[..., None]).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def mtp_distillation_loss(model: nn.Module, batch: Batch) -> torch.Tensor | None:
    """The MTP module's loss on rollouts: at each position t whose token t+2 is a completion token, predict it
    from the trunk's final-normed hidden state at t and the embedding of token t+1 (compute_loss's depth 1).
    The trunk, the embedding and the head are detached: only the module learns. None without MTP modules."""
    from nanoseek.model.loss import linear_cross_entropy
    from nanoseek.model.mtp import shift_left

    modules = getattr(model, "mtp", None)
    if not modules:
        return None
    device = next(model.parameters()).device
    ids, real = batch.input_ids.to(device), batch.attention_mask.to(device).bool()
    rope_mask: list = []
    with torch.no_grad():
        h = model.forward_hidden(ids, real.long(), _rope_mask_out=rope_mask, token_mask=real)
        emb = model.model.embed_tokens(shift_left(ids, 1, 0))
    cos, sin, mask = rope_mask
    targets = mtp_targets(batch).to(device)
    module = modules[0]
    out = module(h, emb, cos, sin, mask, None, real & shift_left(real, 1, False))
    return linear_cross_entropy(module.norm(out), model.lm_head.weight.detach(), targets)


def mtp_targets(batch: Batch) -> torch.Tensor:
    """[B, T]: at position t, token t+2 where that is a completion token, else IGNORE_INDEX (the MTP loss's)."""
    from nanoseek.model.loss import IGNORE_INDEX
    from nanoseek.model.mtp import shift_left

    ids, real = batch.input_ids, batch.attention_mask.bool()
    positions = torch.arange(ids.shape[1])[None, :]
    in_completion = (positions + 2 >= batch.prompt_lens[:, None]) & shift_left(real, 2, False)
    return shift_left(ids, 2, IGNORE_INDEX).masked_fill(~in_completion, IGNORE_INDEX)


def mtp_target_count(batch: Batch) -> int:
    from nanoseek.model.loss import IGNORE_INDEX

    return int((mtp_targets(batch) != IGNORE_INDEX).sum())


# ---- the objective of one optimizer step --------------------------------------------------------------------
@dataclass
class MicroStep:
    """One forward and backward of an optimizer step: policy rows (`rows` of the step's batch; None: a dummy
    or nothing) with their advantages [B], token weights, old and reference log-probs [B, L], and MTP rows
    with their target count (0: a dummy or nothing)."""

    policy: Batch | None = None
    rows: slice | None = None
    adv: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    old: torch.Tensor | None = None  # pi_old when mu > 1 (else the log-probs themselves, detached)
    ref: torch.Tensor | None = None  # the reference policy's when beta > 0
    mtp: Batch | None = None
    mtp_targets: int = 0


class GRPOLoss:
    """The loop's objective for GRPO (cfg: a GRPOConfig): the clipped surrogate with beta x KL to the frozen
    reference `ref` over a step's micro-batches, plus mtp_weight x the MTP module's loss, each normalised by the
    whole step's counts (all ranks), so the summed gradient is the single-process one. `step_module`: the
    wrapped model (parallel.LossModule), whose one forward computes both (DDP sees every trained parameter)."""

    def __init__(self, cfg, step_module: nn.Module, ref: nn.Module | None, device: torch.device, pad_id: int,
                 distributed: bool, trains_mtp: bool):  # fmt: skip
        self.cfg, self.step_module, self.ref, self.device = cfg, step_module, ref, device
        self.pad_id, self.distributed, self.trains_mtp = pad_id, distributed, trains_mtp

    def plan(self, batch: Batch | None, adv: torch.Tensor, weights: torch.Tensor | None, mtp_batch: Batch | None,
             counts: list[list[float]]) -> list[MicroStep]:  # fmt: skip
        """The micro-batches of one optimizer step: policy rows (with their advantages and token weights) and
        MTP rows side by side, each pair one forward and backward. Under torchrun every rank runs as many as the
        rank with the most (counts: every rank's), filling its gaps with a dummy row whose loss is multiplied by
        0: DDP and FSDP2 need the same forwards and backwards on every rank (FSDP2 gathers each block's weights
        in them; DDP waits for every trained parameter's gradient)."""
        micro = self.cfg.micro_batch_size

        def slices(n: float) -> list[slice]:
            size = micro or max(1, int(n))
            return [slice(s, s + size) for s in range(0, int(n), size)]

        policy = slices(batch.mask.shape[0]) if batch is not None else []
        mtp = slices(mtp_batch.input_ids.shape[0]) if mtp_batch is not None else []
        steps = max(len(policy), len(mtp))
        if self.distributed:
            steps = max(max(len(slices(rows)), len(slices(m_rows))) for rows, _, m_rows, _, _ in counts)
        dummy = make_batch([[self.pad_id, self.pad_id]], [[self.pad_id]], self.pad_id) if self.distributed else None
        plan = []
        for j in range(steps):
            part = MicroStep()
            if j < len(policy):
                part.policy, part.rows = batch.rows(policy[j]), policy[j]
                part.adv, part.weights = adv[policy[j]], weights[policy[j]]
            elif self.distributed:
                part.policy = dummy
            if j < len(mtp):
                part.mtp = mtp_batch.rows(mtp[j])
                part.mtp_targets = mtp_target_count(part.mtp)
            elif self.distributed and self.trains_mtp:
                part.mtp = dummy
            plan.append(part)
        with torch.no_grad():
            for part in plan:
                # pi_old: the rollout policy; recomputed once only when several inner iterations follow (for mu=1
                # the first iteration's own log-probs, detached, are identical). Through the wrapper (FSDP2
                # gathers), so dummies too.
                if self.cfg.mu > 1 and part.policy is not None:
                    part.old = self.forward(MicroStep(part.policy, part.rows))[0]
                if self.ref is not None and part.rows is not None:
                    part.ref = completion_logprobs(self.ref, part.policy, self.cfg.temperature)[0]
        return plan

    def forward(self, part: MicroStep):
        """(log-probs [B, L], entropy [B, L]) of the part's policy rows and the MTP loss of its MTP rows, in one
        forward of the wrapped model (None for what the part lacks)."""
        temperature = self.cfg.temperature

        def compute(model: nn.Module):
            logp = entropy = mtp = None
            if part.policy is not None:
                with _not_counted(model, part.rows is None):
                    logp, entropy = completion_logprobs(
                        model, part.policy, temperature, with_entropy=torch.is_grad_enabled()
                    )  # fmt: skip
                logp = logp.clone()  # not a view: FSDP2 warns of views among a forward's outputs
            if part.mtp is not None:
                with _not_counted(model, part.mtp_targets == 0):
                    mtp = mtp_distillation_loss(model, part.mtp)
            return logp, entropy, mtp

        return self.step_module(call=compute)

    def loss(self, part: MicroStep, total: float, n_mtp: float, stats: dict) -> torch.Tensor:
        """A micro-batch's loss (total: the sum of the step's token weights, n_mtp: its MTP targets, all ranks);
        its logged shares are added to `stats` (a dummy's loss is 0 and adds nothing)."""
        logp, entropy, mtp = self.forward(part)
        loss = self._policy_loss(part, logp, entropy, total, stats)
        if mtp is None:
            return loss
        if part.mtp_targets == 0:  # a dummy
            return loss + mtp * 0.0
        share = part.mtp_targets / n_mtp  # its mean over these rows' targets, weighted by their share of the step's
        stats["mtp_loss"] += float(mtp.detach()) * share / self.cfg.mu
        return loss + self.cfg.mtp_weight * mtp * share

    def _policy_loss(self, part: MicroStep, logp, entropy, total: float, stats: dict) -> torch.Tensor:
        cfg = self.cfg
        if logp is None:
            return torch.zeros((), device=self.device)
        if part.rows is None:  # a dummy: its forward ran for the collectives, its loss must not count
            return logp.sum() * 0.0
        out = clipped_loss(
            logp, part.old if part.old is not None else logp.detach(), part.adv, part.weights,
            eps_low=cfg.epsilon_low, eps_high=cfg.eps_high, beta=cfg.beta, ref_logp=part.ref,
        )  # fmt: skip
        w = part.weights
        share = float(w.sum()) / total  # this micro-batch's share of the whole step's weight
        stats["loss"] += float(out.loss.detach()) / cfg.mu
        stats["kl"] += out.kl * share / cfg.mu
        stats["clip_frac"] += out.clip_fraction * share / cfg.mu
        stats["entropy"] += float((entropy * w).sum() / w.sum().clamp(min=1e-12)) * share / cfg.mu
        return out.loss


@contextlib.contextmanager
def _not_counted(model: nn.Module, dummy: bool):
    """A dummy micro-batch runs in eval mode: the MoE counts expert loads (which move the router bias) in
    training mode only, and a dummy's tokens must not count. Nothing else differs between the modes."""
    if not dummy or not model.training:
        yield
        return
    model.eval()
    try:
        yield
    finally:
        model.train()
