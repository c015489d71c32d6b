"""Generation through the engine, for callers that want a function: stream one prompt's tokens, or
complete a batch of prompts. Both run on `Engine` (paged cache, continuous batching, per-request sampling):
there is no second decode loop.

    for token in generate_tokens(model, prompt_ids, 64, SamplingParams(temperature=0), tok.stop_token_ids):
        ...
    results = generate_batch(model, [ids1, ids2], 32, SamplingParams(temperature=0), tok.stop_token_ids)

`model` is any nanoseek model (DeepSeek-V3 and the dense families) or the LossModule that `parallelize()`
wraps around one; under FSDP every rank must make the same calls (greedy decoding then runs the same
forwards everywhere, which the shard all-gathers need). Pass `engine=` to reuse one engine across calls:
its prefix cache then serves a growing chat history without prefilling it again.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch

from nanoseek.engine.engine import Engine, EngineConfig, cache_blocks
from nanoseek.engine.sampling import SamplingParams


@dataclass
class GenerationResult:
    token_ids: list[int]
    finish_reason: str  # "stop" (a stop token), "length" (max_new_tokens) or "context" (context full)


def context_length(model) -> int | None:
    """The model's context (max_position_embeddings), looking through a LossModule wrapper; None if unknown."""
    config = getattr(model, "config", None) or getattr(getattr(model, "model", None), "config", None)
    return getattr(config, "max_position_embeddings", None)


def engine_for(
    model,
    max_len: int,
    *,
    max_num_seqs: int = 1,
    stop_ids: Iterable[int] = (),
    autocast_dtype: torch.dtype | None = None,
    compile: bool = False,
) -> Engine:
    """An engine whose cache holds `max_num_seqs` sequences of up to `max_len` tokens (no more);
    compile: decode steps through torch.compile (EngineConfig.compile)."""
    config = EngineConfig(
        block_size=16, max_num_seqs=max_num_seqs, max_step_tokens=max(256, max_num_seqs * 32),
        autocast_dtype=autocast_dtype, compile=compile,
    )  # fmt: skip
    config = replace(config, num_blocks=cache_blocks(model, config, max_num_seqs, max_len))
    return Engine(model, config, eos_ids=list(stop_ids))


def _params(params: SamplingParams | None, max_new_tokens: int) -> SamplingParams:
    return replace(params or SamplingParams(), max_tokens=max_new_tokens)


def _result(engine: Engine, prompt_len: int, token_ids: list[int], reason: str) -> GenerationResult:
    if reason == "length" and prompt_len + len(token_ids) >= engine.runner.context_length:
        reason = "context"
    return GenerationResult(token_ids, reason)


def _check(prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    if any(len(p) == 0 for p in prompts):
        raise ValueError("the prompt is empty: give at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")


def generate_tokens(
    model,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    params: SamplingParams | None = None,
    stop_ids: Iterable[int] = (),
    result: GenerationResult | None = None,
    *,
    engine: Engine | None = None,
) -> Iterator[int]:
    """Yield generated token ids one by one (stop tokens are not yielded). If `result` is given, it is
    filled with the ids and the finish reason when the loop ends. Closing the iterator aborts the request."""
    _check([prompt_ids], max_new_tokens)
    limit = context_length(model)
    if limit is not None and len(prompt_ids) >= limit:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {limit}")
    out: list[int] = []
    if max_new_tokens == 0:
        if result is not None:
            result.token_ids, result.finish_reason = out, "length"
        return
    if engine is None:
        span = len(prompt_ids) + max_new_tokens
        engine = engine_for(model, span if limit is None else min(span, limit), stop_ids=stop_ids)
    rid = engine.add_request(prompt_ids, _params(params, max_new_tokens))
    request = engine.get(rid)
    try:
        while not request.finished:
            for step in engine.step():
                if step.request_id == rid and step.token_id is not None:
                    out.append(step.token_id)
                    yield step.token_id
    finally:
        engine.abort(rid)
        engine.release(rid)
        if result is not None:
            reason = request.finish_reason if request.finish_reason != "abort" else "stop"
            done = _result(engine, len(prompt_ids), out, reason)
            result.token_ids, result.finish_reason = done.token_ids, done.finish_reason


def generate_batch(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    params: SamplingParams | None = None,
    stop_ids: Iterable[int] = (),
    *,
    autocast_dtype: torch.dtype | None = None,
    engine: Engine | None = None,
) -> list[GenerationResult]:
    """Continuations of many prompts, decoded together; one result per prompt, in order."""
    if not prompts:
        return []
    _check(prompts, max_new_tokens)
    if max_new_tokens == 0:
        return [GenerationResult([], "length") for _ in prompts]
    limit = context_length(model)
    if engine is None:
        span = max(len(p) for p in prompts) + max_new_tokens
        engine = engine_for(
            model, span if limit is None else min(span, limit), max_num_seqs=len(prompts), stop_ids=stop_ids,
            autocast_dtype=autocast_dtype,
        )  # fmt: skip
    done = engine.generate(prompts, _params(params, max_new_tokens))
    return [_result(engine, len(p), c.token_ids, c.finish_reason) for p, c in zip(prompts, done)]


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
