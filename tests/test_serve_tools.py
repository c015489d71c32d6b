"""Tool calling through the official openai and anthropic SDKs: a whole round trip (request with tools, the
model calls the tool, the client sends the result, the model answers from it), streaming and not, on a
scripted model run by the real engine and server, for a Qwen-style (Hermes `<tool_call>`) and a Llama 3.1-style
(JSON with "parameters") chat template; a malformed call comes back as plain text."""

from __future__ import annotations

import json

import pytest

import nanoseek
from scripted_model import ScriptedConfig, ScriptedModel, script_policy
from serve_helpers import serve, tiny_llama_gguf

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")

# Qwen 2.5's chat template, shortened (the same tool prompt, tool_call and tool_response layout)
HERMES = (
    "{%- if tools %}<|im_start|>system\n{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "# Tools\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>"
    "{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools>\n\nFor each function call, return a json "
    "object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
    "{%- elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) or "
    "(message.role == 'assistant' and not message.tool_calls) %}"
    "<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{%- elif message.role == 'assistant' %}<|im_start|>assistant{% if message.content %}\n{{ message.content }}"
    "{% endif %}{%- for tool_call in message.tool_calls %}{% if tool_call.function is defined %}"
    "{% set tool_call = tool_call.function %}{% endif %}\n<tool_call>\n"
    '{"name": "{{ tool_call.name }}", "arguments": {{ tool_call.arguments | tojson }}}\n</tool_call>'
    "{%- endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}{% if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}"
    "<|im_start|>user{% endif %}\n<tool_response>\n{{ message.content }}\n</tool_response>"
    "{% if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>\n{% endif %}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# A Llama 3.1-style template on the test tokenizer's ChatML tokens: the same JSON call instruction and
# "parameters" key, tool results as "ipython" messages, the assistant's calls written back as JSON
LLAMA31 = (
    "{%- for message in messages %}"
    "{%- if message.role == 'user' and loop.last and tools %}<|im_start|>user\n"
    "Given the following functions, respond with a JSON for a function call with its proper arguments. "
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.\n'
    "{% for t in tools %}{{ t | tojson }}\n{% endfor %}{{ message.content }}<|im_end|>\n"
    "{%- elif message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant\n"
    "{%- set call = message.tool_calls[0].function %}"
    '{{ \'{"name": "\' + call.name + \'", "parameters": \' + (call.arguments | tojson) + "}" }}<|im_end|>\n'
    "{%- elif message.role in ('tool', 'ipython') %}<|im_start|>ipython\n{{ message.content }}<|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

WEATHER = {
    "name": "get_weather",
    "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def _asked_city(prompt: str) -> str:
    return prompt.rsplit("weather in ", 1)[1].split("?", 1)[0]


def hermes_reply(prompt: str) -> str:
    """What the scripted model writes: with the tool's result in the prompt, an answer quoting it; with the tool
    offered, a call for the city the user named last (a malformed one when asked for "Nowhere"); else text."""
    if "<tool_response>" in prompt:
        result = prompt.rsplit("<tool_response>\n", 1)[1].split("\n</tool_response>", 1)[0]
        return f"The tool says: {result}"
    if '"get_weather"' in prompt:
        city = _asked_city(prompt)
        if city == "Nowhere":
            return '<tool_call>\n{"name": "get_weather", "arguments": {city: Nowhere}\n</tool_call>'
        return f'Let me check.\n<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "{city}"}}}}\n</tool_call>'
    return "No tools here."


def llama31_reply(prompt: str) -> str:
    if "<|im_start|>ipython\n" in prompt:
        return "The tool says: " + prompt.rsplit("<|im_start|>ipython\n", 1)[1].split("<|im_end|>", 1)[0]
    if '"get_weather"' in prompt:
        city = _asked_city(prompt)
        if city == "Nowhere":
            return '{"name": "get_weather", "parameters": {"city": Nowhere}'
        return f'{{"name": "get_weather", "parameters": {{"city": "{city}"}}}}'
    return "No tools here."


FORMATS = {"hermes": (HERMES, hermes_reply, "Let me check."), "llama3_json": (LLAMA31, llama31_reply, "")}


@pytest.fixture(scope="module", params=list(FORMATS))
def running(tmp_path_factory, request):
    template, reply, _ = FORMATS[request.param]
    gguf = tiny_llama_gguf(tmp_path_factory.mktemp("tools") / "tiny.gguf", chat_template=template)
    tok = nanoseek.load_tokenizer(gguf)
    config = ScriptedConfig(vocab_size=tok.vocab_size, eos_token_id=tok.stop_token_ids[0])
    model = ScriptedModel(config, script_policy(tok, "<|im_start|>assistant\n", reply))
    with serve(gguf, model=model) as r:
        r.format = request.param
        yield r


@pytest.fixture(scope="module")
def preamble(running) -> str:
    """The text the format's model writes before its call."""
    return FORMATS[running.format][2]


@pytest.fixture(scope="module")
def client(running):
    return openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def claude(running):
    return anthropic.Anthropic(base_url=running.url, api_key="unused", max_retries=0, timeout=120)


QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [{"type": "function", "function": WEATHER}]


def _openai_stream(client, **kwargs):
    """A streamed reply put back together: content, tool calls (by index) and finish reason."""
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = call.id or entry["id"]
            entry["name"] += call.function.name or ""
            entry["arguments"] += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("stream", [False, True])
def test_openai_tool_round_trip(client, preamble, stream):
    kwargs = dict(model="tiny", messages=QUESTION, tools=TOOLS, max_tokens=200)
    if stream:
        content, calls, finish = _openai_stream(client, **kwargs)
    else:
        choice = client.chat.completions.create(**kwargs).choices[0]
        content, finish = choice.message.content, choice.finish_reason
        calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                 for c in choice.message.tool_calls]  # fmt: skip
    assert finish == "tool_calls" and (content or "") == preamble
    assert len(calls) == 1 and calls[0]["name"] == "get_weather" and calls[0]["id"]
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}

    conversation = QUESTION + [
        {"role": "assistant", "content": content, "tool_calls": [
            {"id": calls[0]["id"], "type": "function",
             "function": {"name": calls[0]["name"], "arguments": calls[0]["arguments"]}}]},
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": "sunny, 24 C"},
    ]  # fmt: skip
    kwargs["messages"] = conversation
    if stream:
        content, calls, finish = _openai_stream(client, **kwargs)
    else:
        choice = client.chat.completions.create(**kwargs).choices[0]
        content, calls, finish = choice.message.content, choice.message.tool_calls, choice.finish_reason
    assert content == "The tool says: sunny, 24 C" and not calls and finish == "stop"


def test_openai_tool_choice_none_and_no_tools_leave_the_reply_alone(client):
    for kwargs in ({"tools": TOOLS, "tool_choice": "none"}, {}):
        choice = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=50, **kwargs).choices[0]
        assert choice.message.content == "No tools here." and not choice.message.tool_calls
        assert choice.finish_reason == "stop"


ANTHROPIC_TOOLS = [{"name": "get_weather", "description": "the weather in a city",
                    "input_schema": WEATHER["parameters"]}]  # fmt: skip


def test_anthropic_tool_choice_none_leaves_the_reply_alone(claude):
    message = claude.messages.create(model="tiny", max_tokens=50, tools=ANTHROPIC_TOOLS, messages=QUESTION,
                                     tool_choice={"type": "none"})  # fmt: skip
    assert message.stop_reason == "end_turn" and [(b.type, b.text) for b in message.content] == [
        ("text", "No tools here.")]  # fmt: skip


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_tool_round_trip(claude, preamble, stream):
    kwargs = dict(model="tiny", max_tokens=200, tools=ANTHROPIC_TOOLS, messages=QUESTION)
    if stream:
        with claude.messages.stream(**kwargs) as s:
            kinds = [e.type for e in s]
            message = s.get_final_message()
        assert "input_json" in kinds  # the SDK's event for an input_json_delta
    else:
        message = claude.messages.create(**kwargs)
    assert message.stop_reason == "tool_use"
    texts = [b.text for b in message.content if b.type == "text"]
    assert [b.type for b in message.content] == ["text"] * bool(preamble) + ["tool_use"] and "".join(texts) == preamble
    use = message.content[-1]
    assert use.name == "get_weather" and use.input == {"city": "Paris"} and use.id.startswith("toolu_")

    kwargs["messages"] = QUESTION + [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in message.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                      "content": [{"type": "text", "text": "rain, 9 C"}]}]},
    ]  # fmt: skip
    if stream:
        with claude.messages.stream(**kwargs) as s:
            message = s.get_final_message()
    else:
        message = claude.messages.create(**kwargs)
    assert message.stop_reason == "end_turn"
    assert [(b.type, b.text) for b in message.content] == [("text", "The tool says: rain, 9 C")]


@pytest.mark.parametrize("stream", [False, True])
def test_a_malformed_call_is_plain_content(client, claude, running, stream):
    question = [{"role": "user", "content": "What is the weather in Nowhere?"}]
    want = FORMATS[running.format][1]('"get_weather" weather in Nowhere?')  # the scripted model's broken call
    kwargs = dict(model="tiny", messages=question, tools=TOOLS, max_tokens=200)
    if stream:
        content, calls, finish = _openai_stream(client, **kwargs)
    else:
        choice = client.chat.completions.create(**kwargs).choices[0]
        content, calls, finish = choice.message.content, choice.message.tool_calls, choice.finish_reason
    assert content == want and not calls and finish == "stop"
    kwargs["tools"] = ANTHROPIC_TOOLS
    if stream:
        with claude.messages.stream(**kwargs) as s:
            message = s.get_final_message()
    else:
        message = claude.messages.create(**kwargs)
    assert message.stop_reason == "end_turn" and [(b.type, b.text) for b in message.content] == [("text", want)]


def test_the_template_sees_the_conversation_in_its_own_shape(running):
    """The assistant's call comes back to the template with arguments as a mapping (Qwen writes them with
    tojson) and the tool result as a tool message."""
    import httpx

    messages = QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "snow"},
    ]  # fmt: skip
    ids = httpx.post(running.url + "/tokenize", json={"messages": messages, "add_special_tokens": False}).json()
    text = running.server.tokenizer.decode(ids["tokens"], skip_special_tokens=False)
    if running.format == "hermes":
        assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in text
        assert "<tool_response>\nsnow\n</tool_response>" in text
    else:
        assert '{"name": "get_weather", "parameters": {"city": "Oslo"}}' in text and "ipython\nsnow" in text


# ---- a tool_choice that forces a call is enforced by the grammar, on a random model ---------------------------

BOUNDED = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}}},
]  # fmt: skip


def _valid_call(name: str, arguments: dict) -> bool:
    if name == "get_weather":
        return set(arguments) == {"city", "days"} and arguments["city"] in ("Paris", "Oslo") and (
            type(arguments["days"]) is int and 1 <= arguments["days"] <= 7)  # fmt: skip
    return name == "get_time" and arguments in ({"zone": "UTC"}, {"zone": "CET"})


@pytest.fixture(scope="module", params=list(FORMATS))
def random_server(tmp_path_factory, request):
    gguf = tiny_llama_gguf(tmp_path_factory.mktemp("forced") / "tiny.gguf", chat_template=FORMATS[request.param][0],
                           context=2048)  # fmt: skip
    with serve(gguf) as r:
        yield r


def test_forced_tool_choice_makes_a_random_model_call(random_server):
    client = openai.OpenAI(base_url=random_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    kwargs = dict(model="tiny", messages=QUESTION, tools=BOUNDED, max_tokens=300, temperature=0)
    free = client.chat.completions.create(**kwargs).choices[0]
    assert not free.message.tool_calls and free.finish_reason != "tool_calls"  # left alone, it calls nothing
    for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
        reply = client.chat.completions.create(tool_choice=choice, **kwargs).choices[0]
        calls = reply.message.tool_calls
        assert reply.finish_reason == "tool_calls" and calls and not reply.message.content
        assert all(_valid_call(c.function.name, json.loads(c.function.arguments)) for c in calls)
        if isinstance(choice, dict):
            assert [c.function.name for c in calls] == ["get_time"]
    claude = anthropic.Anthropic(base_url=random_server.url, api_key="unused", max_retries=0, timeout=120)
    tools = [{"name": t["function"]["name"], "input_schema": t["function"]["parameters"]} for t in BOUNDED]
    message = claude.messages.create(
        model="tiny", max_tokens=300, messages=QUESTION, tools=tools, extra_body={"top_k": 1},
        tool_choice={"type": "tool", "name": "get_weather"},
    )  # fmt: skip
    assert message.stop_reason == "tool_use" and [b.type for b in message.content] == ["tool_use"]
    assert message.content[0].name == "get_weather" and _valid_call("get_weather", message.content[0].input)


def test_forced_tool_choice_errors(random_server):
    import httpx

    body = {"model": "tiny", "messages": QUESTION, "tools": BOUNDED, "max_tokens": 50}
    cases = [
        {"tool_choice": {"type": "function", "function": {"name": "nope"}}},
        {"tool_choice": "required", "response_format": {"type": "json_object"}},
    ]
    for extra in cases:
        r = httpx.post(random_server.url + "/v1/chat/completions", json={**body, **extra}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["message"]
