"""What the dashboard shows, as plain dicts: agent rows, fleet overview, charts, jobs, model matrix.

Everything live comes from memory (registry, job ledger); only history (request log, metric samples,
events) is read from the database, on the store's reader threads, with short caches so many open
browsers cost no more than one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import peewee as pw

from ollama_fleet.contract.model_names import normalize

from ollama_fleet.controller.api.agents import STATES
from ollama_fleet.controller.jobs.catalogue import estimate_memory
from ollama_fleet.controller.db import MetricSample, db
from ollama_fleet.controller.exports import to_csv
from ollama_fleet.controller.registry.live import AgentRecord
from ollama_fleet.controller.proxy.requestlog import RequestRecord

STATUS_ORDER = {"lost": 0, "stale": 1, "ollama_down": 2, "offline": 3, "online": 4}  # needs attention first
SORTS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "name": lambda r: r["name"].lower(),
    "status": lambda r: (STATUS_ORDER.get(r["status"], 9), r["name"].lower()),
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
STATUS_LABELS = {"online": "Online", "offline": "Offline", "lost": "Lost", "stale": "Stale",
                 "ollama_down": "Ollama down"}
CSV_COLUMNS = ("id", "name", "hostname", "ips", "status", "ollama_version", "uptime", "gpu_count", "vram_total",
               "vram_used", "models", "loaded", "in_flight", "requests", "errors", "mean_latency_ms", "cpu", "mem",
               "tags", "last_seen")
JOBS_SHOWN = 25
SERIES_WINDOW = 3600.0


# ---- agents --------------------------------------------------------------------------------------
def agent_row(a: AgentRecord, now: float) -> dict[str, Any]:
    gpus = a.gpu_view()
    vram_total = sum(g.get("mem_total") or 0 for g in gpus)
    vram_used = sum(g.get("mem_used") or 0 for g in gpus)
    done = a.requests_total
    ips = a.info.get("ips") or []
    return {
        "id": a.node_id, "name": a.name, "hostname": a.hostname, "ip": ips[0] if ips else "", "ips": ips,
        "ollama_version": a.ollama_version, "status": a.status, "tags": a.tags,
        "uptime": round(now - a.online_since) if a.online_since and a.state == "online" else None,
        "gpu_count": len(gpus), "gpu_names": sorted({str(g.get("name") or "GPU") for g in gpus}),
        "vram_total": vram_total, "vram_used": vram_used,
        "models": len(a.models), "loaded": len(a.loaded), "in_flight": a.in_flight, "requests": done,
        "errors": a.errors_total, "mean_latency_ms": round(a.latency_sum / done * 1000, 1) if done else None,
        "cpu": a.metrics.get("cpu"), "mem": a.metrics.get("mem"), "last_seen": a.last_seen,
    }


class AgentQuery:
    """The agents table's filter, search and sort, from query-string arguments."""

    def __init__(self, args: Any) -> None:
        status = args.get("status") or ""
        self.status = status if status in STATES else ""
        self.q = (args.get("q") or "").strip()[:100]
        sort = args.get("sort") or "name"
        self.sort = sort if sort in SORTS else "name"
        self.desc = args.get("dir") == "desc"

    def matches(self, a: AgentRecord) -> bool:
        if self.status and a.status != self.status:
            return False
        if self.q:
            hay = " ".join([a.node_id, a.name, a.hostname, *(a.info.get("ips") or []), *a.tags]).lower()
            return self.q.lower() in hay
        return True

    def rows(self, agents: Iterable[AgentRecord], now: float | None = None) -> list[dict[str, Any]]:
        now = now or time.time()
        rows = [agent_row(a, now) for a in agents if self.matches(a)]
        rows.sort(key=lambda r: r["name"].lower())  # stable tie-break
        rows.sort(key=SORTS[self.sort], reverse=self.desc)
        return rows

    def params(self, **override: str) -> str:
        """Query string for links (sort headers, exports) that keep the other choices."""
        from urllib.parse import urlencode

        p = {"status": self.status, "q": self.q, "sort": self.sort, "dir": "desc" if self.desc else ""}
        p.update(override)
        return urlencode({k: v for k, v in p.items() if v})


def agents_csv(rows: list[dict[str, Any]]) -> str:
    """Names and tags come from agents and operators: exports.to_csv keeps them from being formulas."""
    return to_csv(({**r, "ips": " ".join(r["ips"]), "tags": " ".join(r["tags"]),
                    "last_seen": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r["last_seen"]))} for r in rows),
                  CSV_COLUMNS)


# ---- overview ------------------------------------------------------------------------------------
def fleet_counts(agents: Iterable[AgentRecord]) -> dict[str, Any]:
    counts = {s: 0 for s in STATES}
    total = in_flight = 0
    utils: list[float] = []
    vram_used = vram_total = 0
    for a in agents:
        total += 1
        counts[a.status] = counts.get(a.status, 0) + 1
        in_flight += a.in_flight
        if a.state != "online":
            continue
        for g in a.gpu_view():
            if isinstance(g.get("util"), (int, float)):
                utils.append(float(g["util"]))
            vram_used += g.get("mem_used") or 0
            vram_total += g.get("mem_total") or 0
    return {"total": total, **counts, "in_flight": in_flight,
            "gpu_util": round(sum(utils) / len(utils), 1) if utils else None, "gpu_count": len(utils),
            "vram_used": vram_used, "vram_total": vram_total}


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


class Cached:
    """One value shared by every open dashboard, recomputed at most every `ttl` seconds."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.at = float("-inf")
        self.value: Any = None

    async def get(self, compute: Any) -> Any:
        now = time.monotonic()
        if now - self.at >= self.ttl:
            self.at = now  # before awaiting: concurrent callers reuse the old value instead of re-querying
            self.value = await compute()
        return self.value


# ---- jobs and models -----------------------------------------------------------------------------
def jobs(fleet: Any, agent: str | None = None, limit: int = JOBS_SHOWN) -> list[dict[str, Any]]:
    """Unfinished jobs first (oldest first), then the latest finished ones; from the ledger's memory."""
    ledger = getattr(fleet, "jobs", None)
    if ledger is None:
        return []
    active = sorted((r for r in ledger.active.values() if agent is None or r.node_id == agent),
                    key=lambda r: r.created_at)
    done = [r for r in reversed(ledger.recent.values()) if agent is None or r.node_id == agent]
    return [r.to_json() for r in [*active, *done[:max(0, limit - len(active))]]]


def matrix(fleet: Any) -> dict[str, Any]:
    """Agents x models (like GET /api/models/matrix): columns are installed or in-flight models."""
    agents = sorted(fleet.registry.agents.values(), key=lambda a: a.name.lower())
    names: dict[str, str] = {}
    for a in agents:
        for m in a.models:
            names.setdefault(normalize(m["name"]), m["name"])
    pulls: dict[tuple[str, str], dict[str, Any]] = {}
    ledger = getattr(fleet, "jobs", None)
    for rec in (ledger.active.values() if ledger else ()):
        if rec.model and rec.node_id in fleet.registry.agents:
            key = normalize(rec.model)
            names.setdefault(key, rec.model)
            pulls[(rec.node_id, key)] = rec.to_json()
    columns = sorted(names)
    return {"columns": [names[k] for k in columns], "keys": columns, "agents": agents, "pulls": pulls}


def matrix_row(a: AgentRecord, keys: list[str], pulls: dict[tuple[str, str], dict[str, Any]]) -> list[Any]:
    installed = {normalize(m["name"]) for m in a.models}
    loaded = {normalize(m["name"]) for m in a.loaded}
    cells = []
    for k in keys:
        job = pulls.get((a.node_id, k))
        state = "loaded" if k in loaded else "installed" if k in installed else ""
        cells.append({"state": state, "job": job})
    return cells


def catalogue(fleet: Any) -> list[dict[str, Any]]:
    """The distributable models: catalogue plus what agents have, with where each is installed."""
    dist = getattr(fleet, "distributor", None)
    on: dict[str, list[str]] = {}
    sizes: dict[str, tuple[str, int]] = {}
    for a in fleet.registry.agents.values():
        for m in a.models:
            k = normalize(m["name"])
            on.setdefault(k, []).append(a.name)
            sizes.setdefault(k, (m["name"], int(m.get("size") or 0)))
    out = []
    for c in (dist.catalogue.models if dist else []):
        k = normalize(c.name)
        out.append({**c.to_json(), "installed_on": sorted(on.pop(k, [])), "source": "catalogue"})
        sizes.pop(k, None)
    for k, names in on.items():
        name, size = sizes[k]
        out.append({"name": name, "size": size, "description": "",
                    "required_memory": estimate_memory(size) if size else None, "tags": [],
                    "installed_on": sorted(names), "source": "agents"})
    out.sort(key=lambda m: (not m["installed_on"], m["name"]))
    return out
