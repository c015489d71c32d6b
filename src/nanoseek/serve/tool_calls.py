"""Tool calls: the model's tool-call text parsed back into calls, for OpenAI `tool_calls` and Anthropic
`tool_use` blocks, and the API's tool messages put into the shape chat templates read.

Which format a model writes is told by its chat template (the one that taught it), so the parser is picked by
the template's text, never by the model's name:
- Hermes / Qwen: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number, text around them;
- Llama 3.1 JSON: the whole reply is `{"name": ..., "parameters": {...}}` (several joined by `;`), possibly
  after `<|python_tag|>`.

Parsers see the reply as streamed text deltas and return events: answer text (str) or a finished `ToolCall`;
text that may still become a call is held back. A call whose JSON does not parse, or lacks a name, is given
back as the plain text it was: a broken call never fails the request.

    parser = parser_for_template(tokenizer.chat_template)()      # (None: the template has no tool format)
    for delta in deltas:
        events = parser.feed(delta)
    events = parser.finish()

A tool_choice that forces a call ("required", or a named function) is enforced, not only asked for: the
parser's `grammar(tools, name)` constrains decoding (engine/constraint.py) to calls of the offered tools with
arguments valid under their parameter schemas.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


Event = str | ToolCall


def _call_from_json(text: str, argument_keys: tuple[str, ...]) -> ToolCall | None:
    """A call from `{"name": ..., <argument key>: {...}}`, or None when the text is not one."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    arguments = next((value[k] for k in argument_keys if k in value), {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string, as OpenAI sends them
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(value["name"], arguments)


COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _call_schema(tools: list[dict[str, Any]], name: str | None, argument_key: str) -> dict[str, Any]:
    """A JSON schema for one call object `{"name": ..., argument_key: {...}}` of the offered tools (OpenAI
    layout), or of the one named; the arguments follow the tool's parameter schema."""
    options = []
    for tool in tools:
        function = tool.get("function", tool)
        if name is not None and function.get("name") != name:
            continue
        parameters = function.get("parameters") or {"type": "object"}
        options.append({"type": "object", "properties": {"name": {"const": function.get("name")},
                                                         argument_key: parameters},
                        "required": ["name", argument_key], "additionalProperties": False})  # fmt: skip
    if not options:
        raise ValueError(f"tool_choice names {name!r}, which is not among the tools")
    return {"anyOf": options, "x-guidance": COMPACT_JSON}


def _partial_prefix(text: str, tag: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class HermesToolParser:
    """`<tool_call>` JSON `</tool_call>` blocks (Hermes, Qwen 2.5 / 3), with answer text around them. The
    whitespace that separates text from calls is layout, not answer: it is dropped (so a trailing blank is held
    back until text follows it, and the streamed text equals the whole reply's)."""

    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self):
        self._buffer = ""  # text not given out yet: a possible start of a tag, or a call being written
        self._inside = False
        self._blank = ""  # trailing whitespace of the text given out so far
        self._before_tag = ""
        self._after_call = False

    def feed(self, text: str) -> list[Event]:
        self._buffer += text
        events: list[Event] = []
        while self._buffer:
            if not self._inside:
                i = self._buffer.find(self.OPEN)
                if i < 0:
                    keep = _partial_prefix(self._buffer, self.OPEN)
                    events += self._text(self._buffer[: len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    break
                events += self._text(self._buffer[:i])
                self._buffer, self._inside = self._buffer[i:], True
                self._before_tag, self._blank = self._blank, ""  # given back if the call turns out malformed
            j = self._buffer.find(self.CLOSE)
            if j < 0:
                break
            block, self._buffer = self._buffer[: j + len(self.CLOSE)], self._buffer[j + len(self.CLOSE) :]
            self._inside = False
            events.append(self._parse(block))
        return events

    def finish(self) -> list[Event]:
        """The end of the reply: an unclosed call still counts if its JSON is whole (models often stop there)."""
        rest, self._buffer, inside = self._buffer, "", self._inside
        self._inside = False
        if inside:
            return [self._parse(rest)]
        events = self._text(rest)
        if self._blank and not self._after_call:
            events.append(self._blank)
        self._blank = ""
        return events

    @classmethod
    def grammar(cls, tools: list[dict[str, Any]], name: str | None) -> str:
        """A Lark grammar (llguidance) for a reply made of calls only: one or more, or exactly one of `name`."""
        body = json.dumps(_call_schema(tools, name, "arguments"))
        start = "start: call" if name else 'start: call ("\\n" call)*'
        return f'{start}\ncall: "{cls.OPEN}\\n" body "\\n{cls.CLOSE}"\nbody: %json {body}\n'

    def _text(self, text: str) -> list[Event]:
        if self._after_call:
            text = text.lstrip()
            if not text:
                return []
            self._after_call = False
        text = self._blank + text
        body = text.rstrip()
        self._blank = text[len(body) :]
        return [body] if body else []

    def _parse(self, block: str) -> Event:
        body = block[len(self.OPEN) :]
        body = body[: -len(self.CLOSE)] if body.endswith(self.CLOSE) else body
        call = _call_from_json(body.strip(), ("arguments", "parameters"))
        if call is None:
            self._after_call = False
            return self._before_tag + block
        self._after_call = True
        return call


class Llama3JsonToolParser:
    """Llama 3.1 / 3.2 JSON calls: a reply that is `{"name": ..., "parameters": {...}}` (or several, `;`-joined),
    possibly after `<|python_tag|>`. A reply that starts otherwise is answer text, streamed as it comes; one that
    starts with `{` is held to its end (only then is it known to be a call)."""

    PYTHON_TAG = "<|python_tag|>"

    def __init__(self):
        self._held = ""
        self._mode: str | None = None  # None: undecided; "text" or "call"

    def feed(self, text: str) -> list[Event]:
        if self._mode == "text":
            return [text] if text else []
        self._held += text
        if self._mode is None:
            start = self._held.lstrip()
            if not start or self.PYTHON_TAG.startswith(start):
                return []
            self._mode = "call" if start.startswith(("{", self.PYTHON_TAG)) else "text"
        if self._mode == "text":
            held, self._held = self._held, ""
            return [held]
        return []

    @staticmethod
    def grammar(tools: list[dict[str, Any]], name: str | None) -> str:
        """A Lark grammar (llguidance) for a reply that is one call (of `name`, when given)."""
        return f"start: %json {json.dumps(_call_schema(tools, name, 'parameters'))}\n"

    def finish(self) -> list[Event]:
        held, self._held = self._held, ""
        if not held:
            return []
        if self._mode != "call":
            return [held]
        body = held.strip().removeprefix(self.PYTHON_TAG).strip()
        calls = [_call_from_json(part.strip(), ("parameters", "arguments")) for part in _split_calls(body)]
        return calls if calls and all(calls) else [held]  # type: ignore[return-value]


def _split_calls(body: str) -> list[str]:
    """`{...}; {...}` into its JSON objects (a `;` inside a string or an object does not split)."""
    decoder, parts, i = json.JSONDecoder(), [], 0
    while i < len(body):
        try:
            _, end = decoder.raw_decode(body, i)
        except ValueError:
            return [body]  # not a list of objects: parsed as one, which fails and leaves the text as it was
        parts.append(body[i:end])
        i = end
        while i < len(body) and body[i] in " \t\n;":
            i += 1
    return parts


PARSERS = {"hermes": HermesToolParser, "llama3_json": Llama3JsonToolParser}


def parser_for_template(template: str | None) -> type | None:
    """The tool-call parser for the format a chat template teaches (None: no tool format known)."""
    if not template:
        return None
    if HermesToolParser.OPEN in template:
        return HermesToolParser
    if Llama3JsonToolParser.PYTHON_TAG in template or ('"parameters"' in template and "ipython" in template):
        return Llama3JsonToolParser
    return None


def forced_call(tool_choice: str | dict[str, Any] | None) -> tuple[bool, str | None]:
    """Whether an OpenAI tool_choice forces a call ("required" or a named function), and the name if named."""
    if tool_choice == "required":
        return True, None
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        return True, (tool_choice.get("function") or {}).get("name")
    return False, None


def parse_all(parser, text: str) -> tuple[str, list[ToolCall]]:
    """A whole reply: its answer text and its calls."""
    events = parser.feed(text) + parser.finish()
    return "".join(e for e in events if isinstance(e, str)), [e for e in events if isinstance(e, ToolCall)]


# ---- the conversation, for the template -------------------------------------------------------------------


def template_tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI-layout tool calls as chat templates read them: `function.arguments` as a mapping (templates write
    it with `tojson`; the API sends a JSON string). Arguments that are not a JSON object stay as they are."""
    out = []
    for call in calls:
        call = dict(call)
        function = dict(call.get("function") or {})
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                parsed = json.loads(arguments)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict):
                function["arguments"] = parsed
        call["function"] = function
        out.append(call)
    return out
