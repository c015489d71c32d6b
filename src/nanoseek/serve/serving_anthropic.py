"""Anthropic's Messages API on a ModelServer: a reply's text deltas become thinking and text content blocks,
returned whole or streamed as SSE events (message_start, content_block_start / _delta / _stop, message_delta
with the stop reason and usage, message_stop)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import replace

from nanoseek.serve import protocol_anthropic as a
from nanoseek.serve.errors import ANTHROPIC_TYPES, APIError
from nanoseek.serve.reasoning import ReasoningParser, starts_in_reasoning
from nanoseek.serve.serving import Generation, ModelServer
from nanoseek.serve.tool_calls import parse_all


def event(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, ensure_ascii=False)}\n\n"


async def start_message(server: ModelServer, req: a.MessagesRequest) -> tuple[Generation, bool]:
    adapter = server.resolve_model(req.model)
    tools = req.template_kwargs().get("tools") if req.uses_tools else None
    choice = a.openai_tool_choice(req.tool_choice) if req.tool_choice else None
    constraint = await server.structured.for_request(None, server.tool_parser, tools, choice)
    ids, text = await server.chat_prompt(req.template_messages(), **req.template_kwargs())
    max_tokens = server.max_tokens(req.max_tokens, len(ids))
    params = replace(req.sampling_params(max_tokens), constraint=constraint, lora=adapter)
    return server.generate([(ids, params)]), starts_in_reasoning(text)


async def count_tokens(server: ModelServer, req: a.CountTokensRequest) -> a.CountTokensResponse:
    server.resolve_model(req.model)  # an adapter counts as its base: the same tokenizer
    ids, _ = await server.chat_prompt(req.template_messages(), **req.template_kwargs())
    return a.CountTokensResponse(input_tokens=len(ids))


def _tool_parser(server: ModelServer, req: a.MessagesRequest):
    """A fresh tool-call parser when the request offers tools and the template has a tool-call format."""
    return server.tool_parser() if req.uses_tools and server.tool_parser is not None else None


async def message_response(
    server: ModelServer, req: a.MessagesRequest, gen: Generation, in_reasoning: bool
) -> a.MessageResponse:
    parser, text, finish, stop = ReasoningParser(in_reasoning), [], None, None
    async for d in gen:
        text.append(d.text)
        finish, stop = d.finish_reason or finish, d.stop_reason
    if finish == "abort":
        raise APIError(a.CUT_OFF_STATUS, a.CUT_OFF)
    parts = [parser.feed("".join(text)), parser.finish()]
    reasoning, content = "".join(r for r, _ in parts), "".join(c for _, c in parts)
    tool_parser, calls = _tool_parser(server, req), []
    if tool_parser is not None:
        content, calls = parse_all(tool_parser, content)
    blocks: list = [a.ThinkingBlock(thinking=reasoning)] if reasoning else []
    if content or not (reasoning or calls):
        blocks.append(a.TextBlock(text=content))
    blocks += [a.tool_use_block(c) for c in calls]
    return a.MessageResponse(
        id=a.new_message_id(), model=server.model_name(req.model), content=blocks,
        stop_reason=a.stop_reason(finish, stop, bool(calls)), stop_sequence=stop if isinstance(stop, str) else None,
        usage=a.Usage(input_tokens=gen.prompt_tokens, output_tokens=gen.completion_tokens),
    )  # fmt: skip


class BlockWriter:
    """Opens, fills and closes content blocks as reasoning and answer text arrive: a change of kind closes the
    open block and starts the next one."""

    DELTA = {"thinking": ("thinking_delta", "thinking"), "text": ("text_delta", "text")}

    def __init__(self):
        self.index = -1
        self.kind: str | None = None

    def write(self, kind: str, text: str) -> list[str]:
        if not text:
            return []
        events = []
        if kind != self.kind:
            events += self.close()
            self.index, self.kind = self.index + 1, kind
            block = {"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking" else {
                "type": "text", "text": ""}  # fmt: skip
            events.append(event("content_block_start", {"index": self.index, "content_block": block}))
        delta_type, field = self.DELTA[kind]
        events.append(event("content_block_delta", {"index": self.index, "delta": {"type": delta_type, field: text}}))
        return events

    def close(self) -> list[str]:
        if self.kind is None:
            return []
        self.kind = None
        return [event("content_block_stop", {"index": self.index})]

    def tool_use(self, call) -> list[str]:
        """A whole tool_use block: start (empty input), the input as one input_json_delta, stop."""
        block = a.tool_use_block(call)
        events = self.close()
        self.index += 1
        start = {**block.model_dump(), "input": {}}
        partial = json.dumps(block.input, ensure_ascii=False)
        events.append(event("content_block_start", {"index": self.index, "content_block": start}))
        events.append(
            event(
                "content_block_delta",
                {"index": self.index, "delta": {"type": "input_json_delta", "partial_json": partial}},
            )
        )
        events.append(event("content_block_stop", {"index": self.index}))
        return events


async def message_stream(
    server: ModelServer, req: a.MessagesRequest, gen: Generation, in_reasoning: bool
) -> AsyncIterator[str]:
    message = a.MessageResponse(
        id=a.new_message_id(), model=server.model_name(req.model), content=[], stop_reason=None, stop_sequence=None,
        usage=a.Usage(input_tokens=gen.prompt_tokens, output_tokens=0),
    )  # fmt: skip
    yield event("message_start", {"message": message.model_dump()})
    parser, blocks, tool_parser = ReasoningParser(in_reasoning), BlockWriter(), _tool_parser(server, req)
    finish = stop = None
    num_calls = 0
    try:
        async for d in gen:
            pieces = [parser.feed(d.text)] + ([parser.finish()] if d.finish_reason else [])
            for reasoning, content in pieces:
                lines = blocks.write("thinking", reasoning)
                if tool_parser is None:
                    lines += blocks.write("text", content)
                else:
                    found = tool_parser.feed(content) + (tool_parser.finish() if d.finish_reason else [])
                    for e in found:
                        if isinstance(e, str):
                            lines += blocks.write("text", e)
                        else:
                            lines += blocks.tool_use(e)
                            num_calls += 1
                for line in lines:
                    yield line
            finish, stop = d.finish_reason or finish, d.stop_reason
        if finish == "abort":  # no message_delta: its stop_reason would say the reply is whole
            raise APIError(a.CUT_OFF_STATUS, a.CUT_OFF)
    except APIError as exc:
        yield event("error", {"error": {"type": ANTHROPIC_TYPES.get(exc.status, "api_error"), "message": exc.message}})
        return
    finally:
        gen.close()
    for line in blocks.close():
        yield line
    delta = {"stop_reason": a.stop_reason(finish, stop, num_calls > 0),
             "stop_sequence": stop if isinstance(stop, str) else None}  # fmt: skip
    yield event("message_delta", {"delta": delta, "usage": {"output_tokens": gen.completion_tokens}})
    yield event("message_stop", {})
