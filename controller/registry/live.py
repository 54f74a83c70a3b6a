"""The live registry: agents in memory, updated by MQTT ingest, flushed to the database in batches.

Everything that reads agent state (API, router, dashboard) reads here; the database is the durable
copy written behind by the flusher, so a heartbeat never waits for disk.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ollama_fleet.contract.sanitize import clean_text, finite
from ollama_fleet.contract.status import AgentStatus

from ollama_fleet.controller.hub import Hub
from ollama_fleet.controller.registry.reach import effective_url

log = logging.getLogger("fleet.registry")

UP_STATES = (AgentStatus.ONLINE.value,)  # plain str: compared on the proxy's hot path
MAX_TEXT = 255  # agent-supplied strings stored in VARCHAR(255) columns (PostgreSQL enforces the length)
REQUEUE_CAP = 50_000  # events/samples kept across failing flushes before the oldest are let go
_META = ("v", "session", "ts")
INT64 = 2**63 - 1  # BIGINT columns: a larger Python int fails the whole INSERT
HB_INTERVAL_MAX = 3600.0  # seconds; a birth claiming more keeps the node's last known interval
MAX_LIST = 1024  # GPUs / models per node kept from one snapshot
MAX_CAPACITY = 1024  # generations at once an agent may claim (info.ollama.num_parallel); more is not believed


def _text(value: Any) -> str | None:
    """An agent-supplied value for a VARCHAR(255) column (ingest already cleaned it; this is the backstop)."""
    return clean_text(str(value), MAX_TEXT) if value else None


def _int64(value: Any) -> int | None:
    """A non-negative integer that fits a BIGINT column, or None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= INT64 else None


def _capacity(ollama: Any) -> int:
    """Generations the agent's Ollama runs at once, from its info's `ollama.num_parallel`; 1 for anything
    but an integer from 1 to MAX_CAPACITY (missing, bool, float, string, hostile)."""
    n = ollama.get("num_parallel") if isinstance(ollama, dict) else None
    return n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_CAPACITY else 1


@dataclass(eq=False)  # identity: records are compared on the proxy's hot path (router membership tests)
class AgentRecord:
    node_id: str
    first_seen: float
    last_seen: float
    display_name: str = ""
    tags: list[str] = field(default_factory=list)
    notes: str = ""
    state: str = AgentStatus.ONLINE
    session: str = ""
    forced_offline: bool = False
    ollama_up: bool = False
    ollama_url: str = ""
    ollama_version: str | None = None
    hostname: str = ""
    agent_version: str | None = None
    hb_interval: float = 5.0
    capacity: int = 1  # generations its Ollama runs at once (reported num_parallel); derived from info
    info: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    loaded: list[dict[str, Any]] = field(default_factory=list)
    models: list[dict[str, Any]] = field(default_factory=list)
    gpus: list[dict[str, Any]] = field(default_factory=list)
    online_since: float | None = None
    # runtime only: proxy counters and sampling bookkeeping
    in_flight: int = 0
    requests_total: int = 0
    errors_total: int = 0
    latency_sum: float = 0.0
    last_sample: float = 0.0

    @property
    def name(self) -> str:
        return self.display_name or self.node_id

    @property
    def routable(self) -> bool:
        return self.state in UP_STATES and self.ollama_up

    @property
    def status(self) -> str:
        """One word for humans: the state, or `ollama_down` for a live agent whose Ollama is not."""
        if self.state == AgentStatus.ONLINE and not self.ollama_up:
            return AgentStatus.OLLAMA_DOWN
        return self.state

    def gpu_view(self) -> list[dict[str, Any]]:
        live = {g.get("index"): g for g in self.metrics.get("gpus") or []}
        out = []
        for g in self.gpus:
            m = live.get(g["index"], {})
            out.append({**g, **{k: v for k, v in m.items() if v is not None}})
        return out

    def to_json(self, now: float | None = None) -> dict[str, Any]:
        now = now or time.time()
        done = self.requests_total
        return {
            "id": self.node_id,
            "name": self.name,
            "display_name": self.display_name,
            "tags": self.tags,
            "notes": self.notes,
            "state": self.state,
            "status": self.status,
            "routable": self.routable,
            "forced_offline": self.forced_offline,
            "hostname": self.hostname,
            "ips": self.info.get("ips", []),
            "os": self.info.get("os"),
            "arch": self.info.get("arch"),
            "cpu_count": self.info.get("cpu_count"),
            "mem_total": self.info.get("mem_total"),
            "disk_total": self.info.get("disk_total"),
            "disk_free": self.metrics.get("disk_free", self.info.get("disk_free")),
            "agent_version": self.agent_version,
            "ollama": {"url": self.ollama_url, "version": self.ollama_version, "up": self.ollama_up},
            "capacity": self.capacity,
            "heartbeat_interval": self.hb_interval,
            "metrics": {k: self.metrics.get(k) for k in ("cpu", "mem", "mem_used", "load1", "uptime", "seq")},
            "gpus": self.gpu_view(),
            "models": [m["name"] for m in self.models],
            "loaded": [m["name"] for m in self.loaded],
            "requests": {
                "in_flight": self.in_flight,
                "total": done,
                "errors": self.errors_total,
                "mean_latency_ms": round(self.latency_sum / done * 1000, 1) if done else None,
            },
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "online_since": self.online_since,
            "uptime": round(now - self.online_since, 1) if self.online_since and self.state == AgentStatus.ONLINE else None,
        }


@dataclass
class Batch:
    """Everything the flusher writes in one transaction."""

    agents: list[dict[str, Any]] = field(default_factory=list)
    beats: list[tuple[float, str, str]] = field(default_factory=list)  # (last_seen, metrics json, node_id)
    gpus: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    models: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return any((self.agents, self.beats, self.gpus, self.models, self.deleted, self.events, self.samples))

    def size(self) -> int:
        """Rows this batch holds (a node's GPU or model list counts its items)."""
        return (len(self.agents) + len(self.beats) + len(self.deleted) + len(self.events) + len(self.samples)
                + sum(len(s) for s in self.gpus.values()) + sum(len(s) for s in self.models.values()))


AGENT_COLUMNS = (
    "node_id", "display_name", "tags", "notes", "state", "session", "forced_offline", "ollama_up",
    "ollama_url", "ollama_version", "hostname", "agent_version", "hb_interval", "info", "metrics",
    "loaded", "first_seen", "last_seen", "online_since",
)


class Registry:
    def __init__(self, hub: Hub, stale_after: float = 3.0, sample_interval: float = 30.0) -> None:
        self.hub = hub
        self.stale_after = stale_after
        self.sample_interval = sample_interval
        self.agents: dict[str, AgentRecord] = {}
        self.deleted: set[str] = set()  # deleted by an operator in this run: no rebirth requests for them
        self._dirty: set[str] = set()
        self._beats: set[str] = set()  # only last_seen + metrics changed: a narrow, cheap UPDATE
        self._dirty_gpus: set[str] = set()
        self._dirty_models: set[str] = set()
        self._deleted: list[str] = []
        self._events: list[dict[str, Any]] = []
        self._samples: list[dict[str, Any]] = []
        # called with an agent id after every change to it (state, models, capacity, heartbeat): admission
        # control dispatches queued requests to an agent that joins or grows without polling
        self.listeners: list[Callable[[str], None]] = []

    # ---- persistence -----------------------------------------------------------------------
    def load(self, agents: list[dict[str, Any]], gpus: list[dict[str, Any]], models: list[dict[str, Any]]) -> None:
        """Start from the database; online agents get a fresh grace period before they can go stale."""
        start = time.time()
        for row in agents:
            rec = AgentRecord(**{k: row[k] for k in AGENT_COLUMNS})
            rec.capacity = _capacity(rec.info.get("ollama"))  # not a column: info holds what was reported
            if rec.state == AgentStatus.ONLINE:
                rec.last_seen = max(rec.last_seen, start)
            self.agents[rec.node_id] = rec
        for g in sorted(gpus, key=lambda g: g["index"]):
            if g["node_id"] in self.agents:
                self.agents[g["node_id"]].gpus.append({k: v for k, v in g.items() if k not in ("id", "node_id")})
        for m in sorted(models, key=lambda m: m["name"]):
            if m["node_id"] in self.agents:
                self.agents[m["node_id"]].models.append({k: v for k, v in m.items() if k not in ("id", "node_id")})

    def drain(self) -> Batch:
        batch = Batch(deleted=self._deleted, events=self._events, samples=self._samples)
        for node in self._dirty:
            a = self.agents.get(node)
            if a is not None:
                batch.agents.append({k: getattr(a, k) for k in AGENT_COLUMNS})
        for node in self._beats - self._dirty:
            a = self.agents.get(node)
            if a is not None:
                try:
                    batch.beats.append((a.last_seen, json.dumps(a.metrics, separators=(",", ":"), default=str), node))
                except (ValueError, RecursionError) as e:  # never a reason to fail every flush from now on
                    log.error("heartbeat of %s not persisted: %r", node, e)
        for node in self._dirty_gpus:
            if node in self.agents:
                batch.gpus[node] = self.agents[node].gpus
        for node in self._dirty_models:
            if node in self.agents:
                batch.models[node] = self.agents[node].models
        self._dirty, self._beats, self._dirty_gpus, self._dirty_models = set(), set(), set(), set()
        self._deleted, self._events, self._samples = [], [], []
        return batch

    def rewrite_all(self) -> None:
        """Write every agent, its GPUs and models at the next flush: a new leader's rows replace whatever
        the old one left (docs/scaling.md)."""
        self._dirty.update(self.agents)
        self._dirty_gpus.update(self.agents)
        self._dirty_models.update(self.agents)

    def requeue(self, batch: Batch) -> None:
        """A flush failed (database busy or restarting): keep what it held for the next one."""
        self._dirty.update(row["node_id"] for row in batch.agents if row["node_id"] in self.agents)
        self._beats.update(node for _, _, node in batch.beats if node in self.agents)
        self._dirty_gpus.update(n for n in batch.gpus if n in self.agents)
        self._dirty_models.update(n for n in batch.models if n in self.agents)
        self._deleted[:0] = batch.deleted
        self._events[:0] = batch.events[-REQUEUE_CAP:]
        self._samples[:0] = batch.samples[-REQUEUE_CAP:]

    # ---- events ----------------------------------------------------------------------------
    def event(self, kind: str, node: str | None, message: str, level: str = "info", **data: Any) -> None:
        ev = {"ts": time.time(), "node_id": node, "kind": kind, "level": level, "message": message,
              "data": data or None}
        self._events.append(ev)
        self.hub.publish("event", ev)

    def _changed(self, a: AgentRecord, beat_only: bool = False) -> None:
        (self._beats if beat_only else self._dirty).add(a.node_id)
        for fn in self.listeners:
            fn(a.node_id)
        if self.hub.subscriber_count:
            self.hub.publish("agent", {"id": a.node_id})

    def _set_state(self, a: AgentRecord, state: str, why: str, level: str = "info") -> None:
        if a.state == state:
            return
        old, a.state = a.state, state
        if state == AgentStatus.ONLINE:
            a.online_since = time.time()
        self.event(state, a.node_id, f"{a.name}: {old} -> {state} ({why})", level, previous=old)

    # ---- ingest handlers (called from the MQTT loop; must stay cheap) ---------------------
    def on_state(self, node: str, doc: dict[str, Any]) -> str | None:
        """Returns a counter key when the message was ignored."""
        now = time.time()
        state, session = doc["state"], doc["session"]
        a = self.agents.get(node)
        if a is None:
            if state != AgentStatus.ONLINE and node in self.deleted:
                return "deleted"  # a deleted agent saying goodbye: do not bring it back
            self.deleted.discard(node)
            a = self.agents[node] = AgentRecord(node_id=node, first_seen=now, last_seen=now, state=state,
                                                session=session)
            if state == AgentStatus.ONLINE:
                a.online_since = now
            self.event("registered", node, f"{node} joined the fleet ({state})")
        elif state == AgentStatus.ONLINE:
            if session != a.session:
                a.session, a.forced_offline = session, False
                if a.state == AgentStatus.ONLINE:  # reconnected between two looks: still worth a line
                    self.event("reconnected", node, f"{a.name} reconnected")
                    a.online_since = now
            if a.forced_offline:
                return "forced_offline"
            self._set_state(a, AgentStatus.ONLINE, "birth")
        else:
            if a.session and session != a.session:
                return "stale_session"  # the will of an older connection (client-id takeover)
            level = "warning" if state == AgentStatus.LOST else "info"
            self._set_state(a, state, "last will" if state == AgentStatus.LOST else "clean stop", level)
        if state == AgentStatus.ONLINE:
            hb = finite(doc.get("hb_interval"))
            a.hb_interval = hb if hb is not None and 0 < hb <= HB_INTERVAL_MAX else a.hb_interval
            agent = doc.get("agent")
            if isinstance(agent, dict):
                a.agent_version = _text(agent.get("version"))
        a.last_seen = now
        self._changed(a)
        return None

    def _current(self, node: str, doc: dict[str, Any]) -> AgentRecord | str:
        a = self.agents.get(node)
        if a is None:
            return "unknown_agent"
        if doc.get("session") != a.session:
            return "stale_session"
        return a

    def on_heartbeat(self, node: str, doc: dict[str, Any]) -> str | None:
        a = self._current(node, doc)
        if isinstance(a, str):
            return a
        now = time.time()
        a.last_seen = now
        doc.pop("v", None)
        a.metrics = doc
        steady = True
        ollama = doc.get("ollama")
        if isinstance(ollama, dict) and ollama.get("up") is not a.ollama_up and isinstance(ollama.get("up"), bool):
            self._set_ollama(a, ollama["up"])
            steady = False
        if a.state == AgentStatus.STALE and not a.forced_offline:
            self._set_state(a, AgentStatus.ONLINE, "heartbeat resumed")
            steady = False
        if now - a.last_sample >= self.sample_interval:
            # the first sample lands at a random point of the interval: a fleet that (re)connects at
            # once must not write all its samples in the same flush
            a.last_sample = now if a.last_sample else now - random.uniform(0, self.sample_interval)
            self._samples.append(self._sample(a, now))
        self._changed(a, beat_only=steady)
        return None

    def _set_ollama(self, a: AgentRecord, up: bool) -> None:
        if up == a.ollama_up:
            return
        a.ollama_up = up
        if up:
            self.event("ollama_up", a.node_id, f"{a.name}: Ollama is up")
        else:
            self.event("ollama_down", a.node_id, f"{a.name}: Ollama is down", "warning")

    def _sample(self, a: AgentRecord, now: float) -> dict[str, Any]:
        gpus = [g for g in a.metrics.get("gpus") or [] if isinstance(g, dict)]
        utils = [u for g in gpus if (u := finite(g.get("util"))) is not None]
        used = [g["mem_used"] for g in gpus if isinstance(g.get("mem_used"), int)]
        total = [g["mem_total"] for g in gpus if isinstance(g.get("mem_total"), int)]
        return {
            "node_id": a.node_id, "ts": now, "cpu": finite(a.metrics.get("cpu")),
            "mem": finite(a.metrics.get("mem")), "gpu_util": finite(sum(utils) / len(utils)) if utils else None,
            "gpu_mem_used": _int64(sum(used)) if used else None, "gpu_mem_total": _int64(sum(total)) if total else None,
        }

    def on_info(self, node: str, doc: dict[str, Any]) -> str | None:
        a = self._current(node, doc)
        if isinstance(a, str):
            return a
        a.info = {k: v for k, v in doc.items() if k not in _META}
        ips = a.info.get("ips")
        a.info["ips"] = [ip for ip in ips if isinstance(ip, str)][:MAX_LIST] if isinstance(ips, list) else []
        a.hostname = _text(doc.get("hostname")) or ""
        a.agent_version = _text(doc.get("agent_version")) or a.agent_version
        ollama = doc["ollama"]
        a.ollama_url = _text(effective_url(str(ollama.get("url") or ""), a.info.get("ips") or [],
                                           ollama.get("advertise_url"))) or ""
        a.ollama_version = _text(ollama.get("version")) or a.ollama_version
        a.capacity = _capacity(ollama)
        if isinstance(ollama.get("up"), bool):
            self._set_ollama(a, ollama["up"])
        self._changed(a)
        return None

    def on_gpus(self, node: str, doc: dict[str, Any]) -> str | None:
        a = self._current(node, doc)
        if isinstance(a, str):
            return a
        gpus: dict[int, dict[str, Any]] = {}  # one row per index: (node, index) is unique in the database
        for g in doc["gpus"][:MAX_LIST]:
            index = _int64(g["index"])
            if index is not None and index < 2**31 and index not in gpus:
                gpus[index] = {"index": index, "uuid": _text(g.get("uuid")), "name": _text(g.get("name")) or "",
                               "mem_total": _int64(g.get("mem_total")), "driver": _text(g.get("driver"))}
        a.gpus = list(gpus.values())
        self._dirty_gpus.add(node)
        self._changed(a)
        return None

    def on_models(self, node: str, doc: dict[str, Any]) -> str | None:
        a = self._current(node, doc)
        if isinstance(a, str):
            return a
        now = time.time()
        before = {m["name"]: m for m in a.models}
        models = []
        names: set[str] = set()  # (node, name) is unique in the database
        for m in doc["models"][:MAX_LIST]:
            name = _text(m["name"])
            if not name or name in names:
                continue
            names.add(name)
            digest = _text(m.get("digest")) or ""
            old = before.get(name)
            installed_at = old["installed_at"] if old and old.get("digest") == digest else now
            details = m.get("details")
            models.append({"name": name, "digest": digest, "size": _int64(m.get("size")) or 0,
                           "modified_at": _text(m.get("modified_at")),
                           "details": details if isinstance(details, dict) else {}, "installed_at": installed_at})
        if before or a.models:
            for name in sorted(names - before.keys()):
                self.event("model_added", node, f"{a.name}: model {name} installed")
            for name in sorted(before.keys() - names):
                self.event("model_removed", node, f"{a.name}: model {name} removed")
        a.models = models
        self._dirty_models.add(node)
        self._changed(a)
        return None

    def on_running(self, node: str, doc: dict[str, Any]) -> str | None:
        a = self._current(node, doc)
        if isinstance(a, str):
            return a
        a.loaded = doc["models"]
        self._changed(a)
        return None

    def on_event(self, node: str, doc: dict[str, Any]) -> str | None:
        if node not in self.agents:
            return "unknown_agent"
        level = str(doc.get("level")) if doc.get("level") in ("info", "warning", "error") else "info"
        self.event(clean_text(str(doc["event"]), 32), node, clean_text(str(doc.get("message") or doc["event"]), 500),
                   level)
        return None

    # ---- time and operators ----------------------------------------------------------------
    def check_stale(self, now: float | None = None, heard_since: float = 0.0) -> list[str]:
        """Mark online agents unheard for stale_after heartbeats stale. `heard_since`: when the controller's
        broker connection was made; silence before it (the controller could not hear) does not count."""
        now = now or time.time()
        stale = []
        for a in self.agents.values():
            heard = max(a.last_seen, heard_since)
            if a.state == AgentStatus.ONLINE and now - heard > self.stale_after * a.hb_interval:
                self._set_state(a, AgentStatus.STALE, f"no heartbeat for {now - a.last_seen:.1f} s", "warning")
                self._changed(a)
                stale.append(a.node_id)
        return stale

    def update_settings(self, node: str, display_name: str | None, tags: list[str] | None,
                        notes: str | None) -> AgentRecord:
        a = self.agents[node]
        if display_name is not None and display_name != a.display_name:
            self.event("renamed", node, f"{a.name} renamed to {display_name or node}")
            a.display_name = display_name
        if tags is not None:
            a.tags = tags
        if notes is not None:
            a.notes = notes
        self._changed(a)
        return a

    def force_offline(self, node: str) -> AgentRecord:
        a = self.agents[node]
        a.forced_offline = True
        self._set_state(a, AgentStatus.OFFLINE, "forced disconnect by operator", "warning")
        self._changed(a)
        return a

    def delete(self, node: str) -> None:
        a = self.agents.pop(node)
        self.deleted.add(node)
        self._dirty.discard(node)
        self._beats.discard(node)
        self._dirty_gpus.discard(node)
        self._dirty_models.discard(node)
        self._deleted.append(node)
        self.event("deleted", node, f"{a.name} deleted by operator", "warning")
        self.hub.publish("agent", {"id": node, "deleted": True})
        for fn in self.listeners:
            fn(node)
