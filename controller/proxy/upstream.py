"""A lean HTTP/1.1 client for controller -> Ollama traffic: keep-alive pools, httptools' C parser.

Every request the controller sends to an agent's Ollama goes through this client, with one error
vocabulary (UpstreamError: ConnectError, ReadTimeout, ProtocolError): the proxy's routed requests, and
the fleet-wide model management that calls each agent's Ollama itself (/api/copy, /api/create, /api/push
in controller/api/ollama_models.py, through `call()` and `post()`). The agent reaches its own Ollama with
httpx: that hop is a different process's, off the proxy path, and keeps httpx's vocabulary there.

Why not httpx here: measured on this project's 2-core machine, one httpx.AsyncClient request cost
~1.1 ms of CPU at concurrency 1 and ~2.2 ms at 16+ (httpcore alone: 0.8 to 3.3 ms, its pool scheduling
grows with the number of connections), which alone caps the proxy at a fraction of what one Ollama
serves. This client does only what the controller needs: POST a body, hand back status and headers as soon
as they arrive, then the body chunk by chunk (de-chunked), with a connect timeout and an idle read timeout.
Closing a response before its end aborts the connection, so the upstream sees the client go away.
No environment proxies are consulted (LAN traffic must never go through HTTP(S)_PROXY).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import NamedTuple, Protocol
from urllib.parse import urlsplit

import httptools

JSON_HEADERS = (("content-type", "application/json"),)
MAX_BUFFER = 1 << 20  # bytes read ahead of a slow consumer before the socket stops being read
MAX_IDLE_PER_HOST = 512
IDLE_EXPIRY = 30.0  # seconds an idle connection is kept for reuse


class BodySource(Protocol):
    """A request body too large to hold in memory (controller/edge/body.py): its size, and its bytes in pieces
    from the start (called again for a retry)."""

    size: int

    def pieces(self) -> Iterator[bytes]: ...


class UpstreamError(Exception):
    """Nothing usable came back: connection refused or reset, timeout, malformed answer."""


class Reply(NamedTuple):
    """A whole answer (`UpstreamPool.call`)."""

    status: int
    content_type: str
    body: bytes


class ConnectError(UpstreamError):
    pass


class ReadTimeout(UpstreamError):
    pass


class ProtocolError(UpstreamError):
    pass


class _Target:
    """A parsed base URL (`http://host:port[/prefix]`)."""

    __slots__ = ("host", "key", "netloc", "port", "prefix", "ssl")

    def __init__(self, url: str) -> None:
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ConnectError(f"unusable Ollama URL {url!r}")
        self.ssl = u.scheme == "https"
        self.host = u.hostname
        try:
            port = u.port  # an agent's advertised URL may carry a port like `:abc` or `:99999`
        except ValueError:
            raise ConnectError(f"unusable Ollama URL {url!r}: bad port") from None
        self.port = port or (443 if self.ssl else 80)
        self.netloc = u.netloc.rpartition("@")[2]
        self.prefix = u.path.rstrip("/")
        self.key = (u.scheme, self.host, self.port)


class _Conn(asyncio.Protocol):
    """One connection; one response at a time. Parser callbacks fill a queue the consumer drains."""

    def __init__(self, pool: UpstreamPool, key: tuple[str, str, int]) -> None:
        self.pool, self.key = pool, key
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.can_write = asyncio.Event()  # cleared while the transport's write buffer is over its high mark
        self.can_write.set()
        self.sending = False  # _send_pieces is writing a BodySource
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.headers_done = False
        self.keep_alive = False
        self.complete = False
        self.error: UpstreamError | None = None
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.received_any = False
        self.sent_whole = True  # False: the request body was cut short, the connection cannot be reused
        self.waiter: asyncio.Future[None] | None = None
        self.last_activity = self.loop.time()

    # ---- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        self.last_activity = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(ProtocolError(f"malformed response: {e}"))
            self._abort()

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()
        # the upstream is taking the request: that is activity too, or the wait for the answer after a slow
        # upload (longer in all than the read timeout, never idle that long) would time out at once
        self.last_activity = self.loop.time()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.can_write.set()  # a sender waiting for room sees `closed`
        if not self.complete:
            self._fail(ProtocolError("connection closed before the response ended" if self.received_any
                                     else "connection closed without a response"))

    # ---- httptools callbacks ---------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1").lower(), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()  # only meaningful while parsing this message
        self.headers_done = True
        if self.sending:  # a sender waiting for room stops: the upstream answered before reading it all
            self.can_write.set()  # (the connection is not reused then, so this flag's lie does not outlive it)
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > MAX_BUFFER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()

    # ---- consumer side ---------------------------------------------------------------------
    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _fail(self, err: UpstreamError) -> None:
        if self.error is None:
            self.error = err
        self._wake()

    def _abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    async def wait(self, timeout: float) -> None:
        """Until the parser has news; an idle read timeout counts from the last byte received."""
        self.waiter = self.loop.create_future()
        self.timer = self.loop.call_at(self.last_activity + timeout, self._check_idle, timeout)
        try:
            await self.waiter
        finally:
            if self.timer is not None:
                self.timer.cancel()
            self.waiter = None

    def _check_idle(self, timeout: float) -> None:
        due = self.last_activity + timeout
        if due > self.loop.time():  # bytes arrived since the timer was set: wait the rest
            self.timer = self.loop.call_at(due, self._check_idle, timeout)
            return
        self._fail(ReadTimeout(f"no data from upstream for {timeout:g} s"))
        self._abort()


class UpstreamResponse:
    """Status and headers of an upstream answer; the body through `chunks()` or `read()`."""

    def __init__(self, conn: _Conn, pool: UpstreamPool) -> None:
        self._conn: _Conn | None = conn
        self._pool = pool
        self.status = conn.status
        self.headers = conn.headers

    def header(self, name: str, default: str = "") -> str:
        for k, v in self.headers:
            if k == name:
                return v
        return default

    async def chunks(self) -> AsyncIterator[bytes]:
        conn = self._conn
        assert conn is not None
        while True:
            if conn.chunks:  # everything received so far, as one piece: one write downstream, not several
                queued = conn.chunks
                chunk = queued.popleft() if len(queued) == 1 else b"".join(queued)
                queued.clear()
                conn.buffered = 0
                if conn.paused and conn.transport is not None:
                    conn.paused = False
                    conn.transport.resume_reading()
                yield chunk
                continue
            if conn.complete:
                return
            if conn.error is not None:
                raise conn.error
            await conn.wait(self._pool.read_timeout)

    @property
    def finished(self) -> bool:
        """The whole answer has been handed out by `chunks()`."""
        conn = self._conn
        return conn is not None and conn.complete and not conn.chunks

    async def read(self) -> bytes:
        return b"".join([c async for c in self.chunks()])

    def close(self) -> None:
        """Reuse the connection when the answer was read to its end; abort it otherwise."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if conn.complete and conn.error is None and not conn.closed and conn.keep_alive and conn.sent_whole:
            self._pool._release(conn)
        else:
            conn._abort()


class UpstreamPool:
    def __init__(self, connect_timeout: float, read_timeout: float) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._idle: dict[tuple[str, str, int], list[_Conn]] = {}
        self._targets: dict[str, _Target] = {}
        self._ssl: ssl.SSLContext | None = None
        self.opened = 0

    def target(self, base_url: str) -> _Target:
        t = self._targets.get(base_url)
        if t is None:
            t = self._targets[base_url] = _Target(base_url)
        return t

    async def post(self, base_url: str, path: str, headers: Sequence[tuple[str, str]],
                   body: bytes | BodySource) -> UpstreamResponse:
        """Send; return once status and headers are in. A reused connection that turns out closed is
        replaced once, transparently (the server may close an idle keep-alive connection at any time).
        A BodySource goes out piece by piece as the socket takes it: memory stays flat whatever its size."""
        t = self.target(base_url)
        size = len(body) if isinstance(body, bytes) else body.size
        head = "".join([f"POST {t.prefix}{path} HTTP/1.1\r\nHost: {t.netloc}\r\n",
                        *[f"{k}: {v}\r\n" for k, v in headers],
                        f"Content-Length: {size}\r\n\r\n"]).encode("utf-8", "surrogateescape")
        for retry in (True, False):
            conn, reused = await self._acquire(t)
            assert conn.transport is not None
            conn._reset()
            try:
                if isinstance(body, bytes):
                    conn.transport.write(head + body if len(body) < 65536 else head)
                    if len(body) >= 65536:
                        conn.transport.write(body)
                else:
                    await self._send_pieces(conn, head, body)
            except BaseException:
                conn._abort()
                raise
            try:
                while not conn.headers_done:
                    if conn.error is not None:
                        raise conn.error
                    await conn.wait(self.read_timeout)
            except ProtocolError:
                conn._abort()
                if reused and retry and not conn.received_any:
                    continue
                raise
            except BaseException:  # timeouts, and cancellation by a client that went away
                conn._abort()
                raise
            return UpstreamResponse(conn, self)
        raise AssertionError("unreachable")

    async def call(self, base_url: str, path: str, body: bytes,
                   headers: Sequence[tuple[str, str]] = JSON_HEADERS) -> Reply:
        """POST and read the whole answer (for answers that are small or awaited whole); the connection
        goes back to the pool. Raises UpstreamError."""
        response = await self.post(base_url, path, headers, body)
        try:
            return Reply(response.status, response.header("content-type"), await response.read())
        finally:
            response.close()

    async def _send_pieces(self, conn: _Conn, head: bytes, body: BodySource) -> None:
        """Write `body` with flow control; stop early when the upstream already answered or went away
        (the connection is then not reused: its request was not sent whole)."""
        assert conn.transport is not None
        conn.transport.write(head)
        conn.sending = True
        try:
            for piece in body.pieces():
                if not conn.can_write.is_set():
                    try:  # bounded: an upstream that stops reading and never answers must not hold this forever
                        await asyncio.wait_for(conn.can_write.wait(), self.read_timeout)
                    except TimeoutError:
                        raise ReadTimeout(f"upstream took no request bytes for {self.read_timeout:g} s") from None
                if conn.closed or conn.error is not None or conn.headers_done:
                    conn.sent_whole = False
                    return
                conn.transport.write(piece)
        finally:
            conn.sending = False

    async def _acquire(self, t: _Target) -> tuple[_Conn, bool]:
        idle = self._idle.get(t.key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < IDLE_EXPIRY:
                return conn, True
            conn._abort()
        loop = asyncio.get_running_loop()
        ctx = None
        if t.ssl:
            ctx = self._ssl = self._ssl or ssl.create_default_context()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Conn(self, t.key), t.host, t.port, ssl=ctx,
                                       server_hostname=t.host if ctx else None),
                self.connect_timeout)
        except TimeoutError:
            raise ConnectError(f"connect timeout after {self.connect_timeout:g} s") from None
        except OSError as e:
            raise ConnectError(f"cannot connect to {t.netloc}: {e.strerror or e}") from None
        self.opened += 1
        return conn, False

    def _release(self, conn: _Conn) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= MAX_IDLE_PER_HOST:
            conn._abort()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn._abort()
        self._idle.clear()
