"""OpenAI's chat completions and completions on a ModelServer: a request becomes engine requests, their text
deltas become a response or a stream of SSE chunks (`data: {json}`, then `data: [DONE]`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from nanoseek.serve import protocol_openai as p
from nanoseek.serve.errors import APIError
from nanoseek.serve.prompt_logprobs import prompt_logprobs
from nanoseek.serve.reasoning import ReasoningParser, starts_in_reasoning
from nanoseek.serve.serving import ChoiceDelta, Generation, ModelServer, TokenLogprob, seeded
from nanoseek.serve.tool_calls import ToolCall, parse_all


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def _with_usage_field(chunk: dict, include_usage: bool) -> dict:
    """With stream_options.include_usage every chunk has "usage": null (the last one carries it); else none."""
    if not include_usage:
        chunk.pop("usage", None)
    return chunk


def sse_error(exc: APIError) -> str:
    return sse({"error": {"message": exc.message, "type": "server_error", "param": exc.param, "code": exc.code}})


# ---- chat completions -------------------------------------------------------------------------------------


async def start_chat(server: ModelServer, req: p.ChatCompletionRequest) -> tuple[Generation, bool]:
    """Submit the request's choices; returns the generation and whether replies start inside reasoning."""
    adapter = server.resolve_model(req.model)
    tools, choice = (req.openai_tools() if req.uses_tools else None), req.openai_tool_choice()
    constraint = await server.structured.for_request(req.response_format, server.tool_parser, tools, choice)
    ids, text = await server.chat_prompt(req.template_messages(), req.add_generation_prompt, **req.template_kwargs())
    max_tokens = server.max_tokens(req.requested_max_tokens, len(ids))
    params = replace(req.sampling_params(max_tokens, req.num_logprobs, server.vocab_size), constraint=constraint,
                     lora=adapter)  # fmt: skip
    return server.generate([(ids, q) for q in seeded(params, req.n)]), starts_in_reasoning(text)


def chat_logprobs(items: list[TokenLogprob]) -> p.ChoiceLogprobs:
    return p.ChoiceLogprobs(
        content=[
            p.TokenLogprob(
                token=t.token, logprob=t.logprob, bytes=list(t.token.encode()),
                top_logprobs=[p.TopLogprob(token=s, logprob=lp, bytes=list(s.encode())) for s, lp in t.top],
            )
            for t in items
        ]
    )  # fmt: skip


async def chat_response(
    server: ModelServer, req: p.ChatCompletionRequest, gen: Generation, in_reasoning: bool
) -> p.ChatCompletion:
    texts, logprobs, finish = [[] for _ in range(req.n)], [[] for _ in range(req.n)], [None] * req.n
    async for delta in gen:
        texts[delta.index].append(delta.text)
        logprobs[delta.index] += delta.logprobs
        finish[delta.index] = delta.finish_reason or finish[delta.index]
    choices = []
    for i in range(req.n):
        parser = ReasoningParser(in_reasoning)
        parts = [parser.feed("".join(texts[i])), parser.finish()]
        reasoning, content = "".join(r for r, _ in parts), "".join(c for _, c in parts)
        tool_parser = _tool_parser(server, req)
        calls = []
        if tool_parser is not None:
            content, calls = parse_all(tool_parser, content)
        message = p.AssistantMessage(
            content=content if content or not (reasoning or calls) else None,
            reasoning_content=(reasoning or None) if req.include_reasoning else None,
            tool_calls=[_tool_call(c) for c in calls],
        )
        lp = chat_logprobs(logprobs[i]) if req.logprobs else None
        reason = "tool_calls" if calls and finish[i] != "abort" else finish[i]
        choices.append(p.ChatChoice(index=i, message=message, logprobs=lp, finish_reason=reason))
    return p.ChatCompletion(
        id=p.new_id("chatcmpl"), created=p.now(), model=server.model_name(req.model), choices=choices,
        usage=p.usage(gen.prompt_tokens, gen.completion_tokens),
    )  # fmt: skip


async def chat_stream(
    server: ModelServer, req: p.ChatCompletionRequest, gen: Generation, in_reasoning: bool
) -> AsyncIterator[str]:
    cid, created, model = p.new_id("chatcmpl"), p.now(), server.model_name(req.model)

    def chunk(index: int, delta: p.ChatDelta, logprobs=None, finish_reason=None) -> str:
        choice = p.ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason)
        body = p.ChatCompletionChunk(id=cid, created=created, model=model, choices=[choice]).model_dump()
        body["choices"][0]["delta"] = delta.model_dump(exclude_unset=True)  # only the fields this chunk carries
        return sse(_with_usage_field(body, req.include_usage))

    parsers = [ReasoningParser(in_reasoning) for _ in range(req.n)]
    tool_parsers = [_tool_parser(server, req) for _ in range(req.n)]
    num_calls = [0] * req.n

    def tool_events(i: int, content: str, final: bool) -> tuple[str, list[dict]]:
        """The content text and the tool-call deltas in this piece of answer text."""
        if tool_parsers[i] is None:
            return content, []
        found = tool_parsers[i].feed(content) + (tool_parsers[i].finish() if final else [])
        texts, calls = [], []
        for e in found:
            if isinstance(e, str):
                texts.append(e)
            else:
                calls.append({"index": num_calls[i], **_tool_call(e).model_dump()})
                num_calls[i] += 1
        return "".join(texts), calls

    async def events() -> AsyncIterator[str]:
        for i in range(req.n):
            yield chunk(i, p.ChatDelta(role="assistant", content=""), None, None)
        async for d in gen:
            final = d.finish_reason is not None
            reasoning, content = parsers[d.index].feed(d.text)
            if final:
                r, c = parsers[d.index].finish()
                reasoning, content = reasoning + r, content + c
            content, calls = tool_events(d.index, content, final)
            fields: dict = {"content": content} if content else {}
            if reasoning and req.include_reasoning:
                fields["reasoning_content"] = reasoning
            lp = chat_logprobs(d.logprobs) if req.logprobs and d.logprobs else None
            if fields or lp is not None:
                yield chunk(d.index, p.ChatDelta(**fields), lp, None)
            if calls:
                yield chunk(d.index, p.ChatDelta(tool_calls=calls), None, None)
            if final:
                reason = "tool_calls" if num_calls[d.index] and d.finish_reason != "abort" else d.finish_reason
                yield chunk(d.index, p.ChatDelta(), None, reason)

    def usage_chunk(usage: p.Usage) -> p.ChatCompletionChunk:
        return p.ChatCompletionChunk(id=cid, created=created, model=model, choices=[], usage=usage)

    async for event in _framed(events(), gen, usage_chunk if req.include_usage else None):
        yield event


def _tool_parser(server: ModelServer, req: p.ChatCompletionRequest):
    """A fresh tool-call parser for one choice when the request offers tools and the template has a format."""
    return server.tool_parser() if req.uses_tools and server.tool_parser is not None else None


def _tool_call(call: ToolCall) -> p.ToolCall:
    return p.ToolCall(id=call.id, function=p.ToolCallFunction(name=call.name, arguments=call.arguments_json))


async def _framed(events: AsyncIterator[str], gen: Generation, usage_chunk) -> AsyncIterator[str]:
    """OpenAI's stream framing around a request's chunks: with include_usage (`usage_chunk` given) a last
    chunk with no choices and the usage; an error event if the request fails midway; always `data: [DONE]`."""
    try:
        async for event in events:
            yield event
        if usage_chunk is not None:
            yield sse(usage_chunk(p.usage(gen.prompt_tokens, gen.completion_tokens)).model_dump())
    except APIError as exc:
        yield sse_error(exc)
    finally:
        gen.close()
    yield sse("[DONE]")


# ---- completions ------------------------------------------------------------------------------------------


@dataclass
class EchoedPrompt:
    """What `echo` puts before a choice's text: the prompt, and with logprobs its own tokens' logprobs."""

    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


async def start_completion(server: ModelServer, req: p.CompletionRequest) -> tuple[Generation, list[EchoedPrompt]]:
    """Submit n choices per prompt; returns the generation and the prompts (for echo)."""
    adapter = server.resolve_model(req.model)
    constraint = await server.structured.constraint(req.response_format)
    prompts, echoed = [], []
    for prompt in req.prompts():
        if isinstance(prompt, str):
            ids, text = await server.encode(prompt), prompt
        else:
            ids = server.check_tokens(prompt, "prompt")
            text = server.tokenizer.decode(ids) if req.echo else ""
        max_tokens = server.max_tokens(req.max_tokens, len(ids), "prompt")
        params = replace(req.sampling_params(max_tokens, req.logprobs, server.vocab_size), constraint=constraint,
                         lora=adapter)  # fmt: skip
        if req.echo and req.logprobs is not None and max_tokens == 1:
            # a scoring request: its one reply token is listed even when it is end-of-sequence, so the logprobs
            # always hold prompt + 1 entries (lm-evaluation-harness drops the last one by position, as on vLLM)
            params = replace(params, ignore_eos=True)
        prompts.append((ids, params))
        echoed.append(EchoedPrompt(text))
    if req.echo and req.logprobs is not None:  # log-likelihood scoring (lm-evaluation-harness): before submitting
        server.limits.check_echo_logprobs(sum(len(ids) for ids, _ in prompts))
        model = server.engine.engine.runner.model
        for (ids, _), e in zip(prompts, echoed):
            e.logprobs = await asyncio.to_thread(prompt_logprobs, model, ids, req.logprobs, server.token_text,
                                                 lora=adapter)  # fmt: skip
    requests = [(ids, q) for ids, params in prompts for q in seeded(params, req.n)]
    return server.generate(requests), echoed


class CompletionLogprobs:
    """The legacy logprobs layout: parallel lists, and each token's offset in the choice's text."""

    def __init__(self, offset: int = 0):
        self.offset = offset

    def take(self, items: list[TokenLogprob]) -> p.CompletionLogprobs:
        offsets = []
        for t in items:
            offsets.append(self.offset)
            self.offset += len(t.token)
        return p.CompletionLogprobs(
            tokens=[t.token for t in items], token_logprobs=[t.logprob for t in items],
            top_logprobs=[None if t.logprob is None else dict(t.top) for t in items], text_offset=offsets,
        )  # fmt: skip


def _prefix(req: p.CompletionRequest, prompts: list[EchoedPrompt], index: int) -> EchoedPrompt:
    return prompts[index // req.n] if req.echo else EchoedPrompt("")


async def completion_response(
    server: ModelServer, req: p.CompletionRequest, gen: Generation, prompts: list[EchoedPrompt]
) -> p.Completion:
    count = len(prompts) * req.n
    deltas: list[list[ChoiceDelta]] = [[] for _ in range(count)]
    async for d in gen:
        deltas[d.index].append(d)
    choices = []
    for i, ds in enumerate(deltas):
        prefix = _prefix(req, prompts, i)
        items = [t for d in ds for t in d.logprobs]
        lp = None
        if req.logprobs is not None:  # the echoed prompt's tokens (if any) come first, from offset 0
            lp = CompletionLogprobs(0 if prefix.logprobs else len(prefix.text)).take(prefix.logprobs + items)
        finish = next((d.finish_reason for d in reversed(ds) if d.finish_reason), None)
        text = prefix.text + "".join(d.text for d in ds)
        choices.append(p.CompletionChoice(index=i, text=text, logprobs=lp, finish_reason=finish))
    return p.Completion(
        id=p.new_id("cmpl"), created=p.now(), model=server.model_name(req.model), choices=choices,
        usage=p.usage(gen.prompt_tokens, gen.completion_tokens),
    )  # fmt: skip


async def completion_stream(
    server: ModelServer, req: p.CompletionRequest, gen: Generation, prompts: list[EchoedPrompt]
) -> AsyncIterator[str]:
    cid, created = p.new_id("cmpl"), p.now()
    count = len(prompts) * req.n
    offsets = [CompletionLogprobs() for _ in range(count)]

    def chunk(index: int, text: str, logprobs=None, finish_reason=None) -> str:
        choice = p.CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish_reason)
        body = p.Completion(id=cid, created=created, model=server.model_name(req.model), choices=[choice]).model_dump()
        return sse(_with_usage_field(body, req.include_usage))

    async def events() -> AsyncIterator[str]:
        for i in range(count):
            prefix = _prefix(req, prompts, i)
            if prefix.text:
                lp = offsets[i].take(prefix.logprobs) if req.logprobs is not None and prefix.logprobs else None
                offsets[i].offset = len(prefix.text)
                yield chunk(i, prefix.text, lp)
        async for d in gen:
            lp = offsets[d.index].take(d.logprobs) if req.logprobs is not None else None
            yield chunk(d.index, d.text, lp, d.finish_reason)

    def usage_chunk(usage: p.Usage) -> p.Completion:
        return p.Completion(id=cid, created=created, model=server.model_name(req.model), choices=[], usage=usage)

    async for event in _framed(events(), gen, usage_chunk if req.include_usage else None):
        yield event
