"""Anthropic's Messages API: request and response models, and the conversion of a request to chat-template
messages and the engine's SamplingParams. Fields follow https://docs.anthropic.com/en/api/messages."""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from nanoseek.engine.sampling import SamplingParams
from nanoseek.serve.errors import APIError
from nanoseek.serve.protocol_openai import Lenient, RequestBody, make_params

# ---- requests ---------------------------------------------------------------------------------------------


class ContentBlock(Lenient):
    type: str
    text: str | None = None
    thinking: str | None = None
    id: str | None = None  # tool_use
    name: str | None = None
    input: dict[str, Any] | None = None
    tool_use_id: str | None = None  # tool_result
    content: str | list[dict[str, Any]] | None = None


class Message(Lenient):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class ThinkingConfig(Lenient):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=0)


class ToolChoice(Lenient):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None  # the tool a "tool" choice forces
    disable_parallel_tool_use: bool | None = None

    @model_validator(mode="after")
    def _tool_needs_a_name(self):
        if self.type == "tool" and self.name is None:
            raise ValueError('a tool_choice of type "tool" needs the tool\'s name')
        return self


class MessagesRequest(RequestBody):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    system: str | list[ContentBlock] | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    thinking: ThinkingConfig | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: ToolChoice | None = None
    metadata: dict[str, Any] | None = None

    def template_messages(self) -> list[dict[str, Any]]:
        return template_messages(self.system, self.messages)

    @property
    def uses_tools(self) -> bool:
        """Tools are offered (and the reply is parsed for tool_use): tools given and tool_choice not "none"."""
        return bool(self.tools) and (self.tool_choice is None or self.tool_choice.type != "none")

    def template_kwargs(self) -> dict[str, Any]:
        extra = template_kwargs(self.thinking, self.tools if self.uses_tools else None)
        if self.uses_tools and self.tool_choice:
            extra["tool_choice"] = openai_tool_choice(self.tool_choice)
        return extra

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        return make_params(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            max_tokens=max_tokens,
            stop=tuple(s for s in self.stop_sequences or () if s),
        )


class CountTokensRequest(RequestBody):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    system: str | list[ContentBlock] | None = None
    thinking: ThinkingConfig | None = None
    tools: list[dict[str, Any]] | None = None

    def template_messages(self) -> list[dict[str, Any]]:
        return template_messages(self.system, self.messages)

    def template_kwargs(self) -> dict[str, Any]:
        return template_kwargs(self.thinking, self.tools)


def template_kwargs(thinking: ThinkingConfig | None, tools: list[dict] | None) -> dict[str, Any]:
    """Extra chat-template variables: `enable_thinking` (the switch reasoning templates read) and `tools` in
    the OpenAI function layout most templates iterate over."""
    extra: dict[str, Any] = {}
    if thinking is not None:
        extra["enable_thinking"] = thinking.type != "disabled"
    if tools:
        extra["tools"] = [
            {"type": "function", "function": {"name": t.get("name"), "description": t.get("description", ""),
                                              "parameters": t.get("input_schema", {})}}
            for t in tools
        ]  # fmt: skip
    return extra


def openai_tool_choice(choice: ToolChoice) -> str | dict[str, Any]:
    """Anthropic's tool_choice in the OpenAI layout templates know: auto, required (Anthropic's "any"), or one
    named function."""
    if choice.type == "tool":
        return {"type": "function", "function": {"name": choice.name}}
    return {"any": "required"}.get(choice.type, choice.type)


def _text_of(blocks: str | list[ContentBlock] | list[dict] | None, param: str) -> str:
    if blocks is None or isinstance(blocks, str):
        return blocks or ""
    texts = []
    for b in blocks:
        kind, text = (b.get("type"), b.get("text")) if isinstance(b, dict) else (b.type, b.text)
        if kind != "text" or text is None:
            raise APIError(400, f"content blocks of type {kind!r} are not supported here (text only)", param)
        texts.append(text)
    return "".join(texts)


def template_messages(system: str | list[ContentBlock] | None, messages: list[Message]) -> list[dict[str, Any]]:
    """Anthropic messages as chat-template messages: a system message first; text, thinking, tool_use and
    tool_result blocks become content, reasoning_content, tool_calls and tool messages."""
    out: list[dict[str, Any]] = []
    if system:
        out.append({"role": "system", "content": _text_of(system, "system")})
    for m in messages:
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        texts, thinking, calls = [], [], []
        for b in m.content:
            if b.type == "text" and b.text is not None:
                texts.append(b.text)
            elif b.type == "thinking" and m.role == "assistant":
                thinking.append(b.thinking or "")
            elif b.type == "redacted_thinking":
                continue
            elif b.type == "tool_use" and m.role == "assistant":
                # arguments as a mapping: templates write them with tojson (tool_calls.template_tool_calls)
                calls.append({"id": b.id, "type": "function", "function": {"name": b.name, "arguments": b.input or {}}})
            elif b.type == "tool_result" and m.role == "user":
                out.append({"role": "tool", "tool_call_id": b.tool_use_id, "content": _text_of(b.content, "messages")})
            else:
                raise APIError(400, f"content blocks of type {b.type!r} are not supported in {m.role} messages",
                               "messages")  # fmt: skip
        if texts or thinking or calls or not any(b.type == "tool_result" for b in m.content):
            message: dict[str, Any] = {"role": m.role, "content": "".join(texts)}
            if thinking:
                message["reasoning_content"] = "".join(thinking)
            if calls:
                message["tool_calls"] = calls
            out.append(message)
    return out


# ---- responses --------------------------------------------------------------------------------------------


class TextBlock(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ThinkingBlock(BaseModel):
    type: Literal["thinking"] = "thinking"
    thinking: str
    signature: str = ""  # Anthropic signs its thinking; an open model has nothing to sign it with


class ToolUseBlock(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int


class MessageResponse(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[TextBlock | ThinkingBlock | ToolUseBlock]
    stop_reason: str | None
    stop_sequence: str | None
    usage: Usage


class CountTokensResponse(BaseModel):
    input_tokens: int


# A reply the server cut off (finish reason "abort": it is shutting down). Anthropic has no stop reason for that
# (`end_turn` would tell the client the reply is whole), so it is an error, as Anthropic's own API reports a reply
# it cannot finish: overloaded_error, which its SDKs retry (on another replica behind a load balancer).
CUT_OFF_STATUS = 503
CUT_OFF = "the server stopped before the reply was finished (it is shutting down); send the request again"


def stop_reason(finish_reason: str | None, stop_string: str | int | None, tool_use: bool = False) -> str | None:
    """The engine's finish reason in Anthropic's terms (`tool_use`: the reply called a tool); None while it runs,
    and for a reply cut off ("abort"), which has none: the caller reports CUT_OFF instead."""
    if finish_reason in (None, "abort"):
        return None
    if tool_use:
        return "tool_use"
    if finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if finish_reason == "stop" and isinstance(stop_string, str) else "end_turn"


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def tool_use_block(call) -> ToolUseBlock:
    """A parsed tool_calls.ToolCall as a tool_use block."""
    return ToolUseBlock(id="toolu_" + call.id.removeprefix("call_"), name=call.name, input=call.arguments)
