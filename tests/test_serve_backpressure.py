"""A slow reader holds a bounded buffer and slows no other stream; connections are capped (issue 23).

- AsyncEngine's max_unread: a request whose reader has not taken that many outputs is paused (not scheduled, its
  cache kept); the engine then has no work for it, another request runs to completion meanwhile, and once the
  reader takes its outputs the request resumes and ends with the tokens it would have had alone.
- The server's streams (serving.Generation) submit with Limits.max_stream_buffer: a client that stops iterating
  leaves exactly that many outputs waiting, and a second stream completes meanwhile.
- A reply whose write waits longer than Limits.stream_stall_timeout for its client ends: its request is aborted.
- A connection opened while max_connections are open gets a 503 in the API's error shape with Retry-After.

No timing windows: the tests wait for states (paused, idle, closed), with generous deadlines only against hangs.
"""

from __future__ import annotations

import asyncio
import json
import queue
import socket
import time

import pytest

from serve_helpers import serve, tiny_llama_gguf

pytest.importorskip("transformers")


def _until(condition, what: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    return tiny_llama_gguf(tmp_path_factory.mktemp("backpressure") / "tiny.gguf", context=128)


@pytest.fixture(scope="module")
def model_and_tok(gguf):
    import nanoseek

    return nanoseek.load(gguf), nanoseek.load_tokenizer(gguf)


# ---- the engine: a reader behind pauses its request ----------------------------------------------------------


def test_a_reader_that_stops_pauses_its_request_and_others_run(model_and_tok):
    from nanoseek.engine.async_engine import AsyncEngine
    from nanoseek.engine.engine import Engine
    from nanoseek.engine.sampling import SamplingParams

    model, _ = model_and_tok
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    alone = Engine(model, eos_ids=[]).generate([[5, 6, 7]], params)[0].token_ids
    engine = AsyncEngine(Engine(model, eos_ids=[]))
    try:
        slow: queue.Queue = queue.Queue()
        rid = engine.submit([5, 6, 7], params, slow.put, max_unread=3)
        request = engine.engine.requests
        _until(lambda: rid in request and request[rid].paused, "the slow request to pause")
        _until(lambda: not engine.engine.has_work(), "the engine to go idle")
        assert engine.unread(rid) == 3 and slow.qsize() == 3  # exactly the bound: one token a step
        # another stream runs to completion while the slow one waits
        other = [o.token_id for o in engine.stream([9, 8], SamplingParams(temperature=0, max_tokens=10))]
        assert len(other) == 10
        assert slow.qsize() == 3 and len(request[rid].output_ids) == 3  # it did not move meanwhile
        # the reader reads on: the request resumes and ends as it would have alone
        tokens, most = [], 0
        while True:
            out = slow.get(timeout=60)
            most = max(most, engine.unread(rid) or 0)
            engine.taken(rid)
            if out.token_id is not None:
                tokens.append(out.token_id)
            if out.finished:
                break
        assert tokens == alone and most <= 3
        assert engine.unread(rid) is None  # forgotten once finished
    finally:
        engine.shutdown()


def test_max_unread_must_be_positive(model_and_tok):
    from nanoseek.engine.async_engine import AsyncEngine
    from nanoseek.engine.engine import Engine
    from nanoseek.engine.sampling import SamplingParams

    engine = AsyncEngine(Engine(model_and_tok[0], eos_ids=[]))
    try:
        with pytest.raises(ValueError, match="max_unread"):
            engine.submit([1, 2], SamplingParams(), lambda out: None, max_unread=0)
    finally:
        engine.shutdown()


# ---- the server's streams -------------------------------------------------------------------------------------


def test_a_stream_not_read_holds_the_bound_and_another_completes(model_and_tok):
    from nanoseek.engine.sampling import SamplingParams
    from nanoseek.serve.limits import Limits
    from nanoseek.serve.serving import make_server

    model, tok = model_and_tok
    server = make_server(model, tok, "tiny", limits=Limits(max_stream_buffer=2))
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)

    async def scenario():
        slow = server.generate([([5, 6, 7], params)])
        (rid,) = slow.choices
        reader = slow.__aiter__()
        first = await reader.__anext__()  # read once, then stop reading
        assert first.num_tokens >= 1
        request = server.engine.engine.requests
        while not request[rid].paused or server.engine.engine.has_work():
            await asyncio.sleep(0.005)
        assert server.engine.unread(rid) == 2  # the bound, whatever the engine's speed
        fast = server.generate([([9, 8], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))])
        deltas = [d async for d in fast]
        assert deltas[-1].finish_reason == "length" and deltas[-1].num_tokens == 12
        assert server.engine.unread(rid) == 2 and request[rid].paused
        rest = [d async for d in reader]  # read on: it resumes and finishes
        assert rest[-1].finish_reason == "length" and rest[-1].num_tokens == 30

    try:
        asyncio.run(asyncio.wait_for(scenario(), 120))
    finally:
        server.engine.shutdown()


def test_a_stalled_write_ends_the_stream_and_aborts_its_request(model_and_tok):
    """The app's SSE reply, called as uvicorn calls it, with a `send` that never completes a body write: what
    uvicorn's send does while a client reads nothing (its buffers full). After stream_stall_timeout the app
    returns (uvicorn then closes the connection) and the engine request is aborted."""
    from nanoseek.serve.app import create_app
    from nanoseek.serve.limits import Limits
    from nanoseek.serve.serving import make_server

    model, tok = model_and_tok
    server = make_server(model, tok, "tiny", limits=Limits(stream_stall_timeout=0.2))
    app = create_app(server)
    body = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 100, "stream": True, "ignore_eos": True})
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}  # fmt: skip
    sent: list[dict] = []

    async def scenario():
        never = asyncio.Event()
        requests = iter([{"type": "http.request", "body": body.encode(), "more_body": False}])

        async def receive():
            message = next(requests, None)
            if message is None:
                await never.wait()  # the client neither sends more nor disconnects
            return message

        async def send(message):
            sent.append(message)
            if message["type"] == "http.response.body" and message.get("body"):
                await never.wait()  # the client reads nothing

        await app(scope, receive, send)

    try:
        asyncio.run(asyncio.wait_for(scenario(), 60))
        assert sent[0]["status"] == 200
        engine = server.engine.engine
        _until(lambda: not engine.requests and not engine.has_work(), "the stream's request to be aborted")
    finally:
        server.engine.shutdown()


# ---- the connection cap ---------------------------------------------------------------------------------------


def _request(sock: socket.socket, path: str = "/v1/models") -> tuple[int, dict[str, str], bytes]:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "closed without a response"
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(rest) < int(headers["content-length"]):
        rest += sock.recv(65536)
    return int(lines[0].split()[1]), headers, rest


def test_a_connection_past_the_cap_gets_a_503_with_retry_after(gguf):
    from nanoseek.serve.limits import Limits

    with serve(gguf, limits=Limits(max_connections=2, header_timeout=60)) as running:
        host, port = running.url.removeprefix("http://").split(":")
        addr = (host, int(port))
        first, second = socket.create_connection(addr, timeout=30), socket.create_connection(addr, timeout=30)
        try:
            for s in (first, second):  # both served (so both accepted and open, kept alive)
                assert _request(s)[0] == 200
            with socket.create_connection(addr, timeout=30) as third:
                status, headers, body = _request(third, "/v1/chat/completions")
                assert status == 503 and headers["retry-after"] == "1" and headers["connection"] == "close"
                error = json.loads(body)["error"]
                assert error["type"] == "server_error" and "--max-connections" in error["message"]
                assert third.recv(1) == b""  # closed
            with socket.create_connection(addr, timeout=30) as anthropic:
                status, _, body = _request(anthropic, "/v1/messages")
                assert status == 503 and json.loads(body)["error"]["type"] == "overloaded_error"
            assert _request(first)[0] == 200  # the open ones are served as before
            first.close()

            def served() -> bool:  # once the server has seen the close, a new connection is served
                with socket.create_connection(addr, timeout=30) as s:
                    return _request(s)[0] == 200

            _until(served, "a connection to be served after one closed")
        finally:
            first.close()
            second.close()


def test_serve_flags_set_the_connection_and_stream_limits():
    from nanoseek.cli import build_parser
    from nanoseek.commands.serve import limits_from_args
    from nanoseek.serve.limits import Limits

    d = Limits()
    assert (d.max_connections, d.max_stream_buffer, d.stream_stall_timeout) == (512, 64, 60.0)
    argv = ["serve", "m", "--max-connections", "9", "--max-stream-buffer", "5", "--stream-stall-timeout", "2.5"]
    limits = limits_from_args(build_parser().parse_args(argv))
    assert (limits.max_connections, limits.max_stream_buffer, limits.stream_stall_timeout) == (9, 5, 2.5)
    with pytest.raises(ValueError, match="--max-connections"):
        limits_from_args(build_parser().parse_args(["serve", "m", "--max-connections", "0"]))
    assert build_parser().parse_args(["serve", "m", "--threads", "1"]).threads == 1
