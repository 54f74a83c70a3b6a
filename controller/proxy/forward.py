"""Forwarding of LLM requests to the agents' Ollama: failover before the first byte, pass-through after.

Request bytes go upstream unchanged (the body is parsed only for `model` and `stream`); upstream status,
content type and bytes come back unchanged. A streamed answer (NDJSON or SSE) is forwarded chunk by
chunk; anything else is read whole before it is sent, so a failure while reading it can still fail over.
The hot path does no database I/O: counters live on the AgentRecord, log rows go to a buffer.
A request's state (its log columns, routing decision, failures so far) is one Exchange, passed along.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sanic import Request
from sanic.compat import Header
from sanic.response import HTTPResponse

from ollama_fleet.contract.model_names import normalize as normalize_model
from ollama_fleet.contract.sanitize import clean_text
from ollama_fleet.settings import Config

from ollama_fleet.controller.admission import priority
from ollama_fleet.controller.admission.gate import Admission, Pass, QueueRefused
from ollama_fleet.controller.admission.limits import Refusal
from ollama_fleet.controller.edge import access
from ollama_fleet.controller.edge.body import Payload, TooLarge, read_body
from ollama_fleet.controller.edge.http import Api, api_key, api_of, error_response, parse_json
from ollama_fleet.controller.edge.peer import client_ip
from ollama_fleet.controller.edge.timeouts import body_timed_out
from ollama_fleet.controller.metrics.requests import Observation, RequestStats
from ollama_fleet.controller.proxy.keys import KeyRing
from ollama_fleet.controller.proxy.keys import state as key_state
from ollama_fleet.controller.proxy.requestlog import RequestLog, prune_rows, replay_journal, write_rows
from ollama_fleet.controller.proxy.router import Decision, NoRoute, Router
from ollama_fleet.controller.proxy.tracing import NO_TRACE, RequestTrace, Tracer
from ollama_fleet.controller.proxy.upstream import BodySource, UpstreamError, UpstreamPool, UpstreamResponse
from ollama_fleet.controller.registry.live import AgentRecord, Registry
from ollama_fleet.controller.registry.store import Store

log = logging.getLogger("fleet.proxy")

# Request headers never forwarded: hop-by-hop, set by the upstream client, or ours (the API key stays here).
REQUEST_DROP = frozenset({
    "connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
    "proxy-authorization", "proxy-authenticate", "host", "content-length", "authorization", "accept-encoding",
    "expect", "x-fleet-agent", "x-fleet-debug", "cookie", "x-csrf-token",  # dashboard credentials stay here
    "x-api-key",  # Anthropic's clients send the API key here
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
BUSY_RETRIES = 3  # times a generation answered "server busy" waits for a slot again before failing over
BUSY_BACKOFF = 0.25  # seconds (times the retry's number) before retrying an agent busy with others' work
KEYS_RELOAD_EVERY = 2.0  # seconds: `fleet keys add|revoke` take effect within this
PRUNE_EVERY = 600.0
ERROR_TEXT_MAX = 500
JOURNAL_DIR = "requests.journal"  # under data_dir
SPOOL_DIR = "spool"  # under data_dir: large request bodies on their way upstream (unlinked files)

_PROMPT_RE = re.compile(rb'"(?:prompt_eval_count|prompt_tokens|input_tokens)"\s*:\s*(\d{1,18})')
_COMPLETION_RE = re.compile(rb'"(?:eval_count|completion_tokens|output_tokens)"\s*:\s*(\d{1,18})')
_ERROR_MSG_RE = re.compile(rb'"(?:message|error)"\s*:\s*"((?:[^"\\]|\\.)*)"')
# Ollama's final stats (nanoseconds), last in its final chunk: found with rfind in the answer's last
# STATS_BYTES (a regex scan there costs ~10 us a request, rfind well under 1)
_NUMBER_RE = re.compile(rb'\s*:\s*(\d{1,18})')
STATS_BYTES = 512


@dataclass(frozen=True)
class Endpoint:
    """One routed endpoint: its path, the API it belongs to (its error shape) and its `stream` default."""

    path: str
    api: Api
    stream_default: bool
    name_alias: bool = False  # /api/show accepts the deprecated `name` for `model`
    generates: bool = False  # answers with generated tokens: only these have a time to first token

    @property
    def native(self) -> bool:
        """Ollama's own API (Go-lenient: a `stream` that is not false streams); OpenAI's and Anthropic's
        stream only on `"stream": true`."""
        return self.api == "ollama"

    @property
    def openai(self) -> bool:  # for callers from before the `api` field
        return self.api == "openai"

    def error(self, status: int, message: str, code: str | None = None) -> HTTPResponse:
        """An error in the endpoint's own API's shape."""
        return error_response(self.api, status, message, code)


def inband_error(content_type: str, path: str, message: str, events_sent: int) -> bytes:
    """The last line of a stream that failed after its first byte, as Ollama itself would write it."""
    if content_type.startswith("text/event-stream"):
        if api_of(path) == "anthropic":  # Anthropic's stream error event
            err = {"type": "error", "error": {"type": "api_error", "message": message}}
            return b"event: error\ndata: " + _dumps(err) + b"\n\n"
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

    @staticmethod
    def durations(data: bytes | bytearray) -> tuple[int | None, int | None]:
        """(eval_duration, load_duration + prompt_eval_duration) in ns from Ollama's final stats; None
        where absent (OpenAI-style answers carry none)."""
        start = max(0, len(data) - STATS_BYTES)
        prompt = _stat(data, b'"prompt_eval_duration"', start)
        if prompt is not None:
            prompt += _stat(data, b'"load_duration"', start) or 0
        return _stat(data, b'"eval_duration"', start), prompt

    @staticmethod
    def load(data: bytes | bytearray) -> int | None:
        """Ollama's load_duration (ns) from its final stats; None where absent."""
        return _stat(data, b'"load_duration"', max(0, len(data) - STATS_BYTES))

    def error(self) -> str | None:
        """The message of a final in-band error line (`{"error": ...}`, `data: {"error"...}`, `event: error`)."""
        lines = bytes(self.tail).rstrip().rsplit(b"\n", 2)[-2:]
        for line in lines:
            if line.startswith((b'{"error"', b'data: {"error"', b"event: error")):
                m = _ERROR_MSG_RE.search(lines[-1])
                return (m.group(1).decode(errors="replace") if m else "error")[:ERROR_TEXT_MAX]
        return None


def _stat(data: bytes | bytearray, key: bytes, start: int) -> int | None:
    """The number after the last `key` (a quoted JSON name) in data[start:]."""
    i = data.rfind(key, start)
    m = _NUMBER_RE.match(data, i + len(key)) if i >= 0 else None
    return int(m.group(1)) if m else None


def _last_int(regex: re.Pattern[bytes], data: bytes | bytearray) -> int | None:
    last = None
    for last in regex.finditer(data):
        pass
    return int(last.group(1)) if last else None


@dataclass(slots=True)
class Exchange:
    """One routed request from arrival to its log row: what every step of the forwarding reads and sets.
    Created once per request; the log columns are plain attributes until `row()` at the end."""

    request: Request
    ep: Endpoint
    t0: float  # perf_counter() at arrival: ttfb and duration count from here
    rid: str
    ts: float
    client: str
    key: str | None = None
    model: str | None = None
    stream: bool = False
    agent: str | None = None  # the agent tried last (the one that answered, when one did)
    status: int = 0
    attempts: int = 0
    ttfb_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None
    failover: str | None = None
    payload: Payload | None = None
    body: bytes | BodySource = b""  # what goes upstream (the payload's bytes, or the payload itself)
    headers: Sequence[tuple[str, str]] = ()  # the request headers that go upstream
    decision: Decision | None = None
    trace: RequestTrace = NO_TRACE  # spans, when tracing is on (controller/proxy/tracing.py)
    failures: list[str] = field(default_factory=list)  # "<node>: <why>" per attempt that failed over
    # metrics (observed only when the setting `metrics` is on): seconds spent awaiting the agent and the
    # client, the failure's reason word (names.REQUEST_ERRORS), Ollama's final stats
    waited: float = 0.0
    reason: str | None = None
    eval_ns: int | None = None
    first_token_ns: int | None = None
    load_ns: int | None = None  # Ollama's load_duration: learned per model and agent (warm or cold)
    admitted: Pass | None = None  # a generation's place in admission control
    logged: bool = False

    def since_ms(self) -> float:
        return round((time.perf_counter() - self.t0) * 1000, 3)

    def observation(self, duration_s: float) -> Observation:
        """The request's numbers for RequestStats: overhead is what remains of the total once the time
        awaiting others is taken out; TTFT (of a success) is the first chunk's time for a stream, Ollama's
        own figure (load + prompt evaluation) for a whole answer when it gave one; only for endpoints that
        generate (an /api/show or an embedding has no first token)."""
        status, reason = self.status, self.reason
        if not status:  # an exception escaped the proxy: Sanic answers 500
            status, reason = 500, "internal"
        ttft = None
        if reason is None and self.ttfb_ms is not None and self.ep.generates:  # a generation's, when it succeeded
            ttft = self.first_token_ns / 1e9 if self.first_token_ns else self.ttfb_ms / 1000
        tpot = self.eval_ns / self.completion_tokens / 1e9 if self.eval_ns and self.completion_tokens else None
        return Observation(
            self.ep.path, self.model or "", self.agent or "", status, reason, duration_s, ttft, tpot,
            max(0.0, duration_s - self.waited), self.prompt_tokens, self.completion_tokens,
            max(0, self.attempts - 1), time.monotonic())

    def row(self) -> dict[str, Any]:
        """The request log's row (requestlog.COLUMNS)."""
        # a keyed embedding is metered (a Pass) but never queues: priority is a generation's only
        p = self.admitted if self.ep.generates else None
        return {
            "rid": self.rid, "ts": self.ts, "client": self.client, "key": self.key, "endpoint": self.ep.path,
            "model": self.model, "stream": self.stream, "agent": self.agent, "status": self.status,
            "attempts": self.attempts, "ttfb_ms": self.ttfb_ms, "duration_ms": self.since_ms(),
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "error": self.error, "failover": self.failover,
            "queue_ms": round(p.waited * 1000, 1) if p is not None and p.queued else None,
            "priority": p.ticket.tier if p is not None else None,
        }


@dataclass(slots=True)
class Answer:
    """An upstream's answer before anything of it went to the client: status, content type, the headers
    to pass back, and the whole body (`streamed`: only the first chunk, the rest still to come)."""

    status: int
    ctype: str
    headers: dict[str, str]
    data: bytes
    streamed: bool


class _Failed(Exception):
    """An attempt that failed before the first byte: try the next candidate."""

    def __init__(self, why: str, answer: Answer | None = None, cool: bool = True) -> None:
        super().__init__(why)
        self.why, self.answer, self.cool = why, answer, cool


class Proxy:
    def __init__(self, cfg: Config, registry: Registry, *, tracer: Tracer | None = None,
                 stats: RequestStats | None = None, instance: str = "") -> None:
        self.cfg = cfg
        self.registry = registry
        self.instance = instance  # this controller process (/healthz `instance`): X-Fleet-Controller
        self.stats = stats if cfg.metrics else None  # None: no metric work on the request path
        self.router = Router(cfg.routing_strategy, cfg.proxy_cooldown)
        self.admission = Admission(cfg, registry, self.router.has_model, self.router.warm)
        self.max_attempts = max(1, cfg.proxy_max_attempts)
        self.debug = cfg.log_level == "DEBUG"
        self.requests = RequestLog(access_log=cfg.access_log)
        self.keys = KeyRing()
        self.upstream = UpstreamPool(cfg.proxy_connect_timeout, cfg.proxy_read_timeout)
        self.store: Store | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._flush_lock = asyncio.Lock()
        self.max_body = cfg.max_body_bytes
        self.spool_dir: Path | None = None  # large bodies; the system's temp dir may be RAM (tmpfs)
        self.tracer = tracer or Tracer()

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self, store: Store) -> None:
        self.store = store
        cfg = self.cfg
        await self._open_journal(store)
        try:
            (cfg.data_path / SPOOL_DIR).mkdir(parents=True, exist_ok=True)
            self.spool_dir = cfg.data_path / SPOOL_DIR
        except OSError as e:
            log.warning("no spool directory in data_dir (%s): large bodies go to the system's temp dir", e)
        self.keys.load(*await store.read(key_state))
        self._tasks = [
            asyncio.create_task(self._every(cfg.flush_interval, self.flush), name="proxy-log-flush"),
            asyncio.create_task(self._every(KEYS_RELOAD_EVERY, self._reload_keys), name="proxy-keys"),
            asyncio.create_task(self._every(PRUNE_EVERY, self._prune, first=0.0), name="proxy-log-prune"),
        ]

    async def _open_journal(self, store: Store) -> None:
        """The request log's journal in data_dir; segments a crash left behind are written first."""
        try:
            self.requests = RequestLog(self.cfg.data_path / JOURNAL_DIR, self.cfg.access_log)
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
                    _, dropped = await self._store().write(write_rows, rows)
                except Exception:
                    self.requests.requeue(rows)
                    raise
                self.requests.committed(sealed, dropped)

    async def _reload_keys(self) -> None:
        self.keys.load(*await self._store().read(key_state))

    async def _prune(self) -> None:
        days = self.cfg.request_log_retention_days
        await self._store().write(prune_rows, time.time() - days * 86400)

    def _store(self) -> Store:
        if self.store is None:
            raise RuntimeError("the proxy has not been started")
        return self.store

    async def _every(self, interval: float, fn: Callable[[], Awaitable[None]],
                     first: float | None = None) -> None:
        await asyncio.sleep(interval if first is None else first)
        while True:
            try:
                await fn()
            except Exception:
                log.exception("%s failed; retrying next interval", fn.__qualname__)
            await asyncio.sleep(interval)

    # ---- auth --------------------------------------------------------------------------------
    def authorize(self, request: Request, api: Api | bool) -> tuple[str | None, HTTPResponse | None]:
        """(key name, None) when allowed; (None, 401/429 in the API's shape) otherwise. Open only while no
        key was ever created (keys fail closed); wrong keys are throttled like every credential. The key
        comes as a Bearer credential or (Anthropic's clients) in `x-api-key`. `api` True/False: OpenAI's
        or Ollama's API."""
        if not self.keys.enabled:
            return None, None
        given = api_key(request)
        if given:
            if denied := access.throttled(request):
                return None, denied.json(api)
            name = self.keys.check(given)
            if name is not None:
                access.succeeded(request)
                return name, None
            access.failed(request, "API key")
        return None, error_response(api, 401, "unauthorized: a valid API key is required "
                                    "(Authorization: Bearer <key>, or x-api-key: <key>)", "invalid_api_key")

    # ---- the routed request ------------------------------------------------------------------
    async def forward(self, request: Request, ep: Endpoint) -> HTTPResponse | None:
        x = Exchange(request, ep, time.perf_counter(), os.urandom(8).hex(), time.time(), client_ip(request))
        x.trace = self.tracer.request(ep.path, request.headers)
        resp: HTTPResponse | None = None
        try:
            resp = await self._forward(x)
            return resp
        except asyncio.CancelledError:
            if body_timed_out(request):  # the body deadline (controller/edge/timeouts.py) answered 408
                x.status, x.error, x.reason = 408, "request body not received within body_timeout", "timeout"
            else:
                x.status, x.error, x.reason = 499, x.error or "client disconnected", "client_gone"
            raise
        finally:
            if resp is not None and not x.status:
                x.status = resp.status
            try:
                self._finish(x)
            finally:  # the key's meter counts the request out whatever happened
                if x.admitted is not None:
                    self.admission.close(x.admitted, (x.prompt_tokens or 0) + (x.completion_tokens or 0))
            if x.payload is not None:
                x.payload.close()

    def _finish(self, x: Exchange) -> None:
        """Log the request, once. Called before the answer's last byte is handed to the socket (a returned
        response is written by Sanic after this): the journal append is synchronous, so a request whose
        client saw the whole answer is on disk even if the controller is SIGKILLed right after."""
        if x.logged:
            return
        x.logged = True
        row = x.row()
        self.requests.add(row)
        if self.stats is not None:
            self.stats.observe(x.observation(row["duration_ms"] / 1000))
        try:  # after the row: a tracing failure must not cost the request's record
            x.trace.finish(x)
        except Exception:
            log.exception("request %s: finishing its trace failed", x.rid)

    async def _forward(self, x: Exchange) -> HTTPResponse | None:
        request, ep = x.request, x.ep
        x.key, denied = self.authorize(request, ep.api)
        if denied is not None:
            x.error, x.reason = "unauthorized", "rejected"
            return denied
        try:
            t = time.perf_counter()  # the client's upload is not time the controller adds
            payload = x.payload = await read_body(request, self.max_body, self.spool_dir)
            x.waited += time.perf_counter() - t
        except TooLarge as e:
            if not e.drained:  # the rest of the body is still coming: answer, then close
                request.stream.keep_alive = False  # type: ignore[union-attr]
            return self._reject(x, 413, str(e))
        raw = payload.data
        if not payload.size:
            return self._reject(x, 400, "missing request body" if ep.native else "EOF")
        try:
            if raw is None:  # a large body, spooled: only the fields the proxy reads, found by a scanner
                body = payload.fields()
            else:
                body = parse_json(raw)  # bounded depth: no RecursionError (500) from nested input
        except ValueError as e:
            return self._reject(x, 400, f"invalid JSON body: {e}")
        if not isinstance(body, dict):
            return self._reject(x, 400, "request body must be a JSON object")
        model = body.get("model") or (body.get("name") if ep.name_alias else None)
        if not isinstance(model, str) or not model.strip():
            return self._reject(x, 400, "model is required")
        stream = body.get("stream", ep.stream_default)
        x.stream = stream is not False if ep.native else stream is True
        model = clean_text(model, None)  # a lone surrogate or NUL never reaches the log, a page or a reply
        x.model = clean_text(normalize_model(model), MAX_TEXT)  # a VARCHAR(255) on PostgreSQL

        tier = priority.parse(request.headers.get(priority.HEADER))
        if tier is None:
            return self._reject(x, 400, f"{priority.HEADER} must be one of {', '.join(priority.TIERS)}")
        pin = request.headers.get("x-fleet-agent")
        decision = self.router.choose(self.registry.agents.values(), model, pin)
        if isinstance(decision, NoRoute):
            return self._reject(x, 404 if decision.kind == "not_found" else 503, decision.message, "no_route")
        x.decision = decision
        x.trace.routed(x.model, decision)
        limits = self.keys.limits(x.key) if x.key is not None else None
        if ep.generates or limits is not None:  # every keyed request is metered; generations also take a slot
            if limits is not None:
                tier = priority.capped(tier, limits.max_priority)
            opened = self.admission.open(decision.model, tier, x.key or f"client {x.client}", x.key, limits, pin)
            if isinstance(opened, Refusal):
                return self._refuse(x, 429, opened.message, opened.retry_after, "rate_limited")
            x.admitted = opened
        x.body = payload.upload()
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in REQUEST_DROP]
        headers.append(("accept-encoding", "identity"))  # keep bytes readable for the token tap
        x.headers = headers
        return await self._attempts(x, decision)

    async def _attempts(self, x: Exchange, decision: Decision) -> HTTPResponse | None:
        """Up to max_attempts agents, in the router's order (or, for a generation, whichever has a free slot
        first), failing over before the first byte. A generation that an agent's Ollama answered "busy" never
        started: it waits for a slot again (at most BUSY_RETRIES times, that agent last) instead of using up an
        attempt."""
        last_error: tuple[AgentRecord, Answer] | None = None
        remaining = list(decision.order)
        n = min(self.max_attempts, len(remaining))
        p = x.admitted if x.ep.generates else None
        i = busy_retries = 0
        while i < n:
            if p is None:
                agent: AgentRecord | None = remaining[0]
            else:
                before = p.waited
                try:
                    node = await self.admission.place(p, remaining)
                except QueueRefused as q:
                    return self._refuse(x, 503, q.message, q.retry_after, "overloaded")
                finally:
                    x.waited += p.waited - before  # time in the queue is not time the controller adds
                agent = next((a for a in remaining if a.node_id == node), None) or self.registry.agents.get(node)
            x.attempts += 1
            if agent is None:  # granted a slot on an agent deleted while the request waited
                assert p is not None
                self.admission.done(p, node, ok=False)
                x.failures.append(f"{node}: left the registry")
                i += 1
                continue
            x.agent = agent.node_id
            x.trace.attempt(agent)
            ok = busy = again = False
            try:
                out = await self._attempt(x, agent, last=i == n - 1)
                ok = x.error is None
                return out
            except _Failed as f:
                busy = p is not None and f.answer is not None and f.answer.status == 503
                again = busy and busy_retries < BUSY_RETRIES
                why = f.why + ("; waiting for a slot again" if again else "")
                x.trace.failover(why, f.answer.status if f.answer is not None else None)
                x.failures.append(f"{agent.node_id}: {why}")
                x.failover = "; ".join(x.failures)[:ERROR_TEXT_MAX]
                if f.cool:  # later requests try it last for a while (a busy one too)
                    self.router.failed(agent.node_id)
                if again:  # tried again last: an agent with a free slot goes first
                    busy_retries += 1
                    remaining = [a for a in remaining if a is not agent] + [agent]
                    continue
                remaining = [a for a in remaining if a is not agent]
                i += 1
                if f.answer is not None:
                    last_error = (agent, f.answer)
                log.info("request %s: %s failed before the first byte (%s)%s", x.rid, agent.node_id, f.why,
                         "; trying the next agent" if i < n else "")
            finally:
                if p is not None:
                    self.admission.done(p, agent.node_id, ok, x.load_ns / 1e9 if x.load_ns else None, busy)
            if again and all(self.admission.sched.free(a.node_id) <= 0 for a in remaining[:-1]) \
                    and self.admission.sched.free(agent.node_id) > 0:
                # Ollama is busy with work that is not ours and no other agent is free: an immediate retry
                # would meet the same answer
                await asyncio.sleep(BUSY_BACKOFF * busy_retries)
        x.error = x.failover
        x.reason = "upstream_status" if last_error is not None else "upstream"
        if last_error is not None:  # the upstream's own answer, as is
            agent, answer = last_error
            x.agent = agent.node_id
            out = HTTPResponse(answer.data, status=answer.status, headers=answer.headers,
                               content_type=answer.ctype)
        else:
            x.agent = None
            out = x.ep.error(502, f"all {n} agent{'s' if n > 1 else ''} failed: {x.error}")
        self._decorate(out.headers, x)
        x.ttfb_ms = x.since_ms()
        return out

    def _refuse(self, x: Exchange, status: int, message: str, retry_after: float, reason: str) -> HTTPResponse:
        """A 429 (the key's limits) or 503 (the queue) with Retry-After, in the endpoint's error shape."""
        resp = self._reject(x, status, message, reason)
        resp.headers["retry-after"] = str(max(1, math.ceil(retry_after)))
        if x.admitted is not None and x.admitted.queued:
            resp.headers["x-fleet-queue-wait"] = str(round(x.admitted.waited * 1000))
        return resp

    def _reject(self, x: Exchange, status: int, message: str, reason: str = "rejected") -> HTTPResponse:
        x.error, x.reason = message[:ERROR_TEXT_MAX], reason
        resp = x.ep.error(status, message)
        resp.headers["x-fleet-request-id"] = x.rid  # refused requests are logged too: let clients find them
        return resp

    def _decorate(self, headers: Header, x: Exchange) -> None:
        if x.agent:
            headers["x-fleet-agent"] = x.agent
        headers["x-fleet-request-id"] = x.rid
        if self.instance:  # which of several controllers answered: behind a load balancer, for a failed stream
            headers["x-fleet-controller"] = self.instance
        p = x.admitted
        if p is not None and p.queued:
            headers["x-fleet-queue-wait"] = str(round(p.waited * 1000))
        if x.decision is not None and (self.debug or x.request.headers.get("x-fleet-debug") == "1"):
            reason = x.decision.reason()
            if p is not None and p.note:
                reason += "; " + p.note
            if x.failures:
                reason += "; failed over: " + "; ".join(x.failures)
            headers["x-fleet-route-reason"] = reason

    async def _attempt(self, x: Exchange, agent: AgentRecord, last: bool) -> HTTPResponse | None:
        if not agent.ollama_url:
            raise _Failed("no Ollama URL known")
        started = time.perf_counter()
        agent.in_flight += 1
        upstream: UpstreamResponse | None = None
        failed = True
        try:
            try:
                upstream = await self.upstream.post(agent.ollama_url, x.ep.path, x.headers, x.body)
                status = upstream.status
                ctype = upstream.header("content-type")
                streamed = status < 400 and ctype.startswith(STREAM_TYPES)
                if streamed:
                    chunks = upstream.chunks()
                    data = await anext(chunks, b"")
                else:
                    data = await upstream.read()
            except UpstreamError as e:
                raise _Failed(f"{type(e).__name__}: {e}"[:200]) from None
            finally:  # connect, send, headers and the first chunk (or all) of the answer
                x.waited += time.perf_counter() - started
            answer = Answer(status, ctype, {k: v for k, v in upstream.headers if k not in RESPONSE_DROP}, data,
                            streamed)
            if status >= 500 or (status == 404 and not last and b"not found" in data):
                # 5xx and Ollama's busy 503 move on; a 404 here means the registry's model list is stale
                raise _Failed(f"HTTP {status}", answer, cool=status >= 500)
            self.router.succeeded(agent.node_id)
            if streamed:
                await self._stream(x, agent, upstream, chunks, answer)
                failed = x.error is not None
                return None  # sent through request.respond(); returning it would make Sanic log an error
            failed = status >= 500
            out = HTTPResponse(data, status=status, headers=answer.headers, content_type=ctype or None)
            self._decorate(out.headers, x)
            x.ttfb_ms = x.since_ms()
            if status < 400:
                x.prompt_tokens, x.completion_tokens = Tap.tokens_of(data)
                x.load_ns = Tap.load(data)
                if self.stats is not None:
                    x.eval_ns, x.first_token_ns = Tap.durations(data)
            else:
                x.error, x.reason = data[:ERROR_TEXT_MAX].decode(errors="replace"), "upstream_status"
            return out
        finally:
            agent.in_flight -= 1
            agent.requests_total += 1
            agent.latency_sum += time.perf_counter() - started
            if failed:
                agent.errors_total += 1
            if upstream is not None:
                upstream.close()

    async def _stream(self, x: Exchange, agent: AgentRecord, upstream: UpstreamResponse,
                      chunks: AsyncIterator[bytes], answer: Answer) -> None:
        """Forward a stream as it arrives (what arrived together leaves together, the last piece with the
        end of the response: one write each). After the first byte a failure can only end it in-band."""
        ctype = answer.ctype
        response = await x.request.respond(status=answer.status, headers=answer.headers, content_type=ctype)
        self._decorate(response.headers, x)
        tap = Tap()
        sse = ctype.startswith("text/event-stream")
        chunk: bytes | None = answer.data
        try:
            while chunk is not None:
                tap.feed(chunk)
                if sse:
                    tap.events += chunk.count(b"\n\n")
                last = upstream.finished
                if x.ttfb_ms is None:
                    x.ttfb_ms = x.since_ms()
                if last:  # logged before the end goes out (see _finish)
                    self._stream_done(x, tap, answer.status, tap.error())
                t = time.perf_counter()  # a slow reader's backpressure is the client's time, not ours
                await response.send(chunk, end_stream=last)
                x.waited += time.perf_counter() - t
                if last:
                    break
                t = time.perf_counter()
                chunk = await anext(chunks, None)
                x.waited += time.perf_counter() - t
            else:
                self._stream_done(x, tap, answer.status, tap.error())
                await response.eof()
        except UpstreamError as e:
            message = f"agent {agent.node_id} failed mid-stream: {type(e).__name__}: {e}"[:ERROR_TEXT_MAX]
            sep = b"" if tap.tail.endswith(b"\n") else (b"\n\n" if sse else b"\n")
            x.reason = "upstream"
            self._stream_done(x, tap, answer.status, message)
            await response.send(sep + inband_error(ctype, x.ep.path, message, tap.events), end_stream=True)
            log.warning("request %s: %s", x.rid, message)
            self.router.failed(agent.node_id)

    def _stream_done(self, x: Exchange, tap: Tap, status: int, error: str | None) -> None:
        x.error = error
        if error is not None and x.reason is None:
            x.reason = "in_band"
        x.prompt_tokens, x.completion_tokens = tap.tokens()
        x.load_ns = Tap.load(tap.tail)
        if self.stats is not None:
            x.eval_ns = Tap.durations(tap.tail)[0]
        x.status = status
        self._finish(x)
