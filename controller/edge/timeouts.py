"""Slow clients: a deadline for a request's headers and another for its body.

Sanic's REQUEST_TIMEOUT is an idle timer over the header phase only (every byte restarts it, so a client
trickling a byte every few seconds is never closed), and a body is read under RESPONSE_TIMEOUT, which the
proxy sets to an hour for slow generations. Here both phases get a total deadline: `header_timeout`
seconds from the request's first byte to the end of its headers, then `body_timeout` seconds for the
whole body. A connection past either gets 408 (if nothing was answered yet) and is closed. Used by
`fleet controller` as the server protocol (ollama_fleet/cli.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

from sanic.exceptions import RequestTimeout
from sanic.http.http1 import Http
from sanic.server.protocols.http_protocol import HttpProtocol

# app.config keys set by create_app (seconds)
HEADER_TIMEOUT_KEY = "FLEET_HEADER_TIMEOUT"
BODY_TIMEOUT_KEY = "FLEET_BODY_TIMEOUT"


class DeadlineHttp(Http):
    """Sanic's HTTP/1.1 connection handler with total deadlines for headers and body (one timer each)."""

    __slots__ = ("_body_timeout", "_head_timeout", "_timer")

    def __init__(self, protocol: Any) -> None:
        super().__init__(protocol)  # type: ignore[no-untyped-call]  # Sanic's Http is unannotated
        config = protocol.app.config
        self._head_timeout = float(config.get(HEADER_TIMEOUT_KEY) or 0)
        self._body_timeout = float(config.get(BODY_TIMEOUT_KEY) or 0)
        self._timer: asyncio.TimerHandle | None = None

    def init_for_request(self) -> None:
        self._cancel_timer()
        super().init_for_request()  # type: ignore[no-untyped-call]

    async def http1_request_header(self) -> None:
        """Called once the request's first bytes are in: the header deadline starts here."""
        if self._head_timeout > 0:
            self._arm(self._head_timeout, "request headers")
        try:
            await super().http1_request_header()  # type: ignore[no-untyped-call]
        finally:
            self._cancel_timer()
        if self.request_body and self._body_timeout > 0:
            self._arm(self._body_timeout, "request body")

    def _arm(self, seconds: float, what: str) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(seconds, self._expire, self.request, what, seconds)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self, request: Any, what: str, seconds: float) -> None:
        self._timer = None
        if request is not self.request:  # a later request on this connection
            return
        if what == "request body" and not self.request_body:  # read to its end in time
            return
        task = getattr(self.protocol, "_task", None)
        if task is None or task.done():
            return
        self.exception = RequestTimeout(f"{what} not received within {seconds:g} s")
        self.keep_alive = False
        self.request_body = None  # else Sanic would wait for the rest of the stalled body after the 408
        task.cancel()


class DeadlineProtocol(HttpProtocol):
    HTTP_CLASS = DeadlineHttp


def body_timed_out(request: Any) -> bool:
    """In a handler cancelled by the body deadline: True (log 408, not a client that went away)."""
    return isinstance(getattr(request.stream, "exception", None), RequestTimeout)
