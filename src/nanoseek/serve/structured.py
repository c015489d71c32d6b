"""Structured output: OpenAI's `response_format` as a token constraint on the engine (engine/constraint.py).

`{"type": "json_object"}` constrains a reply to one JSON object; `{"type": "json_schema", "json_schema":
{"name", "schema", "strict"}}` to JSON valid under the schema. The grammar masks come from llguidance, so the
model cannot write anything else, whatever it would have written; the reply ends (end-of-sequence) once the
JSON is complete. A malformed or unsatisfiable schema is a 400.

A tool_choice that forces a call ("required", a named function) is a constraint too: the chat template's
call format around a call of the offered tools (tool_calls.py).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from nanoseek.engine.constraint import Constraint, GrammarError, GrammarTokenizer
from nanoseek.serve.errors import APIError
from nanoseek.serve.tool_calls import forced_call


class StructuredOutput:
    """Compiles response formats for one model; the llguidance tokenizer is built on first use (about a second
    for a large vocabulary), then shared."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._grammars: GrammarTokenizer | None = None
        self._lock = threading.Lock()

    def grammars(self) -> GrammarTokenizer:
        with self._lock:
            if self._grammars is None:
                try:
                    self._grammars = GrammarTokenizer(self.tokenizer, self.tokenizer.stop_token_ids)
                except Exception as exc:  # llguidance refuses a tokenizer it cannot map to bytes
                    raise APIError(400, f"structured output is not available for this model's tokenizer: {exc}",
                                   "response_format") from None  # fmt: skip
            return self._grammars

    async def constraint(self, response_format) -> Constraint | None:
        """The constraint for a request's response_format (None for none or "text"); APIError 400 when bad."""
        schema = json_schema_of(response_format)
        if schema is None:
            return None

        def compile_schema() -> Constraint:
            return self.grammars().json_schema(schema)

        try:
            return await asyncio.to_thread(compile_schema)  # large schemas take real time to compile
        except GrammarError as exc:
            raise APIError(400, str(exc), "response_format") from None

    async def forced_tool_call(self, tool_parser, tools: list[dict], name: str | None) -> Constraint:
        """The constraint for a tool_choice that forces a call: the template's call format (`tool_parser`, from
        tool_calls.py), with a call of one of `tools` (of `name`, when given) valid under its parameters."""
        if tool_parser is None:
            raise APIError(400, "this model's chat template has no tool-call format, so a tool_choice that forces a "
                           "call cannot be enforced", "tool_choice")  # fmt: skip
        try:
            lark = tool_parser.grammar(tools, name)
        except ValueError as exc:
            raise APIError(400, str(exc), "tool_choice") from None

        def compile_grammar() -> Constraint:
            return self.grammars().lark(lark)

        try:
            return await asyncio.to_thread(compile_grammar)
        except GrammarError as exc:
            raise APIError(400, f"the tools' parameter schemas: {exc}", "tools") from None

    async def for_request(
        self, response_format, tool_parser, tools: list[dict] | None, tool_choice
    ) -> Constraint | None:
        """The one constraint a request asks for: its response_format, or a call its tool_choice forces."""
        forced, name = forced_call(tool_choice) if tools else (False, None)
        if forced and json_schema_of(response_format) is not None:
            raise APIError(400, "response_format cannot be combined with a tool_choice that forces a call",
                           "response_format")  # fmt: skip
        if forced:
            return await self.forced_tool_call(tool_parser, tools, name)  # type: ignore[arg-type]
        return await self.constraint(response_format)


def json_schema_of(response_format) -> dict[str, Any] | bool | None:
    """The JSON schema a response_format asks for: None for none or "text", {"type": "object"} for json_object."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return {"type": "object"}
    spec = response_format.json_schema
    if spec is None:
        raise APIError(400, 'response_format of type "json_schema" needs a "json_schema" field', "response_format")
    schema = spec.get("schema", {})  # OpenAI: no schema means any JSON
    if not isinstance(schema, dict | bool):
        raise APIError(400, "response_format.json_schema.schema must be a JSON schema object", "response_format")
    return schema
