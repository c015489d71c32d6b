"""Choosing the next token from logits, per request and vectorized over a batch.

One definition of "sample with these settings" for the generate loop, the engine, GRPO rollouts and the
server. A batch mixes requests with different settings: each row gets its own temperature, top-k, top-p,
min-p, penalties and logit bias, all applied as [B, V] tensor operations.

Constrained decoding (engine/constraint.py): `allowed` [B, V] bool sets each row's forbidden tokens to -inf
before any sampling, so a grammar's mask applies whatever the settings, and an unconstrained row (all True)
is left exactly as it was.

Seeds: a request with a seed draws its randomness from its own generator, one draw per token, so its
output is the same whatever else shares the batch. Sampling uses the exponential-race form
(argmax of p / q with q ~ Exp(1)), which equals drawing from p and needs no cumulative sums.

Speculative decoding: a sampled request's drafts are kept or replaced by `accept_drafts` (rejection
sampling against the same processed distribution `sample_batch` draws from, with the draws coupled), so its
tokens have the distribution of plain sampling, and a seeded request spends one draw per token as without
speculation: it gives the same tokens with or without drafts, alone or in any batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from nanoseek.engine.constraint import Constraint


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # 0 = no limit
    min_p: float = 0.0  # drop tokens whose probability is below min_p x the top token's
    seed: int | None = None
    repetition_penalty: float = 1.0  # >1 discourages tokens already in the prompt or output (CTRL-style)
    presence_penalty: float = 0.0  # OpenAI: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtracted per occurrence in the generated tokens
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    max_tokens: int = 256
    stop: tuple[str, ...] = ()  # stop strings (the engine needs a tokenizer to see them)
    stop_token_ids: tuple[int, ...] = ()  # extra stop ids, beside the model's end-of-sequence ids
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; n >= 0: the sampled token's and the top-n alternatives
    constraint: Constraint | None = None  # which tokens may come next (e.g. a JSON schema's grammar); per request
    lora: str | None = None  # the LoRA adapter the request runs (its name; engine/lora.py); None: the base model

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        check(
            math.isfinite(self.temperature) and self.temperature >= 0,
            f"temperature must be >= 0, got {self.temperature}",
        )
        check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        check(isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be an integer >= 0, got {self.top_k}")
        check(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        check(math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
              f"repetition_penalty must be > 0, got {self.repetition_penalty}")  # fmt: skip
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            check(math.isfinite(value) and -2 <= value <= 2, f"{name} must be in [-2, 2], got {value}")
        check(
            isinstance(self.max_tokens, int) and self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"
        )
        check(self.logprobs is None or 0 <= self.logprobs <= 20, f"logprobs must be in [0, 20], got {self.logprobs}")
        for token, bias in self.logit_bias.items():
            check(isinstance(token, int) and token >= 0, f"logit_bias keys must be token ids >= 0, got {token!r}")
            check(math.isfinite(bias) and -100 <= bias <= 100, f"logit_bias values must be in [-100, 100], got {bias}")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator seeded from `params.seed` (None: torch's global RNG)."""
    if params.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


def _column(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=like.device)[:, None]


def apply_penalties(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    prompt_counts: torch.Tensor | None,
    output_counts: torch.Tensor | None,
) -> torch.Tensor:
    """Logit bias, then repetition / presence / frequency penalties. counts: [B, V] token occurrences."""
    logits = logits.float()
    if any(p.logit_bias for p in params):
        bias = torch.zeros_like(logits)
        for i, p in enumerate(params):
            for token, value in p.logit_bias.items():
                if token < bias.shape[1]:
                    bias[i, token] = value
        logits = logits + bias
    if not any(p.penalized for p in params) or output_counts is None:
        return logits
    rep = _column([p.repetition_penalty for p in params], logits)
    seen = output_counts > 0 if prompt_counts is None else (output_counts + prompt_counts) > 0
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    logits = logits - _column([p.frequency_penalty for p in params], logits) * output_counts
    return logits - _column([p.presence_penalty for p in params], logits) * (output_counts > 0)


def filter_logits_batch(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Logits [B, V] scaled by each row's temperature, with tokens outside its top-k / top-p / min-p set to
    -inf. Greedy rows are left unscaled (their argmax is taken elsewhere)."""
    logits = logits.float() / _column([p.temperature if p.temperature > 0 else 1.0 for p in params], logits)
    V = logits.shape[-1]
    top_k = [p.top_k if 0 < p.top_k < V else V for p in params]
    if min(top_k) < V:
        kth = torch.topk(logits, max(top_k), dim=-1).values  # [B, max_k]
        kth = kth.gather(1, torch.tensor(top_k, device=logits.device)[:, None] - 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if any(p.top_p < 1 for p in params):
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the best one always stays)
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= _column([p.top_p for p in params], logits)
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    if any(p.min_p > 0 for p in params):
        probs = logits.softmax(dim=-1)
        floor = probs.amax(-1, keepdim=True) * _column([p.min_p for p in params], logits)
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """filter_logits_batch with one setting for every row."""
    return filter_logits_batch(logits, [params] * logits.shape[0])


def process_logits(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    prompt_counts: torch.Tensor | None = None,
    output_counts: torch.Tensor | None = None,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 logits [B, V] after logit bias, penalties and the constraint mask (`allowed` [B, V] bool, when
    given, keeps each row's True tokens only): what greedy takes the argmax of, and what temperature and the
    filters then shape into the distribution a sampled row draws from (`target_probs`)."""
    processed = apply_penalties(logits, params, prompt_counts, output_counts)
    if allowed is not None:
        processed = processed.masked_fill(~allowed.to(processed.device), float("-inf"))
    return processed


def target_probs(processed: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """[B, V] the distribution each (non-greedy) row samples from: temperature, top-k / top-p / min-p."""
    return filter_logits_batch(processed, params).softmax(dim=-1)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """One token from probs [V] (need not sum to 1): the exponential race sample_batch runs per row, drawing
    V exponentials from `generator`."""
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return int((probs / noise).argmax())


def accept_drafts(
    probs: torch.Tensor, drafts: Sequence[int], generator: torch.Generator | None = None
) -> tuple[list[int], int]:
    """Speculative sampling for deterministic drafts. probs [k+1, V]: the target distribution at the request's
    last token and after each of its k drafts (each already conditioned on the drafts before it: penalties
    see them as output). Position by position, the target draws its own token y_j = `draw`(p_j) and keeps
    the draft while y_j equals it; the first y_j that differs, or the bonus y_k when all k are kept, ends
    the run. This is rejection sampling with the draws coupled (Gumbel-max): a draft x is kept with
    probability P(y_j = x) = p_j(x) = min(1, p_j(x) / q(x)) for the point mass q = 1{x} that n-gram and MTP
    drafts are, and a rejected position's token is y_j given y_j != x, i.e. p_j with x removed and
    renormalised. Each examined position spends exactly the draw plain sampling spends on that token, so a
    seeded request gives the same tokens with or without speculation, whatever its drafts and its batch.
    Returns (tokens, number of drafts kept)."""
    if probs.shape[0] != len(drafts) + 1:
        raise ValueError(f"{len(drafts)} drafts need {len(drafts) + 1} rows of probabilities, got {probs.shape[0]}")
    for j, x in enumerate(drafts):
        y = draw(probs[j], generator)
        if y != x:
            return [*drafts[:j], y], j
    return [*drafts, draw(probs[len(drafts)], generator)], len(drafts)


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # [B]
    logprobs: torch.Tensor | None = None  # [B] log-probability of each sampled token (model distribution)
    top_ids: torch.Tensor | None = None  # [B, n] the n most likely tokens
    top_logprobs: torch.Tensor | None = None  # [B, n]


def with_logprobs(out: SampleOutput, logits: torch.Tensor, params: Sequence[SamplingParams]) -> SampleOutput:
    """Fill in the logprobs of out.tokens when any row asks: the model's own distribution (before penalties,
    temperature and filters), and the top-n alternatives."""
    wanted = [p.logprobs for p in params if p.logprobs is not None]
    if wanted:
        logp = logits.float().log_softmax(dim=-1)
        out.logprobs = logp.gather(1, out.tokens[:, None].to(logp.device)).squeeze(1)
        n = max(wanted)
        if n:
            out.top_logprobs, out.top_ids = logp.topk(n, dim=-1)
    return out


def sample_batch(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None] | None = None,
    *,
    prompt_counts: torch.Tensor | None = None,
    output_counts: torch.Tensor | None = None,
    allowed: torch.Tensor | None = None,
) -> SampleOutput:
    """Next tokens [B] from logits [B, V], each row with its own settings and (optional) generator; `allowed`
    [B, V] bool, when given, limits each row to its True tokens (a row needs at least one).
    Logprobs, when any row asks, are of the model's own distribution (before temperature and filters)."""
    processed = process_logits(logits, params, prompt_counts, output_counts, allowed)
    return with_logprobs(SampleOutput(choose(processed, params, generators)), logits, params)


def choose(
    processed: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """Tokens [B] from processed logits (`process_logits`): the argmax for greedy rows, a draw from
    `target_probs` for the others (each seeded row from its own generator: the same draws in any batch)."""
    B = processed.shape[0]
    generators = generators or [None] * B
    tokens = processed.argmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        rows = torch.tensor(sampled, device=processed.device)
        probs = target_probs(processed[rows], [params[i] for i in sampled])
        noise = torch.empty_like(probs)
        unseeded = [j for j, i in enumerate(sampled) if generators[i] is None]
        if unseeded:
            noise[unseeded] = torch.empty(len(unseeded), probs.shape[1], device=probs.device).exponential_()
        for j, i in enumerate(sampled):
            if generators[i] is not None:  # its own stream: the same draws in any batch
                noise[j].exponential_(generator=generators[i])
        tokens[rows] = (probs / noise).argmax(dim=-1)
    return tokens
