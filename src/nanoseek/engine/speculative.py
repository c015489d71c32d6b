"""Speculative decoding: cheap draft tokens, checked by the target model in one forward.

A decoding request that carries k drafts feeds [its last token, draft_1..draft_k] to the target model,
which returns logits at all k+1 positions. Greedy verification keeps the longest prefix of drafts equal to
the target's own argmax, then the target's token after it: 1..k+1 tokens per step, exactly the tokens plain
greedy decoding would give. Cache entries of rejected drafts stay behind `num_computed` and are
overwritten by the next step (prefix caching only registers blocks wholly below `num_computed`).

Sampled requests (temperature > 0) speculate too: `sampling.accept_drafts` keeps draft x at position j with
probability p_j(x), where p_j is the request's fully processed distribution there (temperature, top-k/p,
min-p, penalties that count the drafts before j, logit bias), and on the first rejection draws from p_j
without x: the tokens are distributed exactly as plain sampling's (both drafters propose deterministic
tokens, a point-mass q). It does so by drawing the target's own token at each position from the request's
generator, exactly as plain sampling would, and keeping the draft while they agree (the Gumbel-max coupling
of rejection sampling): a seeded request is reproducible, independent of its batch mates and of how many
drafts each step verified, and gives the same tokens as the same seed without speculation (up to the fp32
noise of the logits, and bit for bit with int8 weights, see below).
Requests with a token constraint (engine/constraint.py) take no drafts: they would need the grammar's mask
at every draft position.

Exactness: while speculating, decodes and verifications run row-wise (kv_cache.PagedView.query_spans), so
a query's numbers do not depend on how many drafts share its forward; with int8 weights (row-invariant
matmuls) greedy output and logprobs then equal plain decoding's bit for bit.

Two drafters, picked by `EngineConfig.speculative`:
- "ngram" (prompt lookup, every family): the last n tokens (n = ngram_max down to ngram_min) are looked up
  earlier in the request's prompt + output; the tokens that followed their most recent earlier occurrence
  are the drafts. Free, and good whenever the output copies from the prompt or repeats itself.
- "mtp" (DeepSeek models with MTP modules): MTP depth 1 at position t combines the main model's
  final-normed hidden state h[t] with the embedding of token t+1 and predicts token t+2, exactly as
  `compute_loss` trains it. Its block attends over the sequence, so it keeps its own entries in the paged
  cache (layer num_hidden_layers, same block table). After every forward, the module is run over that
  forward's new positions (`catch_up`): the entries at positions below `num_computed` are then always the
  ones computed from the main model's real hidden states and the real next tokens, and its output at the
  last accepted position is draft 1. Drafts 2..k re-apply depth 1 autoregressively on its own output and
  the previous draft, writing speculative entries at positions >= num_computed that the next catch-up
  overwrites. (Models with several MTP depths draft with the first one only.) One known gap: after a
  prefix-cache hit of m tokens, the MTP entry at position m-1 is the one the sequence that first computed
  the block wrote, with its own token m; drafts may get worse there, the output cannot (the target
  verifies every draft).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from nanoseek.engine.runner import ForwardResult, ModelRunner
from nanoseek.engine.scheduler import Request, Scheduled

METHODS = ("ngram", "mtp")


def propose_ngram(tokens: Sequence[int], num_drafts: int, max_n: int = 3, min_n: int = 1) -> list[int]:
    """Up to num_drafts tokens that followed the most recent earlier occurrence of the longest suffix
    n-gram (max_n down to min_n) of `tokens`; [] when no suffix occurs earlier."""
    if num_drafts < 1 or len(tokens) < min_n + 1:
        return []
    seq = np.asarray(tokens, dtype=np.int64)
    for n in range(min(max_n, len(seq) - 1), min_n - 1, -1):
        # windows starting at 0..L-n-1: every earlier occurrence, never the suffix itself
        windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)
        hits = np.flatnonzero((windows == seq[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return seq[start : start + num_drafts].tolist()
    return []


def accept_greedy(drafts: Sequence[int], targets: Sequence[int]) -> list[int]:
    """The tokens a greedy verification yields: targets[j] is the target's choice after drafts[:j]
    (len(targets) == len(drafts) + 1); keep drafts while they equal the target's choice, then add the
    target's own next token."""
    if len(targets) != len(drafts) + 1:
        raise ValueError(f"{len(drafts)} drafts need {len(drafts) + 1} target tokens, got {len(targets)}")
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == targets[accepted]:
        accepted += 1
    return list(targets[: accepted + 1])


def draft_limit(req: Request, num_speculative_tokens: int, context_length: int) -> int:
    """How many drafts the request may verify next step: 0 unless it is unconstrained and decoding; never
    more than its remaining max_tokens (the bonus token always comes) or the context allows."""
    if req.finished or req.constraint is not None or req.num_computed != req.num_tokens - 1:
        return 0
    room = min(req.params.max_tokens - len(req.output_ids) - 1, context_length - req.num_tokens)
    return max(0, min(num_speculative_tokens, room))


class NgramDrafter:
    needs_hidden = False

    def __init__(self, num_tokens: int, context_length: int, max_n: int = 3, min_n: int = 1):
        self.num_tokens, self.context_length = num_tokens, context_length
        self.max_n, self.min_n = max_n, min_n

    def after_step(self, passes: Sequence[tuple[Sequence[Scheduled], ForwardResult]]) -> None:
        for group, _ in passes:
            for s in group:
                req = s.request
                limit = draft_limit(req, self.num_tokens, self.context_length)
                req.draft_ids = propose_ngram(req.all_ids, limit, self.max_n, self.min_n) if limit else []


class MTPDrafter:
    needs_hidden = True

    def __init__(self, runner: ModelRunner, num_tokens: int):
        self.runner, self.model, self.num_tokens = runner, runner.model, num_tokens

    @torch.inference_mode()
    def after_step(self, passes: Sequence[tuple[Sequence[Scheduled], ForwardResult]]) -> None:
        drafting: list[tuple[Request, int, torch.Tensor]] = []  # request, limit, MTP output at its last position
        for group, result in passes:
            out = self.catch_up(group, result)
            for i, s in enumerate(group):
                req = s.request
                req.draft_ids = []
                limit = draft_limit(req, self.num_tokens, self.runner.context_length)
                if limit:
                    drafting.append((req, limit, out[i, req.num_computed - 1 - result.past_lens[i]]))
        if drafting:
            self.draft(drafting)

    def catch_up(self, group: Sequence[Scheduled], result: ForwardResult) -> torch.Tensor:
        """Run MTP depth 1 over the forward's new positions, with each position's next token (padding, rejected
        drafts and the unknown token after a stopped request get 0: those entries lie at or past
        num_computed and are overwritten before anything reads them). Returns its output [B, T, d]."""
        T = result.hidden.shape[1]
        next_ids = torch.zeros(len(group), T, dtype=torch.long)
        for i, s in enumerate(group):
            following = s.request.all_ids[result.past_lens[i] + 1 : result.past_lens[i] + 1 + T]
            next_ids[i, : len(following)] = torch.tensor(following, dtype=torch.long)
        return self.model.mtp_forward(0, result.hidden, next_ids.to(result.hidden.device), result.view)

    def draft(self, drafting: list[tuple[Request, int, torch.Tensor]]) -> None:
        """Draft 1 from each catch-up output; then depth 1 again on its own output and the previous draft, one
        position further each time, while the request's limit and its reserved blocks allow."""
        reqs = [r for r, _, _ in drafting]
        limits = [limit for _, limit, _ in drafting]
        h = torch.stack([h for _, _, h in drafting])  # [B, d]
        tokens = self.model.mtp_logits(0, h).argmax(-1).tolist()
        for req, token in zip(reqs, tokens):
            req.draft_ids = [token]
        for j in range(1, max(limits)):
            # draft j+1 comes from MTP position num_computed + j - 1 (its entry is speculative)
            active = [
                i for i, req in enumerate(reqs)
                if limits[i] > j and len(req.draft_ids) == j
                and req.table.reserve(req.num_computed + j, req.num_computed)
            ]  # fmt: skip
            if not active:
                break
            rows = [reqs[i] for i in active]
            view = self.runner.storage.view(
                [r.table for r in rows], [r.num_computed + j - 1 for r in rows], [1] * len(rows)
            )
            prev = torch.tensor([[r.draft_ids[-1]] for r in rows], device=h.device)
            h = self.model.mtp_forward(0, h[active][:, None], prev, view)[:, 0]
            for r, token in zip(rows, self.model.mtp_logits(0, h).argmax(-1).tolist()):
                r.draft_ids.append(token)
            reqs, limits = rows, [limits[i] for i in active]


def make_drafter(method: str | None, runner: ModelRunner, num_tokens: int, ngram_max: int, ngram_min: int):
    if method is None:
        return None
    if method == "ngram":
        return NgramDrafter(num_tokens, runner.context_length, ngram_max, ngram_min)
    return MTPDrafter(runner, num_tokens)
