"""Direct tests of controller/proxy/upstream.py, the hand-made controller -> Ollama HTTP/1.1 client,
against a raw asyncio server written here that misbehaves on purpose: resets, half-closed keep-alives,
silence, trickling and large bodies, malformed and cut-off answers.

The proxy suites exercise the client end to end through Ollama's stand-in; these pin its own contract: what
it returns, what it raises (UpstreamError as ConnectError, ReadTimeout or ProtocolError, nothing else),
when it re-sends a POST (only on a reused keep-alive connection that closed before any byte of the answer),
and that a connection in an unknown state is never handed out again: the server side sees it closed.
Timeouts are tenths of a second; every wait for a condition polls it under DEADLINE."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import socket
import struct
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from typing import cast

import pytest

from ollama_fleet.controller.proxy import upstream
from ollama_fleet.controller.proxy.upstream import (
    ConnectError,
    ProtocolError,
    ReadTimeout,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
)

CONNECT_TIMEOUT = 0.3  # seconds, the pool's
READ_TIMEOUT = 0.5  # seconds, the pool's idle read timeout
DEADLINE = 10.0  # seconds any polled condition may take before the test fails (never reached when green)
POLL = 0.005
PIECE = 256 * 1024  # what controller/edge/body.py sends per piece
ASYNCIO_READ = 256 * 1024  # most bytes one read of an asyncio socket transport hands to the protocol
BLOCK = random.Random(10).randbytes((1 << 20) + 7)  # body pattern; its period is no multiple of a piece
BLOCK2 = BLOCK + BLOCK
PATH = "/api/chat"


def pattern(size: int, piece: int = PIECE) -> Iterator[bytes]:
    """`size` deterministic bytes in pieces of at most `piece` (<= 1 MiB)."""
    pos = 0
    while pos < size:
        n = min(piece, size - pos)
        off = pos % len(BLOCK)
        yield BLOCK2[off:off + n]
        pos += n


def digest_of(size: int) -> str:
    h = hashlib.sha256()
    for p in pattern(size):
        h.update(p)
    return h.hexdigest()


class Source:
    """A BodySource as controller/edge/body.py hands one over: a size, and pieces from the start on each
    call."""

    def __init__(self, size: int, piece: int = PIECE) -> None:
        self.size = size
        self.piece = piece
        self.calls = 0
        self.yielded = 0  # bytes handed out by the current pass

    def pieces(self) -> Iterator[bytes]:
        self.calls += 1
        self.yielded = 0
        for p in pattern(self.size, self.piece):
            self.yielded += len(p)
            yield p


# ---- the raw server ----------------------------------------------------------------------------------
class Request:
    def __init__(self, head: list[str], body: bytes, size: int, digest: str) -> None:
        self.line = head[0]
        self.head = head
        self.headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}
        self.body, self.size, self.digest = body, size, digest


class Peer:
    """The server side of one accepted connection."""

    def __init__(self, server: FaultServer, index: int, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.server, self.index, self.reader, self.writer = server, index, reader, writer
        self.gone = asyncio.Event()  # the client closed or aborted its end
        self.sent = 0

    async def head(self) -> list[str] | None:
        """The request line and header lines; None when the client closed before sending anything."""
        try:
            raw = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as e:
            if e.partial:
                raise
            return None
        return raw.decode("latin-1").split("\r\n")[:-2]

    async def body(self, head: list[str], keep: int = 1 << 20) -> Request:
        """Read the body announced by `head`; its digest always, its bytes when at most `keep`."""
        req = Request(head, b"", 0, "")
        length = int(req.headers.get("content-length", "0"))
        h = hashlib.sha256()
        parts = []
        while req.size < length:
            data = await self.reader.read(min(length - req.size, 1 << 20))
            if not data:
                raise asyncio.IncompleteReadError(b"", length - req.size)
            h.update(data)
            req.size += len(data)
            if length <= keep:
                parts.append(data)
        req.body, req.digest = b"".join(parts), h.hexdigest()
        self.server.requests.append((self.index, req))
        self.server.got_request.set()
        return req

    async def request(self) -> Request | None:
        head = await self.head()
        return None if head is None else await self.body(head)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        self.sent += len(data)
        await self.writer.drain()

    async def send_pattern(self, size: int) -> None:
        for p in pattern(size):
            await self.send(p)

    def reset(self) -> None:
        """Close with a TCP RST instead of a FIN."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def until_gone(self) -> None:
        """Read and drop whatever comes until the client closes its end (the leak check: it must)."""
        with contextlib.suppress(ConnectionError):
            while await self.reader.read(1 << 20):
                pass
        self.gone.set()

    async def answer_all(self) -> None:
        """An ordinary keep-alive server: each request answered with what it received."""
        while (req := await self.request()) is not None:
            await self.send(ok(json.dumps({"conn": self.index, "size": req.size, "digest": req.digest}).encode()))
        self.gone.set()


Handler = Callable[[Peer], Awaitable[None]]


class FaultServer:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.peers: list[Peer] = []
        self.requests: list[tuple[int, Request]] = []  # (connection index, request), in arrival order
        self.got_request = asyncio.Event()
        self.hold = asyncio.Event()  # handlers that must stay silent wait on it; the test sets it
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> FaultServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        peer = Peer(self, len(self.peers), reader, writer)
        self.peers.append(peer)
        try:
            await self.handler(peer)
        except (ConnectionError, asyncio.IncompleteReadError):
            peer.gone.set()
        except asyncio.CancelledError:
            pass  # stop(): ended here, as asyncio's stream callback (3.11) logs a cancelled handler as an error
        finally:
            writer.transport.close()
            self.tasks.discard(task)

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for peer in self.peers:
            peer.writer.transport.abort()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()


def ok(body: bytes, *extra: str, status: str = "200 OK", version: str = "HTTP/1.1") -> bytes:
    head = [f"{version} {status}", f"Content-Length: {len(body)}", "Content-Type: application/json", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"


def answer_once(answer: bytes) -> Callable[[Peer], Awaitable[None]]:
    """A server handler: read one request, send `answer` as is, wait for the client to hang up."""

    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(answer)
        await peer.until_gone()

    return handler


def chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    p = UpstreamPool(CONNECT_TIMEOUT, READ_TIMEOUT)
    yield p
    p.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[FaultServer]]]:
    servers: list[FaultServer] = []

    async def start(handler: Handler) -> FaultServer:
        s = await FaultServer(handler).start()
        servers.append(s)
        return s

    yield start
    for s in servers:
        await s.stop()


async def until(cond: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while not cond():
        if loop.time() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        await asyncio.sleep(POLL)


async def gone(peer: Peer) -> None:
    """The client closed this connection (it did not leak it)."""
    await until(peer.gone.is_set, f"the client to close connection {peer.index}")


async def post(pool: UpstreamPool, url: str, body: bytes | Source = b'{"model":"m"}',
               headers: list[tuple[str, str]] | None = None) -> UpstreamResponse:
    """pool.post, bounded: a client that hangs fails the test instead of stalling it."""
    return await asyncio.wait_for(pool.post(url, PATH, headers or [], body), DEADLINE)


async def fetch(pool: UpstreamPool, url: str, body: bytes | Source = b'{"model":"m"}') -> tuple[int, bytes]:
    resp = await post(pool, url, body)
    try:
        return resp.status, await asyncio.wait_for(resp.read(), DEADLINE)
    finally:
        resp.close()


async def read_until_error(resp: UpstreamResponse) -> tuple[bytes, UpstreamError]:
    """The body pieces that arrived before the error the stream ended with."""
    got = []
    with pytest.raises(UpstreamError) as err:
        async for piece in resp.chunks():
            got.append(piece)
    return b"".join(got), err.value


# ---- ordinary answers -----------------------------------------------------------------------------------
async def test_a_content_length_answer_comes_back_whole_and_the_request_goes_out_as_given(pool, serve):
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(ok(b'{"done":true}', "X-Twice: a", "X-Twice: b", "X-Odd: caf?").replace(b"?", b"\xe9"))
        await peer.until_gone()

    server = await serve(handler)
    body = b'{"model":"m","stream":false}'
    resp = await post(pool, server.url + "/base/", body, [("content-type", "application/json"), ("x-a", "1")])
    assert resp.status == 200
    assert resp.header("content-type") == "application/json"  # names are lower-cased
    assert [v for k, v in resp.headers if k == "x-twice"] == ["a", "b"]  # repeated headers kept, in order
    assert resp.header("x-odd") == "caf\udce9"  # not UTF-8: kept byte for byte (surrogateescape), no crash
    assert resp.header("x-missing", "dflt") == "dflt"
    assert not resp.finished
    assert await resp.read() == b'{"done":true}'
    assert resp.finished
    resp.close()
    (_, req), = server.requests
    assert req.line == f"POST /base{PATH} HTTP/1.1"  # the base URL's path is a prefix
    assert req.headers["host"] == server.url.removeprefix("http://")
    assert req.headers["content-type"] == "application/json" and req.headers["x-a"] == "1"
    assert req.headers["content-length"] == str(len(body)) and req.body == body


async def test_a_chunked_answer_is_dechunked_and_its_trailer_accepted(pool, serve):
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(CHUNKED_HEAD)
        for line in (b'{"n":1}\n', b'{"n":2}\n'):
            await peer.send(chunk(line))
        await peer.send(b"6;ext=1\r\n{\"n\":3\r\n" + chunk(b"}\n") + b"0\r\nX-Trailer: t\r\n\r\n")
        await peer.answer_all()

    server = await serve(handler)
    resp = await post(pool, server.url)
    assert resp.header("content-type") == "application/x-ndjson"
    assert b"".join([c async for c in resp.chunks()]) == b'{"n":1}\n{"n":2}\n{"n":3}\n'
    assert resp.finished
    resp.close()
    # the trailer ended the message cleanly: the connection is reused
    assert (await fetch(pool, server.url))[0] == 200
    assert pool.opened == 1 and len(server.peers) == 1


# ---- keep-alive ------------------------------------------------------------------------------------------
async def test_a_kept_alive_connection_is_reused(pool, serve):
    server = await serve(Peer.answer_all)
    for _ in range(3):
        status, data = await fetch(pool, server.url)
        assert status == 200 and json.loads(data)["conn"] == 0
    assert pool.opened == 1 and len(server.peers) == 1 and len(server.requests) == 3
    pool.close()  # idle connections are closed, not dropped
    await gone(server.peers[0])


@pytest.mark.parametrize("answer", [
    ok(b"{}", "Connection: close"),
    ok(b"{}", version="HTTP/1.0"),
], ids=["connection-close", "http-1.0"])
async def test_an_answer_that_ends_the_connection_is_not_reused(pool, serve, answer):
    server = await serve(answer_once(answer))
    for _ in range(2):
        assert await fetch(pool, server.url) == (200, b"{}")
    assert pool.opened == 2 and len(server.peers) == 2
    await gone(server.peers[0])


async def test_an_idle_connection_past_its_expiry_is_closed_not_reused(pool, serve, monkeypatch):
    server = await serve(Peer.answer_all)
    assert (await fetch(pool, server.url))[0] == 200
    monkeypatch.setattr(upstream, "IDLE_EXPIRY", 0.0)
    assert (await fetch(pool, server.url))[0] == 200
    assert pool.opened == 2
    await gone(server.peers[0])


async def test_a_connection_the_server_closed_while_idle_is_replaced(pool, serve):
    async def handler(peer: Peer) -> None:
        if peer.index == 0:
            await peer.request()
            await peer.send(ok(b"{}"))  # keep-alive promised, then closed (an idle timeout upstream)
            return
        await peer.answer_all()

    server = await serve(handler)
    assert await fetch(pool, server.url) == (200, b"{}")
    await until(lambda: server.peers[0].writer.transport.is_closing(), "the server to close")
    status, data = await fetch(pool, server.url)
    assert status == 200 and json.loads(data)["conn"] == 1
    assert pool.opened == 2
    assert [i for i, _ in server.requests] == [0, 1]  # each request answered once


@pytest.mark.parametrize("close", ["fin", "rst"])
@pytest.mark.parametrize("size", [100, 3 << 20], ids=["small", "spooled"])
async def test_a_post_is_resent_once_when_a_reused_connection_closes_before_any_answer(pool, serve, close, size):
    """The race every keep-alive client meets: the server closes an idle connection just as a request goes
    out on it. Nothing of an answer arrived, so the request is sent again, whole, on a new connection."""
    async def handler(peer: Peer) -> None:
        if peer.index == 0:
            await peer.request()
            await peer.send(ok(b"first"))
            await peer.request()  # read whole, then dropped unanswered
            if close == "rst":
                peer.reset()
            return
        await peer.answer_all()

    server = await serve(handler)
    assert await fetch(pool, server.url) == (200, b"first")
    body: bytes | Source = b"".join(pattern(size)) if size < PIECE else Source(size)
    status, data = await fetch(pool, server.url, body)
    answer = json.loads(data)
    assert status == 200 and answer["conn"] == 1
    (c0, _), (c1, dropped), (c2, resent) = server.requests
    assert (c0, c1, c2) == (0, 0, 1)
    assert dropped.size == resent.size == size and dropped.digest == resent.digest == answer["digest"]
    if isinstance(body, Source):
        assert body.calls == 2  # the spooled body was read again from its start
    assert pool.opened == 2


async def test_a_request_is_resent_at_most_once(pool, serve):
    async def handler(peer: Peer) -> None:
        if peer.index == 0:
            await peer.request()
            await peer.send(ok(b"first"))
        await peer.request()  # then closed unanswered, on the reused and on the new connection alike

    server = await serve(handler)
    assert await fetch(pool, server.url) == (200, b"first")
    with pytest.raises(ProtocolError, match="without a response"):
        await post(pool, server.url)
    assert [i for i, _ in server.requests] == [0, 0, 1]
    assert pool.opened == 2


async def test_a_new_connection_that_closes_unanswered_is_not_resent(pool, serve):
    async def handler(peer: Peer) -> None:
        await peer.request()

    server = await serve(handler)
    with pytest.raises(ProtocolError, match="without a response"):
        await post(pool, server.url)
    assert len(server.requests) == 1 and pool.opened == 1


@pytest.mark.parametrize("partial", [
    b"HTTP/1.1 200 OK\r\nContent-",
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
], ids=["mid-head", "mid-body"])
@pytest.mark.parametrize("close", ["fin", "rst"])
async def test_no_resend_once_part_of_the_answer_arrived(pool, serve, partial, close):
    """The upstream has seen the request and begun answering it: sending it again could run it twice."""
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(ok(b"first"))
        await peer.request()
        await peer.send(partial)
        if close == "rst":
            await until(lambda: len(server.requests) == 2, "the second request")
            peer.reset()

    server = await serve(handler)
    assert await fetch(pool, server.url) == (200, b"first")
    if b"\r\n\r\n" in partial:  # the head is complete: the cut shows in the body
        resp = await post(pool, server.url)
        try:
            got, err = await read_until_error(resp)
        finally:
            resp.close()
        assert got in (b"abc", b"")  # a reset may discard what the socket held
        assert isinstance(err, ProtocolError)
    else:
        with pytest.raises(ProtocolError):
            await post(pool, server.url)
    assert len(server.requests) == 2 and pool.opened == 1 and len(server.peers) == 1


async def test_no_resend_after_a_read_timeout_on_a_reused_connection(pool, serve):
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(ok(b"first"))
        await peer.request()
        await peer.until_gone()  # silent: a model that never answers

    server = await serve(handler)
    assert await fetch(pool, server.url) == (200, b"first")
    with pytest.raises(ReadTimeout):
        await post(pool, server.url)
    await gone(server.peers[0])
    assert len(server.requests) == 2 and pool.opened == 1


# ---- connecting ------------------------------------------------------------------------------------------
async def test_connection_refused_is_a_connect_error(pool):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(ConnectError, match="cannot connect"):
        await post(pool, f"http://127.0.0.1:{port}")
    assert pool.opened == 0


async def test_a_connect_that_hangs_is_a_connect_error_after_the_connect_timeout(pool):
    """A listener whose accept queue is full drops SYNs (Linux): connecting hangs, within loopback."""
    loop = asyncio.get_running_loop()
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        addr = listener.getsockname()
        for _ in range(16):
            s = socket.socket()
            s.setblocking(False)
            fillers.append(s)
            try:
                await asyncio.wait_for(loop.sock_connect(s, addr), CONNECT_TIMEOUT)
            except TimeoutError:
                break  # the queue is full
        else:
            pytest.skip("this kernel never stopped accepting connections into a full queue")
        with pytest.raises(ConnectError, match="connect timeout"):
            await post(pool, f"http://127.0.0.1:{addr[1]}")
    finally:
        for s in fillers:
            s.close()
        listener.close()
    assert pool.opened == 0


async def test_an_unusable_url_is_a_connect_error(pool):
    with pytest.raises(ConnectError, match="unusable"):
        await post(pool, "ftp://127.0.0.1:1")


@pytest.mark.parametrize("url", ["http://127.0.0.1:abc", "http://127.0.0.1:99999"])
async def test_a_bad_port_in_an_agents_url_is_a_connect_error_so_the_proxy_fails_over(pool, url):
    with pytest.raises(ConnectError, match="bad port"):  # a ValueError here would be a 500, no failover
        await post(pool, url)


# ---- timeouts --------------------------------------------------------------------------------------------
async def test_a_server_that_never_answers_is_a_read_timeout_and_the_connection_is_closed(pool, serve):
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.until_gone()

    server = await serve(handler)
    with pytest.raises(ReadTimeout, match="no data from upstream"):
        await post(pool, server.url)
    await gone(server.peers[0])
    assert len(server.requests) == 1  # a timeout is never re-sent


async def test_silence_mid_body_is_a_read_timeout_after_what_arrived(pool, serve):
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(CHUNKED_HEAD + chunk(b'{"n":1}\n'))
        await peer.until_gone()

    server = await serve(handler)
    resp = await post(pool, server.url)
    try:
        got, err = await read_until_error(resp)
    finally:
        resp.close()
    assert got == b'{"n":1}\n' and isinstance(err, ReadTimeout)
    await gone(server.peers[0])


async def test_a_trickling_answer_longer_than_the_read_timeout_is_not_cut(pool, serve):
    """The read timeout is an idle timeout: an answer slower in total than it, but never silent for as
    long, arrives whole. The head comes a byte at a time too."""
    gap = READ_TIMEOUT / 10
    pieces = 20  # 2 x READ_TIMEOUT in all

    async def handler(peer: Peer) -> None:
        await peer.request()
        for b in CHUNKED_HEAD:
            await peer.send(bytes([b]))
        for i in range(pieces):
            await asyncio.sleep(gap)  # the trickle itself, not a wait for a condition
            await peer.send(chunk(b'{"n":%d}\n' % i))
        await peer.send(b"0\r\n\r\n")
        await peer.answer_all()

    server = await serve(handler)
    resp = await post(pool, server.url)
    try:
        data = await asyncio.wait_for(resp.read(), DEADLINE)
    finally:
        resp.close()
    assert data == b"".join(b'{"n":%d}\n' % i for i in range(pieces))
    assert (await fetch(pool, server.url))[0] == 200 and pool.opened == 1  # and the connection is reusable


# ---- large bodies, flow control ------------------------------------------------------------------------
@pytest.mark.parametrize("size", [65535, 65536, 300 * 1024])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_large_bodies_both_ways_arrive_intact(pool, serve, size, framing):
    async def handler(peer: Peer) -> None:
        while (req := await peer.request()) is not None:
            n = int(req.headers["x-want"])
            if framing == "content-length":
                await peer.send(ok(b"", f"X-Digest: {req.digest}").replace(b"Length: 0", b"Length: %d" % n))
                await peer.send_pattern(n)
            else:
                await peer.send(CHUNKED_HEAD.replace(b"\r\n\r\n", f"\r\nX-Digest: {req.digest}\r\n\r\n".encode()))
                for p in pattern(n, 100_003):
                    await peer.send(chunk(p))
                await peer.send(b"0\r\n\r\n")

    server = await serve(handler)
    want = 3 << 20
    for body in (b"".join(pattern(size)), Source(size), Source(size, piece=4099)):
        resp = await post(pool, server.url, body, [("x-want", str(want))])
        try:
            h = hashlib.sha256()
            n = 0
            async for piece in resp.chunks():
                h.update(piece)
                n += len(piece)
        finally:
            resp.close()
        assert resp.header("x-digest") == digest_of(size)  # the server got the request body intact
        assert (n, h.hexdigest()) == (want, digest_of(want))
    assert pool.opened == 1  # and every answer left the connection reusable


async def test_a_slow_consumer_pauses_reading_and_reading_resumes(pool, serve):
    """Far more body than MAX_BUFFER while nobody reads it: the socket stops being read (the server's writes
    back up), and reading resumes as the consumer catches up; the body arrives intact."""
    size = 64 << 20

    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(ok(b"").replace(b"Length: 0", b"Length: %d" % size))
        await peer.send_pattern(size)
        await peer.until_gone()

    server = await serve(handler)
    resp = await post(pool, server.url)
    try:
        conn = resp._conn  # the client's buffer is internal; reading it is the only way to see the pause
        assert conn is not None
        await until(lambda: conn.paused, "the client to pause reading")
        assert conn.buffered <= upstream.MAX_BUFFER + ASYNCIO_READ
        assert server.peers[0].sent < size  # the back-pressure reached the server
        h = hashlib.sha256()
        async for piece in resp.chunks():
            h.update(piece)
        assert h.hexdigest() == digest_of(size) and not conn.paused
    finally:
        resp.close()


async def test_a_spooled_body_waits_for_room_instead_of_queueing_whole(pool, serve, monkeypatch):
    """A BodySource goes out as the socket takes it: while the server reads nothing, the client stops
    pulling pieces; once the server reads, the rest follows and arrives intact."""
    size = 64 << 20
    release = asyncio.Event()

    async def handler(peer: Peer) -> None:
        head = await peer.head()
        assert head is not None
        await release.wait()
        req = await peer.body(head)
        await peer.send(ok(json.dumps({"digest": req.digest}).encode()))
        await peer.answer_all()

    conns: list[upstream._Conn] = []
    acquire = pool._acquire

    async def spy(t: upstream._Target) -> tuple[upstream._Conn, bool]:  # only looks at the connection
        conn, reused = await acquire(t)
        conns.append(conn)
        return conn, reused

    monkeypatch.setattr(pool, "_acquire", spy)
    server = await serve(handler)
    src = Source(size)
    task = asyncio.create_task(fetch(pool, server.url, src))
    try:
        await until(lambda: bool(conns) and not conns[0].can_write.is_set(), "the client to wait for room")
        assert src.yielded < size // 2
    except BaseException:
        task.cancel()
        raise
    release.set()
    status, data = await task
    assert status == 200 and json.loads(data)["digest"] == digest_of(size)


async def test_a_server_that_stops_reading_a_large_body_is_a_read_timeout(pool, serve):
    """A hung upstream (it read the head, then nothing) must not hold a large upload forever."""
    async def handler(peer: Peer) -> None:
        await peer.head()
        await server.hold.wait()
        await peer.until_gone()

    server = await serve(handler)
    with pytest.raises(ReadTimeout):
        await post(pool, server.url, Source(64 << 20))
    server.hold.set()
    await gone(server.peers[0])


async def test_an_upload_slower_than_the_read_timeout_is_not_cut(pool, serve):
    """The idle timeout counts the upstream's progress in taking the request too: a server that reads a
    large body in bursts, never stalling for READ_TIMEOUT but slower than it in all, gets to answer."""
    size = 16 << 20
    burst = 1 << 20

    async def handler(peer: Peer) -> None:
        head = await peer.head()
        assert head is not None
        h = hashlib.sha256()
        n = 0
        for _ in range(6):  # 6 x READ_TIMEOUT / 2.5 in all: longer than READ_TIMEOUT
            await asyncio.sleep(READ_TIMEOUT / 2.5)  # the slowness itself, not a wait for a condition
            data = await peer.reader.readexactly(burst)
            h.update(data)
            n += len(data)
        while n < size:
            data = await peer.reader.read(min(1 << 20, size - n))
            assert data
            h.update(data)
            n += len(data)
        await peer.send(ok(json.dumps({"digest": h.hexdigest()}).encode()))
        await peer.answer_all()

    server = await serve(handler)
    status, data = await fetch(pool, server.url, Source(size))
    assert status == 200 and json.loads(data)["digest"] == digest_of(size)


async def test_an_answer_before_the_upload_ended_stops_the_upload(pool, serve):
    """An upstream may refuse a body before reading it (a 413 from a proxy in front of Ollama) and then
    read nothing more: the answer is handed back at once, and the half-sent connection is not reused."""
    async def handler(peer: Peer) -> None:
        if peer.index == 0:
            await peer.head()
            await peer.send(ok(b"too large", status="413 Request Entity Too Large"))
            await server.hold.wait()
            await peer.until_gone()
            return
        await peer.answer_all()

    server = await serve(handler)
    src = Source(64 << 20)
    assert await fetch(pool, server.url, src) == (413, b"too large")
    assert src.yielded < src.size
    server.hold.set()
    await gone(server.peers[0])
    assert (await fetch(pool, server.url))[0] == 200 and pool.opened == 2


# ---- malformed and cut-off answers ---------------------------------------------------------------------
@pytest.mark.parametrize("answer", [
    b"garbage\r\n\r\n",
    b"HTTP/1.1 2x0 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
    CHUNKED_HEAD + b"zz\r\nhello\r\n0\r\n\r\n",
    CHUNKED_HEAD + b"5\r\nhelloXX0\r\n\r\n",
], ids=["garbage", "status", "content-length", "header", "chunk-size", "chunk-end"])
async def test_a_malformed_answer_is_a_protocol_error_and_the_connection_is_dropped(pool, serve, answer):
    server = await serve(answer_once(answer))
    with pytest.raises(ProtocolError, match="malformed"):
        resp = await post(pool, server.url)  # a bad head fails here, a bad body while it is read
        try:
            await asyncio.wait_for(resp.read(), DEADLINE)
        finally:
            resp.close()
    await gone(server.peers[0])
    assert len(server.requests) == 1


@pytest.mark.parametrize("cut", [
    ok(b"x" * 1000)[:-600],
    CHUNKED_HEAD + b"3e8\r\n" + b"x" * 400,
    CHUNKED_HEAD + chunk(b"x" * 400),
], ids=["content-length", "mid-chunk", "between-chunks"])
@pytest.mark.parametrize("close", ["fin", "rst"])
async def test_an_answer_cut_off_mid_body_is_a_protocol_error_after_what_arrived(pool, serve, cut, close):
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(cut)
        if close == "rst":
            peer.reset()

    server = await serve(handler)
    resp = await post(pool, server.url)
    try:
        got, err = await read_until_error(resp)
    finally:
        resp.close()
    assert isinstance(err, ProtocolError) and "before the response ended" in str(err)
    assert got == b"x" * 400 or (close == "rst" and (b"x" * 400).startswith(got))
    assert not resp.finished


async def test_closing_an_answer_early_aborts_its_connection(pool, serve):
    """A client that goes away mid-stream: the upstream sees its connection close (Ollama then stops
    generating), and the next request gets a new connection."""
    async def handler(peer: Peer) -> None:
        if peer.index == 0:
            await peer.request()
            await peer.send(CHUNKED_HEAD + chunk(b'{"n":1}\n'))
            await peer.until_gone()
            return
        await peer.answer_all()

    server = await serve(handler)
    resp = await post(pool, server.url)
    chunks = cast(AsyncGenerator[bytes, None], resp.chunks())
    assert await anext(chunks) == b'{"n":1}\n'
    await chunks.aclose()
    resp.close()
    await gone(server.peers[0])
    assert (await fetch(pool, server.url))[0] == 200 and pool.opened == 2


async def test_cancelling_a_request_that_waits_for_its_answer_closes_the_connection(pool, serve):
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.until_gone()

    server = await serve(handler)
    task = asyncio.create_task(pool.post(server.url, PATH, [], b"{}"))
    await until(server.got_request.is_set, "the request to arrive")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await gone(server.peers[0])
    assert len(server.requests) == 1
