"""What both APIs share: the model behind the server, prompts, and the text streams of running requests.

    server = ModelServer(AsyncEngine(engine), tokenizer, name="tiny", metrics=Metrics(...))
    ids, text = await server.chat_prompt(messages)          # the chat template, off the event loop
    generation = server.generate([(ids, params)] * 1)         # submits now: bad input raises APIError here
    async for delta in generation:                           # text deltas per choice, stop strings cut
        ...
    generation.close()                                       # aborts what has not finished (idempotent)

Requests go to the engine's thread through `AsyncEngine.submit`; their outputs come back on this event loop, so
concurrent requests share the engine's batched steps and no handler ever waits for a step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from nanoseek.engine.async_engine import AsyncEngine
from nanoseek.engine.engine import StepOutput
from nanoseek.engine.generate import TextStreamer
from nanoseek.engine.sampling import SamplingParams
from nanoseek.serve.errors import APIError
from nanoseek.serve.limits import Limits
from nanoseek.serve.metrics import Metrics
from nanoseek.serve.structured import StructuredOutput
from nanoseek.serve.tool_calls import parser_for_template


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[str, float]]  # the most likely tokens' texts and logprobs


@dataclass
class ChoiceDelta:
    """New output of one choice: text (complete characters, stop strings cut), the tokens' logprobs when asked,
    and on its last delta the finish reason ("stop", "length", "abort")."""

    index: int
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # the stop string that ended it (None for a stop token)
    num_tokens: int = 0  # tokens generated so far by this choice


class ChoiceText:
    """Detokenizes one choice incrementally and cuts its text at the first stop string. Text that may be the
    start of a stop string is held back until it is known not to be one."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.streamer = TextStreamer(tokenizer)
        self.stop = tuple(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""  # the choice's text so far (cut at a stop string)
        self.emitted = 0
        self.stopped_by: str | None = None
        self.num_tokens = 0

    def push(self, token_id: int) -> None:
        self.num_tokens += 1
        if self.stopped_by is None:
            self.text += self.streamer.push(token_id)
            self._cut()

    def take(self, final: bool) -> str:
        """The text not returned yet; at the end (`final`) also what was held back."""
        if final and self.stopped_by is None:
            self.text += self.streamer.finish()
            self._cut()
        upto = len(self.text) if final or self.stopped_by is not None else len(self.text) - self.hold
        if upto <= self.emitted:
            return ""
        delta, self.emitted = self.text[self.emitted : upto], upto
        return delta

    def _cut(self) -> None:
        # A stop string starts at or after `emitted`: anything earlier was checked when more text had arrived.
        found = [(i, s) for s in self.stop if (i := self.text.find(s, self.emitted)) >= 0]
        if found:
            i, self.stopped_by = min(found)
            self.text = self.text[:i]


class Generation:
    """Requests submitted together (the n choices of one or more prompts); iterate for their ChoiceDeltas.

    Its buffer is bounded: a choice whose outputs wait untaken (`Limits.max_stream_buffer` of them: the stream's
    client reads slower than the tokens come, so its SSE writes block and nothing iterates here) is paused in the
    engine until they are taken, so a slow reader holds a bounded buffer and costs the other streams nothing."""

    def __init__(self, server: ModelServer, requests: Sequence[tuple[list[int], SamplingParams]]):
        self.server = server
        self.engine = server.engine
        self._queue: asyncio.Queue[StepOutput] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.choices: dict[int, tuple[int, ChoiceText, SamplingParams]] = {}
        self.unfinished: set[int] = set()
        self.prompt_tokens = sum(len(ids) for ids, _ in requests)
        start = server.clock()
        self._last_token = {}
        try:
            for index, (ids, params) in enumerate(requests):
                # put on this loop: one call_soon_threadsafe per engine step for all of this loop's requests;
                # a reader that falls behind pauses its request (limits.max_stream_buffer outputs not taken)
                rid = self.engine.submit(ids, params, self._queue.put_nowait, loop, server.limits.max_stream_buffer)
                self.choices[rid] = (index, ChoiceText(server.tokenizer, params.stop), params)
                self.unfinished.add(rid)
                self._last_token[rid] = start
        except ValueError as exc:
            self.close()
            raise APIError(400, str(exc)) from None
        except RuntimeError as exc:
            self.close()
            raise APIError(503, str(exc)) from None
        server.metrics.prompt_tokens.inc(self.prompt_tokens)

    @property
    def completion_tokens(self) -> int:
        return sum(text.num_tokens for _, text, _ in self.choices.values())

    def close(self) -> None:
        """Abort every choice still running and free its cache blocks; safe to call more than once."""
        for rid in self.unfinished:
            self.engine.abort(rid)
        self.unfinished.clear()

    async def __aiter__(self) -> AsyncIterator[ChoiceDelta]:
        try:
            while self.unfinished:
                out = await self._queue.get()
                self.engine.taken(out.request_id)
                if out.request_id not in self.unfinished:
                    continue  # an abort's echo after the server stopped the choice itself
                delta = self._consume(out)
                if delta is not None:
                    yield delta
        finally:
            self.close()

    def _consume(self, out: StepOutput) -> ChoiceDelta | None:
        index, text, params = self.choices[out.request_id]
        logprobs = []
        if out.token_id is not None:
            self._observe_token(out.request_id, first=text.num_tokens == 0)
            text.push(out.token_id)
            if params.logprobs is not None and out.logprob is not None:
                logprobs.append(self.server.token_logprob(out))
        finish = out.finish_reason if out.finished else None
        if finish is None and text.stopped_by is not None:
            # The text holds a stop string the engine did not see (its check decodes a shorter tail): stop here.
            self.engine.abort(out.request_id)
            finish = "stop"
        if finish == "error":
            self.close()
            raise APIError(500, f"the engine failed: {self.engine.error!r}")
        if finish is not None:
            self.unfinished.discard(out.request_id)
        delta_text = text.take(final=finish is not None)
        if not delta_text and not logprobs and finish is None:
            return None
        return ChoiceDelta(index, delta_text, logprobs, finish, text.stopped_by, text.num_tokens)

    def _observe_token(self, rid: int, first: bool) -> None:
        now = self.server.clock()
        elapsed, self._last_token[rid] = now - self._last_token[rid], now
        (self.server.metrics.time_to_first_token if first else self.server.metrics.inter_token_latency).observe(elapsed)
        self.server.metrics.generation_tokens.inc()


class ModelServer:
    """The served model: its engine, tokenizer and name, and the checks every endpoint shares."""

    def __init__(
        self,
        engine: AsyncEngine,
        tokenizer,
        name: str,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.perf_counter,
        limits: Limits | None = None,
    ):
        self.engine = engine
        self.tokenizer = tokenizer
        self.name = name
        self.metrics = metrics
        self.clock = clock
        self.limits = limits or Limits()  # what one request may ask (limits.py); the app takes its HTTP limits too
        self.context_length: int = engine.engine.runner.context_length
        self.vocab_size: int = engine.engine.vocab_size
        self.created = int(time.time())
        self.structured = StructuredOutput(tokenizer)
        self.tool_parser = parser_for_template(tokenizer.chat_template)  # a class, or None: no tool-call format
        metrics.watch_engine(engine.engine)

    @property
    def adapters(self) -> list[str]:
        """The LoRA adapters served beside the base model, by name (engine/lora.py; `nanoseek serve --lora`)."""
        adapters = getattr(self.engine.engine.runner.model, "lora_adapters", None)
        return list(adapters.names) if adapters is not None else []

    @property
    def adapter_paths(self) -> dict[str, str]:
        adapters = getattr(self.engine.engine.runner.model, "lora_adapters", None)
        return dict(adapters.paths) if adapters is not None else {}

    def check_model(self, model: str | None) -> None:
        """The request names the base model (or none). A LoRA adapter's name is refused here: an endpoint that
        runs adapters calls resolve_model."""
        if model is not None and model != self.name and model in self.adapters:
            raise APIError(400, f"{model!r} is a LoRA adapter, which this endpoint does not run; it runs the base "
                           f"model {self.name!r}", "model")  # fmt: skip
        self.resolve_model(model)

    def resolve_model(self, model: str | None) -> str | None:
        """The LoRA adapter a request's `model` names, or None for the base model (its name, or no name); an
        unknown name is a 404 model_not_found."""
        if model is None or model == self.name:
            return None
        if model in self.adapters:
            return model
        served = ", ".join(map(repr, [self.name, *self.adapters]))
        raise APIError(404, f"the model {model!r} does not exist; this server serves {served}", "model",
                       "model_not_found")  # fmt: skip

    def model_name(self, model: str | None) -> str:
        """The name a reply carries: the adapter's the request named, else the base model's."""
        return model if model is not None and model in self.adapters else self.name

    async def chat_prompt(
        self, messages: list[dict], add_generation_prompt: bool = True, **template_kwargs
    ) -> tuple[list[int], str]:
        """Prompt ids and text of a conversation through the model's chat template (rendered on a worker thread:
        templates and tokenizing long prompts take real time)."""
        from nanoseek.tokenizer import ChatTemplateError

        tok = self.tokenizer

        def render() -> tuple[list[int], str]:
            text = tok.apply_chat_template(messages, add_generation_prompt, **template_kwargs)
            return tok.encode(text, add_special_tokens=False), text

        try:
            return await asyncio.to_thread(render)
        except ChatTemplateError as exc:
            raise APIError(400, str(exc), "messages") from None

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens)

    def check_tokens(self, ids: Sequence[int], param: str) -> list[int]:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})", param)
        return list(ids)

    def max_tokens(self, requested: int | None, prompt_len: int, param: str = "messages") -> int:
        """The tokens a reply may have: what was asked, or the rest of the context. A prompt or a request that
        does not fit the context is a 400 (never truncated)."""
        room = self.context_length - prompt_len
        if prompt_len == 0:
            raise APIError(400, "the prompt is empty", param)
        context, too_long = self.context_length, "context_length_exceeded"
        if room < 1:
            message = f"the prompt has {prompt_len} tokens; the model's context is {context} tokens and the reply "
            raise APIError(400, message + "needs at least one", param, too_long)
        if requested is None:
            return room
        if requested > room:
            message = f"the prompt ({prompt_len} tokens) plus max_tokens ({requested}) exceed the model's context"
            raise APIError(400, f"{message} of {context} tokens", "max_tokens", too_long)
        return requested

    def generate(self, requests: Sequence[tuple[list[int], SamplingParams]]) -> Generation:
        return Generation(self, requests)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def token_logprob(self, out: StepOutput) -> TokenLogprob:
        top = [(self.token_text(t), lp) for t, lp in (out.top_logprobs or {}).items()]
        return TokenLogprob(out.token_id, self.token_text(out.token_id), out.logprob, top)

    def healthy(self) -> bool:
        return self.engine.healthy


def seeded(params: SamplingParams, n: int) -> list[SamplingParams]:
    """n copies of the settings for n choices; with a seed, choice i draws from seed + i so they differ."""
    from dataclasses import replace

    if params.seed is None:
        return [params] * n
    return [replace(params, seed=(params.seed + i) % 2**63) for i in range(n)]


def make_server(model, tokenizer, name: str, engine_config=None, limits: Limits | None = None) -> ModelServer:
    """A ModelServer over a fresh engine thread for `model` (stop strings decoded with `tokenizer`); `limits`:
    what a client may ask (default `Limits()`)."""
    from nanoseek.engine.engine import Engine

    engine = Engine(model, engine_config, eos_ids=tokenizer.stop_token_ids, detokenize=tokenizer.decode)
    async_engine = AsyncEngine(engine)
    # a compiled decode step compiled (on the engine's thread) and its thread plan measured (adaptive threads)
    # before the first client is taken
    async_engine.ready.wait()
    if async_engine.startup_error is not None:
        raise async_engine.startup_error
    return ModelServer(async_engine, tokenizer, name, Metrics(), limits=limits)
