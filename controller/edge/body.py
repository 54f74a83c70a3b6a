"""Request bodies of the proxy routes: bounded, and large ones never held in memory.

A body up to SMALL_BODY is read whole and parsed as today (the fast path of ordinary requests). A larger
one (vision requests carry base64 images) is spooled to a temporary file as it arrives (the first
SPOOL_MEMORY bytes stay in memory) while a small incremental scanner picks out the few top-level fields
the proxy reads (`model`, `name`, `stream`) without materialising the big strings; the spooled bytes go
upstream in pieces with flow control (controller/proxy/upstream.py). Memory per request stays around
SPOOL_MEMORY + a few socket buffers whatever the body's size; the body limit is checked against the
declared Content-Length first and again while a chunked body streams in.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from sanic import Request

from ollama_fleet.controller.edge.http import MAX_JSON_DEPTH

SMALL_BODY = 1 << 20  # bytes read whole and parsed with the JSON parser
SPOOL_MEMORY = 1 << 20  # bytes of a larger body kept in memory before it moves to a temporary file
SEND_PIECE = 256 * 1024  # bytes per write upstream when sending a spooled body
DRAIN_MAX = 16 << 20  # bytes past the limit still read (and discarded) so the client sees the 413
WANTED = frozenset({b"model", b"name", b"stream"})  # every top-level field the proxy reads
VALUE_CAP = 4096  # bytes of a wanted field's raw value; longer ones are unusable (a model name is short)
KEY_CAP = 16  # bytes of a top-level key worth remembering (the wanted ones are shorter)
MAX_DEPTH = MAX_JSON_DEPTH  # the scanner accepts what the bounded JSON parser accepts
# Structural characters handled one by one (brackets below the top level; quotes, colons and commas in
# it): bounds the scanner's CPU (~1 us each) for bodies like `[[],[],...]`; ordinary bodies have far fewer.
MAX_TOKENS = 500_000


class TooLarge(Exception):
    def __init__(self, limit: int, drained: bool) -> None:
        super().__init__(f"request body too large: the limit is {limit} bytes (setting max_body_bytes)")
        self.drained = drained  # the rest was read, so the connection can stay open


class Container:
    """A wanted field whose value is an object or array (never a valid model name or `stream` flag)."""

    def __repr__(self) -> str:
        return "<container>"


CONTAINER = Container()
_OUTER = re.compile(rb'["{}\[\],:]')  # what matters inside the top-level object
_STR_SKIP = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*', re.DOTALL)  # string content up to its closing quote
# Deeper down only nesting matters: skip scalars and whole escape-free strings in one match.
_DEEP_SKIP = re.compile(rb'[^"{}\[\]]*(?:"[^"\\]*"[^"{}\[\]]*)*')


class Scanner:
    """Top-level fields of a JSON object fed in chunks. Checks the structure (one object, balanced brackets,
    closed strings, depth); scalars other than the wanted ones are not validated (Ollama does that).
    Cost: two `bytes.find` per chunk inside a long string, a few Python steps per structural character
    elsewhere (deep arrays of numbers skip commas)."""

    def __init__(self, max_depth: int = MAX_DEPTH) -> None:
        self.max_depth = max_depth
        self.stack = bytearray()
        self.in_str = False
        self.esc = False
        self.started = False
        self.done = False
        self.error: str | None = None
        self.expect_key = False
        self.key: bytes | None = None
        self.key_buf: bytearray | None = None
        self.val_buf: bytearray | None = None
        self.val_str = False
        self.tokens = 0
        self.raw: dict[bytes, bytes | Container | None] = {}  # None: too long to be usable

    # ---- capture helpers ---------------------------------------------------------------------
    def _take(self, seg: bytes) -> None:
        """String content (depth 1 keys and wanted values only)."""
        if self.key_buf is not None:
            if len(self.key_buf) + len(seg) > KEY_CAP:
                self.key_buf = None
                self.key = None
            else:
                self.key_buf += seg
        elif self.val_buf is not None:
            self._val(seg)

    def _val(self, seg: bytes) -> None:
        assert self.val_buf is not None and self.key is not None
        if len(self.val_buf) + len(seg) > VALUE_CAP:
            self.raw[self.key] = None
            self.val_buf = None
        else:
            self.val_buf += seg

    def _end_value(self) -> None:
        if self.val_buf is not None and self.key is not None:
            self.raw[self.key] = bytes(self.val_buf).strip()
        self.val_buf = None
        self.val_str = False

    def _string_end(self) -> None:
        if self.key_buf is not None:
            k = bytes(self.key_buf)
            if b"\\" in k:
                try:
                    k = json.loads(b'"' + k + b'"').encode("utf-8", "surrogatepass")
                except ValueError:
                    k = b""
            self.key = k if k in WANTED else None
            self.key_buf = None
        elif self.val_buf is not None and self.val_str:
            self._val(b'"')
            self._end_value()

    # ---- the scan ------------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n and self.error is None:
            if self.in_str:
                if self.esc:  # the byte after a backslash: never a quote
                    self._take(data[i:i + 1])
                    self.esc = False
                    i += 1
                    continue
                q = data.find(b'"', i)
                j = n if q < 0 else q
                if data.find(b"\\", i, j) >= 0:  # escapes: the slower regex walk
                    j = _STR_SKIP.match(data, i).end()  # type: ignore[union-attr]  # always matches
                if j > i:
                    self._take(data[i:j])
                if j >= n:
                    i = n
                elif data[j] == 0x5C:  # a backslash ending the chunk: its pair is in the next one
                    self._take(data[j:j + 1])
                    self.esc = True
                    i = j + 1
                else:  # the closing quote
                    self.in_str = False
                    self._string_end()
                    i = j + 1
                continue
            if len(self.stack) > 1:
                j = _DEEP_SKIP.match(data, i).end()  # type: ignore[union-attr]  # always matches
                if j < n:
                    self._token(data[j])
                i = j + 1
                continue
            m = _OUTER.search(data, i)
            j = n if m is None else m.start()
            if j > i:
                self._scalar(data[i:j])
                if self.error is not None:
                    return
            if j < n:
                self._token(data[j])
            i = j + 1

    def _scalar(self, seg: bytes) -> None:
        """Bytes outside strings between structural characters: whitespace, or a scalar's text."""
        if not self.started or self.done:
            if seg.strip():
                self.error = "request body must be a JSON object" if not self.started else "trailing data after JSON"
            return
        if len(self.stack) == 1 and self.val_buf is not None and not self.val_str:
            self._val(seg)

    def _token(self, c: int) -> None:
        depth = len(self.stack)
        self.tokens += 1
        if self.tokens > MAX_TOKENS:
            self.error = f"JSON body too complex (more than {MAX_TOKENS} nested values or top-level fields)"
            return
        if self.done or (not self.started and c != 0x7B):
            self.error = "trailing data after JSON" if self.done else "request body must be a JSON object"
            return
        if c == 0x22:  # "
            self.in_str = True
            if depth == 1 and self.expect_key:
                self.key_buf = bytearray()
            elif depth == 1 and self.val_buf is not None and not self.val_str:
                self.val_str = True
                self._val(b'"')
        elif c in (0x7B, 0x5B):  # { [
            if not self.started:
                self.started = True
                self.expect_key = True
            elif depth == 1 and self.val_buf is not None and self.key is not None:
                self.raw[self.key] = CONTAINER
                self.val_buf = None
            self.stack.append(c)
            if len(self.stack) > self.max_depth:
                self.error = f"JSON nested deeper than {self.max_depth} levels"
        elif c in (0x7D, 0x5D):  # } ]
            if not self.stack or self.stack[-1] != c - 2:
                self.error = "unbalanced brackets"
                return
            if depth == 1:
                self._end_value()
                self.done = True
            self.stack.pop()
        elif depth == 1 and c == 0x2C:  # ,
            self._end_value()
            self.expect_key = True
            self.key = None
        elif depth == 1 and c == 0x3A:  # :
            self.expect_key = False
            if self.key is not None:
                self.val_buf = bytearray()
                self.val_str = False

    def result(self) -> dict[str, Any]:
        """The wanted fields, decoded; ValueError (message for the client) when the body is not usable."""
        if self.error is None and (self.in_str or self.stack or not self.started):
            self.error = "unexpected end of JSON input"
        if self.error is not None:
            raise ValueError(self.error)
        out: dict[str, Any] = {}
        for k, raw in self.raw.items():
            if raw is None:
                raise ValueError(f"field {k.decode()!r} is too long")
            out[k.decode()] = raw if isinstance(raw, Container) else json.loads(raw)
        return out


class Payload:
    """A request body: `data` when small, else a spooled file and the scanned fields."""

    __slots__ = ("_scan", "_spool", "data", "size")

    def __init__(self, data: bytes | None, size: int, spool: IO[bytes] | None = None,
                 scan: Scanner | None = None) -> None:
        self.data, self.size, self._spool, self._scan = data, size, spool, scan

    def fields(self) -> dict[str, Any]:
        assert self._scan is not None
        return self._scan.result()

    def upload(self) -> bytes | Payload:
        """What upstream.post sends: the bytes, or this object (`size` + `pieces()`)."""
        return self.data if self.data is not None else self

    def pieces(self) -> Iterator[bytes]:
        """The spooled body from its start (again for each attempt), SEND_PIECE bytes at a time."""
        f = self._spool
        assert f is not None
        f.seek(0)
        while piece := f.read(SEND_PIECE):
            yield piece

    def close(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None


async def read_body(request: Request, limit: int, spool_dir: Path | None = None) -> Payload:
    """The body of a streaming route, bounded by `limit` (TooLarge) and SMALL_BODY in memory."""
    http: Any = request.stream
    declared = request.headers.get("content-length")
    length = int(declared) if declared and declared.isdigit() else None
    if length is not None and length > limit:
        # with `Expect: 100-continue` the client waits for our answer: nothing to drain
        drain = length - limit <= DRAIN_MAX and not getattr(http, "expecting_continue", False)
        if drain:
            await _discard(request, length + 1)
        raise TooLarge(limit, drained=drain)
    if http is None:
        return Payload(request.body or b"", len(request.body or b""))
    if length is not None and length <= SMALL_BODY:
        await request.receive_body()  # type: ignore[no-untyped-call]  # the same read Sanic does for a non-streaming route
        return Payload(request.body, len(request.body))
    parts: list[bytes] = []
    size = 0
    spool: Any = None
    scan: Scanner | None = None
    try:
        while (chunk := await http.read()) is not None:
            size += len(chunk)
            if size > limit:
                drained = size - limit <= DRAIN_MAX and await _discard(request, limit + DRAIN_MAX - size)
                raise TooLarge(limit, drained=drained)
            if spool is None:
                parts.append(chunk)
                if size <= SMALL_BODY:
                    continue
                spool = tempfile.SpooledTemporaryFile(  # noqa: SIM115  # closed by Payload.close()
                    max_size=SPOOL_MEMORY, dir=str(spool_dir) if spool_dir else None, prefix="fleet-body-")
                scan = Scanner()
                for p in parts:
                    spool.write(p)
                    scan.feed(p)
                parts = []
                continue
            assert scan is not None
            if scan.error is None:  # once unusable (a 400 follows), the rest is only read, not kept
                spool.write(chunk)
                scan.feed(chunk)
    except BaseException:
        if spool is not None:
            spool.close()
        raise
    if spool is None:
        data = b"".join(parts)
        return Payload(data, size)
    return Payload(None, size, spool, scan)


async def _discard(request: Request, budget: int) -> bool:
    """Read and drop the rest of the body, at most `budget` bytes; True when it ended within it."""
    http: Any = request.stream
    if http is None:
        return True
    seen = 0
    while (chunk := await http.read()) is not None:
        seen += len(chunk)
        if seen > budget:
            return False
    return True
