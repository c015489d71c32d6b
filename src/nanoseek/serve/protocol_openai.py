"""OpenAI's chat completions and completions APIs: request and response models, and the conversion of a
request to the engine's SamplingParams.

Fields follow https://platform.openai.com/docs/api-reference/chat and .../completions, plus what vLLM accepts
beside them (top_k, min_p, repetition_penalty, stop_token_ids, ignore_eos, chat_template_kwargs). Unknown
fields are accepted (clients send newer ones) and logged by the app.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator
from pydantic_core import PydanticCustomError

from nanoseek.engine.sampling import SamplingParams
from nanoseek.serve.errors import APIError
from nanoseek.serve.tool_calls import template_tool_calls
from nanoseek.tokenizer import TEMPLATE_OWN_VARIABLES

SEED_RANGE = dict(ge=-(2**63), lt=2**63)
# Names chat_template_kwargs may not set: the variables the renderer passes the template itself, the parameters
# of the functions on the way (a clash is a TypeError there), and what the request's own fields set.
RESERVED_TEMPLATE_KWARGS = TEMPLATE_OWN_VARIABLES | {"self", "template", "source", "tools", "tool_choice"}


class Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


# ---- requests ---------------------------------------------------------------------------------------------

_SURROGATE = re.compile("[\ud800-\udfff]")


def check_json_values(body: Any) -> None:
    """A 400 at the first string (key or value) that is not Unicode text, and at the first number that is not
    finite, anywhere in a parsed JSON body, known fields or not.

    JSON's `\\ud800` escape lets a body carry a lone surrogate, which no tokenizer, template or UTF-8 encoder
    takes (each fails with its own TypeError or UnicodeEncodeError, deep in the request). Python's JSON parser
    reads NaN and Infinity, which JSON does not have, and turns 1e400 into inf. Walked without recursion: a
    deeply nested body cannot exhaust the stack."""
    stack: list[tuple[Any, tuple]] = [(body, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                raise APIError(400, f"invalid unicode: lone surrogate in {_where(path)}", _where(path))
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise APIError(400, f"invalid number: {_where(path)} is {value} (JSON numbers are finite)",
                               _where(path))  # fmt: skip
        elif isinstance(value, dict):
            if any(_SURROGATE.search(key) for key in value):  # the key is not shown: it is what cannot be written
                raise APIError(400, f"invalid unicode: lone surrogate in a key of {_where(path)}", _where(path))
            stack.extend(reversed([(item, (*path, key)) for key, item in value.items()]))  # popped in order
        elif isinstance(value, list):  # (ints, the bulk of a token-id prompt, need no look)
            stack.extend(reversed([(item, (*path, i)) for i, item in enumerate(value) if not isinstance(item, int)]))


def _where(path: tuple) -> str:
    """A position in a JSON body as clients write it: messages[0].content."""
    out = ""
    for key in path:
        out += f"[{key}]" if isinstance(key, int) else f".{key}" if out else key
    return out or "the request body"


def body_error(message: str, param: str) -> APIError:
    """A 400 from a check across a body's fields. Raised as is from a model validator (pydantic passes it through):
    pydantic's own error would have no field to name and read as if the body were not an object."""
    return APIError(400, message, param)


class RequestBody(Lenient):
    """A request body: every string in it is Unicode text and every number finite (check_json_values), checked
    once here for all routes and every field, before any field is looked at."""

    @model_validator(mode="before")
    @classmethod
    def _valid_json_values(cls, data: Any) -> Any:
        check_json_values(data)
        return data


def check_token_ids(ids: Iterable[int], vocab_size: int, param: str) -> list[int]:
    """`ids` as a list, or a 400 naming `param` at the first id outside [0, vocab_size)."""
    ids = list(ids)
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise APIError(400, f"{param}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})", param)
    return ids


class ContentPart(Lenient):
    type: str
    text: str | None = None


class FunctionCall(Lenient):
    name: str
    arguments: str | dict[str, Any] | None = None  # OpenAI sends a JSON string; some clients send the object


class MessageToolCall(Lenient):
    """A call an earlier assistant message made (sent back with the conversation)."""

    id: str | None = None
    type: str = "function"
    function: FunctionCall


class ChatMessage(Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    def text(self) -> str:
        """The message's text; only text parts are supported (this server has no image or audio input)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        texts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise APIError(400, f"content parts of type {part.type!r} are not supported (text only)", "messages")
            texts.append(part.text)
        return "".join(texts)

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates expect it (plain-string content; "developer" is a system message)."""
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        for key in ("name", "tool_call_id", "reasoning_content"):
            if getattr(self, key) is not None:
                message[key] = getattr(self, key)
        if self.tool_calls:  # as sent (exclude_unset): templates test which keys a call has
            message["tool_calls"] = template_tool_calls([c.model_dump(exclude_unset=True) for c in self.tool_calls])
        return message


class StreamOptions(Lenient):
    include_usage: bool = False


class ResponseFormat(Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class NamedFunction(Lenient):
    name: str


class FunctionDefinition(NamedFunction):
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments


class Tool(Lenient):
    """An offered tool: a function (other types, newer OpenAI ones, reach the template as they are)."""

    type: str = "function"
    function: FunctionDefinition | None = None

    @model_validator(mode="after")
    def _function_needs_its_definition(self):
        if self.type == "function" and self.function is None:
            raise ValueError('a tool of type "function" needs function: {"name": ...}')
        return self


class ToolChoice(Lenient):
    """tool_choice as an object: {"type": "function", "function": {"name": ...}} forces that function; other
    types (newer OpenAI ones) reach the template as they are."""

    type: str
    function: NamedFunction | None = None

    @model_validator(mode="after")
    def _function_needs_a_name(self):
        if self.type == "function" and self.function is None:
            raise ValueError('a tool_choice of type "function" needs function: {"name": ...}')
        return self


def _str_or_object(value: Any) -> str:
    """Which form of a string-or-object field a value is meant as: its errors are that form's only."""
    return "name" if isinstance(value, str) else "object"


class SamplingFields(RequestBody):
    """The sampling fields both OpenAI endpoints share (with vLLM's extensions)."""

    model: str | None = None
    n: int = Field(1, ge=1, le=128)
    seed: int | None = Field(None, **SEED_RANGE)
    stop: str | list[str] | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM: -1 or 0 = no limit
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    logit_bias: dict[str, float] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None  # json_object / json_schema: constrained decoding

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise body_error("stream_options is only allowed when stream is true", "stream_options")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in stops if s)  # an empty stop string would end every reply at once

    def sampling_params(self, max_tokens: int, logprobs: int | None, vocab_size: int) -> SamplingParams:
        """The engine's settings; token ids (logit_bias keys, stop_token_ids) must be in the model's vocabulary:
        the engine would ignore one outside it without a word."""
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            try:
                bias[int(key)] = value
            except ValueError:
                raise APIError(400, f"logit_bias keys must be token ids, got {key!r}", "logit_bias") from None
        check_token_ids(bias, vocab_size, "logit_bias")
        return make_params(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(self.top_k or 0, 0),
            min_p=self.min_p or 0.0,
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty or 1.0,
            logit_bias=bias,
            max_tokens=max_tokens,
            stop=self.stop_strings(),
            stop_token_ids=tuple(check_token_ids(self.stop_token_ids or (), vocab_size, "stop_token_ids")),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
        )


def make_params(**fields) -> SamplingParams:
    """SamplingParams, with its own checks turned into a 400."""
    try:
        return SamplingParams(**fields)
    except ValueError as exc:
        raise APIError(400, str(exc)) from None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Annotated[Annotated[str, Tag("name")] | Annotated[ToolChoice, Tag("object")],
                           Discriminator(_str_or_object)] | None = None  # fmt: skip
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    include_reasoning: bool = True

    @field_validator("chat_template_kwargs")
    @classmethod
    def _not_reserved(cls, kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
        clash = sorted(set(kwargs or ()) & RESERVED_TEMPLATE_KWARGS)
        if clash:
            raise PydanticCustomError("reserved", "the key '{key}' is reserved: the server sets it itself (from the "
                                      "request's own fields)", {"key": clash[0]})  # fmt: skip
        return kwargs

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise body_error("top_logprobs needs logprobs set to true", "top_logprobs")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.for_template() for m in self.messages]

    @property
    def uses_tools(self) -> bool:
        """Tools are offered (and the reply is parsed for calls): tools given and tool_choice not "none"."""
        return bool(self.tools) and self.tool_choice != "none"

    def openai_tools(self) -> list[dict[str, Any]] | None:
        """The tools as the client sent them (mappings), as templates and the tool parser read them."""
        return None if self.tools is None else [t.model_dump(exclude_unset=True) for t in self.tools]

    def openai_tool_choice(self) -> str | dict[str, Any] | None:
        """tool_choice as the client sent it (a string or a mapping), as templates and the tool parser read it."""
        if isinstance(self.tool_choice, ToolChoice):
            return self.tool_choice.model_dump(exclude_unset=True)
        return self.tool_choice

    def template_kwargs(self) -> dict[str, Any]:
        extra = dict(self.chat_template_kwargs or {})
        if self.uses_tools:
            extra["tools"] = self.openai_tools()
            if self.tool_choice is not None:
                extra["tool_choice"] = self.openai_tool_choice()
        return extra


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for this endpoint
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _unsupported(self):
        if self.suffix:
            raise body_error("suffix is not supported", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise body_error("best_of is not supported (it must be unset or equal n)", "best_of")
        if isinstance(self.prompt, list) and not self.prompt:
            raise body_error("prompt must not be empty", "prompt")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as texts or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class TokenizeRequest(RequestBody):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise body_error("give exactly one of prompt or messages", "prompt")
        return self


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: list[int]


# ---- responses --------------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class ToolCallFunction(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "nanoseek"
    max_model_len: int
    root: str | None = None  # as vLLM: the base model's name, or a LoRA adapter's folder
    parent: str | None = None  # a LoRA adapter's base model (None for the base itself)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
