"""uvicorn's settings for the app: connections that send nothing useful are closed.

    config = uvicorn_config(app, host="127.0.0.1", port=8000)      # the app from app.create_app
    uvicorn.Server(config).run()

uvicorn times out a kept-alive connection only while no byte arrives, and a new connection not at all, so a client
that sends a request head one byte at a time (slowloris), or nothing, holds its socket for ever. The protocol
here gives every request head a deadline, `Limits.header_timeout` seconds from the connection's start or the end of
the previous reply; the body's own deadline is the app's (a 408, app.py). Heads are at most 16 KiB (h11 answers a
400 past that).
"""

from __future__ import annotations

import asyncio

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

MAX_HEAD_BYTES = 16 << 10  # request line + headers; uvicorn's own default, stated here on purpose


def uvicorn_config(app, **kwargs) -> uvicorn.Config:
    """uvicorn.Config for `app` (its limits from `app.state.limits`) plus any other uvicorn settings."""
    protocol = head_deadline_protocol(app.state.limits.header_timeout)
    return uvicorn.Config(app, http=protocol, h11_max_incomplete_event_size=MAX_HEAD_BYTES, **kwargs)


def head_deadline_protocol(seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol, closing a connection whose next request head has not arrived within `seconds`."""

    class HeadDeadline(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
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
