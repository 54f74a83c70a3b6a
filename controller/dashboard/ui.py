"""Rendering of the dashboard's regions (full pages and SSE fragments share these), and which live
sections each page's stream carries."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from collections.abc import Callable
from pathlib import Path
from typing import Any

from importlib.resources import files

from jinja2 import Environment, FileSystemLoader

from ollama_fleet.contract.status import AgentStatus

from ollama_fleet.controller import readmodel
from ollama_fleet.controller.dashboard import data
from ollama_fleet.controller.compose import Fleet
from ollama_fleet.controller.metrics import names, queues
from ollama_fleet.controller.metrics.queues import Queue
from ollama_fleet.controller.metrics.requests import Recent
from ollama_fleet.controller.registry import store
from ollama_fleet.controller.registry.live import AgentRecord, Registry
from ollama_fleet.controller.dashboard.sse import Block, Keyed, Prepend, Section

# Package data of ollama_fleet.web: a real folder both in a checkout and in an installed wheel (Sanic
# serves static files from disk), found through the import system rather than a sibling path.
WEB = Path(str(files("ollama_fleet.web")))
TEMPLATES = WEB / "templates"
EVENTS_SHOWN = 12  # on the overview
EVENTS_PAGE = 50
TRAFFIC_TICK = 1.0  # seconds: traffic figures are recomputed (once for every open page) and re-sent at most this often
NONE = "—"  # a traffic figure without requests in the window


# ---- filters -------------------------------------------------------------------------------------
def fmt_bytes(n: Any) -> str:
    if not isinstance(n, (int, float)) or n < 0:
        return "–"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return "–"


def fmt_duration(s: Any) -> str:
    if not isinstance(s, (int, float)) or s < 0:
        return "–"
    s = int(s)
    d, rem = divmod(s, 86400)
    h, rem = divmod(rem, 3600)
    m, sec = divmod(rem, 60)
    if d:
        return f"{d}d {h}h"
    if h:
        return f"{h}h {m}m"
    if m:
        return f"{m}m {sec}s"
    return f"{sec}s"


def fmt_uptime(s: Any) -> str:
    """Minutes at best: a table row must not change every second (a browser showing a thousand agents
    would re-render a thousand rows a second for nothing)."""
    if not isinstance(s, (int, float)) or s < 0:
        return "–"
    if s < 60:
        return "<1m"
    if s < 3600:
        return f"{int(s // 60)}m"
    return fmt_duration(s)


def fmt_pct(v: Any, digits: int = 0) -> str:
    return "–" if not isinstance(v, (int, float)) else f"{v:.{digits}f}%"


def fmt_num(v: Any) -> str:
    return "–" if v is None else f"{v:,}" if isinstance(v, int) else f"{v:,.1f}"


def fmt_rate(v: float | None) -> str:
    """Requests or tokens per second: two decimals below 1 (a request every few seconds still shows)."""
    if v is None:
        return NONE
    return f"{v:.2f}" if v < 0.995 else f"{v:,.1f}" if v < 99.95 else f"{v:,.0f}"


def fmt_secs(v: float | None) -> str:
    """A latency: milliseconds below a second."""
    if v is None:
        return NONE
    return f"{v * 1000:.0f} ms" if v < 0.9995 else f"{v:.2f} s"


def traffic_shown(t: Recent | None) -> tuple[str, str, str, str]:
    """What a page shows of one agent's or model's traffic: req/s, TTFT p50, TTFT p95, tokens/s."""
    if t is None or not t.requests:
        return NONE, NONE, NONE, NONE
    return fmt_rate(t.rps), fmt_secs(t.ttft_p50), fmt_secs(t.ttft_p95), fmt_rate(t.tokens_per_s)


def waiting_shown(q: Queue | None) -> tuple[str, str]:
    """What the models page shows of a model's queue: how many wait (with the tiers unless all are
    normal), and the oldest one's wait."""
    if q is None or not q.depth:
        return "0", NONE
    depth = str(q.depth)
    if q.mixed:
        depth += " (" + " · ".join(f"{n} {tier}" for tier, n in q.by_tier.items() if n) + ")"
    return depth, fmt_secs(q.oldest_wait)


def waits_shown(t: Recent | None) -> tuple[str, str]:
    """The last window's queue wait p50 / p95 of the requests that waited."""
    if t is None or not t.queued:
        return NONE, NONE
    return fmt_secs(t.wait_p50), fmt_secs(t.wait_p95)


def iso(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return ""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def utc_text(ts: Any) -> str:
    """The no-JavaScript text of a <time>: UTC, replaced by local time in the browser."""
    if not isinstance(ts, (int, float)):
        return "–"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def clamp_pct(v: Any) -> float:
    return 0.0 if not isinstance(v, (int, float)) else max(0.0, min(100.0, float(v)))


def setup(env: Environment) -> None:
    env.loader = FileSystemLoader(str(TEMPLATES))
    env.trim_blocks = env.lstrip_blocks = True
    env.filters.update(bytes=fmt_bytes, duration=fmt_duration, uptime=fmt_uptime, pct=fmt_pct, num=fmt_num, iso=iso,
                       utc=utc_text, clamp=clamp_pct, traffic=traffic_shown, waiting=waiting_shown,
                       waits=waits_shown)
    env.globals.update(status_labels=data.STATUS_LABELS, states=[s.value for s in AgentStatus],
                       traffic_window=data.TRAFFIC_WINDOW)


# ---- regions -------------------------------------------------------------------------------------
class UI:
    """Renders each region of the dashboard from the live registry (and the store, for history)."""

    def __init__(self, env: Environment, fleet: Fleet) -> None:
        self.env, self.fleet = env, fleet
        self.stats: data.Cached[dict[str, Any]] = data.Cached(1.0)
        self.series: data.Cached[dict[str, Any]] = data.Cached(10.0)
        self.recent: data.Cached[data.Traffic] = data.Cached(TRAFFIC_TICK)

    async def render(self, name: str, **ctx: Any) -> str:
        return await self.env.get_template(name).render_async(**ctx)

    @property
    def registry(self) -> Registry:
        return self.fleet.registry

    @property
    def agents(self) -> dict[str, AgentRecord]:
        return self.registry.agents

    def controller(self) -> dict[str, Any]:
        """Which controller served the page, whether it leads, how many it sees (docs/scaling.md)."""
        f = self.fleet
        return {"instance": f.ingest.instance[:12], "leader": f.leadership.is_leader,
                "controllers": 1 + len(f.load.peers)}

    async def request_stats(self) -> dict[str, Any]:
        async def compute() -> dict[str, Any]:
            return await self.fleet.store.read(data.request_stats, time.time() - 86400)
        return await self.stats.get(compute)

    async def series_json(self) -> dict[str, Any]:
        async def compute() -> dict[str, Any]:
            return await self.fleet.store.read(data.series, time.time())
        return await self.series.get(compute)

    def traffic(self) -> data.Traffic:
        """The last minute's figures, computed at most once a tick however many pages are open."""
        return self.recent.get_now(lambda: data.traffic(self.fleet.stats, self.fleet.proxy.admission))

    async def pulse(self, oob: bool = False) -> str:
        return await self.render("_pulse.html", c=data.fleet_counts(self.agents.values()), oob=oob)

    async def cards(self, oob: bool = False) -> str:
        return await self.render("_cards.html", c=data.fleet_counts(self.agents.values()),
                                 r=await self.request_stats(),
                                 q=data.fleet_queue(self.fleet.proxy.admission, self.agents.values()), oob=oob)

    async def agent_counts(self, q: data.AgentQuery, oob: bool = False) -> str:
        return await self.render("_agent_counts.html", c=data.fleet_counts(self.agents.values()), query=q, oob=oob)

    async def agent_rows(self, q: data.AgentQuery, oob: bool = False) -> str:
        return await self.render("_agent_rows.html", rows=q.rows(self.registry), query=q,
                                 traffic=self.traffic().agents, oob=oob)

    async def agent_row(self, q: data.AgentQuery, node: str) -> str:
        a = self.agents.get(node)
        if a is None or not q.matches(a):
            return ""
        return await self.render("_agent_row.html", r=readmodel.agent_summary(a, time.time()),
                                 t=self.traffic().agents.get(node), oob=True)

    def agent_sig(self, q: data.AgentQuery, node: str) -> str | None:
        """What the agent's table row shows (uptime as shown, not to the second)."""
        a = self.agents.get(node)
        if a is None or not q.matches(a):
            return None
        r = readmodel.agent_summary(a, time.time())
        shown = {k: v for k, v in r.items() if k not in ("cpu", "mem", "last_seen")}
        shown["uptime"] = fmt_uptime(r["uptime"]) if r["uptime"] is not None else None
        shown["traffic"] = traffic_shown(self.traffic().agents.get(node))
        return repr(shown)

    def traffic_changes(self) -> Callable[[], set[str]]:
        """For one agents table: the agents whose traffic figures, as shown, changed since the last call
        (requests bring no hub event: the stream asks on its tick)."""
        last = {k: traffic_shown(t) for k, t in self.traffic().agents.items()}

        def changed() -> set[str]:
            now = {k: traffic_shown(t) for k, t in self.traffic().agents.items()}
            out = {k for k in now.keys() | last.keys() if now.get(k) != last.get(k)}
            last.clear()
            last.update(now)
            return out
        return changed

    async def agent_live(self, node: str, oob: bool = False) -> str:
        a = self.agents.get(node)
        return await self.render("_agent_live.html", node=node, a=a.to_json() if a else None,
                                 gpus=a.gpu_view() if a else [], oob=oob)

    async def agent_traffic(self, node: str, oob: bool = False) -> str:
        t = self.traffic()
        a = self.agents.get(node)
        slots = queues.slots(self.fleet.proxy.admission, a) if a is not None else None
        return await self.render("_agent_traffic.html", t=t.agents.get(node), slots=slots, oob=oob)

    async def agent_models(self, node: str, oob: bool = False) -> str:
        a = self.agents.get(node)
        loaded = readmodel.loaded_by_name(a) if a else {}
        return await self.render("_agent_models.html", node=node, a=a, models=a.models if a else [],
                                 loaded=loaded, oob=oob)

    async def jobs(self, dom_id: str, agent: str | None = None, oob: bool = False) -> str:
        names = {k: a.name for k, a in self.agents.items()}
        return await self.render("_jobs.html", dom_id=dom_id, jobs=data.jobs(self.fleet.jobs, agent),
                                 names=names, agent=agent, oob=oob)

    async def matrix(self, oob: bool = False) -> str:
        m = data.matrix(self.registry, self.fleet.jobs)
        keys = m.keys
        rows = [(a, data.matrix_row(m, a, keys)) for a in m.agents]
        return await self.render("_matrix.html", m=m, rows=rows, oob=oob)

    def matrix_shape(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        m = data.matrix(self.registry, self.fleet.jobs)
        return tuple(m.keys), tuple(a.node_id for a in m.agents)

    async def matrix_row(self, node: str) -> str:
        a = self.agents.get(node)
        if a is None:
            return ""
        m = data.matrix(self.registry, self.fleet.jobs)
        return await self.render("_matrix_row.html", a=a, cells=data.matrix_row(m, a, m.keys),
                                 columns=m.columns, oob=True)

    async def model_traffic(self, oob: bool = False) -> str:
        t = self.traffic()
        return await self.render("_model_traffic.html", rows=data.model_traffic(self.registry, t),
                                 other=names.OTHER_MODEL, oob=oob)

    def catalogue_models(self) -> list[dict[str, Any]]:
        return data.catalogue(self.registry, self.fleet.catalogue)

    async def catalogue(self, oob: bool = False) -> str:
        return await self.render("_catalogue.html", models=self.catalogue_models(), oob=oob)

    async def recent_events(self, node: str | None = None, kind: str | None = None,
                            limit: int = EVENTS_SHOWN, before: int | None = None) -> list[dict[str, Any]]:
        fleet = self.fleet
        await fleet.flush_registry()  # read-your-writes, like GET /api/events
        return await fleet.store.read(store.query_events, node, kind, None, limit, before)

    async def event_rows(self, events: list[dict[str, Any]], dom_id: str, oob: str = "",
                         show_agent: bool = True) -> str:
        names = {k: a.name for k, a in self.agents.items()}
        return await self.render("_event_rows.html", events=events, dom_id=dom_id, oob=oob, names=names,
                                 show_agent=show_agent)


# ---- live sections per page ----------------------------------------------------------------------
def _agent_topic(node: str | None = None) -> Any:
    return lambda t, d: t == "agent" and (node is None or d.get("id") == node)


def _no_event(topic: str, data: dict[str, Any]) -> bool:
    """Traffic figures: no hub event carries them; they follow the stream's tick."""
    return False


def _events(ui: UI, dom_id: str, node: str | None = None, kind: str | None = None,
            limit: int = EVENTS_SHOWN, show_agent: bool = True) -> Prepend:
    shown: list[dict[str, Any]] = []

    async def initial() -> str:
        shown[:] = await ui.recent_events(node, kind, limit)
        return await ui.event_rows(shown, dom_id, "true", show_agent)

    def wants(ev: dict[str, Any]) -> bool:
        return (node is None or ev.get("node_id") == node) and (kind is None or ev.get("kind") == kind)

    async def rows(evs: list[dict[str, Any]]) -> str:
        return await ui.event_rows(evs, dom_id, f"afterbegin:#{dom_id}", show_agent)

    return Prepend(initial, wants, rows, lambda: {Prepend.key(e) for e in shown})


def sections(ui: UI, view: str, args: Any) -> list[Section]:
    """The live regions of one page (`view`), the same ones the page rendered."""
    out: list[Section] = [Block(lambda: ui.pulse(True), _agent_topic(), every=1.0)]
    if view == "overview":
        out += [Block(lambda: ui.cards(True), _agent_topic(), every=1.0, poll=1.0),
                _events(ui, "recent-events")]
    elif view == "agents":
        q = data.AgentQuery(args)
        out += [Block(lambda: ui.agent_counts(q, True), _agent_topic(), every=1.0),
                Keyed(shape=lambda: tuple(r["id"] for r in q.rows(ui.registry)),
                      keys_of=lambda t, d: [d["id"]] if t == "agent" else [],
                      row=lambda k: ui.agent_row(q, k), whole=lambda: ui.agent_rows(q, True),
                      sig=lambda k: ui.agent_sig(q, k), poll=TRAFFIC_TICK, tick=ui.traffic_changes())]
    elif view == "agent":
        node = str(args.get("id") or "")
        out += [Block(lambda: ui.agent_live(node, True), _agent_topic(node), every=0.25),
                Block(lambda: ui.agent_traffic(node, True), _no_event, every=TRAFFIC_TICK, poll=TRAFFIC_TICK),
                Block(lambda: ui.agent_models(node, True), _agent_topic(node), every=0.5),
                Block(lambda: ui.jobs("agent-jobs", node, True),
                      lambda t, d: t == "job" and d.get("agent_id") == node, every=0.25),
                _events(ui, "agent-events", node=node, show_agent=False)]
    elif view == "models":
        out += [Block(lambda: ui.jobs("model-jobs", None, True), lambda t, d: t == "job", every=0.25),
                Keyed(shape=ui.matrix_shape,
                      keys_of=lambda t, d: [d["id"]] if t == "agent" else [d["agent_id"]] if t == "job" else [],
                      row=ui.matrix_row, whole=lambda: ui.matrix(True)),
                Block(lambda: ui.model_traffic(True), _no_event, every=TRAFFIC_TICK, poll=TRAFFIC_TICK),
                Block(lambda: ui.catalogue(True), lambda t, d: t == "agent", every=2.0)]
    elif view == "events":
        out.append(_events(ui, "event-rows", node=args.get("agent") or None, kind=args.get("kind") or None,
                           limit=EVENTS_PAGE))
    return out
