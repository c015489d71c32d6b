"""OpenAI's Responses API on a ModelServer. A request is rendered and submitted as a chat completion is (the chat
template, structured output, tool calls); the reply's text deltas are split into reasoning, answer text and
function calls (reasoning.py, tool_calls.py) and become output items: `reasoning`, `message` (one `output_text`
part) and `function_call`, in the order the model wrote them.

One writer (`OutputWriter`) builds the items and the stream's events both, so a response returned whole is the
one the stream would have ended with. The stream: response.created, response.in_progress; per item
response.output_item.added, its content (content_part.added, output_text.delta ..., output_text.done,
content_part.done; reasoning_text.* for reasoning; function_call_arguments.delta / .done for a call),
response.output_item.done; then response.completed, or response.incomplete when max_output_tokens cut the reply
(the API's terminal events), each with the usage. Every event has a sequence_number. A reply the server cut
off (it is shutting down) ends the stream with response.failed, and is a 503 when returned whole.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace

from nanoseek.serve import protocol_responses as r
from nanoseek.serve.errors import APIError
from nanoseek.serve.reasoning import ReasoningParser, starts_in_reasoning
from nanoseek.serve.serving import Generation, ModelServer
from nanoseek.serve.tool_calls import ToolCall

CUT_OFF = "the server stopped before the reply was finished (it is shutting down); send the request again"


def sse(data: dict) -> str:
    return f"event: {data['type']}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


async def start_response(server: ModelServer, req: r.ResponsesRequest) -> tuple[Generation, bool]:
    """Submit the request; returns the generation and whether the reply starts inside reasoning."""
    server.check_model(req.model)
    tools = req.chat_tools() if req.uses_tools else None
    constraint = await server.structured.for_request(req.response_format(), server.tool_parser, tools,
                                                     req.chat_tool_choice())  # fmt: skip
    ids, text = await server.chat_prompt(req.template_messages(), **req.template_kwargs())
    room = server.context_length - len(ids)
    if req.max_output_tokens is not None and 0 < room < req.max_output_tokens:  # (room < 1: max_tokens says so)
        raise APIError(400, f"the input ({len(ids)} tokens) plus max_output_tokens ({req.max_output_tokens}) exceed "
                       f"the model's context of {server.context_length} tokens", "max_output_tokens",
                       "context_length_exceeded")  # fmt: skip
    max_tokens = server.max_tokens(req.max_output_tokens, len(ids), "input")
    params = replace(req.sampling_params(max_tokens), constraint=constraint)
    return server.generate([(ids, params)]), starts_in_reasoning(text)


class OutputWriter:
    """Output items from the reply's pieces, in order; each method returns the stream events it makes (the
    `events` counter numbers them). A change of kind closes the open item; a call is a whole item."""

    def __init__(self):
        self.items: list[r.OutputItem] = []
        self.open: r.ReasoningOutput | r.OutputMessage | None = None
        self.sequence = 0

    def event(self, kind: str, **fields) -> dict:
        self.sequence += 1
        return {"type": kind, "sequence_number": self.sequence - 1, **fields}

    @property
    def index(self) -> int:
        return len(self.items)

    def reasoning(self, text: str) -> list[dict]:
        if not text:
            return []
        events = [] if isinstance(self.open, r.ReasoningOutput) else self._start(r.ReasoningOutput(id=r.new_id("rs")))
        part = self.open.content[0]  # type: ignore[union-attr]
        part.text += text
        return events + [self.event("response.reasoning_text.delta", item_id=self.open.id, output_index=self.index,
                                    content_index=0, delta=text)]  # fmt: skip

    def text(self, text: str) -> list[dict]:
        if not text:
            return []
        events = [] if isinstance(self.open, r.OutputMessage) else self._start(r.OutputMessage(id=r.new_id("msg")))
        self.open.content[0].text += text  # type: ignore[union-attr]
        return events + [self.event("response.output_text.delta", item_id=self.open.id, output_index=self.index,
                                    content_index=0, delta=text, logprobs=[])]  # fmt: skip

    def call(self, call: ToolCall) -> list[dict]:
        """A whole function_call item: added (no arguments yet), the arguments as one delta, done."""
        events = self.close()
        item = r.FunctionCallOutput(id=r.new_id("fc"), call_id=call.id, name=call.name,
                                    arguments=call.arguments_json)  # fmt: skip
        at = {"item_id": item.id, "output_index": self.index}
        added = item.model_copy(update={"arguments": "", "status": "in_progress"})
        events += [self.event("response.output_item.added", output_index=self.index, item=added.model_dump()),
                   self.event("response.function_call_arguments.delta", **at, delta=item.arguments),
                   self.event("response.function_call_arguments.done", **at, arguments=item.arguments),
                   self.event("response.output_item.done", output_index=self.index,
                              item=item.model_dump())]  # fmt: skip
        self.items.append(item)
        return events

    def close(self, status: str = "completed") -> list[dict]:
        """Finish the open item (`status`: how the reply ended for it)."""
        item, self.open = self.open, None
        if item is None:
            return []
        item.status = status  # type: ignore[assignment]
        part = item.content[0]
        at = {"item_id": item.id, "output_index": self.index, "content_index": 0}
        if isinstance(item, r.ReasoningOutput):
            events = [self.event("response.reasoning_text.done", **at, text=part.text)]
        else:
            events = [self.event("response.output_text.done", **at, text=part.text, logprobs=[])]
        events += [self.event("response.content_part.done", **at, part=part.model_dump()),
                   self.event("response.output_item.done", output_index=self.index,
                              item=item.model_dump())]  # fmt: skip
        self.items.append(item)
        return events

    def finish(self, status: str) -> list[dict]:
        """The end of the reply: close the open item; a reply with no item at all gets an empty message (as chat's
        content is "" then)."""
        events = [] if self.items or self.open else self._start(r.OutputMessage(id=r.new_id("msg")))
        return events + self.close(status)

    def _start(self, item: r.ReasoningOutput | r.OutputMessage) -> list[dict]:
        events = self.close()
        empty = r.ReasoningOutputText(text="") if isinstance(item, r.ReasoningOutput) else r.OutputText(text="")
        added = item.model_copy(update={"status": "in_progress"})
        events.append(self.event("response.output_item.added", output_index=self.index, item=added.model_dump()))
        item.content = [empty.model_copy()]  # type: ignore[list-item]
        events.append(self.event("response.content_part.added", item_id=item.id, output_index=self.index,
                                 content_index=0, part=empty.model_dump()))  # fmt: skip
        self.open = item
        return events


class Reply:
    """A running reply: its text deltas through the reasoning and tool-call parsers into an OutputWriter."""

    def __init__(self, server: ModelServer, req: r.ResponsesRequest, gen: Generation, in_reasoning: bool):
        self.server, self.req, self.gen = server, req, gen
        self.response = r.new_response(req, server.name)
        self.writer = OutputWriter()
        self.reasoning = ReasoningParser(in_reasoning)
        self.tools = server.tool_parser() if req.uses_tools and server.tool_parser is not None else None
        self.finish: str | None = None
        self.reasoning_tokens = 0  # tokens generated up to the last reasoning text

    def lifecycle(self, kind: str) -> dict:
        return self.writer.event(kind, response=self.response.model_dump())

    async def events(self) -> AsyncIterator[dict]:
        """The output events, as the reply comes; then the items are closed and the response is whole. Raises
        APIError(503) if the reply was cut off."""
        async for d in self.gen:
            final = d.finish_reason is not None
            pieces = [self.reasoning.feed(d.text)] + ([self.reasoning.finish()] if final else [])
            for i, (reasoning, content) in enumerate(pieces):
                if reasoning:
                    self.reasoning_tokens = d.num_tokens
                for event in self.writer.reasoning(reasoning):
                    yield event
                last = final and i == len(pieces) - 1  # the tool parser finishes once, after the reply's last text
                found = [content] if self.tools is None else self.tools.feed(content) + (
                    self.tools.finish() if last else [])  # fmt: skip
                for e in found:
                    for event in self.writer.text(e) if isinstance(e, str) else self.writer.call(e):
                        yield event
            self.finish = d.finish_reason or self.finish
        if self.finish == "abort":
            raise APIError(503, CUT_OFF)
        cut = self.finish == "length"
        for event in self.writer.finish("incomplete" if cut else "completed"):
            yield event
        self.response = self.response.model_copy(update={
            "status": "incomplete" if cut else "completed", "completed_at": None if cut else time.time(),
            "incomplete_details": r.IncompleteDetails(reason="max_output_tokens") if cut else None,
            "output": self.writer.items,
            "usage": r.usage(self.gen.prompt_tokens, self.gen.completion_tokens, self.reasoning_tokens)})  # fmt: skip


async def response_whole(server: ModelServer, req: r.ResponsesRequest, gen: Generation, in_reasoning: bool):
    reply = Reply(server, req, gen, in_reasoning)
    async for _ in reply.events():
        pass
    return reply.response


async def response_stream(
    server: ModelServer, req: r.ResponsesRequest, gen: Generation, in_reasoning: bool
) -> AsyncIterator[str]:
    reply = Reply(server, req, gen, in_reasoning)
    yield sse(reply.lifecycle("response.created"))
    yield sse(reply.lifecycle("response.in_progress"))
    try:
        async for event in reply.events():
            yield sse(event)
    except APIError as exc:
        failed = "server_error" if exc.status >= 500 else "invalid_prompt"
        reply.response = reply.response.model_copy(update={
            "status": "failed", "error": r.ErrorDetail(code=failed, message=exc.message),
            "output": reply.writer.items,
            "usage": r.usage(gen.prompt_tokens, gen.completion_tokens, reply.reasoning_tokens)})  # fmt: skip
        yield sse(reply.lifecycle("response.failed"))
        return
    finally:
        gen.close()
    yield sse(reply.lifecycle("response.incomplete" if reply.response.status == "incomplete" else "response.completed"))
