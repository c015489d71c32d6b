"""Structured output through the official openai SDK on a tiny random model (whose own replies are not JSON):
`response_format` json_schema replies parse and validate against the schema, streaming and not; json_object
replies are JSON objects; /v1/completions takes response_format too."""

from __future__ import annotations

import json

import pytest

from serve_helpers import serve, tiny_llama_gguf

openai = pytest.importorskip("openai")
pytest.importorskip("llguidance")

MESSAGES = [{"role": "user", "content": "describe a person"}]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "admin": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
    },
    "required": ["name", "age", "admin", "color", "tags"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}


def validate(value, schema=SCHEMA) -> None:
    """jsonschema when installed, else the checks this schema needs, by hand."""
    try:
        import jsonschema
    except ImportError:
        assert isinstance(value, dict) and set(value) == set(schema["required"])
        assert isinstance(value["name"], str) and len(value["name"]) <= 8
        assert isinstance(value["age"], int) and not isinstance(value["age"], bool) and 0 <= value["age"] <= 120
        assert isinstance(value["admin"], bool) and value["color"] in ("red", "green", "blue")
        assert isinstance(value["tags"], list) and len(value["tags"]) <= 2
        assert all(isinstance(t, str) and len(t) <= 3 for t in value["tags"])
    else:
        jsonschema.validate(value, schema)


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    with serve(tiny_llama_gguf(tmp_path_factory.mktemp("structured") / "tiny.gguf", context=512)) as r:
        yield r


@pytest.fixture(scope="module")
def client(running):
    return openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_the_model_alone_writes_no_json(client):
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=60, temperature=0)
    with pytest.raises(ValueError):
        json.loads(reply.choices[0].message.content)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_reply_validates(client, temperature):
    reply = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=200, temperature=temperature, seed=5, n=2, response_format=FORMAT
    )
    for choice in reply.choices:
        assert choice.finish_reason == "stop"
        validate(json.loads(choice.message.content))


def test_json_schema_stream_equals_whole_and_validates(client):
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=200, temperature=0, response_format=FORMAT)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole and chunks[-1].choices[0].finish_reason == "stop"
    validate(json.loads(text))


def test_json_object_reply_is_an_object(client):
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=100, temperature=0)
    with pytest.raises(ValueError):
        json.loads(client.chat.completions.create(**kwargs).choices[0].message.content)
    reply = client.chat.completions.create(response_format={"type": "json_object"}, **kwargs).choices[0]
    assert reply.finish_reason == "stop" and isinstance(json.loads(reply.message.content), dict)


def test_completions_take_response_format(client):
    reply = client.completions.create(
        model="tiny", prompt="person:", max_tokens=200, temperature=0, extra_body={"response_format": FORMAT}
    )
    validate(json.loads(reply.choices[0].text))
