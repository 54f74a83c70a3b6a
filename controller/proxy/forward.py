"""Forwarding of LLM requests to the agents' Ollama: failover before the first byte, pass-through after.

Request bytes go upstream unchanged (the body is parsed only for `model` and `stream`); upstream status,
content type and bytes come back unchanged. A streamed answer (NDJSON or SSE) is forwarded chunk by
chunk; anything else is read whole before it is sent, so a failure while reading it can still fail over.
The hot path does no database I/O: counters live on the AgentRecord, log rows go to a buffer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sanic import Request
from sanic.response import HTTPResponse

from ollama_fleet.contract.sanitize import clean_text
from ollama_fleet.settings import Config

from ollama_fleet.controller.edge import access
from ollama_fleet.controller.edge.body import TooLarge, read_body
from ollama_fleet.controller.edge.http import bearer, error_response, parse_json
from ollama_fleet.controller.proxy.keys import KeyRing
from ollama_fleet.controller.proxy.keys import state as key_state
from ollama_fleet.controller.edge.peer import client_ip
from ollama_fleet.controller.registry.live import AgentRecord, Registry
from ollama_fleet.controller.proxy.requestlog import RequestLog, prune_rows, replay_journal, write_rows
from ollama_fleet.controller.proxy.router import Decision, NoRoute, Router, normalize_model
from ollama_fleet.controller.edge.timeouts import body_timed_out
from ollama_fleet.controller.proxy.upstream import UpstreamError, UpstreamPool, UpstreamResponse

log = logging.getLogger("fleet.proxy")

# Request headers never forwarded: hop-by-hop, set by the upstream client, or ours (the API key stays here).
REQUEST_DROP = frozenset({
    "connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
    "proxy-authorization", "proxy-authenticate", "host", "content-length", "authorization", "accept-encoding",
    "expect", "x-fleet-agent", "x-fleet-debug", "cookie", "x-csrf-token",  # dashboard credentials stay here
})
# Response headers never passed back: hop-by-hop, and the length Sanic recomputes (or re-chunks).
RESPONSE_DROP = frozenset({
    "connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
    "proxy-authenticate", "proxy-authorization", "content-length", "content-type",
    "set-cookie",  # an agent must not set cookies on the controller's origin (the dashboard lives there)
})
STREAM_TYPES = ("application/x-ndjson", "text/event-stream")
MAX_TEXT = 255  # the request log's text columns
TAIL_BYTES = 32 * 1024  # end of each answer kept to read token counts and in-band errors from
KEYS_RELOAD_EVERY = 2.0  # seconds: `fleet keys add|revoke` take effect within this
PRUNE_EVERY = 600.0
ERROR_TEXT_MAX = 500
JOURNAL_DIR = "requests.journal"  # under data_dir
SPOOL_DIR = "spool"  # under data_dir: large request bodies on their way upstream (unlinked files)

_PROMPT_RE = re.compile(rb'"(?:prompt_eval_count|prompt_tokens|input_tokens)"\s*:\s*(\d{1,18})')
_COMPLETION_RE = re.compile(rb'"(?:eval_count|completion_tokens|output_tokens)"\s*:\s*(\d{1,18})')
_ERROR_MSG_RE = re.compile(rb'"(?:message|error)"\s*:\s*"((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Endpoint:
    """One routed endpoint: its path, its API's error dialect and its `stream` default."""

    path: str
    openai: bool
    stream_default: bool
    name_alias: bool = False  # /api/show accepts the deprecated `name` for `model`

    def error(self, status: int, message: str, code: str | None = None) -> HTTPResponse:
        return error_response(self.openai, status, message, code)


def inband_error(content_type: str, path: str, message: str, events_sent: int) -> bytes:
    """The last line of a stream that failed after its first byte, as Ollama itself would write it."""
    if content_type.startswith("text/event-stream"):
        if path == "/v1/responses":
            ev = {"type": "error", "sequence_number": events_sent, "code": None, "message": message, "param": None}
            return b"event: error\ndata: " + _dumps(ev) + b"\n\n"
        err = {"error": {"message": message, "type": "api_error", "param": None, "code": None}}
        return b"data: " + _dumps(err) + b"\n\n"
    return _dumps({"error": message}) + b"\n"


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


class Tap:
    """Keeps the end of what was forwarded: token counts sit in the final chunk, errors in the last line."""

    __slots__ = ("events", "tail")

    def __init__(self) -> None:
        self.tail = bytearray()
        self.events = 0

    def feed(self, chunk: bytes) -> None:
        tail = self.tail
        tail += chunk
        if len(tail) > TAIL_BYTES:
            del tail[:len(tail) - TAIL_BYTES]

    def tokens(self) -> tuple[int | None, int | None]:
        return _last_int(_PROMPT_RE, self.tail), _last_int(_COMPLETION_RE, self.tail)

    @staticmethod
    def tokens_of(data: bytes) -> tuple[int | None, int | None]:
        tail = data[-TAIL_BYTES:]
        return _last_int(_PROMPT_RE, tail), _last_int(_COMPLETION_RE, tail)

    def error(self) -> str | None:
        """The message of a final in-band error line (`{"error": ...}`, `data: {"error"...}`, `event: error`)."""
        lines = bytes(self.tail).rstrip().rsplit(b"\n", 2)[-2:]
        for line in lines:
            if line.startswith((b'{"error"', b'data: {"error"', b"event: error")):
                m = _ERROR_MSG_RE.search(lines[-1])
                return (m.group(1).decode(errors="replace") if m else "error")[:ERROR_TEXT_MAX]
        return None


def _last_int(regex: re.Pattern[bytes], data: bytes | bytearray) -> int | None:
    last = None
    for last in regex.finditer(data):
        pass
    return int(last.group(1)) if last else None


class _Failed(Exception):
    """An attempt that failed before the first byte: try the next candidate."""

    def __init__(self, why: str, response: tuple[int, dict[str, str], str, bytes] | None = None,
                 cool: bool = True) -> None:
        super().__init__(why)
        self.why, self.response, self.cool = why, response, cool


class Proxy:
    def __init__(self, cfg: Config, registry: Registry) -> None:
        self.cfg = cfg
        self.registry = registry
        self.router = Router(cfg.routing_strategy, float(cfg.proxy_cooldown))
        self.max_attempts = max(1, int(cfg.proxy_max_attempts))
        self.debug = cfg.log_level == "DEBUG"
        self.requests = RequestLog()
        self.keys = KeyRing()
        self.upstream: UpstreamPool | None = None
        self.store: Any = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._flush_lock = asyncio.Lock()
        self.max_body = int(cfg.max_body_bytes)
        self.spool_dir: Path | None = None  # large bodies; the system's temp dir may be RAM (tmpfs)

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self, store: Any) -> None:
        self.store = store
        cfg = self.cfg
        await self._open_journal(store)
        try:
            (cfg.data_path / SPOOL_DIR).mkdir(parents=True, exist_ok=True)
            self.spool_dir = cfg.data_path / SPOOL_DIR
        except OSError as e:
            log.warning("no spool directory in data_dir (%s): large bodies go to the system's temp dir", e)
        self.upstream = UpstreamPool(float(cfg.proxy_connect_timeout), float(cfg.proxy_read_timeout))
        self.keys.load(*await store.read(key_state))
        self._tasks = [
            asyncio.create_task(self._every(float(cfg.flush_interval), self.flush), name="proxy-log-flush"),
            asyncio.create_task(self._every(KEYS_RELOAD_EVERY, self._reload_keys), name="proxy-keys"),
            asyncio.create_task(self._every(PRUNE_EVERY, self._prune, first=0.0), name="proxy-log-prune"),
        ]

    async def _open_journal(self, store: Any) -> None:
        """The request log's journal in data_dir; segments a crash left behind are written first."""
        try:
            self.requests = RequestLog(self.cfg.data_path / JOURNAL_DIR)
        except OSError as e:
            log.error("request log journal unavailable (%s): rows reach the database only when flushed", e)
            return
        journal = self.requests.journal
        assert journal is not None
        if journal.leftover:
            written, dropped = await store.write(replay_journal, journal.leftover)
            self.requests.replayed, self.requests.dropped = written, dropped
            log.info("request log: %d rows recovered from the journal (%d unreadable or refused)", written, dropped)

    async def stop(self) -> None:
        """Never raises: the registry's own shutdown flush comes after this."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self.upstream is not None:
            self.upstream.close()
        committed = False
        if self.store is not None:
            try:
                await self.flush()
                committed = True
            except Exception:
                log.exception("request log: final flush failed; its %d rows stay in the journal %s for the next "
                              "start", len(self.requests.drain()[0]), self.requests.stats()["journal"])
        if self.requests.journal is not None:
            self.requests.journal.close(committed)

    async def flush(self, barrier: bool = False) -> None:
        """Write buffered rows. `barrier`: also wait for a write the periodic flusher has in progress,
        so a read that follows sees every finished request. One flush at a time: a journal segment is
        deleted only when every row in it is committed."""
        async with self._flush_lock:
            rows, sealed = self.requests.drain()
            if rows or barrier:
                try:
                    _, dropped = await self.store.write(write_rows, rows)
                except Exception:
                    self.requests.requeue(rows)
                    raise
                self.requests.committed(sealed, dropped)

    async def _reload_keys(self) -> None:
        self.keys.load(*await self.store.read(key_state))

    async def _prune(self) -> None:
        days = float(self.cfg.request_log_retention_days)
        await self.store.write(prune_rows, time.time() - days * 86400)

    async def _every(self, interval: float, fn: Any, first: float | None = None) -> None:
        await asyncio.sleep(interval if first is None else first)
        while True:
            try:
                await fn()
            except Exception:
                log.exception("%s failed; retrying next interval", getattr(fn, "__name__", fn))
            await asyncio.sleep(interval)

    # ---- auth --------------------------------------------------------------------------------
    def authorize(self, request: Request, openai: bool) -> tuple[str | None, HTTPResponse | None]:
        """(key name, None) when allowed; (None, 401/429 in the API's shape) otherwise. Open only while no
        key was ever created (keys fail closed); wrong keys are throttled like every credential."""
        if not self.keys.enabled:
            return None, None
        given = bearer(request)
        if given:
            if denied := access.throttled(request):
                return None, denied.json(openai)
            name = self.keys.check(given)
            if name is not None:
                access.succeeded(request)
                return name, None
            access.failed(request, "API key")
        return None, error_response(openai, 401, "unauthorized: a valid API key is required "
                                    "(Authorization: Bearer <key>)", "invalid_api_key" if openai else None)

    # ---- the routed request ------------------------------------------------------------------
    async def forward(self, request: Request, ep: Endpoint) -> HTTPResponse | None:
        t0 = time.perf_counter()
        rec: dict[str, Any] = {
            "rid": os.urandom(8).hex(), "ts": time.time(), "client": client_ip(request),
            "key": None, "endpoint": ep.path, "model": None, "stream": False, "agent": None, "status": 0,
            "attempts": 0, "ttfb_ms": None, "duration_ms": 0.0, "prompt_tokens": None,
            "completion_tokens": None, "error": None, "failover": None,
        }
        resp: HTTPResponse | None = None
        try:
            resp = await self._forward(request, ep, rec, t0)
            return resp
        except asyncio.CancelledError:
            if body_timed_out(request):  # the body deadline (controller/timeouts.py) answered 408
                rec["status"], rec["error"] = 408, "request body not received within body_timeout"
            else:
                rec["status"], rec["error"] = 499, rec["error"] or "client disconnected"
            raise
        finally:
            if resp is not None and not rec["status"]:
                rec["status"] = resp.status
            self._finish(rec, t0)
            payload = getattr(request.ctx, "fleet_body", None)
            if payload is not None:
                payload.close()

    def _finish(self, rec: dict[str, Any], t0: float) -> None:
        """Log the request, once. Called before the answer's last byte is handed to the socket (a returned
        response is written by Sanic after this): the journal append is synchronous, so a request whose
        client saw the whole answer is on disk even if the controller is SIGKILLed right after."""
        if rec.get("_logged"):
            return
        rec["_logged"] = True
        rec["duration_ms"] = round((time.perf_counter() - t0) * 1000, 3)
        self.requests.add(rec)

    async def _forward(self, request: Request, ep: Endpoint, rec: dict[str, Any],
                       t0: float) -> HTTPResponse | None:
        rec["key"], denied = self.authorize(request, ep.openai)
        if denied is not None:
            rec["error"] = "unauthorized"
            return denied
        try:
            payload = request.ctx.fleet_body = await read_body(request, self.max_body, self.spool_dir)
        except TooLarge as e:
            if not e.drained:  # the rest of the body is still coming: answer, then close
                request.stream.keep_alive = False  # type: ignore[union-attr]
            return self._reject(rec, ep, 413, str(e))
        raw = payload.data
        if not payload.size:
            return self._reject(rec, ep, 400, "missing request body" if not ep.openai else "EOF")
        try:
            if raw is None:  # a large body, spooled: only the fields the proxy reads, found by a scanner
                body = payload.fields()
            else:
                body = parse_json(raw)  # bounded depth: no RecursionError (500) from nested input
        except ValueError as e:
            return self._reject(rec, ep, 400, f"invalid JSON body: {e}")
        if not isinstance(body, dict):
            return self._reject(rec, ep, 400, "request body must be a JSON object")
        model = body.get("model") or (body.get("name") if ep.name_alias else None)
        if not isinstance(model, str) or not model.strip():
            return self._reject(rec, ep, 400, "model is required")
        stream = body.get("stream", ep.stream_default)
        rec["stream"] = stream is not False if not ep.openai else stream is True
        model = clean_text(model, None)  # a lone surrogate or NUL never reaches the log, a page or a reply
        rec["model"] = clean_text(normalize_model(model), MAX_TEXT)  # a VARCHAR(255) on PostgreSQL

        decision = self.router.choose(self.registry.agents.values(), model, request.headers.get("x-fleet-agent"))
        if isinstance(decision, NoRoute):
            return self._reject(rec, ep, 404 if decision.kind == "not_found" else 503, decision.message)

        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in REQUEST_DROP]
        headers.append(("accept-encoding", "identity"))  # keep bytes readable for the token tap
        failures: list[str] = []
        last_error: tuple[AgentRecord, tuple[int, dict[str, str], str, bytes]] | None = None
        order = decision.order[:self.max_attempts]
        for i, agent in enumerate(order):
            rec["attempts"] = i + 1
            rec["agent"] = agent.node_id
            try:
                return await self._attempt(request, ep, agent, headers, decision, failures, rec, t0,
                                           last=i == len(order) - 1)
            except _Failed as f:
                failures.append(f"{agent.node_id}: {f.why}")
                rec["failover"] = "; ".join(failures)[:ERROR_TEXT_MAX]
                if f.cool:
                    self.router.failed(agent.node_id)
                if f.response is not None:
                    last_error = (agent, f.response)
                log.info("request %s: %s failed before the first byte (%s)%s", rec["rid"], agent.node_id, f.why,
                         "; trying the next agent" if i + 1 < len(order) else "")
        rec["error"] = rec["failover"]
        if last_error is not None:  # the upstream's own answer, as is
            agent, (status, hdrs, ctype, data) = last_error
            rec["agent"] = agent.node_id
            out = HTTPResponse(data, status=status, headers=hdrs, content_type=ctype)
        else:
            rec["agent"] = None
            n = len(order)
            out = ep.error(502, f"all {n} agent{'s' if n > 1 else ''} failed: {rec['error']}")
        self._decorate(out.headers, request, rec, decision, failures)
        rec["ttfb_ms"] = round((time.perf_counter() - t0) * 1000, 3)
        return out

    def _reject(self, rec: dict[str, Any], ep: Endpoint, status: int, message: str) -> HTTPResponse:
        rec["error"] = message[:ERROR_TEXT_MAX]
        resp = ep.error(status, message)
        resp.headers["x-fleet-request-id"] = rec["rid"]  # refused requests are logged too: let clients find them
        return resp

    def _decorate(self, headers: Any, request: Request, rec: dict[str, Any], decision: Decision,
                  failures: list[str]) -> None:
        if rec["agent"]:
            headers["x-fleet-agent"] = rec["agent"]
        headers["x-fleet-request-id"] = rec["rid"]
        if self.debug or request.headers.get("x-fleet-debug") == "1":
            reason = decision.reason()
            if failures:
                reason += "; failed over: " + "; ".join(failures)
            headers["x-fleet-route-reason"] = reason

    async def _attempt(self, request: Request, ep: Endpoint, agent: AgentRecord, headers: list[tuple[str, str]],
                       decision: Decision, failures: list[str], rec: dict[str, Any], t0: float,
                       last: bool) -> HTTPResponse | None:
        assert self.upstream is not None
        if not agent.ollama_url:
            raise _Failed("no Ollama URL known")
        started = time.perf_counter()
        agent.in_flight += 1
        upstream: UpstreamResponse | None = None
        failed = True
        try:
            try:
                upstream = await self.upstream.post(agent.ollama_url, ep.path, headers,
                                                    request.ctx.fleet_body.upload())
                status = upstream.status
                ctype = upstream.header("content-type")
                if status < 400 and ctype.startswith(STREAM_TYPES):
                    chunks = upstream.chunks()
                    first = await anext(chunks, b"")
                else:
                    data = await upstream.read()
            except UpstreamError as e:
                raise _Failed(f"{type(e).__name__}: {e}"[:200]) from None
            out_headers = {k: v for k, v in upstream.headers if k not in RESPONSE_DROP}
            if status >= 500 or (status == 404 and not last and b"not found" in data):
                # 5xx and Ollama's busy 503 move on; a 404 here means the registry's model list is stale
                raise _Failed(f"HTTP {status}", (status, out_headers, ctype, data), cool=status >= 500)
            self.router.succeeded(agent.node_id)
            if status < 400 and ctype.startswith(STREAM_TYPES):
                await self._stream(request, ep, agent, upstream, chunks, first, out_headers, ctype, decision,
                                   failures, rec, t0)
                failed = rec["error"] is not None
                return None  # sent through request.respond(); returning it would make Sanic log an error
            failed = status >= 500
            out = HTTPResponse(data, status=status, headers=out_headers, content_type=ctype or None)
            self._decorate(out.headers, request, rec, decision, failures)
            rec["ttfb_ms"] = round((time.perf_counter() - t0) * 1000, 3)
            if status < 400:
                rec["prompt_tokens"], rec["completion_tokens"] = Tap.tokens_of(data)
            else:
                rec["error"] = data[:ERROR_TEXT_MAX].decode(errors="replace")
            return out
        finally:
            agent.in_flight -= 1
            agent.requests_total += 1
            agent.latency_sum += time.perf_counter() - started
            if failed:
                agent.errors_total += 1
            if upstream is not None:
                upstream.close()

    async def _stream(self, request: Request, ep: Endpoint, agent: AgentRecord, upstream: UpstreamResponse,
                      chunks: Any, first: bytes, out_headers: dict[str, str], ctype: str, decision: Decision,
                      failures: list[str], rec: dict[str, Any], t0: float) -> None:
        """Forward a stream as it arrives (what arrived together leaves together, the last piece with the
        end of the response: one write each). After the first byte a failure can only end it in-band."""
        response = await request.respond(status=upstream.status, headers=out_headers, content_type=ctype)
        self._decorate(response.headers, request, rec, decision, failures)
        tap = Tap()
        sse = ctype.startswith("text/event-stream")
        chunk: bytes | None = first
        try:
            while chunk is not None:
                tap.feed(chunk)
                if sse:
                    tap.events += chunk.count(b"\n\n")
                last = upstream.finished
                if rec["ttfb_ms"] is None:
                    rec["ttfb_ms"] = round((time.perf_counter() - t0) * 1000, 3)
                if last:  # logged before the end goes out (see _finish)
                    self._stream_done(rec, tap, upstream.status, tap.error(), t0)
                await response.send(chunk, end_stream=last)
                if last:
                    break
                chunk = await anext(chunks, None)
            else:
                self._stream_done(rec, tap, upstream.status, tap.error(), t0)
                await response.eof()
        except UpstreamError as e:
            message = f"agent {agent.node_id} failed mid-stream: {type(e).__name__}: {e}"[:ERROR_TEXT_MAX]
            sep = b"" if tap.tail.endswith(b"\n") else (b"\n\n" if sse else b"\n")
            self._stream_done(rec, tap, upstream.status, message, t0)
            await response.send(sep + inband_error(ctype, ep.path, message, tap.events), end_stream=True)
            log.warning("request %s: %s", rec["rid"], message)
            self.router.failed(agent.node_id)

    def _stream_done(self, rec: dict[str, Any], tap: Tap, status: int, error: str | None, t0: float) -> None:
        rec["error"] = error
        rec["prompt_tokens"], rec["completion_tokens"] = tap.tokens()
        rec["status"] = status
        self._finish(rec, t0)
