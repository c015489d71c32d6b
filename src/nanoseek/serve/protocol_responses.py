"""OpenAI's Responses API (`POST /v1/responses`): request and response models, and the conversion of a request
to chat-template messages and the engine's SamplingParams.

Fields follow https://platform.openai.com/docs/api-reference/responses and the shapes of the official `openai`
SDK's `types/responses/` (its typed parsing is the conformance test). What maps onto the chat-completions path:
`input` (a string, or message / function_call / function_call_output / reasoning items) and `instructions`
become the conversation the chat template renders; `text.format` becomes chat's `response_format`; function
`tools` and `tool_choice` become chat's; `reasoning.effort: "none"` turns a reasoning template's thinking off.

The server is stateless: it keeps no response, so `previous_response_id` and `conversation` are a 400 (send the
whole conversation in `input`, as with `store: false`); `store` is accepted and has no effect. Hosted tools
(web search, file search, ...) and non-text input (images, files) are a 400: nothing here can run or read them.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from nanoseek.engine.sampling import SamplingParams
from nanoseek.serve.errors import APIError
from nanoseek.serve.protocol_openai import Lenient, RequestBody, ResponseFormat, body_error, make_params
from nanoseek.serve.tool_calls import template_tool_calls

# ---- requests ---------------------------------------------------------------------------------------------

TEXT_PARTS = ("input_text", "output_text", "text")  # a client sends back a reply's output_text parts as they came


class ContentPart(Lenient):
    type: str
    text: str | None = None
    refusal: str | None = None  # an assistant's refusal part sent back


def text_of(content: str | list[ContentPart] | None, param: str) -> str:
    """The text of a message's (or a tool output's) content; only text parts (this server reads no images)."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        if part.type in TEXT_PARTS and part.text is not None:
            texts.append(part.text)
        elif part.type == "refusal" and part.refusal is not None:
            texts.append(part.refusal)
        else:
            raise APIError(400, f"content parts of type {part.type!r} are not supported (text only)", param)
    return "".join(texts)


class MessageItem(Lenient):
    """A message: EasyInputMessage (`type` may be left out), an input message, or an output message sent back."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]
    id: str | None = None
    status: str | None = None


class FunctionCallItem(Lenient):
    """A call the model made, sent back with the conversation."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(Lenient):
    """The client's result of a call (matched to it by `call_id`)."""

    type: Literal["function_call_output"]
    call_id: str
    output: str | list[ContentPart]
    id: str | None = None
    status: str | None = None


class ReasoningText(Lenient):
    type: str
    text: str


class ReasoningItem(Lenient):
    """The model's reasoning, sent back: it goes to the next assistant message's `reasoning_content`."""

    type: Literal["reasoning"]
    id: str | None = None
    summary: list[ReasoningText] = Field(default_factory=list)
    content: list[ReasoningText] | None = None
    encrypted_content: str | None = None


ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning")


def _item_type(value: Any) -> str | None:
    """The item's tag: its `type`, "message" when it has none (EasyInputMessage); an unknown type has no tag,
    so pydantic's error lists the ones this server takes."""
    kind = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if kind in ITEM_TYPES else None


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")] | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(_item_type, custom_error_type="invalid_item",
                  custom_error_message=f"an input item's type must be one of {', '.join(ITEM_TYPES)}"),
]  # fmt: skip


class TextFormat(Lenient):
    """`text.format`: plain text, any JSON object, or JSON valid under `schema`."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_needs_one(self):
        if self.type == "json_schema" and self.schema_ is None:
            raise body_error('text.format of type "json_schema" needs a "schema"', "text.format")
        return self

    def response_format(self) -> ResponseFormat:
        """The same constraint in chat's `response_format` layout (structured.py reads that)."""
        if self.type != "json_schema":
            return ResponseFormat(type=self.type)
        return ResponseFormat(type="json_schema", json_schema={"name": self.name, "schema": self.schema_})


class TextConfig(Lenient):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class FunctionTool(Lenient):
    """A function the model may call (the only kind of tool a self-hosted model can be offered)."""

    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _functions_only(self):
        if self.type != "function":
            raise body_error(f"tools of type {self.type!r} are not supported: this server runs no hosted tools "
                             '(only {"type": "function", "name": ...})', "tools")  # fmt: skip
        if not self.name:
            raise body_error('a tool of type "function" needs a "name"', "tools")
        return self

    def for_chat(self) -> dict[str, Any]:
        """The tool in chat's layout, which chat templates and the tool-call parser read."""
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        if self.parameters is not None:
            function["parameters"] = self.parameters
        return {"type": "function", "function": function}


class ToolChoiceFunction(Lenient):
    type: str
    name: str | None = None

    @model_validator(mode="after")
    def _a_named_function(self):
        if self.type != "function" or not self.name:
            raise body_error('tool_choice must be "none", "auto", "required" or {"type": "function", "name": ...}',
                             "tool_choice")  # fmt: skip
        return self


def _str_or_object(value: Any) -> str:
    return "name" if isinstance(value, str) else "object"


class ReasoningConfig(Lenient):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesRequest(RequestBody):
    model: str | None = None
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    text: TextConfig | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Annotated[Annotated[Literal["none", "auto", "required"], Tag("name")]
                           | Annotated[ToolChoiceFunction, Tag("object")],
                           Discriminator(_str_or_object)] | None = None  # fmt: skip
    parallel_tool_calls: bool = True
    reasoning: ReasoningConfig | None = None
    stream: bool = False
    store: bool = True  # accepted; nothing is stored (see the module's docstring)
    background: bool = False
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    truncation: Literal["auto", "disabled"] = "disabled"
    metadata: dict[str, str] | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _stateless(self):
        if self.previous_response_id is not None:
            raise body_error(f"previous response {self.previous_response_id!r} not found: this server keeps no "
                             "responses (it is stateless); send the whole conversation in input",
                             "previous_response_id")  # fmt: skip
        if self.conversation is not None:
            raise body_error("conversations are not supported: this server keeps no state; send the whole "
                             "conversation in input", "conversation")  # fmt: skip
        if self.background:
            raise body_error("background responses are not supported (nothing is stored to poll)", "background")
        if isinstance(self.input, list) and not self.input:
            raise body_error("input must not be empty", "input")
        return self

    @property
    def uses_tools(self) -> bool:
        """Tools are offered (and the reply is parsed for calls): tools given and tool_choice not "none"."""
        return bool(self.tools) and self.tool_choice != "none"

    def chat_tools(self) -> list[dict[str, Any]] | None:
        return [t.for_chat() for t in self.tools] if self.tools else None

    def chat_tool_choice(self) -> str | dict[str, Any] | None:
        """tool_choice in chat's layout (a named function nests under "function")."""
        if isinstance(self.tool_choice, ToolChoiceFunction):
            return {"type": "function", "function": {"name": self.tool_choice.name}}
        return self.tool_choice

    def response_format(self) -> ResponseFormat | None:
        return self.text.format.response_format() if self.text and self.text.format else None

    def template_kwargs(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.reasoning is not None and self.reasoning.effort is not None:
            extra["enable_thinking"] = self.reasoning.effort != "none"
        if self.uses_tools:
            extra["tools"] = self.chat_tools()
            if self.tool_choice is not None:
                extra["tool_choice"] = self.chat_tool_choice()
        return extra

    def template_messages(self) -> list[dict[str, Any]]:
        return template_messages(self.instructions, self.input)

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        return make_params(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            max_tokens=max_tokens,
        )


def template_messages(instructions: str | None, items: str | list) -> list[dict[str, Any]]:
    """The conversation as chat-template messages: the instructions as a system message first; messages as they
    are ("developer" is a system message); a function_call joins the assistant message before it (or starts one),
    with its arguments as a mapping (templates write them with tojson); a function_call_output is a tool message;
    a reasoning item becomes the next assistant message's reasoning_content."""
    out: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    if isinstance(items, str):
        return [*out, {"role": "user", "content": items}]
    reasoning: list[str] = []

    def assistant(new: bool) -> dict[str, Any]:
        """The assistant message to add to: the last one unless `new` or a turn came after it."""
        if new or not out or out[-1]["role"] != "assistant":
            out.append({"role": "assistant", "content": ""})
        if reasoning:
            out[-1]["reasoning_content"] = out[-1].get("reasoning_content", "") + "".join(reasoning)
            reasoning.clear()
        return out[-1]

    for i, item in enumerate(items):
        param = f"input[{i}]"
        if isinstance(item, MessageItem):
            if item.role == "assistant":
                assistant(new=True)["content"] = text_of(item.content, param)
            else:
                out.append({"role": "system" if item.role == "developer" else item.role,
                            "content": text_of(item.content, param)})  # fmt: skip
        elif isinstance(item, FunctionCallItem):
            function = {"name": item.name, "arguments": item.arguments}
            call = {"id": item.call_id, "type": "function", "function": function}
            assistant(new=False).setdefault("tool_calls", []).extend(template_tool_calls([call]))
        elif isinstance(item, FunctionCallOutputItem):
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": text_of(item.output, param)})
        else:  # ReasoningItem
            reasoning.append("".join(part.text for part in item.content or item.summary))
    return out


# ---- responses --------------------------------------------------------------------------------------------


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[dict[str, Any]] = Field(default_factory=list)
    logprobs: list[dict[str, Any]] = Field(default_factory=list)


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"] = "completed"
    content: list[OutputText] = Field(default_factory=list)


class ReasoningOutputText(BaseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class ReasoningOutput(BaseModel):
    """The model's reasoning as a reasoning item: its text in `content` (an open model's thinking is not hidden;
    there is no summary)."""

    id: str
    type: Literal["reasoning"] = "reasoning"
    summary: list[dict[str, Any]] = Field(default_factory=list)
    content: list[ReasoningOutputText] = Field(default_factory=list)
    status: Literal["in_progress", "completed", "incomplete"] = "completed"


class FunctionCallOutput(BaseModel):
    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"] = "completed"


OutputItem = OutputMessage | ReasoningOutput | FunctionCallOutput


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class Usage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


def usage(input_tokens: int, output_tokens: int, reasoning_tokens: int) -> Usage:
    return Usage(input_tokens=input_tokens, output_tokens=output_tokens, total_tokens=input_tokens + output_tokens,
                 output_tokens_details=OutputTokensDetails(reasoning_tokens=reasoning_tokens))  # fmt: skip


class ErrorDetail(BaseModel):
    code: str
    message: str


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class Response(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: float
    completed_at: float | None = None
    status: Literal["completed", "failed", "in_progress", "incomplete"]
    error: ErrorDetail | None = None
    incomplete_details: IncompleteDetails | None = None
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    usage: Usage | None = None
    # the request's settings, echoed as the API does
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    tools: list[dict[str, Any]] = Field(default_factory=list)
    tool_choice: str | dict[str, Any] = "auto"
    parallel_tool_calls: bool = True
    reasoning: dict[str, Any] | None = None
    previous_response_id: None = None
    store: bool = False  # nothing is kept, whatever was asked
    background: bool = False
    truncation: str = "disabled"
    metadata: dict[str, str] = Field(default_factory=dict)
    user: str | None = None


def new_response(req: ResponsesRequest, model: str) -> Response:
    """A response in progress for `req`: no output yet, the request's settings echoed."""
    return Response(
        id=new_id("resp"), created_at=time.time(), status="in_progress", model=model,
        instructions=req.instructions, max_output_tokens=req.max_output_tokens, temperature=req.temperature,
        top_p=req.top_p, text=req.text.model_dump(exclude_none=True, by_alias=True) if req.text else
        {"format": {"type": "text"}},
        tools=[t.model_dump(exclude_none=True) for t in req.tools or []],
        tool_choice=(req.tool_choice.model_dump(exclude_none=True) if isinstance(req.tool_choice, BaseModel)
                     else req.tool_choice or "auto"),
        parallel_tool_calls=req.parallel_tool_calls,
        reasoning=req.reasoning.model_dump() if req.reasoning else None,
        truncation=req.truncation, metadata=req.metadata or {}, user=req.user,
    )  # fmt: skip


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"
