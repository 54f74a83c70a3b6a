"""Soak benchmark: an hour of accelerated churn against real processes; flat memory, zero lost records.

    uv run python tests/bench/bench_soak.py [--minutes 60] [--accel 10] [--agents 4] [--rate 8]

Real parts: Mosquitto with the shipped broker/ config and ACL, the controller as a process (with an admin
token, sent as `Authorization: Bearer` on every management and read call; no `Origin` anywhere), and
`--agents` agent processes, each with its own fake Ollama process (tests/fake_ollama.py). Throughout the
run: proxied streams and plain answers on `/api/chat` and `/v1/chat/completions` at `--rate` requests/s;
model pulls through the controller's API (`/api/models/distribute`, `/api/agents/{id}/models/pull`);
dashboard-like reads; bad input (malformed, huge and deeply nested JSON, over-limit bodies, lone
surrogates in model names and query strings, non-UTF-8 header bytes, wrong JSON types, bogus MQTT payloads
published with a node's own credentials). Churn: agents join during the first third, are SIGKILLed (every
second time with their Ollama) and come back; the broker is restarted in the middle. The controller is
never killed: a SIGKILL of the controller is a separate measurement (issue 9, request-log durability).

`--accel` compresses fleet time: heartbeats, keepalives, job timeouts and every churn period are divided
by it (10: heartbeats every 0.5 s, an agent killed about every 30 s). The controller's RSS, open file
descriptors, threads and database size (SQLite file + WAL) are sampled every few seconds. At the end:
a table and a verdict, exit status 1 when any verdict fails:

- memory flat: median RSS of the last third over the first third (after warm-up) <= --mem-ratio;
- fds flat: median open fds of the last third minus the first third <= FD_SLACK;
- zero lost records: every proxied request the generator got an answer for (its X-Fleet-Request-Id) is
  in the controller's request log (read-your-writes through `/api/requests`, then the SQLite file);
- every agent alive at the end is `online` in `/api/agents`; every pull job reached a terminal state;
- no 5xx for bad input or for ordinary reads; the controller stopped cleanly and never logged lost rows.

Bounded loops, loopback only, stops by itself; temporary files are removed unless a verdict fails or
--keep is given. Not run by CI (docs/soak.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import secrets
import shutil
import signal
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.fake_ollama import FakeOllamaProcess
from tests.mosquitto import MosquittoProcess, start_mosquitto
from tests.support import AgentProc, Controller, wait_until

MiB = 1 << 20

# --- fleet time (divided by --accel) -------------------------------------------------------------
HEARTBEAT_S = 5.0  # the product default
KEEPALIVE_S = 15.0
JOB_STEP_TIMEOUT_S = 120.0
CHURN_EVERY_S = 300.0  # one agent SIGKILLed about this often (jittered +-50 %)
DOWN_S = (20.0, 120.0)  # how long a killed agent stays away
PULL_EVERY_S = 60.0  # one pull action (a distribute or a single-agent pull)
BAD_EVERY_S = 20.0  # one bad-input case (they are cycled through)
READ_EVERY_S = 20.0  # one round of dashboard-like reads
BROKER_DOWN_S = 30.0  # the broker stays down this long in the middle
BROKER_RECOVER_S = 15.0  # wall seconds after the broker is back in which /healthz may still say 503
# --- wall time ------------------------------------------------------------------------------------
SAMPLE_MAX_S = 5.0  # sampling interval (shorter for short runs: at least ~60 samples)
WARMUP_MIN_S = 30.0  # samples before this (or 10 % of the run) are left out of the flatness verdicts
FD_SLACK = 16  # open fds: in-flight requests hold a downstream and an upstream socket each
MEM_RATIO_MAX = 1.10
AGENTS_ONLINE_TIMEOUT_S = 60.0
TASKS_DRAIN_MARGIN_S = 60.0  # after the job step timeout, for every job to end
HTTP_TIMEOUT = httpx.Timeout(connect=5.0, read=60.0, write=30.0, pool=30.0)
PROGRESS_EVERY_S = 60.0

# Fake Ollama: answers take ~0.4 s (streams are often in flight when an agent dies); pulls take ~5 s.
FAKE = {"tokens": 8, "token_delay": 0.05, "pull_total": 20_000_000, "pull_speed": 4_000_000,
        "pull_layers": 2, "pull_interval": 0.1}
CHAT_MODELS = ("llama3.2", "qwen2.5:0.5b")
PULL_MODELS = ("tinyllama:latest", "gemma3:1b", "nomic-embed-text:latest", "llama3.1:8b")
MAX_BODY = 4 * MiB  # the controller's max_body_bytes in this run: over-limit bodies stay cheap to send
HUGE_CONTENT = 1 * MiB  # a valid, large chat body (under the limit)
DEEP = 20_000  # nesting levels of the deep-JSON cases (~40 KB)
VANDAL = "soak-vandal"  # a node account that never runs an agent; publishes bogus payloads
NO_AGENT = (b"no available agents", b"agents failed", b"agent failed", b"is not available for model")
TERMINAL = frozenset({"completed", "failed", "cancelled", "rejected"})


def outcome(status: int, body: bytes) -> str:
    """A bad-input case's outcome; a valid (if odd) proxied request may meet a fleet with no agent to serve it."""
    if status in (502, 503) and any(m in body for m in NO_AGENT):
        return f"{status} (no agent)"
    return str(status)


def now() -> float:
    return time.monotonic()


def chat(model: str = "llama3.2", stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "soak"}], "stream": stream, **extra}


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# --------------------------------------------------------------------------------------------------
# processes


class Node:
    """One agent process and its own fake Ollama process; SIGKILLed and started again during the run."""

    def __init__(self, tmp: Path, node_id: str, mqtt_url: str, env: dict[str, str]) -> None:
        self.tmp, self.node_id, self.mqtt_url, self.env = tmp, node_id, mqtt_url, env
        self.fake = FakeOllamaProcess(node_id, config=FAKE)
        self.agent: AgentProc | None = None
        self.joined = False
        self.kills = 0

    @property
    def alive(self) -> bool:
        return self.agent is not None and self.agent.proc is not None and self.agent.proc.poll() is None

    def start(self) -> None:
        if not self.fake.running:
            self.fake.start()  # same port after the first start: the agent's advertised URL stays valid
        if self.agent is None:
            self.agent = AgentProc(self.tmp, self.node_id, self.mqtt_url, self.fake.url, self.env)
        elif not self.alive:
            self.agent.start()
        self.joined = True

    def kill(self, with_ollama: bool) -> None:
        """SIGKILL: a crashed agent (with_ollama: a crashed machine, streams cut mid-way)."""
        if self.agent is not None:
            self.agent.kill()
        if with_ollama:
            self.fake.kill()
        self.kills += 1

    def close(self) -> None:
        if self.agent is not None:
            self.agent.stop(10)
        self.fake.stop()


# --------------------------------------------------------------------------------------------------
# bookkeeping


@dataclass
class Sample:
    t: float
    rss: int
    fds: int
    threads: int
    db: int
    wal: int
    other: int  # every other file in the controller's data dir (e.g. a request-log journal), logs aside
    answered: int
    alive: int


@dataclass
class Tally:
    answered_rids: set[str] = field(default_factory=set)
    proxy_status: Counter[str] = field(default_factory=Counter)  # "stream 200", "plain 503", ...
    proxy_5xx: list[float] = field(default_factory=list)  # when (s into the run) a proxied answer was 5xx
    no_rid: int = 0  # answers without X-Fleet-Request-Id (rejected before routing)
    no_answer: Counter[str] = field(default_factory=Counter)  # transport errors before any status line
    cut: int = 0  # answers whose body broke off (an agent died mid-stream)
    bad: dict[str, Counter[str]] = field(default_factory=dict)  # case -> outcome counts
    reads: Counter[str] = field(default_factory=Counter)  # "GET /api/agents 200", ...
    pulls: Counter[str] = field(default_factory=Counter)
    task_ids: set[str] = field(default_factory=set)
    mqtt: Counter[str] = field(default_factory=Counter)
    events: list[tuple[float, str]] = field(default_factory=list)

    def bad_outcome(self, case: str, outcome: str) -> None:
        self.bad.setdefault(case, Counter())[outcome] += 1


# --------------------------------------------------------------------------------------------------
# raw HTTP (bytes httpx will not send: non-UTF-8 header values)


async def raw_request(host: str, port: int, head: bytes, body: bytes = b"",
                      timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    """Send `head` + body on a fresh connection (`Connection: close`); status and headers of the answer."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        length = b"Content-Length: %d\r\n" % len(body) if body else b""
        writer.write(head + length + b"Connection: close\r\n\r\n" + body)
        await writer.drain()
        async with asyncio.timeout(timeout):
            data = await reader.read()  # until the server closes: the whole answer
    finally:
        writer.close()
    head_bytes, _, rest = data.partition(b"\r\n\r\n")
    lines = head_bytes.split(b"\r\n")
    if not lines or len(lines[0].split()) < 2:
        raise ConnectionError(f"no status line: {data[:80]!r}")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers[k.strip().lower().decode("latin-1")] = v.strip().decode("latin-1")
    return int(lines[0].split()[1]), headers, rest


# --------------------------------------------------------------------------------------------------
# the soak


class Soak:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args, self.tmp = args, tmp
        self.accel = float(args.accel)
        self.duration = args.minutes * 60.0
        self.rng = random.Random(args.seed)
        self.token = secrets.token_urlsafe(24)
        self.tally = Tally()
        self.samples: list[Sample] = []
        self.broker: MosquittoProcess | None = None
        self.ctl: Controller | None = None
        self.nodes: list[Node] = []
        self.t0 = 0.0
        self.wall0 = 0.0
        self.end = 0.0
        self.comebacks: set[asyncio.Task[None]] = set()
        self.node_lock = asyncio.Lock()  # one kill/start at a time: the fleet's picture stays consistent
        self.broker_down = False
        self.broker_back_at = -1e9

    # ---- timing ------------------------------------------------------------------------------
    def fleet(self, seconds: float) -> float:
        """A fleet-time period in wall seconds."""
        return seconds / self.accel

    def jitter(self, seconds: float) -> float:
        return self.fleet(seconds) * self.rng.uniform(0.5, 1.5)

    def elapsed(self) -> float:
        return now() - self.t0

    def note(self, text: str) -> None:
        self.tally.events.append((self.elapsed(), text))

    async def pause(self, seconds: float) -> bool:
        """Sleep until the next step of a loop (bounded by the end of the run); False when the run is over."""
        left = self.end - now()
        if left <= 0:
            return False
        await asyncio.sleep(min(seconds, left))
        return now() < self.end

    # ---- setup -------------------------------------------------------------------------------
    def setup(self) -> None:
        hb = max(0.2, self.fleet(HEARTBEAT_S))
        keepalive = str(max(2, int(self.fleet(KEEPALIVE_S))))
        self.step_timeout = max(10.0, self.fleet(JOB_STEP_TIMEOUT_S))
        self.broker = start_mosquitto(self.tmp / "mosquitto")
        ids = [f"soak-{i}" for i in range(self.args.agents)]
        for node in [*ids, VANDAL]:
            self.broker.add_user(node)
        (self.tmp / "controller").mkdir()
        (self.tmp / "agents").mkdir()
        ctl = Controller(self.tmp / "controller", self.broker.url("controller"), {
            "FLEET_ADMIN_TOKEN": self.token, "FLEET_LOG_LEVEL": "INFO", "FLEET_FLUSH_INTERVAL": "1.0",
            "FLEET_MQTT_KEEPALIVE": keepalive, "FLEET_JOB_STEP_TIMEOUT": str(self.step_timeout),
            "FLEET_MAX_BODY_BYTES": str(MAX_BODY), "FLEET_STALE_AFTER": "3",
        }, wait=False)
        self.ctl = ctl
        ctl.http.headers["authorization"] = f"Bearer {self.token}"
        ctl.wait_ready(60)
        self.proc = psutil.Process(ctl.pid)
        self.db_path = self.tmp / "controller" / "fleet.db"
        env = {"FLEET_HEARTBEAT_INTERVAL": str(hb), "FLEET_MQTT_KEEPALIVE": keepalive,
               "FLEET_LOG_LEVEL": "INFO", "FLEET_OLLAMA_TIMEOUT": "1"}
        self.nodes = [Node(self.tmp / "agents", n, self.broker.url(n), env) for n in ids]
        first = max(1, len(self.nodes) // 2)
        for node in self.nodes[:first]:
            node.start()
        wait_until(lambda: all(self.status_of(n.node_id) == "online" for n in self.nodes[:first]), 60,
                   what="the first agents online")

    def status_of(self, node_id: str) -> str | None:
        assert self.ctl is not None
        r = self.ctl.http.get(f"/api/agents/{node_id}")
        return r.json().get("status") if r.status_code == 200 else None

    def close(self) -> None:
        for node in self.nodes:
            try:
                node.close()
            except (OSError, RuntimeError, TimeoutError) as e:  # keep stopping the rest
                print(f"  (stopping {node.node_id}: {e})")
        if self.ctl is not None and self.ctl.proc is not None and self.ctl.proc.poll() is None:
            self.ctl.close()
        if self.broker is not None:
            self.broker.stop()

    # ---- the run -----------------------------------------------------------------------------
    async def run(self) -> None:
        assert self.ctl is not None
        self.t0 = now()
        self.wall0 = time.time()
        self.end = self.t0 + self.duration
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=16)
        async with httpx.AsyncClient(base_url=self.ctl.url, timeout=HTTP_TIMEOUT, limits=limits,
                                     trust_env=False) as http, \
                httpx.AsyncClient(base_url=self.ctl.url, timeout=HTTP_TIMEOUT, trust_env=False,
                                  headers={"authorization": f"Bearer {self.token}"}) as admin:
            self.http, self.admin = http, admin
            loops = [self.sampler(), self.joins(), self.churn(), self.broker_restart(), self.pulls(),
                     self.bad_input(), self.reads(), self.progress(),
                     *(self.traffic(i) for i in range(self.args.concurrency))]
            await asyncio.gather(*loops)
            for task in list(self.comebacks):
                task.cancel()
            await asyncio.gather(*self.comebacks, return_exceptions=True)
            await self.finish()

    async def sampler(self) -> None:
        interval = min(SAMPLE_MAX_S, max(1.0, self.duration / 60))
        while True:
            self.sample()
            if not await self.pause(interval):
                break

    def sample(self) -> None:
        def size(p: Path) -> int:
            try:
                return p.stat().st_size
            except FileNotFoundError:
                return 0
        try:
            mem = self.proc.memory_info().rss
            fds, threads = self.proc.num_fds(), self.proc.num_threads()
        except psutil.Error:
            mem = fds = threads = -1  # the controller died: the verdict says so
        db, wal = size(self.db_path), size(self.db_path.with_name("fleet.db-wal"))
        total = 0
        for f in self.db_path.parent.rglob("*"):
            if f.suffix != ".log":
                total += size(f) if not f.is_dir() else 0
        self.samples.append(Sample(self.elapsed(), mem, fds, threads, db, wal, total - db - wal,
                                   len(self.tally.answered_rids), sum(n.alive for n in self.nodes)))

    async def progress(self) -> None:
        while await self.pause(PROGRESS_EVERY_S):
            s = self.samples[-1] if self.samples else None
            if s:
                print(f"  t={s.t:6.0f}s rss={s.rss / MiB:6.1f} MiB fds={s.fds:4d} db={s.db / MiB:6.2f} MiB "
                      f"wal={s.wal / 1024:5.0f} KiB answered={s.answered} agents alive={s.alive} "
                      f"kills={sum(n.kills for n in self.nodes)}", flush=True)

    # ---- churn -------------------------------------------------------------------------------
    async def start_node(self, node: Node, why: str) -> None:
        async with self.node_lock:
            if not node.alive:
                await asyncio.to_thread(node.start)
                self.note(f"{why} {node.node_id}")

    async def joins(self) -> None:
        """The other agents join at random times during the first third."""
        late = [n for n in self.nodes if not n.joined]
        times = sorted(self.rng.uniform(0.05, 0.3) * self.duration for _ in late)
        for node, at in zip(late, times, strict=True):
            if not await self.pause(at - self.elapsed()):
                return
            await self.start_node(node, "join")

    async def churn(self) -> None:
        if not await self.pause(0.1 * self.duration):
            return
        while await self.pause(self.jitter(CHURN_EVERY_S)):
            if now() > self.t0 + 0.9 * self.duration:
                return  # the last tenth runs without churn: the fleet settles before the verdict
            async with self.node_lock:
                alive = [n for n in self.nodes if n.alive]
                if len(alive) < 2:  # keep one agent serving
                    continue
                victim = self.rng.choice(alive)
                with_ollama = sum(n.kills for n in self.nodes) % 2 == 1
                await asyncio.to_thread(victim.kill, with_ollama)
                self.note(f"SIGKILL {victim.node_id}{' + its Ollama' if with_ollama else ''}")
            task = asyncio.create_task(self.comeback(victim, self.fleet(self.rng.uniform(*DOWN_S))))
            self.comebacks.add(task)
            task.add_done_callback(self.comebacks.discard)

    async def comeback(self, node: Node, after: float) -> None:
        if await self.pause(after):
            await self.start_node(node, "back")

    async def broker_restart(self) -> None:
        if not await self.pause(0.5 * self.duration - self.elapsed()):
            return
        assert self.broker is not None
        old = self.broker
        self.note("broker stop")
        self.broker_down = True
        await asyncio.to_thread(old.stop)
        await asyncio.sleep(max(2.0, self.fleet(BROKER_DOWN_S)))  # the outage itself, not a wait for a condition
        self.broker = await asyncio.to_thread(start_mosquitto, old.tmp_dir, dict(old.passwords), False, old.port)
        self.broker_down = False
        self.broker_back_at = now()
        self.note("broker back")

    # ---- proxied traffic ---------------------------------------------------------------------
    async def traffic(self, worker: int) -> None:
        rng = random.Random(f"{self.args.seed}-{worker}")
        interval = self.args.concurrency / self.args.rate
        next_at = now() + rng.uniform(0, interval)
        while await self.pause(next_at - now()):
            next_at += interval
            openai = rng.random() < 0.5
            stream = rng.random() < 0.8
            path = "/v1/chat/completions" if openai else "/api/chat"
            await self.proxied(path, chat(rng.choice(CHAT_MODELS), stream), f"{'v1' if openai else 'api'}"
                               f"-{'stream' if stream else 'plain'}")

    async def proxied(self, path: str, body: dict[str, Any] | bytes, kind: str,
                      headers: dict[str, str] | None = None) -> int | str:
        """One proxied request; every answer's request id goes into the tally. Returns status or 'no answer'."""
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        try:
            async with self.http.stream("POST", path, content=content, headers={
                    "content-type": "application/json", **(headers or {})}) as r:
                self.record(r.status_code, r.headers.get("x-fleet-request-id"), kind)
                try:
                    async for _ in r.aiter_raw():
                        pass
                except httpx.HTTPError:
                    self.tally.cut += 1
                return r.status_code
        except httpx.HTTPError as e:
            self.tally.no_answer[f"{kind} {type(e).__name__}"] += 1
            return f"no answer ({type(e).__name__})"

    def record(self, status: int, rid: str | None, kind: str) -> None:
        self.tally.proxy_status[f"{kind} {status}"] += 1
        if status >= 500:
            self.tally.proxy_5xx.append(self.elapsed())
        if rid:
            self.tally.answered_rids.add(rid)
        else:
            self.tally.no_rid += 1

    # ---- pulls -------------------------------------------------------------------------------
    async def pulls(self) -> None:
        n = 0
        while await self.pause(self.jitter(PULL_EVERY_S)):
            model = PULL_MODELS[n % len(PULL_MODELS)]
            n += 1
            joined = [x.node_id for x in self.nodes if x.joined]
            try:
                if n % 3 == 0:
                    r = await self.admin.post("/api/models/distribute",
                                              json={"model_name": model, "target": "all", "force": True})
                    what = "distribute all"
                elif n % 3 == 1:
                    picked = self.rng.sample(joined, k=min(2, len(joined)))
                    r = await self.admin.post("/api/models/distribute", json={
                        "model_name": model, "target": "specific", "agent_ids": picked, "force": True})
                    what = "distribute specific"
                else:
                    r = await self.admin.post(f"/api/agents/{self.rng.choice(joined)}/models/pull",
                                              json={"model_name": model, "force": True})
                    what = "agent pull"
            except httpx.HTTPError as e:
                self.tally.pulls[f"no answer ({type(e).__name__})"] += 1
                continue
            self.tally.pulls[f"{what} {r.status_code}"] += 1
            if r.status_code == 202:
                doc = r.json()
                self.tally.task_ids.update(doc.get("task_ids") or [])
                if doc.get("task_id"):
                    self.tally.task_ids.add(doc["task_id"])

    # ---- reads -------------------------------------------------------------------------------
    READS = ("/api/agents", "/api/requests?per_page=25", "/api/events?limit=50", "/api/tasks?limit=50",
             "/api/ingest", "/api/models/matrix", "/api/tags", "/api/ps", "/healthz")

    async def reads(self) -> None:
        while await self.pause(self.fleet(READ_EVERY_S)):
            for path in self.READS:
                try:
                    r = await self.admin.get(path)
                    outcome = str(r.status_code)
                except httpx.HTTPError as e:
                    outcome = f"no answer ({type(e).__name__})"
                if path == "/healthz" and outcome == "503" and (
                        self.broker_down or now() - self.broker_back_at < BROKER_RECOVER_S):
                    outcome = "503 (broker restart)"  # /healthz reports the outage: expected
                self.tally.reads[f"GET {path.split('?')[0]} {outcome}"] += 1

    # ---- bad input ---------------------------------------------------------------------------
    def bad_cases(self) -> list[tuple[str, Callable[[], Awaitable[str]]]]:
        assert self.ctl is not None
        port = self.ctl.port

        def post(path: str, body: bytes, admin: bool = False) -> Callable[[], Awaitable[str]]:
            async def go() -> str:
                client = self.admin if admin else self.http
                try:
                    r = await client.post(path, content=body, headers={"content-type": "application/json"})
                except httpx.HTTPError as e:  # e.g. 413 sent while the body was still going out
                    return f"closed ({type(e).__name__})"
                self.record_rid_if_proxied(path, r)
                return outcome(r.status_code, r.content)
            return go

        def get(path: str) -> Callable[[], Awaitable[str]]:
            async def go() -> str:
                try:
                    return str((await self.admin.get(path)).status_code)
                except httpx.HTTPError as e:
                    return f"no answer ({type(e).__name__})"
            return go

        def raw(path: str, extra: bytes, body: bytes = b"", method: bytes = b"POST",
                admin: bool = False) -> Callable[[], Awaitable[str]]:
            async def go() -> str:
                head = (method + b" " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % port + extra
                        + (b"Authorization: Bearer " + self.token.encode() + b"\r\n" if admin else b"")
                        + (b"Content-Type: application/json\r\n" if body else b""))
                try:
                    status, headers, answer = await raw_request("127.0.0.1", port, head, body)
                except (OSError, ConnectionError, TimeoutError) as e:
                    return f"no answer ({type(e).__name__})"
                if path.startswith(("/api/chat", "/v1/")):
                    self.record(status, headers.get("x-fleet-request-id"), "raw")
                return outcome(status, answer)
            return go

        deep = b"[" * DEEP + b"]" * DEEP
        huge = json.dumps(chat(stream=False, messages=[{"role": "user", "content": "x" * HUGE_CONTENT}])).encode()
        over = b'{"model":"llama3.2","stream":false,"messages":[{"role":"user","content":"' + \
            b"x" * (MAX_BODY + 64 * 1024) + b'"}]}'
        lone = json.dumps(chat("llama3.2\ud800", stream=False)).encode()  # ascii-escaped: "\ud800" in the text
        node = self.nodes[0].node_id
        bad_hdr = b"User-Agent: soak-\xff\xfe\x80\r\nX-Soak-Note: caf\xe9 \xc3\x28\r\n"
        return [
            ("malformed JSON /api/chat", post("/api/chat", b'{"model": "llama3.2", "messages": [')),
            ("malformed JSON /v1/chat/completions", post("/v1/chat/completions", b'{"model": "llama3.2",,}')),
            ("malformed JSON distribute", post("/api/models/distribute", b'{"model_name": ', admin=True)),
            ("invalid UTF-8 body /api/chat", post("/api/chat", b'{"model": "llama\xff\xfe", "stream": false}')),
            ("deep JSON /api/chat", post("/api/chat", b'{"model":"llama3.2","messages":' + deep + b"}")),
            ("deep JSON /v1/chat/completions", post("/v1/chat/completions", deep)),
            ("deep JSON distribute", post("/api/models/distribute", b'{"model_name":' + deep + b"}", admin=True)),
            ("deep JSON agent pull", post(f"/api/agents/{node}/models/pull", b'{"x":' + deep + b"}", admin=True)),
            ("huge JSON /api/chat", post("/api/chat", huge)),
            ("over-limit body /api/chat", post("/api/chat", over)),
            ("over-limit body distribute", post("/api/models/distribute", over, admin=True)),
            ("lone surrogate model /api/chat", post("/api/chat", lone)),
            ("lone surrogate model /v1", post("/v1/chat/completions",
                                              json.dumps(chat("\udfff", stream=True)).encode())),
            ("lone surrogate model distribute", post("/api/models/distribute", json.dumps(
                {"model_name": "tiny\ud800llama", "target": "all"}).encode(), admin=True)),
            ("lone surrogate model agent pull", post(f"/api/agents/{node}/models/pull",
                                                     json.dumps({"model_name": "\ud800"}).encode(), admin=True)),
            ("NUL in model /api/chat", post("/api/chat", json.dumps(chat("llama\x003.2", stream=False)).encode())),
            ("wrong types /api/chat", post("/api/chat", b'{"model": 5, "stream": "yes"}')),
            ("wrong types top-level list", post("/api/chat", b'[{"model": "llama3.2"}]')),
            ("wrong types distribute", post("/api/models/distribute", json.dumps(
                {"model_name": "tinyllama", "target": "specific", "agent_ids": [1, {}]}).encode(), admin=True)),
            ("wrong types distribute target", post("/api/models/distribute", json.dumps(
                {"model_name": 5, "target": ["all"], "force": "yes"}).encode(), admin=True)),
            ("wrong types settings", self.put_settings(node, {"tags": 5, "display_name": {"x": 1}})),
            ("non-UTF-8 headers /api/chat (stream)", raw("/api/chat", bad_hdr,
                                                         json.dumps(chat()).encode())),
            ("non-UTF-8 headers /v1 (plain)", raw("/v1/chat/completions", bad_hdr,
                                                  json.dumps(chat(stream=False)).encode())),
            ("non-UTF-8 headers GET /api/agents", raw("/api/agents", bad_hdr, method=b"GET", admin=True)),
            ("bad query /api/events?before", get("/api/events?before=abc")),
            ("paging /api/events?before&since", get("/api/events?before=5&since=1")),
            ("bad query /api/events?since", get("/api/events?since=1e999")),
            ("bad query /api/requests?page", get("/api/requests?page=99999999999999999999999")),
            ("bad query /api/requests?model", get("/api/requests?model=%ED%A0%80%FF")),
            ("bad query /api/tasks?offset", get("/api/tasks?offset=99999999999999999999999&limit=-5")),
            ("bad path /api/tasks/<invalid UTF-8>", get("/api/tasks/%ED%A0%80")),
            ("bad query /api/agents?q", get("/api/agents?q=%FF%FE")),
            ("bogus MQTT as a node", self.bogus_mqtt),
        ]

    def record_rid_if_proxied(self, path: str, r: httpx.Response) -> None:
        if path.startswith(("/api/chat", "/v1/")):
            self.record(r.status_code, r.headers.get("x-fleet-request-id"), "bad")

    def put_settings(self, node: str, body: dict[str, Any]) -> Callable[[], Awaitable[str]]:
        async def go() -> str:
            try:
                return str((await self.admin.put(f"/api/agents/{node}/settings", json=body)).status_code)
            except httpx.HTTPError as e:
                return f"no answer ({type(e).__name__})"
        return go

    async def bad_input(self) -> None:
        cases = self.bad_cases()
        self.rng.shuffle(cases)
        i = 0
        while await self.pause(self.jitter(BAD_EVERY_S)):
            name, case = cases[i % len(cases)]
            i += 1
            self.tally.bad_outcome(name, await case())

    async def bogus_mqtt(self) -> str:
        """Bogus payloads on every node topic, as the vandal node and as a node whose agent is down."""
        assert self.broker is not None
        if self.broker_down:
            return "skipped (broker down)"
        accounts = [VANDAL] + [n.node_id for n in self.nodes if n.joined and not n.alive][:1]
        outcomes = []
        for user in accounts:
            outcomes.append(await asyncio.to_thread(publish_bogus, self.broker, user, self.tally.mqtt))
        return ", ".join(outcomes)

    # ---- the end -----------------------------------------------------------------------------
    async def finish(self) -> None:
        """Every node back, every agent online, every job ended; then the request-log check."""
        assert self.ctl is not None
        self.note("end of churn and traffic")
        dead = [n for n in self.nodes if not n.alive]
        self.not_online_while_dead = {n.node_id: await asyncio.to_thread(self.status_of, n.node_id) for n in dead}
        for node in dead:
            await self.start_node(node, "final start")
        t = now()
        self.agents_online: dict[str, str | None] = {}

        def all_online() -> bool:
            self.agents_online = {n.node_id: self.status_of(n.node_id) for n in self.nodes if n.alive}
            return all(s == "online" for s in self.agents_online.values())
        try:
            await asyncio.to_thread(wait_until, all_online, AGENTS_ONLINE_TIMEOUT_S, 0.5, "every agent online")
        except AssertionError:
            pass  # the verdict reports self.agents_online
        self.online_after = now() - t
        self.tasks: dict[str, str] = {}
        mine = self.tally.task_ids

        def tasks_ended() -> bool:
            self.tasks = self.list_tasks()
            return all(self.tasks.get(tid) in TERMINAL for tid in mine) and \
                all(s in TERMINAL for s in self.tasks.values())
        t = now()
        try:
            await asyncio.to_thread(wait_until, tasks_ended, self.step_timeout * 2 + TASKS_DRAIN_MARGIN_S, 1.0,
                                    "every job terminal")
        except AssertionError:
            pass
        self.tasks_after = now() - t
        self.sample()
        self.ingest = self.get_json("/api/ingest")
        self.check_records()

    def get_json(self, path: str, **params: Any) -> Any:
        assert self.ctl is not None
        try:
            r = self.ctl.http.get(path, params=params)
            return r.json() if r.status_code == 200 else {"status": r.status_code, "text": r.text[:200]}
        except (httpx.HTTPError, ValueError) as e:
            return {"error": repr(e)}

    def list_tasks(self) -> dict[str, str]:
        assert self.ctl is not None
        out: dict[str, str] = {}
        offset: int | None = 0
        for _ in range(1000):  # bounded: 500 per page
            if offset is None:
                break
            doc = self.ctl.http.get("/api/tasks", params={"limit": 500, "offset": offset}).json()
            out.update({t["id"]: t["status"] for t in doc["tasks"]})
            offset = doc.get("next_offset")
        return out

    def check_records(self) -> None:
        """Every answered request id is in the request log: the API first (its read-your-writes barrier
        flushes the buffer), then the SQLite file itself for the ids."""
        since = self.wall0 - 1
        api = self.get_json("/api/requests", since=since, per_page=25)
        self.log_total_api = api.get("total") if isinstance(api, dict) else None
        self.log_api_error = None if self.log_total_api is not None else api
        from ollama_fleet.controller.proxy.requestlog import RequestRecord

        table = RequestRecord._meta.table_name  # type: ignore[attr-defined]
        con = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)
        try:
            rows = con.execute(f"SELECT rid, status, error FROM {table} WHERE ts >= ?", (since,)).fetchall()
        finally:
            con.close()
        self.log_rids = {r[0] for r in rows}
        self.log_rows = len(rows)
        self.log_errors = sum(1 for r in rows if r[2])
        self.missing = sorted(self.tally.answered_rids - self.log_rids)

    def stop_controller(self) -> None:
        assert self.ctl is not None
        self.ctl_rc = self.ctl.stop()
        text = self.ctl.log()
        self.rows_lost_lines = [line for line in text.splitlines() if re.search(r"\blost\b", line)
                                and "row" in line]
        self.tracebacks = text.count("Traceback")
        self.error_lines = sum(1 for line in text.splitlines() if " ERROR " in line or '"ERROR"' in line)


def publish_bogus(broker: MosquittoProcess, user: str, tally: Counter[str]) -> str:
    """Connect as `user` (its own credentials) and publish hostile payloads on its own node topics."""
    base = f"fleet/v1/nodes/{user}"
    job = f"soak-bogus-{uuid.uuid4().hex[:8]}"
    payloads: list[tuple[str, bytes, bool]] = [
        (f"{base}/state", b'{"v":1,"state":"online","session":"\\ud800","name":"\\udfff"}', True),
        (f"{base}/info", b'{"v":1,"hostname":"\\ud800\\u0000","ips":["\\udfff"],"cpu_count":"many"}', True),
        (f"{base}/models", b'{"v":1,"models":[{"name":"\\ud800","size":"huge"}]}', True),
        (f"{base}/gpus", b"\xff\xfe not UTF-8 \x80", True),
        (f"{base}/running", b"{not json", True),
        (f"{base}/heartbeat", b'{"v":1,"session":"x","seq":"NaN","ts":1e999,"cpu":[]}', False),
        (f"{base}/heartbeat", b"[" * 10_000 + b"]" * 10_000, False),
        (f"{base}/events", b'{"v":1,"kind":"\\ud800","message":"a\\u0000b","level":{"x":1}}', False),
        (f"{base}/events", b"x" * 70_000, False),  # over max_payload_bytes, under the broker's limit
        (f"{base}/jobs/{job}", b'{"v":1,"job_id":"\\ud800","seq":1,"status":"in_progress","session":5}', True),
    ]
    connected = threading.Event()
    result: dict[str, Any] = {}
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{user}-soak-{uuid.uuid4().hex[:6]}")
    client.username_pw_set(user, broker.passwords[user])

    def on_connect(_c: Any, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        result["rc"] = rc
        connected.set()

    client.on_connect = on_connect
    try:
        client.connect(broker.host, broker.port, keepalive=10)
    except OSError as e:
        tally["connect failed"] += 1
        return f"{user}: connect failed ({e})"
    client.loop_start()
    try:
        if not connected.wait(5) or getattr(result.get("rc"), "is_failure", True):
            tally["connect refused"] += 1
            return f"{user}: refused ({result.get('rc')})"
        sent = 0
        for topic, payload, retain in payloads:
            info = client.publish(topic, payload, qos=1, retain=retain)
            try:
                info.wait_for_publish(5)
                sent += info.is_published()
            except (RuntimeError, ValueError):
                pass
        tally["published"] += sent
        tally["not acknowledged"] += len(payloads) - sent
        return f"{user}: {sent}/{len(payloads)} published"
    finally:
        client.disconnect()
        client.loop_stop()


# --------------------------------------------------------------------------------------------------
# report


def report(s: Soak, args: argparse.Namespace) -> bool:
    t = s.tally
    samples = [x for x in s.samples if x.rss > 0]
    print("\n== samples (controller process) ==")
    print(f"{'t s':>7} {'RSS MiB':>8} {'fds':>5} {'thr':>4} {'DB MiB':>7} {'WAL KiB':>8} {'other KiB':>9} "
          f"{'answered':>9} {'alive':>5}  churn since the previous row")
    rows = max(1, len(s.samples) // 24)
    shown = s.samples[::rows] + ([s.samples[-1]] if (len(s.samples) - 1) % rows else [])
    prev = -1.0
    for x in shown:
        happened = [e for (et, e) in t.events if prev < et <= x.t]
        kills = sum(e.startswith("SIGKILL") for e in happened)
        notes = [e for e in happened if not e.startswith(("SIGKILL", "back"))]
        what = (f"{kills} kill(s) " if kills else "") + "; ".join(notes)
        print(f"{x.t:7.0f} {x.rss / MiB:8.1f} {x.fds:5d} {x.threads:4d} {x.db / MiB:7.2f} {x.wal / 1024:8.0f} "
              f"{x.other / 1024:9.0f} {x.answered:9d} {x.alive:5d}  {what[:60]}")
        prev = x.t

    print("\n== traffic ==")
    for k, v in sorted(t.proxy_status.items()):
        print(f"  {k:28} {v}")
    print(f"  answers with a request id: {len(t.answered_rids)}, without (rejected before routing): {t.no_rid}, "
          f"bodies cut mid-way: {t.cut}")
    stop = next((et for et, e in t.events if e == "broker stop"), None)
    back = next((et for et, e in t.events if e == "broker back"), None)
    if stop is not None and back is not None:
        during = sum(stop <= x <= back + BROKER_RECOVER_S for x in t.proxy_5xx)
        print(f"  proxied 5xx: {len(t.proxy_5xx)}, {during} of them during the broker restart "
              f"({stop:.0f}-{back:.0f} s, +{BROKER_RECOVER_S:.0f} s), {len(t.proxy_5xx) - during} at other times")
    if t.no_answer:
        print(f"  no answer at all: {dict(t.no_answer)}")
    print(f"  pulls: {dict(sorted(t.pulls.items()))}; jobs created: {len(t.task_ids)}")
    print(f"  reads: {dict(sorted(t.reads.items()))}")
    print("\n== bad input (case: outcomes) ==")
    for case, outcomes in sorted(t.bad.items()):
        print(f"  {case:42} {dict(outcomes)}")
    print(f"  MQTT bogus publishes: {dict(t.mqtt)}")
    counters = s.ingest.get("counters", {}) if isinstance(s.ingest, dict) else {}
    dropped = {k: v for k, v in counters.items() if k.startswith("dropped")}
    print(f"  controller ingest drops: {dropped or s.ingest}")
    kills = sum(n.kills for n in s.nodes)
    print(f"\n== churn == {kills} SIGKILLs, {sum('join' in e for _, e in t.events)} joins, "
          f"{sum(e.startswith('back') for _, e in t.events)} comebacks, "
          f"broker restarts: {sum(e == 'broker back' for _, e in t.events)}")
    print(f"  agents while dead at the end (should not be online): {s.not_online_while_dead}")

    verdicts: list[tuple[str, bool, str]] = []
    warm = max(WARMUP_MIN_S, 0.1 * s.duration)
    steady = [x for x in samples if warm <= x.t <= s.duration]
    third = len(steady) // 3
    if third >= 2:
        first, last = steady[:third], steady[-third:]
        m0, m1 = median([x.rss for x in first]), median([x.rss for x in last])
        f0, f1 = median([x.fds for x in first]), median([x.fds for x in last])
        ratio = m1 / m0
        detail = (f"median RSS {m0 / MiB:.1f} -> {m1 / MiB:.1f} MiB, ratio {ratio:.3f} (<= {args.mem_ratio}); "
                  f"max {max(x.rss for x in samples) / MiB:.1f} MiB")
        verdicts.append(("memory flat", ratio <= args.mem_ratio, detail))
        detail = (f"median fds {f0:.0f} -> {f1:.0f} (+{f1 - f0:.0f}, slack {FD_SLACK}); "
                  f"max {max(x.fds for x in samples)}")
        verdicts.append(("fds flat", f1 - f0 <= FD_SLACK, detail))
    else:
        verdicts.append(("memory/fds flat", False, f"too few samples after warm-up ({len(steady)})"))
    db0, db1 = s.samples[0].db, s.samples[-1].db
    print(f"\n== database == {db0 / MiB:.2f} -> {db1 / MiB:.2f} MiB (+{(db1 - db0) / max(1, s.log_rows):.0f} bytes "
          f"per request-log row), WAL max {max(x.wal for x in s.samples) / 1024:.0f} KiB, other files max "
          f"{max(x.other for x in s.samples) / 1024:.0f} KiB; request-log rows in the "
          f"run: {s.log_rows} (API total {s.log_total_api}), {s.log_errors} with an error")
    detail = (f"{len(t.answered_rids)} answered request ids, {len(s.missing)} missing from the log"
              + (f" e.g. {s.missing[:3]}" if s.missing else "")
              + (f"; /api/requests failed: {s.log_api_error}" if s.log_api_error else ""))
    verdicts.append(("zero lost records", not s.missing and s.log_total_api is not None, detail))
    online = sum(v == "online" for v in s.agents_online.values())
    detail = f"{online}/{len(s.agents_online)} alive agents online after {s.online_after:.1f} s: {s.agents_online}"
    verdicts.append(("agents online", bool(s.agents_online) and online == len(s.agents_online), detail))
    by_status = Counter(s.tasks.get(tid, "missing") for tid in t.task_ids)
    stuck = {k: v for k, v in s.tasks.items() if v not in TERMINAL}
    detail = (f"{len(t.task_ids)} jobs: {dict(by_status)}; unfinished in /api/tasks: {len(stuck)} "
              f"(after {s.tasks_after:.1f} s)")
    verdicts.append(("pull jobs ended", all(k in TERMINAL for k in by_status) and not stuck, detail))
    bad5 = {case: n for case, c in t.bad.items() for o, n in c.items() if o.startswith("5") and "no agent" not in o}
    verdicts.append(("no 5xx for bad input", not bad5, f"{bad5 or 'none'}"))
    read5 = {k: v for k, v in t.reads.items() if k.split()[-1].startswith("5") or "no answer" in k}
    verdicts.append(("no 5xx for reads", not read5, f"{read5 or 'none'}"))
    detail = (f"exit {s.ctl_rc}; 'rows lost' lines: {s.rows_lost_lines[:2] or 'none'}; "
              f"tracebacks in the log: {s.tracebacks}, ERROR lines: {s.error_lines}")
    verdicts.append(("clean stop, no rows lost", s.ctl_rc == 0 and not s.rows_lost_lines, detail))
    print("\n== verdict ==")
    for name, ok, detail in verdicts:
        print(f"  [{'ok' if ok else 'FAILED'}] {name}: {detail}")
    return all(ok for _, ok, _ in verdicts)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=60.0, help="length of the churn (wall clock)")
    p.add_argument("--accel", type=float, default=10.0, help="fleet time runs this much faster (heartbeats, churn)")
    p.add_argument("--agents", type=int, default=4)
    p.add_argument("--rate", type=float, default=8.0, help="proxied requests per second")
    p.add_argument("--concurrency", type=int, default=4, help="generator workers")
    p.add_argument("--mem-ratio", type=float, default=MEM_RATIO_MAX)
    p.add_argument("--seed", type=int, default=9)
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, database)")
    args = p.parse_args()
    if args.agents < 2 or args.minutes <= 0 or args.accel <= 0 or args.rate <= 0:
        p.error("need --agents >= 2 and positive --minutes, --accel, --rate")

    # SIGTERM unwinds like Ctrl-C, so the finally below stops every process (agents run in own sessions).
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    tmp = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    soak = Soak(args, tmp)
    ok = False
    print(f"soak: {args.minutes:g} min, accel {args.accel:g}, {args.agents} agents, {args.rate:g} req/s; "
          f"cpus {os.cpu_count()}; logs in {tmp}", flush=True)
    try:
        soak.setup()
        asyncio.run(soak.run())
        soak.stop_controller()
        ok = report(soak, args)
    finally:
        soak.close()
        if ok and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"logs and database kept in {tmp}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
