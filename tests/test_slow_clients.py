"""Slow clients: partial headers or a stalled body get the connection closed (408 when nothing was answered
yet), against a real controller started with small `header_timeout` / `body_timeout`."""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tests.proxy_support import chat_body, start_fleet, wait_routable

HEADER_TIMEOUT = 0.5
BODY_TIMEOUT = 1.0
DEADLINE = 15.0  # seconds a test waits for the close: far below Sanic's defaults (60 s idle, 1 h for a body)
TRICKLE = 0.1  # seconds between the bytes a trickling client sends


@contextmanager
def _connect(c: Any) -> Iterator[socket.socket]:
    s = socket.create_connection(("127.0.0.1", c.port), timeout=5)
    s.setblocking(False)
    try:
        yield s
    finally:
        s.close()


def _closed(s: socket.socket, trickle: bytes = b"", deadline: float = DEADLINE) -> bytes:
    """Wait until the server closes the connection, sending one byte of `trickle` every TRICKLE seconds
    meanwhile (keeping an idle timer alive); returns what the server sent."""
    got = b""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        readable, _, _ = select.select([s], [], [], TRICKLE)
        if readable:
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                return got
            if not data:
                return got
            got += data
        elif trickle:
            try:
                s.send(trickle[:1])
            except (BrokenPipeError, ConnectionResetError):
                return got
            trickle = trickle[1:] or b"x"
    raise AssertionError(f"connection still open after {deadline} s; received {got[:200]!r}")


def test_partial_headers_and_stalled_bodies_are_closed(fleet):
    c, _ = start_fleet(fleet, "slow-a", controller_env={"fleet_header_timeout": str(HEADER_TIMEOUT),
                                                        "fleet_body_timeout": str(BODY_TIMEOUT)})
    wait_routable(c, "slow-a")

    # headers that stop halfway
    with _connect(c) as s:
        s.send(b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
        got = _closed(s)
        assert got == b"" or got.startswith(b"HTTP/1.1 4"), got

    # headers trickled a byte at a time: an idle timer would never fire, the deadline does
    with _connect(c) as s:
        s.send(b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        got = _closed(s, trickle=b"X-Slow: " + b"a" * 4000)
        assert got == b"" or got.startswith(b"HTTP/1.1 4"), got

    # complete headers, then a body that stalls: on a proxy route (streamed body) and a management route
    for path in ("/api/chat", "/v1/chat/completions", "/api/pull"):
        with _connect(c) as s:
            s.send(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                   f"Content-Length: 100\r\n\r\n".encode() + b'{"model":')
            got = _closed(s)
            assert got.startswith(b"HTTP/1.1 408"), (path, got)

    # a body trickled a byte at a time, chunked
    with _connect(c) as s:
        s.send(b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        got = _closed(s, trickle=b"1\r\n \r\n" * 100)
        assert got.startswith(b"HTTP/1.1 408"), got

    # the stalled proxy requests are in the log as 408; ordinary clients are unaffected
    assert c.http.post("/api/chat", json=chat_body()).status_code == 200
    log = c.http.get("/api/requests", params={"status": "408"}).json()
    assert log["total"] == 3 and all("body_timeout" in x["error"] for x in log["requests"])
    with c.http.stream("POST", "/api/chat", json=chat_body(stream=True)) as r:  # a slow answer is not a slow client
        assert r.status_code == 200 and sum(1 for line in r.iter_lines() if line) > 1
