"""The generate loop: one decode loop over the models' KV-cache interface, for one prompt or a batch.

`decode` prefills a batch of prompts into a fresh cache and then feeds one token per row per step until
every row has hit a stop id, the token budget or the context limit, yielding each step's tokens. Prompts
of different lengths are left-padded: the model then gets an attention mask over the cache slots and
explicit positions (each row's real tokens count from 0), so a row's tokens do not depend on the other
rows. Everything it uses is the interface every nanoseek model shares (DeepSeek-V3 and the dense families,
or the LossModule that `parallelize()` wraps around a model):

    model(input_ids, attention_mask=None, position_ids=None, cache=None) -> logits [B, T, V]
    model.new_cache(batch_size, max_len, device=...)

Built on it: `generate_tokens` (one prompt, streamed token by token: `nanoseek generate` / `chat`) and
`generate_batch` (many prompts at once: held-out evaluation). Sampling is shared with everything else
through `engine.sampling`. The inference engine (paged cache, continuous batching) will replace this loop.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from nanoseek.engine.sampling import SamplingParams, make_generator, sample_next


@dataclass
class GenerationResult:
    token_ids: list[int]
    finish_reason: str  # "stop" (a stop token), "length" (max_new_tokens) or "context" (context full)


def context_length(model) -> int | None:
    """The model's context (max_position_embeddings), looking through a LossModule wrapper; None if unknown."""
    config = getattr(model, "config", None) or getattr(getattr(model, "model", None), "config", None)
    return getattr(config, "max_position_embeddings", None)


@torch.no_grad()
def decode(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    params: SamplingParams | None = None,
    stop_ids: Iterable[int] = (),
    *,
    pad_id: int = 0,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    results: list[GenerationResult] | None = None,
) -> Iterator[list[int | None]]:
    """Yield, at each step, the new token of every row, or None for a row that has finished (a stop token,
    which is never part of the output, ends a row). If `results` is given, it receives one GenerationResult
    per row when the loop ends.

    `pad_id` fills the left padding (any id in the vocabulary: padded slots are masked out). With
    `autocast_dtype`, each forward runs under torch.autocast. All ranks of a sharded (FSDP) model must call
    this with the same arguments: greedy decoding then runs the same number of forwards everywhere, which
    the shard all-gathers need."""
    if not prompts:
        raise ValueError("no prompts to decode")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("the prompt is empty: give at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    B, P = len(prompts), max(len(p) for p in prompts)
    limit = context_length(model)
    if limit is not None and limit <= P:
        raise ValueError(f"the prompt has {P} tokens; the model's context is {limit}")
    budget = max_new_tokens if limit is None else min(max_new_tokens, limit - P)
    params = params or SamplingParams()
    stop = set(stop_ids)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    generator = make_generator(params, device)

    ids = torch.full((B, P), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
    padded = any(len(p) < P for p in prompts)
    mask = positions = None  # without padding the model's defaults (all slots real, positions from 0) hold
    if padded:
        mask = torch.zeros((B, P + budget), dtype=torch.long)
        for i, p in enumerate(prompts):
            mask[i, P - len(p) : P] = 1
        mask = mask.to(device)
        positions = (mask[:, :P].cumsum(-1) - 1).clamp(min=0)
    cache = model.new_cache(B, P + budget, device=device)

    out: list[list[int]] = [[] for _ in range(B)]
    reasons = ["length" if budget == max_new_tokens else "context"] * B
    done = [False] * B
    step_ids, step_pos, length = ids.to(device), positions, P
    try:
        for step in range(budget):
            with torch.autocast(
                device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None
            ):
                logits = model(
                    step_ids,
                    attention_mask=None if mask is None else mask[:, :length],
                    position_ids=step_pos,
                    cache=cache,
                )
            tokens = sample_next(logits[:, -1].float(), params, generator)
            emitted: list[int | None] = []
            for i, token in enumerate(tokens.tolist()):
                if not done[i] and token in stop:
                    done[i], reasons[i] = True, "stop"
                if done[i]:
                    emitted.append(None)
                else:
                    out[i].append(token)
                    emitted.append(token)
            yield emitted
            if all(done) or step + 1 == budget:
                break
            # next step: one token per row (finished rows keep decoding into slots nobody reads)
            step_ids = tokens[:, None].to(device)
            if mask is not None:
                mask[:, length] = 1
                step_pos = positions[:, -1:] + 1 + step
            length += 1
    finally:
        if results is not None:
            results[:] = [GenerationResult(o, r) for o, r in zip(out, reasons)]


def generate_tokens(
    model,
    prompt_ids: list[int],
    max_new_tokens: int,
    params: SamplingParams | None = None,
    stop_ids: Iterable[int] = (),
    result: GenerationResult | None = None,
) -> Iterator[int]:
    """Yield generated token ids one by one (stop tokens are not yielded). If `result` is given, it is
    filled with the ids and the finish reason when the loop ends."""
    results: list[GenerationResult] = []
    try:
        for step in decode(model, [prompt_ids], max_new_tokens, params, stop_ids, results=results):
            if step[0] is not None:
                yield step[0]
    finally:
        if result is not None and results:
            result.token_ids, result.finish_reason = results[0].token_ids, results[0].finish_reason


def generate_batch(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    params: SamplingParams | None = None,
    stop_ids: Iterable[int] = (),
    *,
    pad_id: int = 0,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> list[GenerationResult]:
    """Continuations of many prompts decoded together (see `decode`); one result per prompt, in order."""
    if not prompts:
        return []
    results: list[GenerationResult] = []
    for _ in decode(model, prompts, max_new_tokens, params, stop_ids, pad_id=pad_id, device=device,
                    autocast_dtype=autocast_dtype, results=results):  # fmt: skip
        pass
    return results


class TextStreamer:
    """Turns a stream of token ids into text deltas, holding back bytes of an unfinished UTF-8 character
    (byte-fallback and byte-level tokens can split one character over several tokens)."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # ids before this are fully emitted and only give context to the decoder
        self.read = 0  # ids up to here have been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read], skip_special_tokens=self.skip)
        text = self.tokenizer.decode(self.ids[self.prefix :], skip_special_tokens=self.skip)
        if text.endswith("\ufffd") or len(text) <= len(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before) :]

    def finish(self) -> str:
        """Whatever is still held back when the stream ends (bytes that never became a character)."""
        before = self.tokenizer.decode(self.ids[self.prefix : self.read], skip_special_tokens=self.skip)
        text = self.tokenizer.decode(self.ids[self.prefix :], skip_special_tokens=self.skip)
        self.prefix = self.read = len(self.ids)
        return text[len(before) :]


def stream_text(tokenizer, token_ids: Iterable[int]) -> Iterator[str]:
    streamer = TextStreamer(tokenizer)
    for token in token_ids:
        delta = streamer.push(token)
        if delta:
            yield delta
    tail = streamer.finish()
    if tail:
        yield tail
