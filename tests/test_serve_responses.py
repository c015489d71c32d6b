"""OpenAI's Responses API (`POST /v1/responses`) through the official openai SDK, whose typed parsing is the
conformance check: text and message-list input with instructions, reasoning items, a function-tool round trip
(a function_call item, then its function_call_output sent back), streaming events in the API's order with
sequence numbers and the final usage, max_output_tokens, JSON-schema output on a random model, and bad input
as a 4xx in OpenAI's error shape. The model is scripted (scripted_model.py) and run by the real engine and
server with a Qwen-style (Hermes) chat template, so each reply is known exactly."""

from __future__ import annotations

import json

import httpx
import pytest

import nanoseek
from nanoseek.serve.protocol_responses import ResponsesRequest
from scripted_model import ScriptedConfig, ScriptedModel, script_policy
from serve_helpers import serve, tiny_llama_gguf
from test_serve_structured import SCHEMA, validate
from test_serve_tools import HERMES

openai = pytest.importorskip("openai")

TERSE, THINK = "Be terse.", "Think first: what is 2+2?"
REASONING, ANSWER = "Two and two make four.", "The answer is 4."
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"type": "function", "name": "get_weather", "description": "the weather in a city", "parameters": CITY}


def reply(prompt: str) -> str:
    """What the scripted model writes for a prompt: an answer from a tool's result, a call when the tool is
    offered, reasoning then an answer when asked to think, a terse reply under the terse instructions."""
    if "<tool_response>" in prompt:
        return "The tool says: " + prompt.rsplit("<tool_response>\n", 1)[1].split("\n</tool_response>", 1)[0]
    if '"get_weather"' in prompt:
        city = prompt.rsplit("weather in ", 1)[1].split("?", 1)[0]
        return f'Let me check.\n<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "{city}"}}}}\n</tool_call>'
    if THINK in prompt:
        return f"<think>{REASONING}</think>\n\n{ANSWER}"
    if TERSE in prompt:
        return "Terse hello."
    return "Hello from nanoseek."


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    gguf = tiny_llama_gguf(tmp_path_factory.mktemp("responses") / "tiny.gguf", chat_template=HERMES)
    tok = nanoseek.load_tokenizer(gguf)
    config = ScriptedConfig(vocab_size=tok.vocab_size, eos_token_id=tok.stop_token_ids[0])
    with serve(gguf, model=ScriptedModel(config, script_policy(tok, "<|im_start|>assistant\n", reply))) as r:
        r.tokenizer = tok
        yield r


@pytest.fixture(scope="module")
def client(running):
    return openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _tokens(running, text: str) -> int:
    return len(running.tokenizer.encode(text, add_special_tokens=False))


# ---- text ---------------------------------------------------------------------------------------------------


def test_text_input(client, running):
    resp = client.responses.create(model="tiny", input="Hi")
    assert resp.object == "response" and resp.status == "completed" and resp.id.startswith("resp_")
    assert resp.output_text == "Hello from nanoseek." and [item.type for item in resp.output] == ["message"]
    message = resp.output[0]
    assert message.role == "assistant" and message.status == "completed" and message.content[0].type == "output_text"
    usage = resp.usage
    assert usage.output_tokens == _tokens(running, "Hello from nanoseek.")  # (the stop token is not counted)
    assert usage.input_tokens > 0 and usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.output_tokens_details.reasoning_tokens == 0 and resp.model == "tiny" and resp.store is False


def test_message_list_input_and_instructions(client):
    resp = client.responses.create(model="tiny", instructions=TERSE, input=[
        {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello."}]},
        {"role": "user", "content": "Hi again"}], temperature=0.5, top_p=0.9)  # fmt: skip
    assert resp.output_text == "Terse hello." and resp.instructions == TERSE
    assert resp.temperature == 0.5 and resp.top_p == 0.9
    # developer and system messages are the system prompt as well
    for role in ("developer", "system"):
        resp = client.responses.create(model="tiny", input=[{"role": role, "content": TERSE},
                                                            {"role": "user", "content": "Hi"}])  # fmt: skip
        assert resp.output_text == "Terse hello."


def test_max_output_tokens_makes_an_incomplete_response(client):
    resp = client.responses.create(model="tiny", input="Hi", max_output_tokens=3)
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    assert resp.usage.output_tokens == 3 and resp.output[0].status == "incomplete"
    assert "Hello from nanoseek.".startswith(resp.output_text) and resp.max_output_tokens == 3


def test_reasoning_is_a_reasoning_item(client, running):
    resp = client.responses.create(model="tiny", input=THINK)
    assert [item.type for item in resp.output] == ["reasoning", "message"]
    reasoning = resp.output[0]
    assert [(c.type, c.text) for c in reasoning.content] == [("reasoning_text", REASONING)]
    assert resp.output_text == ANSWER
    details = resp.usage.output_tokens_details
    assert _tokens(running, "<think>" + REASONING) <= details.reasoning_tokens < resp.usage.output_tokens
    # sent back, the reasoning item reaches the template (as reasoning_content) and the reply goes on
    again = client.responses.create(model="tiny", input=[{"role": "user", "content": THINK}, *resp.output,
                                                         {"role": "user", "content": "Hi"}])  # fmt: skip
    assert again.output_text == ANSWER  # THINK is still in the prompt


# ---- streaming ----------------------------------------------------------------------------------------------

ADDED, DONE = "response.output_item.added", "response.output_item.done"
TEXT_ITEM = [ADDED, "response.content_part.added", "response.output_text.delta", "response.output_text.done",
             "response.content_part.done", DONE]  # fmt: skip
REASONING_ITEM = [ADDED, "response.content_part.added", "response.reasoning_text.delta",
                  "response.reasoning_text.done", "response.content_part.done", DONE]  # fmt: skip
CALL_ITEM = [ADDED, "response.function_call_arguments.delta", "response.function_call_arguments.done", DONE]


def _squeezed(kinds: list[str]) -> list[str]:
    """Event types with runs of deltas counted once."""
    return [k for i, k in enumerate(kinds) if not (k.endswith(".delta") and i and kinds[i - 1] == k)]


def _raw_stream(running, body: dict) -> list[dict]:
    """The stream's events as sent (SSE `event:` and `data:` lines), each checked to name its own type."""
    with httpx.stream("POST", running.url + "/v1/responses", json={**body, "stream": True}, timeout=60) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        frames = [f for f in resp.read().decode().split("\n\n") if f]
    events = []
    for frame in frames:
        (kind_line, data_line) = frame.split("\n")
        data = json.loads(data_line.removeprefix("data: "))
        assert kind_line == f"event: {data['type']}"
        events.append(data)
    return events


@pytest.mark.parametrize("prompt, items", [("Hi", [TEXT_ITEM]), (THINK, [REASONING_ITEM, TEXT_ITEM])])
def test_stream_events_in_order(client, running, prompt, items):
    with client.responses.stream(model="tiny", input=prompt) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    want = ["response.created", "response.in_progress", *[k for item in items for k in item], "response.completed"]
    assert _squeezed(kinds) == want
    assert [e.sequence_number for e in events] == list(range(len(events)))
    whole = client.responses.create(model="tiny", input=prompt)
    assert final.status == "completed" and final.output_text == whole.output_text
    assert [i.type for i in final.output] == [i.type for i in whole.output]
    assert final.usage == whole.usage
    assert events[-1].response.usage == final.usage and events[0].response.status == "in_progress"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == next(e.text for e in events if e.type == "response.output_text.done")
    # every event of an item names that item and its place
    ids = {e.output_index: e.item.id for e in events if e.type == "response.output_item.added"}
    assert all(e.item_id == ids[e.output_index] for e in events if hasattr(e, "item_id"))
    assert [ids[i] for i in sorted(ids)] == [i.id for i in final.output]


def test_a_cut_stream_ends_with_response_incomplete(running):
    events = _raw_stream(running, {"model": "tiny", "input": "Hi", "max_output_tokens": 3})
    assert events[-1]["type"] == "response.incomplete" and events[-1]["response"]["usage"]["output_tokens"] == 3
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


# ---- tools --------------------------------------------------------------------------------------------------


def _create(client, stream: bool, **kwargs):
    if not stream:
        return client.responses.create(**kwargs)
    with client.responses.stream(**kwargs) as s:
        kinds = [e.type for e in s]
        final = s.get_final_response()
    if any(item.type == "function_call" for item in final.output):
        assert _squeezed(kinds)[-5:-1] == CALL_ITEM
    return final


@pytest.mark.parametrize("stream", [False, True])
def test_tool_round_trip(client, stream):
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    resp = _create(client, stream, model="tiny", input=question, tools=[WEATHER])
    assert [item.type for item in resp.output] == ["message", "function_call"]
    assert resp.output_text == "Let me check." and resp.status == "completed"
    call = resp.output[1]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.call_id.startswith("call_") and call.id.startswith("fc_") and call.status == "completed"
    assert resp.tools[0].name == "get_weather" and resp.tool_choice == "auto"

    # the client runs the tool and sends its result back with the conversation (the output items as they came)
    conversation = question + resp.output + [{"type": "function_call_output", "call_id": call.call_id,
                                              "output": "sunny, 24 C"}]  # fmt: skip
    again = _create(client, stream, model="tiny", input=conversation, tools=[WEATHER])
    assert again.output_text == "The tool says: sunny, 24 C"
    assert [item.type for item in again.output] == ["message"]


def test_tool_choice_none_leaves_the_reply_alone(client):
    resp = client.responses.create(model="tiny", input="What is the weather in Paris?", tools=[WEATHER],
                                   tool_choice="none")  # fmt: skip
    assert [item.type for item in resp.output] == ["message"] and resp.output_text == "Hello from nanoseek."


def test_input_items_become_the_conversation_the_template_reads():
    req = ResponsesRequest.model_validate({"instructions": "sys", "input": [
        {"role": "user", "content": "q"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "hm"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "let me see"}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"a": 1}'},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": [{"type": "input_text", "text": "one"}]},
        {"type": "function_call_output", "call_id": "c2", "output": "two"},
        {"role": "developer", "content": "dev"}]})  # fmt: skip
    assert req.template_messages() == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "let me see", "reasoning_content": "hm", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}},
            {"id": "c2", "type": "function", "function": {"name": "g", "arguments": {}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
        {"role": "system", "content": "dev"},
    ]  # fmt: skip


# ---- structured output, on a random model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_client(tmp_path_factory):
    pytest.importorskip("llguidance")
    with serve(tiny_llama_gguf(tmp_path_factory.mktemp("responses_json") / "tiny.gguf", context=512)) as r:
        yield openai.OpenAI(base_url=r.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_json_schema_output_parses_and_validates(random_client):
    text = {"format": {"type": "json_schema", "name": "person", "schema": SCHEMA, "strict": True}}
    resp = random_client.responses.create(model="tiny", input="describe a person", text=text, temperature=0,
                                          max_output_tokens=200)  # fmt: skip
    assert resp.status == "completed"
    validate(json.loads(resp.output_text))
    assert resp.text.format.type == "json_schema" and resp.text.format.schema_ == SCHEMA
    with random_client.responses.stream(model="tiny", input="describe a person", text=text, temperature=0,
                                        max_output_tokens=200) as s:  # fmt: skip
        streamed = s.get_final_response()
    assert streamed.output_text == resp.output_text
    resp = random_client.responses.create(model="tiny", input="describe a person", temperature=1,
                                          text={"format": {"type": "json_object"}}, max_output_tokens=200)  # fmt: skip
    assert isinstance(json.loads(resp.output_text), dict)


# ---- bad input ----------------------------------------------------------------------------------------------

BAD = {
    "no input": ({"model": "tiny"}, "input"),
    "empty input": ({"input": []}, "input"),
    "input of the wrong type": ({"input": 5}, "input"),
    "a role the API has not": ({"input": [{"role": "tool", "content": "x"}]}, "input"),
    "a message without content": ({"input": [{"role": "user"}]}, "input"),
    "an unknown item type": ({"input": [{"type": "image_generation_call", "id": "x"}]}, "input"),
    "an image part": ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
                      "input[0]"),
    "a lone surrogate": ({"input": [{"role": "user", "content": "\ud800"}]}, "input[0].content"),
    "a lone surrogate in a tool output": ({"input": [{"type": "function_call_output", "call_id": "c",
                                                      "output": "\udfff"}]}, "input[0].output"),
    "a hosted tool": ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools"),
    "a function without a name": ({"input": "hi", "tools": [{"type": "function"}]}, "tools"),
    "temperature out of range": ({"input": "hi", "temperature": 3}, "temperature"),
    "max_output_tokens 0": ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    "a json_schema without a schema": ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}},
                                       "text.format"),
    "a bad tool_choice": ({"input": "hi", "tools": [WEATHER], "tool_choice": {"type": "file_search"}},
                          "tool_choice"),
    "previous_response_id": ({"input": "hi", "previous_response_id": "resp_123"}, "previous_response_id"),
    "background": ({"input": "hi", "background": True}, "background"),
    "an input longer than the context": ({"input": "word " * 5000}, "input"),
    "max_output_tokens past the context": ({"input": "hi", "max_output_tokens": 5000}, "max_output_tokens"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_400_in_openai_shape(running, case):
    body, param = BAD[case]
    raw = json.dumps(body).encode()  # (json.dumps writes the lone surrogate as its \ud800 escape)
    resp = httpx.post(running.url + "/v1/responses", content=raw, headers={"content-type": "application/json"})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["message"] and error["param"] is not None and error["param"].startswith(param), error


def test_sdk_errors(client):
    with pytest.raises(openai.BadRequestError, match="stateless"):
        client.responses.create(model="tiny", input="hi", previous_response_id="resp_unknown")
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="gpt-4o", input="hi")
    assert client.responses.create(model="tiny", input="hi", store=True).output_text  # store is accepted


def test_the_api_key_guards_the_route(tmp_path):
    with serve(tiny_llama_gguf(tmp_path / "tiny.gguf"), api_key="secret") as r:
        assert httpx.post(r.url + "/v1/responses", json={"input": "hi"}).status_code == 401
        ok = httpx.post(r.url + "/v1/responses", json={"input": "hi", "max_output_tokens": 2},
                        headers={"authorization": "Bearer secret"}, timeout=60)  # fmt: skip
        assert ok.status_code == 200 and ok.json()["usage"]["output_tokens"] <= 2


def test_reasoning_effort_switches_a_templates_thinking():
    """reasoning.effort "none" turns thinking off in templates that read enable_thinking (Qwen 3); any other
    effort turns it on; without one the template decides."""
    kwargs = [ResponsesRequest.model_validate({"input": "hi", **extra}).template_kwargs()
              for extra in ({"reasoning": {"effort": "none"}}, {"reasoning": {"effort": "low"}}, {})]  # fmt: skip
    assert kwargs == [{"enable_thinking": False}, {"enable_thinking": True}, {}]
