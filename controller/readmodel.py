"""The read model: what the fleet looks like, computed once from the live registry, the job ledger's jobs
and the model catalogue, for both the JSON API and the dashboard (each only formats what it gets here).

Plain functions over memory: no I/O, no request objects, cheap enough to run on every dashboard tick.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Reversible
from dataclasses import dataclass, field
from typing import Any, TypedDict

from ollama_fleet.contract.model_names import normalize
from ollama_fleet.contract.status import ALL, AgentStatus
from ollama_fleet.controller.jobs.catalogue import Catalogue, estimate_memory
from ollama_fleet.controller.jobs.machine import JobRec
from ollama_fleet.controller.registry.live import AgentRecord, Registry

Model = dict[str, Any]  # one installed or loaded model, as the agent reported it (name, size, details, ...)


# ---- agents --------------------------------------------------------------------------------------
def search_text(a: AgentRecord) -> str:
    """What a search matches: id, name, host name, IPs and tags."""
    return " ".join([a.node_id, a.name, a.hostname, *(a.info.get("ips") or []), *a.tags]).lower()


@dataclass(frozen=True)
class AgentFilter:
    """Which agents a list shows. No statuses: every status. `q`: a case-insensitive substring of
    search_text. With `state_too`, a wanted status also matches the agent's state, so `online` includes
    online agents whose Ollama is down (the JSON API's long-standing meaning)."""

    statuses: frozenset[str] = frozenset()
    q: str = ""
    state_too: bool = False

    def matches(self, a: AgentRecord) -> bool:
        wanted = self.statuses
        if wanted and a.status not in wanted and not (self.state_too and a.state in wanted):
            return False
        return not self.q or self.q.lower() in search_text(a)


def find_agents(registry: Registry, flt: AgentFilter = AgentFilter()) -> list[AgentRecord]:
    """The agents `flt` lets through, in name order (case-sensitive: the JSON API's order)."""
    return sorted((a for a in registry.agents.values() if flt.matches(a)), key=lambda a: a.name)


@dataclass(frozen=True)
class FleetCounts:
    total: int
    routable: int
    by_status: dict[str, int]  # every AgentStatus, in the enum's order
    in_flight: int
    gpu_count: int  # GPUs of online agents that report their use
    gpu_util: float | None  # their mean use, percent
    vram_used: int  # over every GPU of the online agents
    vram_total: int


def fleet_counts(agents: Iterable[AgentRecord]) -> FleetCounts:
    by_status = dict.fromkeys(ALL, 0)
    total = routable = in_flight = vram_used = vram_total = 0
    utils: list[float] = []
    for a in agents:
        total += 1
        routable += a.routable
        by_status[a.status] = by_status.get(a.status, 0) + 1
        in_flight += a.in_flight
        if a.state != AgentStatus.ONLINE:
            continue
        for g in a.gpu_view():
            if isinstance(g.get("util"), (int, float)):
                utils.append(float(g["util"]))
            vram_used += g.get("mem_used") or 0
            vram_total += g.get("mem_total") or 0
    return FleetCounts(total, routable, by_status, in_flight, len(utils),
                       round(sum(utils) / len(utils), 1) if utils else None, vram_used, vram_total)


class AgentSummary(TypedDict):
    """One agent as a table row (the dashboard's table and its CSV export)."""

    id: str
    name: str
    hostname: str
    ip: str
    ips: list[str]
    ollama_version: str | None
    capacity: int
    status: str
    tags: list[str]
    uptime: int | None
    gpu_count: int
    gpu_names: list[str]
    vram_total: int
    vram_used: int
    models: int
    loaded: int
    in_flight: int
    requests: int
    errors: int
    mean_latency_ms: float | None
    cpu: float | None
    mem: float | None
    last_seen: float


def agent_summary(a: AgentRecord, now: float) -> AgentSummary:
    gpus = a.gpu_view()
    done = a.requests_total
    ips: list[str] = a.info.get("ips") or []
    return {
        "id": a.node_id, "name": a.name, "hostname": a.hostname, "ip": ips[0] if ips else "", "ips": ips,
        "ollama_version": a.ollama_version, "capacity": a.capacity, "status": a.status, "tags": a.tags,
        "uptime": round(now - a.online_since) if a.online_since and a.state == AgentStatus.ONLINE else None,
        "gpu_count": len(gpus), "gpu_names": sorted({str(g.get("name") or "GPU") for g in gpus}),
        "vram_total": sum(g.get("mem_total") or 0 for g in gpus),
        "vram_used": sum(g.get("mem_used") or 0 for g in gpus),
        "models": len(a.models), "loaded": len(a.loaded), "in_flight": a.in_flight, "requests": done,
        "errors": a.errors_total, "mean_latency_ms": round(a.latency_sum / done * 1000, 1) if done else None,
        "cpu": a.metrics.get("cpu"), "mem": a.metrics.get("mem"), "last_seen": a.last_seen,
    }


ATTENTION: dict[str, int] = {  # sorting by status puts the agents that need attention first
    AgentStatus.LOST: 0, AgentStatus.STALE: 1, AgentStatus.OLLAMA_DOWN: 2, AgentStatus.OFFLINE: 3,
    AgentStatus.ONLINE: 4,
}
SortKey = str | int | float | tuple[int, str]
AGENT_SORTS: dict[str, Callable[[AgentSummary], SortKey]] = {
    "name": lambda r: r["name"].lower(),
    "status": lambda r: (ATTENTION.get(r["status"], 9), r["name"].lower()),
    "host": lambda r: (r["hostname"] or "").lower(),
    "ip": lambda r: r["ip"] or "",
    "version": lambda r: r["ollama_version"] or "",
    "uptime": lambda r: r["uptime"] if r["uptime"] is not None else -1,
    "gpus": lambda r: r["gpu_count"],
    "vram": lambda r: r["vram_total"],
    "models": lambda r: r["models"],
    "in_flight": lambda r: r["in_flight"],
    "requests": lambda r: r["requests"],
}


def agent_table(registry: Registry, flt: AgentFilter = AgentFilter(), sort: str = "name", desc: bool = False,
                now: float | None = None) -> list[AgentSummary]:
    """Summaries of the agents `flt` lets through, sorted by one of AGENT_SORTS (ties: by name)."""
    now = now or time.time()
    rows = [agent_summary(a, now) for a in registry.agents.values() if flt.matches(a)]
    rows.sort(key=AGENT_SORTS["name"])  # the tie-break (then registration order); the next sort is stable
    rows.sort(key=AGENT_SORTS[sort], reverse=desc)
    return rows


# ---- one agent -----------------------------------------------------------------------------------
def loaded_by_name(a: AgentRecord) -> dict[str, Model]:
    """The agent's models in memory, by name."""
    return {m["name"]: m for m in a.loaded}


def agent_models(a: AgentRecord) -> list[Model]:
    """Installed models, each with `loaded`: whether it is in memory now."""
    loaded = loaded_by_name(a)
    return [{**m, "loaded": m["name"] in loaded} for m in a.models]


# ---- jobs ----------------------------------------------------------------------------------------
def job_list(active: Iterable[JobRec], recent: Reversible[JobRec], agent: str | None = None,
             limit: int = 25) -> list[JobRec]:
    """Unfinished jobs first (oldest first), then the latest finished ones (`recent` is oldest first);
    `agent`: one agent's only."""
    mine = sorted((r for r in active if agent is None or r.node_id == agent), key=lambda r: r.created_at)
    done = [r for r in reversed(recent) if agent is None or r.node_id == agent]
    return [*mine, *done[:max(0, limit - len(mine))]]


# ---- models --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AvailableModel:
    """A model to distribute: from the catalogue, or installed on an agent although not catalogued."""

    name: str
    size: int
    description: str
    required_memory: int | None
    tags: tuple[str, ...]
    source: str  # "catalogue" or "agents"
    agents: list[AgentRecord]  # those that have it, in node id order
    details: Model | None = None  # for agent models: the details the first of them reported


def available_models(registry: Registry, catalogue: Catalogue, q: str = "",
                     tag: str | None = None) -> list[AvailableModel]:
    """The catalogue (in its order), then the models agents have that it lacks; `q`: a case-insensitive
    substring of name or description; `tag`: catalogue models with that tag."""
    have: dict[str, tuple[Model, list[AgentRecord]]] = {}  # normalized name -> first entry seen, agents
    for a in sorted(registry.agents.values(), key=lambda a: a.node_id):
        for m in a.models:
            have.setdefault(normalize(m["name"]), (m, []))[1].append(a)
    out = []
    for c in catalogue.models:
        _, agents = have.pop(normalize(c.name), ({}, []))
        out.append(AvailableModel(c.name, c.size, c.description, c.required_memory, c.tags, "catalogue",
                                  agents))
    for m, agents in have.values():
        size = int(m.get("size") or 0)
        out.append(AvailableModel(m["name"], size, "", estimate_memory(size) if size else None, (), "agents",
                                  agents, m.get("details") or {}))
    q = q.lower()
    return [m for m in out if (not q or q in m.name.lower() or q in m.description.lower())
            and (not tag or tag in m.tags)]


@dataclass(frozen=True)
class MatrixCell:
    installed: Model | None  # the agent's entry for the model (the last of equal spellings), if installed
    loaded: bool
    job: JobRec | None  # an unfinished job for the model on the agent (the last one seen)


@dataclass
class ModelMatrix:
    """Agents x models: every model installed somewhere or in an unfinished job, in normalized-name order."""

    agents: list[AgentRecord]  # in the order asked for
    names: dict[str, str]  # normalized name -> how it is shown (the first spelling, in that order)
    installed: dict[str, dict[str, Model]] = field(default_factory=dict)  # node -> normalized name -> model
    loaded: dict[str, set[str]] = field(default_factory=dict)  # node -> normalized names in memory
    jobs: dict[str, dict[str, JobRec]] = field(default_factory=dict)  # node -> normalized name -> job

    @property
    def keys(self) -> list[str]:
        return sorted(self.names)

    @property
    def columns(self) -> list[str]:
        return [self.names[k] for k in self.keys]

    def cell(self, a: AgentRecord, key: str) -> MatrixCell:
        node = a.node_id
        return MatrixCell(self.installed.get(node, {}).get(key), key in self.loaded.get(node, ()),
                          self.jobs.get(node, {}).get(key))

    def row(self, a: AgentRecord, keys: list[str] | None = None) -> list[MatrixCell]:
        """One cell per column (`keys`: self.keys, when the caller has them already)."""
        return [self.cell(a, k) for k in (self.keys if keys is None else keys)]

    def occupied(self, a: AgentRecord) -> dict[str, MatrixCell]:
        """Only the models the agent has or has a job for: installed ones first, in the agent's order."""
        keys = [*self.installed.get(a.node_id, {}), *self.jobs.get(a.node_id, {})]
        return {k: self.cell(a, k) for k in dict.fromkeys(keys)}


def model_matrix(registry: Registry, active: Iterable[JobRec],
                 order: Callable[[AgentRecord], str] = lambda a: a.node_id) -> ModelMatrix:
    """From the registry and the unfinished jobs (jobs of agents no longer registered are left out), with
    the agents sorted by `order` (node id by default)."""
    mx = ModelMatrix(sorted(registry.agents.values(), key=order), {})
    for a in mx.agents:
        row = mx.installed[a.node_id] = {}
        for m in a.models:
            key = normalize(m["name"])
            mx.names.setdefault(key, m["name"])
            row[key] = m
        mx.loaded[a.node_id] = {normalize(m["name"]) for m in a.loaded}
    for rec in active:
        if rec.model and rec.node_id in registry.agents:
            key = normalize(rec.model)
            mx.names.setdefault(key, rec.model)
            mx.jobs.setdefault(rec.node_id, {})[key] = rec
    return mx
