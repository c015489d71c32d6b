"""The tool-call parsers on texts: Hermes/Qwen `<tool_call>` and Llama 3.1 JSON, whole and streamed in every
split, malformed calls kept as plain text, and the parser picked from the chat template's text."""

from __future__ import annotations

import pytest

from nanoseek.serve.tool_calls import (
    HermesToolParser,
    Llama3JsonToolParser,
    ToolCall,
    parse_all,
    parser_for_template,
    template_tool_calls,
)


def _calls(calls: list[ToolCall]) -> list[tuple[str, dict]]:
    return [(c.name, c.arguments) for c in calls]


def _streamed(parser_class, text: str, size: int) -> tuple[str, list[ToolCall]]:
    parser, events = parser_class(), []
    for i in range(0, len(text), size):
        events += parser.feed(text[i : i + size])
    events += parser.finish()
    return "".join(e for e in events if isinstance(e, str)), [e for e in events if isinstance(e, ToolCall)]


HERMES_CASES = {
    "one call": ('<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>', "", [("f", {"x": 1})]),
    "text then two calls": (
        'Sure.\n<tool_call>\n{"name": "f", "arguments": {"x": "a<b"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>',
        "Sure.",
        [("f", {"x": "a<b"}), ("g", {})],
    ),
    "arguments as a JSON string": (
        '<tool_call>{"name": "f", "arguments": "{\\"y\\": 2}"}</tool_call>',
        "",
        [("f", {"y": 2})],
    ),  # fmt: skip
    "unclosed at the end": ('<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n', "", [("f", {"x": 1})]),
    "plain text": ("no calls here, just < and <tool and text  ", "no calls here, just < and <tool and text  ", []),
    "malformed json": (
        '<tool_call>{"name": "f", "arguments": {x: 1}}</tool_call>',
        '<tool_call>{"name": "f", "arguments": {x: 1}}</tool_call>',
        [],
    ),  # fmt: skip
    "no name": ('<tool_call>{"arguments": {}}</tool_call> ok', '<tool_call>{"arguments": {}}</tool_call> ok', []),
    "arguments not an object": (
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
        [],
    ),  # fmt: skip
    "unclosed garbage": ("text <tool_call>{oops", "text <tool_call>{oops", []),
}


@pytest.mark.parametrize("case", HERMES_CASES)
def test_hermes_parser(case):
    text, content, calls = HERMES_CASES[case]
    got_content, got_calls = parse_all(HermesToolParser(), text)
    assert got_content == content and _calls(got_calls) == calls
    for size in (1, 2, 5, 13):  # streamed in pieces: the same content and calls
        streamed_content, streamed_calls = _streamed(HermesToolParser, text, size)
        assert streamed_content == content and _calls(streamed_calls) == calls


LLAMA_CASES = {
    "one call": ('{"name": "f", "parameters": {"x": 1}}', "", [("f", {"x": 1})]),
    "python tag": ('<|python_tag|>{"name": "f", "parameters": {"q": "a; b"}}', "", [("f", {"q": "a; b"})]),
    "two calls": (
        '{"name": "f", "parameters": {}}; {"name": "g", "arguments": {"z": null}}',
        "",
        [("f", {}), ("g", {"z": None})],
    ),  # fmt: skip
    "leading blank": ('\n {"name": "f", "parameters": {}}', "", [("f", {})]),
    "plain text": ("Hello {there}", "Hello {there}", []),
    "malformed json": ('{"name": "f", "parameters": {"x": }', '{"name": "f", "parameters": {"x": }', []),
    "a JSON answer, not a call": ('{"answer": 42}', '{"answer": 42}', []),
    "one good one bad": (
        '{"name": "f", "parameters": {}}; {"nope": 1}',
        '{"name": "f", "parameters": {}}; {"nope": 1}',
        [],
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", LLAMA_CASES)
def test_llama3_json_parser(case):
    text, content, calls = LLAMA_CASES[case]
    got_content, got_calls = parse_all(Llama3JsonToolParser(), text)
    assert got_content == content and _calls(got_calls) == calls
    for size in (1, 3, 7):
        streamed_content, streamed_calls = _streamed(Llama3JsonToolParser, text, size)
        assert streamed_content == content and _calls(streamed_calls) == calls


def test_llama3_plain_text_streams_as_it_comes():
    parser = Llama3JsonToolParser()
    assert parser.feed("  ") == [] and parser.feed("Hi") == ["  Hi"] and parser.feed(" there") == [" there"]


def test_hermes_holds_back_only_what_may_become_a_tag():
    parser = HermesToolParser()
    assert parser.feed("Hello <tool") == ["Hello"]  # the blank and a possible tag wait
    assert parser.feed("box> x") == [" <toolbox> x"]


def test_call_ids_are_unique():
    _, calls = parse_all(HermesToolParser(), '<tool_call>{"name": "f"}</tool_call><tool_call>{"name": "f"}</tool_call>')
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


QWEN_SNIPPET = '{%- if tools %}...<tool_call>\\n{"name": <function-name>, "arguments": <args-json-object>}...'
LLAMA31_SNIPPET = (
    '{{- \'{"name": function name, "parameters": dictionary of argument name and its value}\' }}'
    "{%- if builtin_tools is defined %}<|python_tag|>{% endif %}"
    '{{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}'
)


def test_parser_is_chosen_by_the_template():
    assert parser_for_template(QWEN_SNIPPET) is HermesToolParser
    assert parser_for_template(LLAMA31_SNIPPET) is Llama3JsonToolParser
    assert parser_for_template("{% for m in messages %}{{ m.content }}{% endfor %}") is None
    assert parser_for_template(None) is None


def test_template_tool_calls_give_arguments_as_a_mapping():
    calls = [{"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"a": [1]}'}},
             {"id": "2", "type": "function", "function": {"name": "g", "arguments": "not json"}}]  # fmt: skip
    out = template_tool_calls(calls)
    assert out[0]["function"]["arguments"] == {"a": [1]} and out[1]["function"]["arguments"] == "not json"
    assert calls[0]["function"]["arguments"] == '{"a": [1]}'  # the request's own messages are left as they were
