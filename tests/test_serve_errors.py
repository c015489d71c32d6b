"""Bad input gets the API's error JSON and a 4xx, the server keeps serving; --api-key auth."""

from __future__ import annotations

import httpx
import pytest

from serve_helpers import serve, tiny_llama_gguf

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")
pytest.importorskip("transformers")

USER = [{"role": "user", "content": "hi"}]
CHAT = {"model": "tiny", "messages": USER, "max_tokens": 2}
MESSAGES = {"model": "tiny", "messages": USER, "max_tokens": 2}


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    return tiny_llama_gguf(tmp_path_factory.mktemp("serve_errors") / "tiny.gguf")


@pytest.fixture(scope="module")
def http(gguf):
    with serve(gguf) as r, httpx.Client(base_url=r.url, timeout=60) as c:
        yield c


def _openai_error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def _anthropic_error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    return body["error"]


def _still_serving(http: httpx.Client) -> None:
    assert http.get("/health").status_code == 200
    assert http.post("/v1/chat/completions", json=CHAT).status_code == 200


LONG = "the " * 100  # far more than the tiny model's 64-token context

OPENAI_CASES = {
    "malformed json": (b'{"messages": [', 400),
    "invalid utf-8": (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400),
    "body not an object": (b"[1, 2]", 400),
    "messages wrong type": ({**CHAT, "messages": 3}, 400),
    "temperature wrong type": ({**CHAT, "temperature": "hot"}, 400),
    "role unknown": ({**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400),
    "unknown model": ({**CHAT, "model": "gpt-9"}, 404),
    "negative max_tokens": ({**CHAT, "max_tokens": -1}, 400),
    "huge max_tokens": ({**CHAT, "max_tokens": 10**9}, 400),
    "huge max_completion_tokens": ({**CHAT, "max_completion_tokens": 10**12}, 400),
    "temperature out of range": ({**CHAT, "temperature": 3.5}, 400),
    "top_p out of range": ({**CHAT, "top_p": 0}, 400),
    "empty messages": ({**CHAT, "messages": []}, 400),
    "prompt longer than context": ({**CHAT, "messages": [{"role": "user", "content": LONG}]}, 400),
    "logit_bias key not an id": ({**CHAT, "logit_bias": {"abc": 1}}, 400),
    "logit_bias out of range": ({**CHAT, "logit_bias": {"5": 1000}}, 400),
    "too many top_logprobs": ({**CHAT, "logprobs": True, "top_logprobs": 50}, 400),
    "stream_options without stream": ({**CHAT, "stream_options": {"include_usage": True}}, 400),
    "image content": ({**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400),
    "response_format unknown type": ({**CHAT, "response_format": {"type": "yaml"}}, 400),
    "json_schema missing": ({**CHAT, "response_format": {"type": "json_schema"}}, 400),
    "json_schema invalid": (
        {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
        400,
    ),
    "json_schema unsatisfiable": (
        {
            **CHAT,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 3, "maximum": 1}},
            },
        },
        400,
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", OPENAI_CASES)
def test_bad_chat_requests_get_openai_errors(http, case):
    body, status = OPENAI_CASES[case]
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {
        "json": body}  # fmt: skip
    error = _openai_error(http.post("/v1/chat/completions", **kwargs), status)
    if case == "prompt longer than context":
        assert error["code"] == "context_length_exceeded" and "64" in error["message"]
    _still_serving(http)


COMPLETION_CASES = {
    "token id outside vocabulary": ({"prompt": [1, 2, 10**6]}, 400),
    "empty prompt": ({"prompt": ""}, 400),
    "long prompt": ({"prompt": LONG}, 400),
    "suffix": ({"prompt": "x", "suffix": "y"}, 400),
    "n too large": ({"prompt": "x", "n": 1000}, 400),
}


@pytest.mark.parametrize("case", COMPLETION_CASES)
def test_bad_completion_requests(http, case):
    body, status = COMPLETION_CASES[case]
    _openai_error(http.post("/v1/completions", json=body), status)
    _still_serving(http)


ANTHROPIC_CASES = {
    "malformed json": (b"{", 400),
    "missing max_tokens": ({"model": "tiny", "messages": USER}, 400),
    "negative max_tokens": ({**MESSAGES, "max_tokens": -5}, 400),
    "huge max_tokens": ({**MESSAGES, "max_tokens": 10**9}, 400),
    "temperature above 1": ({**MESSAGES, "temperature": 1.5}, 400),
    "empty messages": ({**MESSAGES, "messages": []}, 400),
    "unknown model": ({**MESSAGES, "model": "claude-9"}, 404),
    "long prompt": ({**MESSAGES, "messages": [{"role": "user", "content": LONG}]}, 400),
    "image block": ({**MESSAGES, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, 400),
}


@pytest.mark.parametrize("case", ANTHROPIC_CASES)
def test_bad_messages_get_anthropic_errors(http, case):
    body, status = ANTHROPIC_CASES[case]
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {
        "json": body}  # fmt: skip
    error = _anthropic_error(http.post("/v1/messages", **kwargs), status)
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    _still_serving(http)


def test_ten_megabyte_body_is_413_announced_or_chunked(http):
    big = b'{"messages": "' + b"x" * (10 << 20) + b'"}'
    _openai_error(http.post("/v1/chat/completions", content=big), 413)
    chunked = (big[i : i + (1 << 20)] for i in range(0, len(big), 1 << 20))  # no Content-Length: read and counted
    _openai_error(http.post("/v1/chat/completions", content=chunked), 413)
    assert _anthropic_error(http.post("/v1/messages", content=big), 413)["type"] == "request_too_large"
    _still_serving(http)


def test_unknown_route_and_bad_detokenize(http):
    _openai_error(http.get("/v1/nothing"), 404)
    _openai_error(http.post("/detokenize", json={"tokens": [-1]}), 400)
    _openai_error(http.post("/tokenize", json={}), 400)
    _still_serving(http)


def test_the_sdks_raise_their_own_errors(http):
    url = str(http.base_url).rstrip("/")
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="tiny", messages=USER, temperature=5)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=USER)
    claude = anthropic.Anthropic(base_url=url, api_key="x", max_retries=0)
    with pytest.raises(anthropic.BadRequestError, match="context"):
        claude.messages.create(model="tiny", messages=[{"role": "user", "content": LONG}], max_tokens=4)


def test_api_key_is_required_when_set(gguf):
    with serve(gguf, api_key="s3cret") as r, httpx.Client(base_url=r.url, timeout=60) as http:
        assert _openai_error(http.post("/v1/chat/completions", json=CHAT), 401)["code"] == "invalid_api_key"
        wrong = {"Authorization": "Bearer nope"}
        _openai_error(http.post("/v1/chat/completions", json=CHAT, headers=wrong), 401)
        _openai_error(http.get("/v1/models"), 401)
        assert _anthropic_error(http.post("/v1/messages", json=MESSAGES), 401)["type"] == "authentication_error"
        assert http.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer s3cret"}).is_success
        assert http.post("/v1/messages", json=MESSAGES, headers={"x-api-key": "s3cret"}).is_success
        assert http.get("/health").status_code == 200  # probes and scraping stay open
        assert http.get("/metrics").status_code == 200
        client = openai.OpenAI(base_url=r.url + "/v1", api_key="s3cret", max_retries=0)
        assert client.models.list().data[0].id == "tiny"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=r.url + "/v1", api_key="bad", max_retries=0).models.list()
        claude = anthropic.Anthropic(base_url=r.url, api_key="s3cret", max_retries=0)
        assert claude.messages.create(**MESSAGES).usage.output_tokens >= 0
