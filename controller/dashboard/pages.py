"""The dashboard: server-rendered pages (Jinja2 via sanic-ext), one SSE stream per page, login.

Pages: overview, agents (+ CSV/JSON export), agent detail, models, requests (+ detail), events.
Actions in the pages call the management API (`/api/...`) with the session cookie and CSRF header.
"""

from __future__ import annotations

import json as jsonlib
import time
from typing import Any
from urllib.parse import urlencode

import peewee as pw
from sanic import Blueprint, Request
from sanic.response import HTTPResponse, html, json, raw, redirect

from ollama_fleet import __version__

from ollama_fleet.controller.admission import priority
from ollama_fleet.controller.compose import Fleet, fleet_of
from ollama_fleet.controller.edge import access
from ollama_fleet.controller.dashboard import login as auth_web
from ollama_fleet.controller.proxy import requestlog
from ollama_fleet.controller.dashboard import data
from ollama_fleet.controller.dashboard.ui import EVENTS_PAGE, UI, WEB, sections, setup
from ollama_fleet.controller.edge.http import App
from ollama_fleet.controller.edge.params import INT_MAX, ParamError, int_param, text_param
from ollama_fleet.controller.edge.peer import is_tls
from ollama_fleet.controller.dashboard.sse import Stream

bp = Blueprint("dashboard")
PERIODS = {"15m": 900, "1h": 3600, "24h": 86400, "7d": 7 * 86400}
REQUEST_STATUS = ("2xx", "4xx", "5xx", "error")


def _ui(request: Request) -> UI:
    ui: UI = request.app.ctx.dashboard
    return ui


async def page(request: Request, template: str, nav: str, stream: str | None = None, status: int = 200,
               **ctx: Any) -> HTTPResponse:
    s = auth_web.session(request)
    ui = _ui(request)
    body = await ui.render(template, nav=nav, stream=stream, auth_on=bool(auth_web.admin_token(request)),
                           csrf=s.csrf if s else "", read_only=bool(s and s.role == "viewer"), version=__version__, pulse=await ui.pulse(),
                           controller=ui.controller(), **ctx)
    return html(body, status=status, headers={"cache-control": "no-store"})


def _stream_url(view: str, **params: Any) -> str:
    return "/dashboard/stream?" + urlencode({"view": view, **{k: v for k, v in params.items() if v}})


# ---- pages ---------------------------------------------------------------------------------------
@bp.get("/dashboard")
@access.login_required
async def overview(request: Request) -> HTTPResponse:
    ui = _ui(request)
    events = await ui.recent_events()
    return await page(request, "overview.html", "overview", _stream_url("overview"), cards=await ui.cards(),
                      events=await ui.event_rows(events, "recent-events"))


@bp.get("/dashboard/agents")
@access.login_required
async def agents(request: Request) -> HTTPResponse:
    ui = _ui(request)
    q = data.AgentQuery(request.args)
    return await page(request, "agents.html", "agents",
                      _stream_url("agents", status=q.status, q=q.q, sort=q.sort, dir="desc" if q.desc else ""),
                      query=q, counts=await ui.agent_counts(q), rows=await ui.agent_rows(q),
                      sorts=data.SORTS)


@bp.get("/dashboard/agents.csv", name="agents_csv")
@access.login_required
async def agents_csv(request: Request) -> HTTPResponse:
    return _export(request, "csv")


@bp.get("/dashboard/agents.json", name="agents_json")
@access.login_required
async def agents_json(request: Request) -> HTTPResponse:
    return _export(request, "json")


def _export(request: Request, fmt: str) -> HTTPResponse:
    q = data.AgentQuery(request.args)
    registry = _ui(request).registry
    disposition = {"content-disposition": f'attachment; filename="agents.{fmt}"'}
    if fmt == "csv":
        return raw(data.agents_csv(q.rows(registry)).encode(), content_type="text/csv; charset=utf-8",
                   headers=disposition)
    now = time.time()
    docs = [registry.agents[r["id"]].to_json(now) for r in q.rows(registry, now)]
    return raw(jsonlib.dumps(docs).encode(), content_type="application/json", headers=disposition)


@bp.get("/dashboard/agents/<node:str>")
@access.login_required
async def agent_detail(request: Request, node: str) -> HTTPResponse:
    ui = _ui(request)
    a = ui.agents.get(node)
    if a is None:
        return await page(request, "error.html", "agents", status=404, title="Agent not found",
                          message=f"No agent with id “{node}”. It may have been deleted.",
                          back=("/dashboard/agents", "All agents"))
    events = await ui.recent_events(node)
    models = ui.catalogue_models()
    return await page(request, "agent.html", "agents", _stream_url("agent", id=node), node=node, agent=a,
                      live=await ui.agent_live(node), traffic=await ui.agent_traffic(node),
                      models_block=await ui.agent_models(node),
                      jobs=await ui.jobs("agent-jobs", node),
                      events=await ui.event_rows(events, "agent-events", show_agent=False),
                      model_names=[m["name"] for m in models])


@bp.get("/dashboard/models")
@access.login_required
async def models(request: Request) -> HTTPResponse:
    ui = _ui(request)
    agents_ = sorted(ui.agents.values(), key=lambda a: a.name.lower())
    return await page(request, "models.html", "models", _stream_url("models"), agents=agents_,
                      jobs=await ui.jobs("model-jobs"), matrix=await ui.matrix(), catalogue=await ui.catalogue(),
                      traffic=await ui.model_traffic(),
                      model_names=[m["name"] for m in ui.catalogue_models()])


@bp.get("/dashboard/requests")
@access.login_required
async def requests_page(request: Request) -> HTTPResponse:
    fleet = fleet_of(request)
    args = {k: (request.args.get(k) or "").strip()
            for k in ("model", "agent", "endpoint", "status", "priority", "period")}
    if args["status"] not in REQUEST_STATUS:
        args["status"] = ""
    if args["priority"] not in priority.TIERS:
        args["priority"] = ""
    if args["period"] not in PERIODS:
        args["period"] = ""
    query = {k: v for k, v in args.items() if v and k != "period"}
    if args["period"]:
        query["since"] = str(int(time.time() - PERIODS[args["period"]]))
    per_page, page_no = _lenient_int(request, "per_page", 25), _lenient_int(request, "page", 1)
    if per_page not in requestlog.PAGE_SIZES:
        per_page = 25
    error, result = None, {"requests": [], "total": 0, "pages": 0, "page": page_no, "per_page": per_page}
    try:
        filters = requestlog.Filters(query)
        await fleet.proxy.flush()
        result = await fleet.store.read(requestlog.query_page, filters, page_no, per_page)
    except ValueError as e:
        error = str(e)
    except (pw.DatabaseError, OSError) as e:  # the page stays usable when the database is not
        error = f"could not read the request log: {e}"
    keep = {**{k: v for k, v in args.items() if v}, "per_page": str(per_page)}
    return await page(request, "requests.html", "requests", _stream_url("pulse"), args=args, result=result,
                      error=error, per_page=per_page, sizes=requestlog.PAGE_SIZES, periods=list(PERIODS),
                      statuses=REQUEST_STATUS, tiers=priority.TIERS, page_href=lambda n: "?" + urlencode({**keep, "page": n}),
                      export=urlencode(query), agents=sorted(fleet.registry.agents))


@bp.get("/dashboard/requests/<rid:str>")
@access.login_required
async def request_detail(request: Request, rid: str) -> HTTPResponse:
    fleet = fleet_of(request)
    await fleet.proxy.flush()
    row = await fleet.store.read(_request_row, rid)
    if row is None:
        return await page(request, "error.html", "requests", status=404, title="Request not found",
                          message=f"No request “{rid}” in the log (it may be older than the retention).",
                          back=("/dashboard/requests", "Request history"))
    return await page(request, "request.html", "requests", _stream_url("pulse"), r=row)


def _request_row(rid: str) -> dict[str, Any] | None:
    R = requestlog.RequestRecord
    row: dict[str, Any] | None = R.select().where(R.rid == rid).dicts().first()
    return row


@bp.get("/dashboard/events")
@access.login_required
async def events_page(request: Request) -> HTTPResponse:
    ui = _ui(request)
    try:
        agent, kind = text_param(request.args, "agent"), text_param(request.args, "kind")
    except ParamError:
        agent = kind = None
    before: int | None = _lenient_int(request, "before", 0) or None  # pages forgive: a bad value shows page 1
    events = await ui.recent_events(agent, kind, EVENTS_PAGE, before)
    older = events[-1]["id"] if len(events) == EVENTS_PAGE else None
    stream = _stream_url("events", agent=agent, kind=kind) if before is None else _stream_url("pulse")
    return await page(request, "events.html", "events", stream, agent=agent or "", kind=kind or "",
                      rows=await ui.event_rows(events, "event-rows"), older=older, before=before,
                      agents=sorted(ui.agents), urlencode=urlencode)


def _lenient_int(request: Request, name: str, default: int) -> int:
    """Page links and hand-edited URLs: a bad or out-of-range value falls back to the default."""
    try:
        return int_param(request.args, name, default, 1, INT_MAX // 100) or default
    except ParamError:
        return default


# ---- live data -----------------------------------------------------------------------------------
@bp.get("/dashboard/stream")
@access.login_required
async def stream(request: Request) -> None:
    ui = _ui(request)
    view = request.args.get("view") or "overview"
    await Stream(ui.fleet, sections(ui, view, request.args)).run(request)


@bp.get("/dashboard/data/status.json")
@access.login_required
async def status(request: Request) -> HTTPResponse:
    """Open dashboard streams and hub subscribers: a closed browser tab must leave neither behind."""
    fleet = fleet_of(request)
    return json({"streams": len(Stream.streams), "hub_subscribers": fleet.hub.subscriber_count,
                 "hub_dropped": fleet.hub.dropped})


@bp.get("/dashboard/data/series.json")
@access.login_required
async def series(request: Request) -> HTTPResponse:
    return json(await _ui(request).series_json())


@bp.get("/dashboard/data/traffic.json")
@access.login_required
async def traffic(request: Request) -> HTTPResponse:
    """Requests/s, TTFT p50/p95, tokens/s and queue wait p50/p95 per agent and per model over the last
    minute, and each model's queue now, unformatted: the numbers the pages show (same computation, same
    tick)."""
    return json(data.traffic_json(_ui(request).traffic()))


# ---- login ---------------------------------------------------------------------------------------
@bp.get("/dashboard/login")
async def login_form(request: Request) -> HTTPResponse:
    nxt = auth_web.safe_next(request.args.get("next"))
    if not auth_web.admin_token(request) or auth_web.session(request):
        return redirect(nxt, status=303)
    return await page(request, "login.html", "login", next=nxt, error=None)


@bp.post("/dashboard/login")
async def login(request: Request) -> HTTPResponse:
    form: Any = request.form or {}
    nxt = auth_web.safe_next(form.get("next"))
    if not auth_web.admin_token(request):
        return redirect(nxt, status=303)
    if denied := access.throttled(request):
        return denied.json()
    given = str(form.get("token") or "").strip()
    role = access.token_role(request, given) if given else None
    if role is None:
        access.failed(request, "dashboard login")
        return await page(request, "login.html", "login", status=401, next=nxt,
                          error="That token is not correct.")
    access.succeeded(request)
    cookie, s = fleet_of(request).sessions.open(role.value, auth_web.role_tokens(request)[role.value])
    await fleet_of(request).store.write(auth_web.save_session, s)
    resp = redirect(nxt, status=303)
    auth_web.set_cookie(resp, cookie, secure=is_tls(request))
    return resp


@bp.post("/dashboard/logout")
async def logout(request: Request) -> HTTPResponse:
    s = auth_web.session(request)
    if s is None:  # nothing to end (or a cross-site post, which carries no SameSite=Strict cookie)
        return redirect("/dashboard/login", status=303)
    if not auth_web.csrf_ok(request, s):
        return json({"error": "forbidden: missing or invalid CSRF token"}, status=403)
    fleet_of(request).sessions.close(s.id_hash)  # ended on the server: a copied cookie stops working too
    await fleet_of(request).store.write(auth_web.delete_session, s.id_hash)
    resp = redirect("/dashboard/login", status=303)
    auth_web.clear_session(resp)
    return resp


def install(app: App, fleet: Fleet) -> None:
    """Templates, static files and routes. Open streams are ended by Fleet.stop (controller/compose.py)."""
    setup(app.ext.environment)
    app.ctx.dashboard = UI(app.ext.environment, fleet)
    app.static("/dashboard/static", str(WEB / "static"), name="dashboard_static")
    app.blueprint(bp)
