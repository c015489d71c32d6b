"""uvicorn's settings for the app: connections that send nothing useful are closed.

    config = uvicorn_config(app, host="127.0.0.1", port=8000)      # the app from app.create_app
    uvicorn.Server(config).run()

uvicorn times out a kept-alive connection only while no byte arrives, and a new connection not at all, so a client
that sends a request head one byte at a time (slowloris), or nothing, holds its socket for ever. The protocol
here gives every request head a deadline, `Limits.header_timeout` seconds from the connection's start or the end of
the previous reply; the body's own deadline is the app's (a 408, app.py). Heads are at most 16 KiB (h11 answers a
400 past that).

Open connections are capped (`Limits.max_connections`): a connection accepted past the cap is answered, on its first
request, with a 503 in the API's error shape and `Retry-After: 1`, and closed. A 503 rather than a refused accept:
a client whose connect is refused or reset cannot tell a full server from a dead one, while OpenAI's and
Anthropic's SDKs retry a 503 by themselves, after the Retry-After they are given (so does uvicorn's own
--limit-concurrency, without the error body or Retry-After). Each connection costs a socket (the process's file
descriptors are finite: past them no keyed client could connect either) and a handler; idle ones are closed by
the head deadline, so only busy or slowloris clients fill the cap, and those are the ones to turn away.
"""

from __future__ import annotations

import asyncio
import json

import anyio
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

MAX_HEAD_BYTES = 16 << 10  # request line + headers; uvicorn's own default, stated here on purpose


def uvicorn_config(app, **kwargs) -> uvicorn.Config:
    """uvicorn.Config for `app` (its limits from `app.state.limits`) plus any other uvicorn settings."""
    protocol = head_deadline_protocol(app.state.limits.header_timeout, app.state.limits.max_connections)
    return uvicorn.Config(app, http=protocol, h11_max_incomplete_event_size=MAX_HEAD_BYTES, **kwargs)


def head_deadline_protocol(seconds: float, max_connections: int | None = None) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol, closing a connection whose next request head has not arrived within `seconds`; a
    connection opened while `max_connections` are open gets a 503 (`over_capacity`) for its request."""

    class HeadDeadline(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)  # adds it to the server's open connections
            if max_connections is not None and len(self.connections) > max_connections:
                self.app = over_capacity  # this connection's requests only (uvicorn runs self.app for each)
            self._arm()

        def on_response_complete(self) -> None:
            # armed first: the base class may start a pipelined request at once, which must find the timer set
            self._arm()
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(seconds, self._expire, self.cycle)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self, cycle_when_armed) -> None:
            # a request head that arrived since starts a new cycle; the same one means nothing usable came
            if self.cycle is cycle_when_armed and not self.transport.is_closing():
                self.transport.close()

    return HeadDeadline


RETRY_AFTER_S = 1


async def over_capacity(scope, receive, send) -> None:
    """The reply on a connection past the cap: a 503 in the API's error shape with Retry-After, then closed. What
    the client still sends of its body is read and dropped for a second, so one that writes its whole body first
    reads the reply rather than a reset."""
    from nanoseek.serve.errors import error_body

    if scope["type"] != "http":
        return
    message = "the server has too many open connections; retry later (nanoseek serve --max-connections)"
    content = json.dumps(error_body(scope["path"], 503, message, code="server_overloaded")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode()),
               (b"retry-after", str(RETRY_AFTER_S).encode()), (b"connection", b"close")]  # fmt: skip
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": content, "more_body": True})
    with anyio.move_on_after(1.0):
        while (await receive()).get("more_body", False):
            pass
    await send({"type": "http.response.body", "body": b""})
