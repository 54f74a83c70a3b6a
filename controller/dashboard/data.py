"""What the dashboard shows, as plain dicts: agent rows, fleet overview, charts, jobs, model matrix.

Everything live comes from memory through the read model (controller/readmodel.py, which the JSON API
renders too), formatted here for the templates; only history (request log, metric samples,
events) is read from the database, on the store's reader threads, with short caches so many open
browsers cost no more than one.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import urlencode

import peewee as pw
from sanic.request.parameters import RequestParameters

from ollama_fleet.contract.model_names import normalize
from ollama_fleet.contract.status import ALL, AgentStatus

from ollama_fleet.controller import readmodel
from ollama_fleet.controller.admission.gate import Admission
from ollama_fleet.controller.db import MetricSample, db
from ollama_fleet.controller.exports import to_csv
from ollama_fleet.controller.jobs.catalogue import Catalogue
from ollama_fleet.controller.jobs.ledger import JobLedger
from ollama_fleet.controller.metrics import names, queues
from ollama_fleet.controller.metrics.queues import Queue
from ollama_fleet.controller.metrics.requests import Recent, RequestStats
from ollama_fleet.controller.proxy.requestlog import RequestRecord
from ollama_fleet.controller.readmodel import AgentFilter, AgentSummary, ModelMatrix
from ollama_fleet.controller.registry.live import AgentRecord, Registry

STATUS_LABELS: dict[AgentStatus, str] = {AgentStatus.ONLINE: "Online", AgentStatus.OFFLINE: "Offline",
                                 AgentStatus.LOST: "Lost", AgentStatus.STALE: "Stale",
                                 AgentStatus.OLLAMA_DOWN: "Ollama down"}
SORTS = list(readmodel.AGENT_SORTS)
CSV_COLUMNS = ("id", "name", "hostname", "ips", "status", "ollama_version", "uptime", "gpu_count", "vram_total",
               "vram_used", "models", "loaded", "in_flight", "requests", "errors", "mean_latency_ms", "cpu", "mem",
               "tags", "last_seen")
JOBS_SHOWN = 25
SERIES_WINDOW = 3600.0
TRAFFIC_WINDOW = 60.0  # seconds: the per-agent and per-model figures are the last minute's
T = TypeVar("T")


# ---- agents --------------------------------------------------------------------------------------
class AgentQuery:
    """The agents table's filter, search and sort, from query-string arguments (unknown values: ignored)."""

    def __init__(self, args: RequestParameters) -> None:
        status = str(args.get("status") or "")
        self.status = status if status in ALL else ""
        self.q = str(args.get("q") or "").strip()[:100]
        sort = str(args.get("sort") or "name")
        self.sort = sort if sort in readmodel.AGENT_SORTS else "name"
        self.desc = args.get("dir") == "desc"
        self.filter = AgentFilter(frozenset({self.status} if self.status else ()), self.q)

    def matches(self, a: AgentRecord) -> bool:
        return self.filter.matches(a)

    def rows(self, registry: Registry, now: float | None = None) -> list[AgentSummary]:
        return readmodel.agent_table(registry, self.filter, self.sort, self.desc, now)

    def params(self, **override: str) -> str:
        """Query string for links (sort headers, exports) that keep the other choices."""
        p = {"status": self.status, "q": self.q, "sort": self.sort, "dir": "desc" if self.desc else ""}
        p.update(override)
        return urlencode({k: v for k, v in p.items() if v})


def agents_csv(rows: list[AgentSummary]) -> str:
    """Names and tags come from agents and operators: exports.to_csv keeps them from being formulas."""
    return to_csv(({**r, "ips": " ".join(r["ips"]), "tags": " ".join(r["tags"]),
                    "last_seen": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r["last_seen"]))} for r in rows),
                  CSV_COLUMNS)


# ---- overview ------------------------------------------------------------------------------------
def fleet_counts(agents: Iterable[AgentRecord]) -> dict[str, int | float | None]:
    """The templates' `c`: total, one count per status, in_flight, and GPU use of the online agents."""
    c = readmodel.fleet_counts(agents)
    return {"total": c.total, **c.by_status, "in_flight": c.in_flight, "gpu_util": c.gpu_util,
            "gpu_count": c.gpu_count, "vram_used": c.vram_used, "vram_total": c.vram_total}


def _is_error(R: Any) -> Any:
    return (R.status >= 400) | R.error.is_null(False)


def request_stats(since: float) -> dict[str, Any]:
    R: Any = RequestRecord
    errors = pw.Case(None, [(_is_error(R), 1)], 0)
    total, errs, mean = (R.select(pw.fn.COUNT(R.id), pw.fn.SUM(errors), pw.fn.AVG(R.duration_ms))
                         .where(R.ts >= since).tuples().get())
    total, errs = int(total or 0), int(errs or 0)
    return {"total": total, "errors": errs, "success": total - errs,
            "mean_latency_ms": round(mean, 1) if mean is not None else None}


def _minute(col: Any) -> Any:
    """Minute bucket of an epoch column, on SQLite (truncating CAST) and PostgreSQL (FLOOR)."""
    if isinstance(db.obj, pw.SqliteDatabase):
        return (col / 60).cast("INTEGER")
    return pw.fn.FLOOR(col / 60)


def series(now: float) -> dict[str, Any]:
    """Per-minute fleet history for the overview charts: requests (ok, errors) and GPU use."""
    since = now - SERIES_WINDOW
    first = int(since // 60) + 1
    minutes = list(range(first, int(now // 60) + 1))
    R: Any = RequestRecord
    M: Any = MetricSample
    bucket = _minute(R.ts)
    reqs = {int(b): (int(n or 0), int(e or 0)) for b, n, e in
            R.select(bucket, pw.fn.COUNT(R.id), pw.fn.SUM(pw.Case(None, [(_is_error(R), 1)], 0)))
            .where(R.ts >= first * 60).group_by(bucket).tuples()}
    mb = _minute(M.ts)
    gpu = {int(b): (u, used, total) for b, u, used, total in
           M.select(mb, pw.fn.AVG(M.gpu_util), pw.fn.SUM(M.gpu_mem_used), pw.fn.SUM(M.gpu_mem_total))
           .where(M.ts >= first * 60).group_by(mb).tuples()}
    out: dict[str, list[Any]] = {"t": [], "ok": [], "errors": [], "gpu_util": [], "vram_pct": []}
    for m in minutes:
        n, e = reqs.get(m, (0, 0))
        u, used, total = gpu.get(m, (None, None, None))
        out["t"].append(m * 60)
        out["ok"].append(n - e)
        out["errors"].append(e)
        out["gpu_util"].append(round(u, 1) if u is not None else None)
        out["vram_pct"].append(round(100 * used / total, 1) if used is not None and total else None)
    return out


class Cached(Generic[T]):
    """One value shared by every open dashboard, recomputed at most every `ttl` seconds."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.at = float("-inf")
        self.value: T | None = None

    async def get(self, compute: Callable[[], Awaitable[T]]) -> T:
        now = time.monotonic()
        if self.value is None or now - self.at >= self.ttl:
            self.at = now  # before awaiting: concurrent callers reuse the old value (if any), no re-query
            self.value = value = await compute()
            return value
        return self.value

    def get_now(self, compute: Callable[[], T]) -> T:
        """The same, for a value computed without waiting (the live figures of a table row's signature)."""
        now = time.monotonic()
        if self.value is None or now - self.at >= self.ttl:
            self.at, self.value = now, compute()
        return self.value


# ---- traffic: requests/s, TTFT and tokens/s per agent and per model; the queues -----------------
@dataclass(frozen=True)
class Traffic:
    """The last window's figures by agent id and by model label, read from the proxy's RequestStats: the
    accumulators GET /metrics exports, so the dashboard and a Prometheus query agree; and each model
    label's queue now (admission control, as fleet_queue_depth reads it)."""

    agents: dict[str, Recent]
    models: dict[str, Recent]
    window_s: float
    queues: dict[str, Queue]


def traffic(stats: RequestStats, admission: Admission, window_s: float = TRAFFIC_WINDOW) -> Traffic:
    return Traffic(stats.recent("agent", window_s), stats.recent("model", window_s), window_s,
                   queues.queues(admission, stats.label))


def traffic_json(t: Traffic) -> dict[str, Any]:
    """GET /dashboard/data/traffic.json: the figures the pages show, unformatted."""
    return {"window_s": t.window_s, "agents": {k: asdict(r) for k, r in t.agents.items()},
            "models": {k: asdict(r) for k, r in t.models.items()},
            "queues": {k: asdict(q) for k, q in t.queues.items()}}


def model_traffic(registry: Registry, t: Traffic) -> list[tuple[str, Recent | None, Queue | None]]:
    """One row per model installed on some agent, with requests in the window or waiting, by the label
    /metrics gives it (the normalized name; unknown models together as `other`, last); None: no requests,
    nobody waiting."""
    keys = {normalize(m["name"]) for a in registry.agents.values() for m in a.models} | t.models.keys() \
        | t.queues.keys()
    ordered = sorted(keys, key=lambda k: (k == names.OTHER_MODEL, k))
    return [(k, t.models.get(k), t.queues.get(k)) for k in ordered]


def fleet_queue(admission: Admission, agents: Iterable[AgentRecord]) -> dict[str, int]:
    """The overview's: requests waiting for a slot, and the routable agents' slots busy and in force."""
    s = queues.fleet_slots(admission, agents)
    return {"queued": admission.sched.waiting, "busy": s.busy, "capacity": s.capacity}


# ---- jobs and models -----------------------------------------------------------------------------
def jobs(ledger: JobLedger, agent: str | None = None, limit: int = JOBS_SHOWN) -> list[dict[str, Any]]:
    """Unfinished jobs first (oldest first), then the latest finished ones; from the ledger's memory."""
    recs = readmodel.job_list(ledger.active.values(), ledger.recent.values(), agent, limit)
    return [r.to_json() for r in recs]


def matrix(registry: Registry, ledger: JobLedger) -> ModelMatrix:
    """Agents x models (like GET /api/models/matrix), with the agents in the order of their names."""
    return readmodel.model_matrix(registry, ledger.active.values(), order=lambda a: a.name.lower())


def matrix_row(m: ModelMatrix, a: AgentRecord, keys: list[str]) -> list[dict[str, Any]]:
    """A row's cells: state (loaded, installed or empty) and the unfinished job, as a task document."""
    return [{"state": "loaded" if c.loaded else "installed" if c.installed is not None else "",
             "job": c.job.to_json() if c.job else None} for c in m.row(a, keys)]


def catalogue(registry: Registry, cat: Catalogue) -> list[dict[str, Any]]:
    """The distributable models: catalogue plus what agents have, with where each is installed (by name)."""
    out = [{"name": m.name, "size": m.size, "description": m.description,
            "required_memory": m.required_memory, "tags": list(m.tags),
            "installed_on": sorted(a.name for a in m.agents), "source": m.source}
           for m in readmodel.available_models(registry, cat)]
    out.sort(key=lambda m: (not m["installed_on"], m["name"]))
    return out
