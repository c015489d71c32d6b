"""The FastAPI app: thin routes over the protocol models and the serving functions.

    app = create_app(server, api_key="secret")       # server: serving.ModelServer
    uvicorn.run(app, host="127.0.0.1", port=8000)

Every route parses its body into a pydantic request model, calls one serving function and returns JSON or an
SSE stream. Errors take the shape of the API the route belongs to (errors.py). Around the routes, outermost
first: request counting by status for /metrics; the API key, checked from the headers before anything reads the
body (a 401 costs the server no body); the body, read whole under a size limit (413) and a deadline (408). Each
request's own limits (limits.py) are checked before any work; they and the HTTP limits come from the server's
`Limits` (`nanoseek serve` flags). Trailing-slash redirects are off (a redirect's Location would be built from the
client's Host header) and so is /docs unless asked for (Swagger's page loads its assets from a CDN). A streaming client
that disconnects cancels its stream, and a non-streaming one its request: both abort the engine requests and
free their cache blocks. Shutting down (uvicorn's lifespan, e.g. on SIGTERM) stops the engine's thread.
`/` serves the web chat (static/, no build step), which talks to /v1/chat/completions like any client.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanoseek.serve import protocol_anthropic as pa
from nanoseek.serve import protocol_embeddings as pe
from nanoseek.serve import protocol_openai as po
from nanoseek.serve import protocol_responses as pr
from nanoseek.serve import serving_anthropic as sa
from nanoseek.serve import serving_embeddings as se
from nanoseek.serve import serving_openai as so
from nanoseek.serve import serving_responses as sr
from nanoseek.serve.errors import APIError, error_body
from nanoseek.serve.limits import Limits
from nanoseek.serve.serving import ModelServer

log = logging.getLogger("nanoseek.serve")

DISCONNECTED = 499  # nginx's status for "the client closed the request"
STATIC = Path(__file__).parent / "static"  # the web chat (package data: the wheel ships it)
# The chat page runs only its own scripts and styles, talks only to this server and shows no remote images: a
# second line of defence behind the sanitizer if a model's reply ever smuggled HTML through.
CHAT_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
            "object-src 'none'; base-uri 'none'; frame-ancestors 'none'")  # fmt: skip


def create_app(server: ModelServer, *, api_key: str | None = None, docs: bool = False) -> FastAPI:
    """The app over `server`, with its limits (`server.limits`). `docs`: serve Swagger's /docs page (its scripts
    and styles come from a CDN, so a browser offline shows a blank page); /openapi.json is always there."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(server.engine.shutdown)  # aborts what is still in flight, stops the thread

    # strict_content_type=False: a JSON body without a Content-Type header (a bare `curl --data-binary`) is JSON
    app = FastAPI(title="nanoseek", summary="OpenAI- and Anthropic-compatible server", lifespan=lifespan,
                  strict_content_type=False, redirect_slashes=False, docs_url="/docs" if docs else None,
                  redoc_url=None)  # fmt: skip
    app.state.server, app.state.limits = server, server.limits
    routers = [_api_routes(server), _open_routes(server)]
    app.include_router(routers[0])
    app.include_router(routers[1])
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _add_error_handlers(app)
    _document_400s(app)
    limits: Limits = server.limits
    app.add_middleware(_LimitBody, max_bytes=limits.max_body_bytes, timeout=limits.body_timeout)
    if api_key:
        open_paths = {r.path for r in routers[1].routes} | {"/openapi.json", "/docs", "/docs/oauth2-redirect"}
        app.add_middleware(_RequireKey, api_key=api_key, open_paths=open_paths)
    app.add_middleware(
        _CountRequests, server=server, paths={r.path for rs in routers for r in rs.routes}
    )  # outermost: sees 401s, 408s and 413s
    return app


# ---- routes ------------------------------------------------------------------------------------------------


def _api_routes(server: ModelServer) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/chat/completions", response_model=po.ChatCompletion)
    async def chat_completions(body: po.ChatCompletionRequest, request: Request):
        _log_unknown(body)
        server.limits.check_chat(body)
        gen, in_reasoning = await so.start_chat(server, body)
        if body.stream:
            return EventStream(so.chat_stream(server, body, gen, in_reasoning), background=BackgroundTask(gen.close))
        return await _unless_disconnected(request, so.chat_response(server, body, gen, in_reasoning), gen.close)

    @router.post("/v1/completions", response_model=po.Completion)
    async def completions(body: po.CompletionRequest, request: Request):
        _log_unknown(body)
        server.limits.check_completion(body)
        gen, prompts = await so.start_completion(server, body)
        if body.stream:
            return EventStream(so.completion_stream(server, body, gen, prompts), background=BackgroundTask(gen.close))
        return await _unless_disconnected(request, so.completion_response(server, body, gen, prompts), gen.close)

    @router.post("/v1/responses", response_model=pr.Response)
    async def responses(body: pr.ResponsesRequest, request: Request):
        _log_unknown(body)
        gen, in_reasoning = await sr.start_response(server, body)
        if body.stream:
            return EventStream(
                sr.response_stream(server, body, gen, in_reasoning), background=BackgroundTask(gen.close)
            )
        return await _unless_disconnected(request, sr.response_whole(server, body, gen, in_reasoning), gen.close)

    @router.post("/v1/embeddings", response_model=pe.EmbeddingResponse)
    async def embeddings(body: pe.EmbeddingRequest, request: Request):
        _log_unknown(body)
        return await _unless_disconnected(request, se.create_embeddings(server, body), lambda: None)

    @router.post("/v1/messages", response_model=pa.MessageResponse)
    async def messages(body: pa.MessagesRequest, request: Request):
        _log_unknown(body)
        server.limits.check_messages(body)
        gen, in_reasoning = await sa.start_message(server, body)
        if body.stream:
            return EventStream(sa.message_stream(server, body, gen, in_reasoning), background=BackgroundTask(gen.close))
        return await _unless_disconnected(request, sa.message_response(server, body, gen, in_reasoning), gen.close)

    @router.post("/v1/messages/count_tokens", response_model=pa.CountTokensResponse)
    async def count_tokens(body: pa.CountTokensRequest):
        return await sa.count_tokens(server, body)

    @router.get("/v1/models", response_model=po.ModelList)
    async def models():
        return po.ModelList(data=[_model_card(server, name) for name in [server.name, *server.adapters]])

    @router.get("/v1/models/{model_id}", response_model=po.ModelCard, responses={404: {"description": "Unknown model"}})
    async def model(model_id: str):
        return _model_card(server, server.model_name(server.resolve_model(model_id)))

    @router.post("/tokenize", response_model=po.TokenizeResponse)
    async def tokenize(body: po.TokenizeRequest):
        server.resolve_model(body.model)  # an adapter tokenizes as its base
        if body.messages is not None:
            ids, _ = await server.chat_prompt([m.for_template() for m in body.messages], body.add_generation_prompt)
        else:
            ids = await server.encode(body.prompt, body.add_special_tokens)
        return po.TokenizeResponse(count=len(ids), max_model_len=server.context_length, tokens=ids)

    @router.post("/detokenize", response_model=po.DetokenizeResponse)
    async def detokenize(body: po.DetokenizeRequest):
        server.resolve_model(body.model)
        ids = server.check_tokens(body.tokens, "tokens")
        return po.DetokenizeResponse(prompt=await asyncio.to_thread(server.tokenizer.decode, ids))

    return router


def _open_routes(server: ModelServer) -> APIRouter:
    """Routes without auth: a health probe, Prometheus scraping and the web chat's page."""
    router = APIRouter()

    @router.get("/health")
    async def health():
        if server.healthy():
            return {"status": "ok"}
        return JSONResponse({"status": "error", "error": repr(server.engine.error)}, status_code=503)

    @router.get("/metrics", response_class=Response)
    async def metrics():
        content, media_type = server.metrics.render()
        return Response(content, media_type=media_type)

    @router.get("/", include_in_schema=False)
    async def chat_page():  # the web chat; it asks for the API key itself when the server needs one
        return FileResponse(STATIC / "index.html", headers={"content-security-policy": CHAT_CSP})

    return router


def _model_card(server: ModelServer, name: str) -> po.ModelCard:
    """The base model's card, or a LoRA adapter's (its parent the base, its root its folder, as vLLM lists them)."""
    card = po.ModelCard(id=name, created=server.created, max_model_len=server.context_length, root=name)
    if name != server.name:
        card.parent, card.root = server.name, server.adapter_paths.get(name, name)
    return card


def _log_unknown(body: BaseModel) -> None:
    if body.model_extra:
        log.info("ignored unknown fields: %s", ", ".join(sorted(body.model_extra)))


# ---- auth, disconnects, streams -----------------------------------------------------------------------------


async def _unless_disconnected(request: Request, work: Awaitable[BaseModel], on_cancel: Callable[[], None]):
    """Await `work` (a non-streaming reply) unless the client goes away first: then cancel it and abort."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            on_cancel()
    if task.cancelled():
        return Response(status_code=DISCONNECTED)
    return JSONResponse(task.result().model_dump())


class EventStream(StreamingResponse):
    """An SSE response that stops as soon as the client disconnects, also while no token is coming (Starlette's
    own, under ASGI 2.4, only notices on its next write). A client that stops reading fills the socket's buffers,
    then the stream's (Generation pauses its requests); a write that waits `Limits.stream_stall_timeout` seconds
    ends the stream: its requests are aborted (the background task) and uvicorn closes the connection."""

    media_type = "text/event-stream"

    def __init__(self, content, background: BackgroundTask | None = None):
        super().__init__(content, background=background, headers={"cache-control": "no-cache",
                                                                   "x-accel-buffering": "no"})  # fmt: skip

    async def __call__(self, scope, receive, send) -> None:
        async with anyio.create_task_group() as group:

            async def stream() -> None:
                with contextlib.suppress(OSError):  # the client went away mid-write
                    await self.stream_response(_within(send, scope))
                group.cancel_scope.cancel()

            group.start_soon(stream)
            await self.listen_for_disconnect(receive)
            group.cancel_scope.cancel()
        if self.background is not None:
            await self.background()


def _within(send, scope):
    """`send`, ending the stream (logged; the caller's task group then cancels it) when one write waits longer
    than the app's stream_stall_timeout for the client to read."""
    limits = getattr(scope.get("app"), "state", None) and scope["app"].state.limits
    seconds = limits.stream_stall_timeout if limits is not None else None

    async def send_within(message) -> None:
        if seconds is None:
            return await send(message)
        with anyio.move_on_after(seconds) as deadline:
            await send(message)
        if deadline.cancelled_caught:
            log.warning("a stream's client read nothing for %g s: the stream is aborted (--stream-stall-timeout)",
                        seconds)  # fmt: skip
            raise OSError("the client stopped reading")

    return send_within


# ---- errors and middleware ----------------------------------------------------------------------------------


def _error(path: str, status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(path, status, message, param, code), status_code=status)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return "the request body is not valid JSON", None
    parts, params = [], []
    for e in errors[:3]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc}: {e.get('msg')}" if loc else f"the request body must be a JSON object ({e.get('msg')}; "
                     "send it as Content-Type: application/json)")  # fmt: skip
        params.append(loc)
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more, params[0] or None


def _document_400s(app: FastAPI) -> None:
    """FastAPI's schema promises a 422 for an invalid request; this server answers 400 in the API's error shape
    (as OpenAI and Anthropic do), so /openapi.json says 400 (schemathesis checks responses against it)."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            for operation in (op for path in schema["paths"].values() for op in path.values()):
                if operation.get("responses", {}).pop("422", None) is not None:
                    operation["responses"]["400"] = {"description": "Invalid request (the API's error JSON)"}
        return app.openapi_schema

    app.openapi = openapi


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return _error(request.url.path, exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return _error(request.url.path, 400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        response = _error(request.url.path, exc.status_code, detail)
        response.headers.update(exc.headers or {})  # e.g. a 405's Allow, which RFC 9110 requires
        return response

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return _error(request.url.path, 500, f"internal error: {type(exc).__name__}")


LINGER_S = 1.0  # how long a refused request's unsent body is read and dropped before the connection closes


async def _refuse(scope, receive, send, status: int, message: str, code: str | None = None, linger: float = LINGER_S):
    """Answer an error before the app runs, and close the connection (the body is not wanted, and a client that
    keeps sending it must not keep the socket). The reply goes out at once; then, for up to `linger` seconds, what
    the client still sends is read and dropped, so that one which writes its whole body before reading gets the
    reply rather than a connection reset by unread data."""
    content = json.dumps(error_body(scope["path"], status, message, code=code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode()),
               (b"connection", b"close")]  # fmt: skip
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content, "more_body": True})
    if linger > 0:
        with anyio.move_on_after(linger):
            while (await receive()).get("more_body", False):
                pass
    await send({"type": "http.response.body", "body": b""})


class _RequireKey:
    """Refuses a request without the API key (Authorization: Bearer KEY or x-api-key: KEY) with a 401, from its
    headers alone: a keyless client's body is never read, parsed or buffered. Paths in `open_paths` (and the web
    chat's /static files) need no key; every other path does, unknown ones included (no route discovery)."""

    def __init__(self, app, api_key: str, open_paths: set[str]):
        self.app, self.expected, self.open_paths = app, api_key.encode(), open_paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self._open(scope["path"]) or self._has_key(scope["headers"]):
            return await self.app(scope, receive, send)
        await _refuse(scope, receive, send, 401, "invalid or missing API key (send Authorization: Bearer KEY or "
                      "x-api-key: KEY)", code="invalid_api_key")  # fmt: skip

    def _open(self, path: str) -> bool:
        return path in self.open_paths or path.startswith("/static/")

    def _has_key(self, headers: list[tuple[bytes, bytes]]) -> bool:
        found = dict(headers)
        bearer = found.get(b"authorization", b"")
        given = bearer[7:] if bearer[:7].lower() == b"bearer " else found.get(b"x-api-key", b"")
        return hmac.compare_digest(given.strip(), self.expected)


class _LimitBody:
    """Reads the whole body before the app parses it, refusing one over `max_bytes` (413: announced in
    Content-Length, or seen while reading a chunked body) or one that takes more than `timeout` seconds to arrive
    (408: a slow sender holds neither a handler nor a growing buffer for long)."""

    def __init__(self, app, max_bytes: int, timeout: float):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = f"the request body is larger than {self.max_bytes} bytes"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await _refuse(scope, receive, send, 413, too_big)
        try:
            async with asyncio.timeout(self.timeout):
                body = await self._read(receive)
        except TimeoutError:
            message = f"the request body did not arrive within {self.timeout:g} seconds"
            return await _refuse(scope, receive, send, 408, message, linger=0)
        if body is None:  # the client went away
            return
        if len(body) > self.max_bytes:
            return await _refuse(scope, receive, send, 413, too_big)
        pending = [{"type": "http.request", "body": bytes(body), "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    async def _read(self, receive) -> bytearray | None:
        """The body, or as much of it as shows it is over the limit; None if the client disconnected."""
        body, more = bytearray(), True
        while more and len(body) <= self.max_bytes:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
        return body


class _CountRequests:
    """Counts requests by endpoint (known routes only, to bound the labels) and response status."""

    def __init__(self, app, server: ModelServer, paths: set[str]):
        self.app, self.counter, self.paths = app, server.metrics.requests, paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status, counted = DISCONNECTED, False
        endpoint = scope["path"] if scope["path"] in self.paths else "other"

        async def send_and_note(message) -> None:
            nonlocal status, counted
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False) and not counted:
                # counted before the last bytes go out: a client that has read the whole reply (a stream's
                # [DONE] included) and then reads /metrics finds its request there
                counted = True
                self.counter.labels(endpoint, str(status)).inc()
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            if not counted:  # the client left, or the app failed before the end of the body
                self.counter.labels(endpoint, str(status)).inc()
