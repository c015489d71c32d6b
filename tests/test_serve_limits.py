"""No client can hurt another: what a request may ask for is bounded, and a client without the key costs the
server next to nothing.

- The key is checked from the headers before the body is read: a keyless request announcing a 4 MB body gets its
  401 while the body is still unsent (a raw socket that sends the head only), and so does a wrong key.
- A body over the size limit is a 413 before it is read (Content-Length) or as soon as it is counted (chunked); a
  body that does not arrive in time is a 408; a request head that does not arrive in time (slowloris), or an idle
  connection, is closed.
- Per-request limits (n and prompts x n, logit_bias entries, stop lists, echo+logprobs prompt tokens) are a 400
  naming the limit and the `nanoseek serve` flag that sets it, before any work is done.
- Trailing-slash redirects are off (no Location built from the Host header), and /docs (Swagger assets from a CDN)
  is off unless asked for.

These are the mechanisms that keep a keyed stream's inter-token latency steady while a noisy client runs; they
are tested directly (deterministic), not by timing streams.
"""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from serve_helpers import serve, tiny_llama_gguf

pytest.importorskip("transformers")

KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
MESSAGES = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    return tiny_llama_gguf(tmp_path_factory.mktemp("serve_limits") / "tiny.gguf")


@pytest.fixture(scope="module")
def running(gguf):
    from nanoseek.serve.limits import Limits

    limits = Limits(header_timeout=0.8, body_timeout=0.8, max_sequences=4, max_logit_bias=4, max_stop=3,
                    max_stop_chars=8, max_echo_logprobs_tokens=12)  # fmt: skip
    with serve(gguf, api_key=KEY, limits=limits) as r:
        yield r


@pytest.fixture(scope="module")
def http(running):
    # a connection per request: a kept-alive one idle past the test server's 0.8 s head deadline may close
    # just as the next request goes out
    no_reuse = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(base_url=running.url, timeout=30, headers=AUTH, limits=no_reuse) as c:
        yield c


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body, read off a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection without a response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    return int(lines[0].split()[1]), headers, body


def _head(path: str, length: int, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
             f"Content-Length: {length}", *(f"{k}: {v}" for k, v in (headers or {}).items())]  # fmt: skip
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes the connection within `seconds` (whatever it sends before is ignored)."""
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
        return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


# ---- the key before the body --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer nope"}, {"x-api-key": "nope"}],
    ids=["none", "wrong bearer", "wrong x-api-key"],
)
def test_keyless_request_is_401_before_its_body_is_sent(running, headers):
    """4 MB announced, nothing sent: the 401 comes back at once, so the server never waited for (or read) it."""
    with _connect(running.url) as sock:
        sock.sendall(_head("/v1/chat/completions", 4_000_000, headers))
        status, response_headers, body = _read_response(sock)
        assert status == 401
        error = json.loads(body)["error"]
        assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
        assert response_headers.get("connection") == "close"
        assert _closed_within(sock, 5)  # the server does not keep the socket for the body it refused


def test_keyless_anthropic_request_gets_anthropics_401(running):
    with _connect(running.url) as sock:
        sock.sendall(_head("/v1/messages", 4_000_000))
        status, _, body = _read_response(sock)
    assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"


def test_keyless_full_body_still_gets_its_401(running):
    """A client that sends its whole (large) body before reading gets the 401, not a reset connection."""
    big = json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * (2 << 20)}]})
    reply = httpx.post(running.url + "/v1/chat/completions", content=big, timeout=30)
    assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"


def test_key_from_either_header_is_accepted(running):
    assert httpx.post(running.url + "/v1/chat/completions", json=CHAT, headers=AUTH, timeout=30).status_code == 200
    assert httpx.post(running.url + "/v1/messages", json=MESSAGES, headers={"x-api-key": KEY}, timeout=30).is_success


def test_unknown_routes_and_trailing_slashes_need_the_key_and_never_redirect(running, http):
    evil = {"Host": "evil.example"}
    for path in ("/v1/models/", "/v1/chat/completions/", "/v1/nothing"):
        keyless = httpx.get(running.url + path, headers=evil, timeout=30)
        assert keyless.status_code == 401 and "location" not in keyless.headers, path
        keyed = http.get(path, headers=evil)
        assert keyed.status_code in (404, 405) and "location" not in keyed.headers, path
    assert httpx.get(running.url + "/health", timeout=30).status_code == 200  # probes stay open
    assert httpx.get(running.url + "/metrics", timeout=30).status_code == 200


# ---- body and head: size and time ---------------------------------------------------------------------------


def test_announced_oversize_body_is_413_before_it_is_sent(running):
    with _connect(running.url) as sock:
        sock.sendall(_head("/v1/chat/completions", 10 << 20, AUTH))
        status, headers, body = _read_response(sock)
    assert status == 413 and "larger than" in json.loads(body)["error"]["message"]
    assert headers.get("connection") == "close"


def test_slow_body_is_408(running):
    with _connect(running.url) as sock:
        sock.sendall(_head("/v1/chat/completions", 100, AUTH) + b'{"model"')
        start = time.monotonic()
        status, _, body = _read_response(sock)
        assert time.monotonic() - start < 5
    assert status == 408 and "0.8 seconds" in json.loads(body)["error"]["message"]


def test_slow_request_head_is_closed(running):
    """Slowloris: a byte of the head every 0.2 s never completes it; the connection is closed at the deadline."""
    with _connect(running.url) as sock:
        start = time.monotonic()
        closed = False
        for byte in b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            sock.settimeout(0.2)
            try:
                if sock.recv(65536) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
        assert closed and time.monotonic() - start < 5


def test_oversize_request_head_is_400(running):
    """A head still incomplete past 16 KiB is refused (h11 checks what it holds while waiting for the rest)."""
    with _connect(running.url) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (20 << 10))  # and no end
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 400 ")


def test_idle_connections_are_closed(running, http):
    with _connect(running.url) as sock:  # never sends anything
        assert _closed_within(sock, 5)
    with _connect(running.url) as sock:  # one request, then silence on the kept-alive connection
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_response(sock)[0] == 200
        sock.sendall(b"GET /hea")  # the next head starts and stalls
        assert _closed_within(sock, 5)
    assert http.get("/v1/models").status_code == 200


# ---- per-request limits -------------------------------------------------------------------------------------

LIMITED = {
    "chat n": ("/v1/chat/completions", {**CHAT, "n": 5}, "n", "--max-sequences"),
    "prompts x n": ("/v1/completions", {**COMPLETION, "prompt": ["a", "b", "c"], "n": 2}, "n", "--max-sequences"),
    "logit_bias": ("/v1/chat/completions", {**CHAT, "logit_bias": {str(i): 1 for i in range(5)}}, "logit_bias",
                   "--max-logit-bias"),
    "completion logit_bias": ("/v1/completions", {**COMPLETION, "logit_bias": {str(i): 1 for i in range(5)}},
                              "logit_bias", "--max-logit-bias"),
    "stop list": ("/v1/chat/completions", {**CHAT, "stop": ["a", "b", "c", "d"]}, "stop", "--max-stop"),
    "stop string": ("/v1/completions", {**COMPLETION, "stop": "x" * 9}, "stop", "--max-stop-chars"),
    "stop_token_ids": ("/v1/chat/completions", {**CHAT, "stop_token_ids": [1, 2, 3, 4]}, "stop_token_ids",
                       "--max-stop"),
    "stop_sequences": ("/v1/messages", {**MESSAGES, "stop_sequences": ["a", "b", "c", "d"]}, None, "--max-stop"),
    "stop_sequence length": ("/v1/messages", {**MESSAGES, "stop_sequences": ["y" * 9]}, None, "--max-stop-chars"),
    "echo logprobs tokens": ("/v1/completions", {**COMPLETION, "prompt": "x" * 13, "echo": True, "logprobs": 1},
                             "prompt", "--max-echo-logprobs-tokens"),
    "echo logprobs tokens over prompts": (
        "/v1/completions", {**COMPLETION, "prompt": ["x" * 7, "y" * 7], "echo": True, "logprobs": 1}, "prompt",
        "--max-echo-logprobs-tokens"),
}  # fmt: skip


@pytest.mark.parametrize("case", LIMITED)
def test_request_over_a_limit_is_400_naming_it(http, case):
    path, body, param, flag = LIMITED[case]
    reply = http.post(path, json=body)
    assert reply.status_code == 400, reply.text
    if path == "/v1/messages":
        error = reply.json()["error"]
        assert error["type"] == "invalid_request_error"
    else:
        error = reply.json()["error"]
        assert error["param"] == param
    assert flag in error["message"] and "at most" in error["message"], error["message"]


AT_LIMIT = {
    "chat n": ("/v1/chat/completions", {**CHAT, "n": 4}),
    "prompts x n": ("/v1/completions", {**COMPLETION, "prompt": ["a", "b"], "n": 2}),
    "logit_bias": ("/v1/chat/completions", {**CHAT, "logit_bias": {str(i): 1 for i in range(4)}}),
    "stop": ("/v1/completions", {**COMPLETION, "stop": ["a", "b", "x" * 8], "stop_token_ids": [1, 2, 3]}),
    "stop_sequences": ("/v1/messages", {**MESSAGES, "stop_sequences": ["a", "b", "y" * 8]}),
    "echo logprobs": ("/v1/completions", {**COMPLETION, "prompt": ["x" * 6, "y" * 6], "echo": True, "logprobs": 1,
                                          "max_tokens": 1}),
}  # fmt: skip


@pytest.mark.parametrize("case", AT_LIMIT)
def test_request_at_the_limits_is_served(http, case):
    path, body = AT_LIMIT[case]
    reply = http.post(path, json=body)
    assert reply.status_code == 200, reply.text


def test_defaults_are_the_documented_ones():
    from nanoseek.serve.limits import Limits

    d = Limits()
    assert (d.max_body_bytes, d.header_timeout, d.body_timeout) == (4 << 20, 10.0, 60.0)
    assert (d.max_sequences, d.max_logit_bias, d.max_stop, d.max_stop_chars) == (16, 300, 16, 256)
    assert d.max_echo_logprobs_tokens == 16384


def test_readme_states_the_defaults():
    """The README's table of limits gives each flag's default as the code has it."""
    from pathlib import Path

    from nanoseek.serve.connection import MAX_HEAD_BYTES
    from nanoseek.serve.limits import Limits, flag
    from nanoseek.serve.prompt_logprobs import CHUNK

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    d = Limits()
    shown = {"max_body_bytes": f"{d.max_body_bytes >> 20} MiB", "header_timeout": f"{d.header_timeout:g} s",
             "body_timeout": f"{d.body_timeout:g} s",
             "stream_stall_timeout": f"{d.stream_stall_timeout:g} s"}  # fmt: skip
    for name, value in vars(d).items():
        assert f"| {shown.get(name, value)} | `{flag(name)}` |" in readme, name
    assert f"| {MAX_HEAD_BYTES >> 10} KiB | |" in readme and f"computed {CHUNK} positions at a time" in readme


def test_serve_flags_set_the_limits():
    from nanoseek.cli import build_parser
    from nanoseek.commands.serve import limits_from_args
    from nanoseek.serve.limits import Limits

    args = build_parser().parse_args(["serve", "m"])
    assert limits_from_args(args) == Limits()
    argv = ["serve", "m", "--max-body-mib", "1", "--header-timeout", "3", "--body-timeout", "4"]
    argv += ["--max-sequences", "2", "--max-logit-bias", "5", "--max-stop", "6", "--max-stop-chars", "7"]
    argv += ["--max-echo-logprobs-tokens", "8"]
    assert limits_from_args(build_parser().parse_args(argv)) == Limits(1 << 20, 3.0, 4.0, 2, 5, 6, 7, 8)
    with pytest.raises(ValueError, match="--max-logit-bias"):
        limits_from_args(build_parser().parse_args(["serve", "m", "--max-logit-bias", "-1"]))


# ---- /docs --------------------------------------------------------------------------------------------------


def test_docs_are_off_by_default_and_the_schema_stays(running, gguf):
    assert httpx.get(running.url + "/docs", timeout=30).status_code in (401, 404)
    assert httpx.get(running.url + "/redoc", timeout=30).status_code in (401, 404)
    assert httpx.get(running.url + "/openapi.json", timeout=30).status_code == 200
    with serve(gguf, docs=True) as r:
        assert httpx.get(r.url + "/docs", timeout=30).status_code == 200


# ---- echo + logprobs in chunks ------------------------------------------------------------------------------


def test_prompt_logprobs_in_chunks_match_the_whole_forward(gguf):
    """Logits made a few positions at a time (bounded memory) give what one forward of the whole prompt gives."""
    import torch

    import nanoseek
    from nanoseek.serve.prompt_logprobs import prompt_logprobs

    model = nanoseek.load(gguf).eval()
    ids = [(7 * i + 3) % 200 for i in range(40)]
    with torch.inference_mode():
        whole = model(torch.tensor([ids]))[0].float().log_softmax(-1)
    for chunk in (1, 3, 16, 256):
        items = prompt_logprobs(model, ids, 2, str, chunk=chunk)
        assert [t.token_id for t in items] == ids and items[0].logprob is None
        for i, t in enumerate(items[1:]):
            assert t.logprob == pytest.approx(whole[i, ids[i + 1]].item(), abs=1e-4)
            assert [int(s) for s, _ in t.top] == whole[i].topk(2).indices.tolist()
