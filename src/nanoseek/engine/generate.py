"""A simple streaming generate loop over the models' KV-cache interface (one sequence at a time).

Prefill the prompt into a fresh cache, then decode one token per step until a stop id, the token budget
or the context limit. Any nanoseek model serves: `model(ids, cache=cache) -> logits` and
`model.new_cache(batch, max_len)` are all it uses (dense families and DeepSeek-V3 alike).
The inference engine (continuous batching, prefix caching) will replace this loop; sampling is shared.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from nanoseek.engine.sampling import SamplingParams, make_generator, sample_next


@dataclass
class GenerationResult:
    token_ids: list[int]
    finish_reason: str  # "stop" (a stop token), "length" (max_new_tokens) or "context" (context full)


def context_length(model) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


@torch.inference_mode()
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
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    limit = context_length(model)
    if limit is not None and len(prompt_ids) >= limit:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {limit}")
    budget = max_new_tokens if limit is None else min(max_new_tokens, limit - len(prompt_ids))
    params = params or SamplingParams()
    stop = set(stop_ids)
    device = next(model.parameters()).device
    generator = make_generator(params, device)
    cache = model.new_cache(1, len(prompt_ids) + budget, device=device)
    out: list[int] = []
    reason = "length" if budget == max_new_tokens else "context"
    logits = model(torch.tensor([prompt_ids], device=device), cache=cache)[:, -1]
    for step in range(budget):
        token = int(sample_next(logits, params, generator)[0])
        if token in stop:
            reason = "stop"
            break
        out.append(token)
        yield token
        if step + 1 < budget:
            logits = model(torch.tensor([[token]], device=device), cache=cache)[:, -1]
    if result is not None:
        result.token_ids, result.finish_reason = out, reason


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
