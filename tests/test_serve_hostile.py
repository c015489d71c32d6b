"""Hostile input never gets a 5xx: every bad request is a 4xx in the API's error shape (OpenAI's, or Anthropic's on
/v1/messages), and the server keeps serving.

The named cases are the ones a probe of a running server found answered with a 500 (lone surrogates, tool calls
and tool_choice of the wrong shape, chat_template_kwargs that shadow the template's own variables,
out-of-vocabulary ids); the fuzz puts hand-picked hostile values (surrogates, NULs, huge and non-finite numbers,
every wrong JSON type) at every position of a valid body of each endpoint. Both run on a tiny random model with
a tool-calling (Hermes) chat template, so the tool-call paths are reached too.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from scripted_model import ScriptedConfig, ScriptedModel
from serve_helpers import serve, tiny_llama_gguf
from test_serve_tools import HERMES

pytest.importorskip("transformers")

VOCAB = 262  # the tiny tokenizer's (gguf_writer.tiny_vocab)
LONE = "\ud800"  # a lone surrogate: valid JSON ("\ud800"), but no Unicode text, so no tokenizer can take it
PARAMETERS = {"type": "object", "properties": {"a": {"type": "integer"}}}
TOOL = {"type": "function", "function": {"name": "f", "parameters": PARAMETERS}}
FORCE_F = {"type": "function", "function": {"name": "f"}}
CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
CHAT = {
    "model": "tiny",
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"},
    ],
    "max_tokens": 1, "temperature": 0, "top_k": 3, "top_p": 0.9, "seed": 1, "n": 1, "stop": ["\n"],
    "logit_bias": {"5": 1}, "stop_token_ids": [3], "logprobs": True, "top_logprobs": 2,
    "tools": [TOOL], "tool_choice": FORCE_F, "chat_template_kwargs": {"enable_thinking": False},
    "response_format": {"type": "text"},
}  # fmt: skip
COMPLETION = {"model": "tiny", "prompt": "the", "max_tokens": 1, "temperature": 0, "logprobs": 2, "echo": True,
              "logit_bias": {"5": 1}, "stop_token_ids": [3], "stop": "x"}  # fmt: skip
MESSAGES = {
    "model": "tiny",
    "system": [{"type": "text", "text": "be brief"}],
    "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm"},
                                          {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}]},
    ],
    "max_tokens": 1, "temperature": 0, "top_k": 3, "stop_sequences": ["\n"],
    "tools": [{"name": "f", "input_schema": {"type": "object"}}], "tool_choice": {"type": "tool", "name": "f"},
    "thinking": {"type": "disabled"}, "metadata": {"user_id": "u"},
}  # fmt: skip
RESPONSES = {
    "model": "tiny",
    "instructions": "be brief",
    "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "hm"}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"a": 1}'},
        {"type": "function_call_output", "call_id": "c1", "output": "ok"},
        {"role": "developer", "content": "go on"},
    ],
    "max_output_tokens": 1, "temperature": 0, "top_p": 0.9,
    "tools": [{"type": "function", "name": "f", "parameters": PARAMETERS}],
    "tool_choice": {"type": "function", "name": "f"},
    "text": {"format": {"type": "text"}}, "reasoning": {"effort": "none"}, "store": False, "metadata": {"k": "v"},
}  # fmt: skip
EMBEDDINGS = {"model": "tiny", "input": ["the", "cat"], "encoding_format": "float", "user": "u"}
TOKENIZE_CHAT = {"model": "tiny", "messages": CHAT["messages"], "add_generation_prompt": True}
TOKENIZE_TEXT = {"model": "tiny", "prompt": "the", "add_special_tokens": True}
COUNT_TOKENS = {k: MESSAGES[k] for k in ("model", "system", "messages", "tools", "thinking")}


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    return tiny_llama_gguf(tmp_path_factory.mktemp("hostile") / "tiny.gguf", chat_template=HERMES, context=1024)


@pytest.fixture(scope="module")
def http(gguf):
    with serve(gguf) as r, httpx.Client(base_url=r.url, timeout=60, limits=httpx.Limits(max_connections=8)) as c:
        yield c


def _post(http: httpx.Client, path: str, body) -> httpx.Response:
    """POST `body` as JSON text as Python writes it: lone surrogates as \\ud800 escapes, NaN and Infinity bare."""
    return http.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


def _is_anthropic(path: str) -> bool:
    return path.startswith("/v1/messages")


def _error(resp: httpx.Response, path: str, status: int | None = None) -> str:
    """The error message of a 4xx in the shape of `path`'s API (and of `status` when given)."""
    assert 400 <= resp.status_code < 500 and (status is None or resp.status_code == status), resp.text
    body = resp.json()
    if _is_anthropic(path):
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
        return body["error"]["message"]
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"], body
    return body["error"]["message"]


def _with(body: dict, path: tuple, value) -> dict:
    """A deep copy of `body` with the value at `path` (keys and list indices) replaced."""
    body = json.loads(json.dumps(body))
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return body


# ---- 1: lone surrogates -----------------------------------------------------------------------------------

SURROGATE_CASES = {
    "chat content": ("/v1/chat/completions", CHAT, ("messages", 0, "content"), "messages[0].content"),
    "chat content part": ("/v1/chat/completions", CHAT, ("messages", 1, "content", 0, "text"),
                          "messages[1].content[0].text"),
    "chat stream": ("/v1/chat/completions", {**CHAT, "stream": True}, ("messages", 0, "content"),
                    "messages[0].content"),
    "chat tool arguments": ("/v1/chat/completions", CHAT, ("messages", 2, "tool_calls", 0, "function", "arguments"),
                            "messages[2].tool_calls[0].function.arguments"),
    "chat stop": ("/v1/chat/completions", CHAT, ("stop", 0), "stop[0]"),
    "chat tools": ("/v1/chat/completions", CHAT, ("tools", 0, "function", "description"),
                   "tools[0].function.description"),
    "chat template kwarg": ("/v1/chat/completions", CHAT, ("chat_template_kwargs", "x"), "chat_template_kwargs.x"),
    "completion prompt": ("/v1/completions", COMPLETION, ("prompt",), "prompt"),
    "completion prompt list": ("/v1/completions", {**COMPLETION, "prompt": ["a", "b"]}, ("prompt", 1), "prompt[1]"),
    "completion stream": ("/v1/completions", {**COMPLETION, "stream": True}, ("prompt",), "prompt"),
    "messages system": ("/v1/messages", MESSAGES, ("system", 0, "text"), "system[0].text"),
    "messages system string": ("/v1/messages", MESSAGES, ("system",), "system"),
    "messages content": ("/v1/messages", MESSAGES, ("messages", 0, "content"), "messages[0].content"),
    "messages stream": ("/v1/messages", {**MESSAGES, "stream": True}, ("messages", 0, "content"),
                        "messages[0].content"),
    "messages tool input": ("/v1/messages", MESSAGES, ("messages", 1, "content", 1, "input", "a"),
                            "messages[1].content[1].input.a"),
    "count_tokens": ("/v1/messages/count_tokens", COUNT_TOKENS, ("messages", 0, "content"), "messages[0].content"),
    "responses input": ("/v1/responses", {**RESPONSES, "input": "hi"}, ("input",), "input"),
    "responses content part": ("/v1/responses", RESPONSES, ("input", 0, "content", 0, "text"),
                               "input[0].content[0].text"),
    "responses call arguments": ("/v1/responses", RESPONSES, ("input", 2, "arguments"), "input[2].arguments"),
    "responses stream": ("/v1/responses", {**RESPONSES, "stream": True}, ("input", 3, "output"), "input[3].output"),
    "responses instructions": ("/v1/responses", RESPONSES, ("instructions",), "instructions"),
    "tokenize prompt": ("/tokenize", TOKENIZE_TEXT, ("prompt",), "prompt"),
    "tokenize messages": ("/tokenize", TOKENIZE_CHAT, ("messages", 0, "content"), "messages[0].content"),
    "a field the server ignores": ("/v1/chat/completions", CHAT, ("user",), "user"),
}  # fmt: skip


@pytest.mark.parametrize("case", SURROGATE_CASES)
def test_lone_surrogates_are_a_400_naming_the_field(http, case):
    path, body, where, name = SURROGATE_CASES[case]
    for text in (LONE, "ok " + LONE + " ok", "\udc00", "\udfff\ud800"):  # high, low, reversed pair
        message = _error(_post(http, path, _with(body, where, text)), path, 400)
        assert message.startswith(f"invalid unicode: lone surrogate in {name}"), message
    assert _post(http, path, _with(body, where, "\U0001f600")).status_code == 200  # a real pair is fine


def test_a_lone_surrogate_in_a_key_is_a_400(http):
    body = {**CHAT, "chat_template_kwargs": {"ok" + LONE: 1}}
    message = _error(_post(http, "/v1/chat/completions", body), "/", 400)
    assert message.startswith("invalid unicode: lone surrogate in a key of chat_template_kwargs"), message


# ---- 2, 3: tool calls and tool_choice of the wrong shape --------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize"])
@pytest.mark.parametrize("function", ["f", 3, ["f"], None, {"arguments": "{}"}, {"name": 3}])
def test_a_tool_call_whose_function_is_not_an_object_is_a_400(http, path, function):
    body = _with(CHAT if path != "/tokenize" else TOKENIZE_CHAT, ("messages", 2, "tool_calls", 0, "function"), function)
    assert "messages.2.tool_calls.0.function" in _error(_post(http, path, body), path, 400)


BAD_CHOICES = [{**FORCE_F, "function": "f"}, {**FORCE_F, "function": 3}, {**FORCE_F, "function": {"name": 3}},
               {"type": "function"}, 7, ["auto"]]  # fmt: skip


@pytest.mark.parametrize("choice", BAD_CHOICES)
def test_a_tool_choice_of_the_wrong_shape_is_a_400(http, choice):
    assert "tool_choice" in _error(_post(http, "/v1/chat/completions", {**CHAT, "tool_choice": choice}), "/", 400)


@pytest.mark.parametrize("choice", [{"type": "tool"}, {"type": "tool", "name": 3}, {"type": "what"}, "auto"])
def test_an_anthropic_tool_choice_of_the_wrong_shape_is_a_400(http, choice):
    assert "tool_choice" in _error(_post(http, "/v1/messages", {**MESSAGES, "tool_choice": choice}), "/v1/messages",
                                   400)  # fmt: skip


CROSS_FIELD = {  # a check across fields names its field (pydantic's own error has none: "the body is not an object")
    "stream_options": ("/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": True}}),
    "top_logprobs": ("/v1/chat/completions", {**CHAT, "logprobs": False, "top_logprobs": 2}),
    "suffix": ("/v1/completions", {**COMPLETION, "suffix": "x"}),
    "best_of": ("/v1/completions", {**COMPLETION, "best_of": 3}),
    "prompt": ("/tokenize", {**TOKENIZE_TEXT, "messages": CHAT["messages"]}),
}


@pytest.mark.parametrize("param", CROSS_FIELD)
def test_cross_field_errors_name_their_field(http, param):
    path, body = CROSS_FIELD[param]
    resp = _post(http, path, body)
    message = _error(resp, path, 400)
    assert resp.json()["error"]["param"] == param and "JSON object" not in message, message


# ---- 4: chat_template_kwargs that shadow the template's own variables --------------------------------------


@pytest.mark.parametrize("key", ["add_generation_prompt", "messages", "bos_token", "eos_token", "pad_token", "self",
                                 "template", "source", "tools", "tool_choice"])  # fmt: skip
def test_reserved_chat_template_kwargs_are_a_400_naming_the_key(http, key):
    body = {**CHAT, "chat_template_kwargs": {key: "x"}}
    resp = _post(http, "/v1/chat/completions", body)
    message = _error(resp, "/", 400)
    assert resp.json()["error"]["param"] == "chat_template_kwargs" and f"{key!r} is reserved" in message, message


def test_other_chat_template_kwargs_reach_the_template(http):
    assert _post(http, "/v1/chat/completions", {**CHAT, "chat_template_kwargs": {"enable_thinking": True}}).is_success


# ---- 9: token ids outside the vocabulary -------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize(
    "field, value, bad",
    [("logit_bias", {"999999": 1}, 999999), ("logit_bias", {str(VOCAB): 1}, VOCAB), ("logit_bias", {"-1": 1}, -1),
     ("logit_bias", {str(10**30): 1}, 10**30), ("stop_token_ids", [1000000000], 1000000000),
     ("stop_token_ids", [VOCAB], VOCAB), ("stop_token_ids", [-1], -1), ("stop_token_ids", [10**30], 10**30)],
)  # fmt: skip
def test_token_ids_outside_the_vocabulary_are_a_400_naming_the_field(http, path, field, value, bad):
    body = {**(CHAT if path == "/v1/chat/completions" else COMPLETION), field: value}
    resp = _post(http, path, body)
    message = _error(resp, path, 400)
    assert resp.json()["error"]["param"] == field and str(bad) in message and field in message, message
    edge = {str(VOCAB - 1): 1} if field == "logit_bias" else [VOCAB - 1]
    assert _post(http, path, {**body, field: edge}).is_success  # the last id is fine


# ---- 8: a reply cut off by shutdown ------------------------------------------------------------------------


def _cut_by_shutdown(gguf, body: dict, path: str = "/v1/messages") -> httpx.Response | list[str]:
    """`body` sent to `path` on a fresh server whose engine shuts down once the reply has started: the
    response (not streaming) or the SSE lines (streaming)."""
    endless = ScriptedModel(ScriptedConfig(VOCAB, eos_token_id=VOCAB - 3), lambda ids: ord("a"))  # never stops
    body = {**body, "max_output_tokens" if path == "/v1/responses" else "max_tokens": 4000}
    with serve(gguf, model=endless) as r, httpx.Client(base_url=r.url, timeout=60) as c:
        engine = r.server.engine.engine
        started = threading.Event()

        def shut_down_once_started() -> None:
            while not any(len(req.output_ids) > 2 for req in list(engine.requests.values())):
                if started.wait(0.005):
                    return
            r.server.engine.shutdown()

        stopper = threading.Thread(target=shut_down_once_started, daemon=True)
        stopper.start()
        try:
            if not body.get("stream"):
                return c.post(path, json=body)
            with c.stream("POST", path, json=body) as resp:
                assert resp.status_code == 200
                return [line for line in resp.iter_lines() if line]
        finally:
            started.set()
            stopper.join()


def test_an_anthropic_stream_cut_by_shutdown_ends_with_an_error_event(gguf):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    lines = _cut_by_shutdown(gguf, body)
    events = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    assert events[0] == "message_start" and "content_block_delta" in events
    assert events[-1] == "error" and "message_delta" not in events and "message_stop" not in events, events
    error = json.loads(lines[-1].removeprefix("data: "))
    assert error["type"] == "error" and error["error"]["type"] == "overloaded_error", error
    assert "end_turn" not in "".join(lines)


def test_a_responses_stream_cut_by_shutdown_ends_with_response_failed(gguf):
    lines = _cut_by_shutdown(gguf, {"model": "tiny", "input": "hi", "stream": True}, "/v1/responses")
    events = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and "response.output_text.delta" in kinds
    assert kinds[-1] == "response.failed" and "response.completed" not in kinds, kinds
    response = events[-1]["response"]
    assert response["status"] == "failed" and response["error"]["code"] == "server_error", response
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


def test_a_responses_reply_cut_by_shutdown_is_a_503(gguf):
    resp = _cut_by_shutdown(gguf, {"model": "tiny", "input": "hi"}, "/v1/responses")
    assert resp.status_code == 503 and resp.json()["error"]["type"] == "server_error", resp.text


def test_an_anthropic_reply_cut_by_shutdown_is_a_503(gguf):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    resp = _cut_by_shutdown(gguf, body)
    assert resp.status_code == 503, resp.text
    assert resp.json() == {"type": "error", "error": {"type": "overloaded_error", "message": resp.json()["error"][
        "message"]}}  # fmt: skip


@pytest.mark.parametrize("depth", [900, 100_000])  # under and far over the JSON parser's nesting limit
def test_deeply_nested_json_is_no_5xx(http, depth):
    nested = '{"x": ' * depth + "1" + "}" * depth
    for field in ("unknown", "chat_template_kwargs", "tools"):
        body = json.dumps(CHAT)[:-1] + f', "{field}": {nested if field != "tools" else "[" * depth + "]" * depth}}}'
        resp = http.post("/v1/chat/completions", content=body.encode(), headers={"content-type": "application/json"})
        assert resp.status_code < 500 and (resp.is_success or _error(resp, "/")), resp.text[:300]


# ---- the fuzz ---------------------------------------------------------------------------------------------

HOSTILE = [None, True, False, 0, -1, 10**30, -(10**30), 1e308, -1e308, float("nan"), float("inf"), "", LONE,
           "\x00", "a\x00b", "\ufffe", [], [None], [[]], {}, {"": None}, "x" * 2000]  # fmt: skip
BODIES = {
    "/v1/chat/completions": [CHAT, {**CHAT, "stream": True, "stream_options": {"include_usage": True}},
                             {**CHAT, "response_format": {"type": "json_schema", "json_schema": {
                                 "name": "x", "schema": {"type": "object"}}}},
                             {**CHAT, "tool_choice": "auto"}],
    "/v1/completions": [COMPLETION, {**COMPLETION, "prompt": [[1, 2], [3]], "stream": True, "n": 2}],
    "/v1/messages": [MESSAGES, {**MESSAGES, "stream": True, "tool_choice": {"type": "auto"}}],
    "/v1/messages/count_tokens": [COUNT_TOKENS],
    "/v1/responses": [RESPONSES, {**RESPONSES, "stream": True, "tool_choice": "auto", "text": {"format": {
        "type": "json_schema", "name": "x", "schema": {"type": "object"}}}}],
    "/tokenize": [TOKENIZE_CHAT, TOKENIZE_TEXT],
    "/detokenize": [{"model": "tiny", "tokens": [1, 2]}],
    "/v1/embeddings": [EMBEDDINGS, {**EMBEDDINGS, "input": [[1, 2], [3]], "encoding_format": "base64"}],
}  # fmt: skip


def _paths(value, prefix: tuple = ()):
    """Every position in a JSON value, outermost first (the root is the empty path)."""
    yield prefix
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        yield from _paths(item, (*prefix, key))


def _at(body, path: tuple):
    for key in path:
        try:
            body = body[key]
        except (KeyError, IndexError, TypeError):
            return KeyError  # (a marker: nothing there)
    return body


def _cases(path: str) -> list[tuple[str, object]]:
    """(what, body) for every hostile value at every position of the endpoint's first body, and at the
    positions where its other bodies differ from the first; plus a hostile unknown key beside every key."""
    first, cases = BODIES[path][0], []
    for n, body in enumerate(BODIES[path]):
        for where in _paths(body):
            if n and (not where or _at(first, where) == _at(body, where)):
                continue
            cases += [(f"{path} body {n} at {where}: {value!r:.40}", _with(body, where, value) if where else value)
                      for value in HOSTILE]  # fmt: skip
            if where and isinstance(where[-1], str):
                extra = _with(body, (*where[:-1], LONE + "\x00"), {"x": [1e308]})
                cases.append((f"{path} body {n}: a hostile key beside {where}", extra))
    return cases


def _server_error(http: httpx.Client, path: str, what: str, body) -> str | None:
    """What was wrong with the answer to `body`: a 5xx, an error body of the wrong shape, or a stream that failed
    with a server error midway; None if nothing."""
    try:
        resp = _post(http, path, body)
    except httpx.HTTPError as exc:  # the server dropped the connection: a crash its error handler did not catch
        return f"{what} -> {exc!r}"
    if resp.status_code >= 500:
        return f"{what} -> {resp.status_code} {resp.text[:300]}"
    try:
        if resp.status_code >= 400:
            _error(resp, path)
    except (AssertionError, ValueError, KeyError) as exc:
        return f"{what} -> {resp.status_code} in the wrong shape: {exc!r:.300}"
    if resp.headers["content-type"].startswith("text/event-stream") and (
        '"server_error"' in resp.text or '"api_error"' in resp.text
    ):
        return f"{what} -> a stream that failed: {resp.text[-300:]}"
    return None


@pytest.mark.parametrize("path", BODIES)
def test_fuzz_hostile_values_everywhere_get_no_5xx(http, path):
    cases = _cases(path)
    # sent 8 at a time: a lone client mostly waits on the loopback's round trips; the server batches them
    with ThreadPoolExecutor(8) as pool:
        failures = [f for f in pool.map(lambda case: _server_error(http, path, *case), cases) if f is not None]
    assert not failures, f"{len(failures)} of {len(cases)} cases:\n" + "\n".join(failures[:20])
    assert http.get("/health").status_code == 200
    assert _post(http, path, BODIES[path][0]).status_code == 200  # and it keeps serving
