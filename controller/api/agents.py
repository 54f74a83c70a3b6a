"""Registry HTTP API: agents, their models and metrics, operator actions, events, health."""

from __future__ import annotations

import os
import time
from typing import Any

import aiomqtt
from sanic import Blueprint, Request, json
from sanic.response import HTTPResponse
from sanic_ext import openapi

from ollama_fleet.contract.status import ALL

from ollama_fleet.controller import readmodel
from ollama_fleet.controller.registry import store
from ollama_fleet.controller.compose import fleet_of
from ollama_fleet.controller.edge.access import require_admin
from ollama_fleet.controller.edge.http import error, json_body
from ollama_fleet.controller.edge.params import ParamError, float_param, int_param, text_param
from ollama_fleet.controller.registry.edits import parse_settings
from ollama_fleet.controller.registry.live import AgentRecord

bp = Blueprint("agents")

EVENTS_MAX = 1000  # events in one page


def _agent(request: Request, agent_id: str) -> AgentRecord | HTTPResponse:
    a = fleet_of(request).registry.agents.get(agent_id)
    return a if a is not None else error(404, f"agent '{agent_id}' not found")


@bp.get("/api/agents")
@openapi.summary("List agents")
@openapi.description(f"Every agent in the registry. Filters: `status` ({', '.join(ALL)}; comma-separated; "
                     "`online` includes agents whose Ollama is down), `q` (substring of id, name, host, IP "
                     "or tag).")
async def list_agents(request: Request) -> HTTPResponse:
    try:
        status, q = text_param(request.args, "status"), (text_param(request.args, "q") or "").lower()
    except ParamError as e:
        return error(400, str(e))
    registry = fleet_of(request).registry
    c = readmodel.fleet_counts(registry.agents.values())
    agents = readmodel.find_agents(registry, readmodel.AgentFilter(
        frozenset(status.split(",")) if status else frozenset(), q, state_too=True))
    now = time.time()
    return json({"agents": [a.to_json(now) for a in agents],
                 "totals": {"agents": c.total, "routable": c.routable, **c.by_status}})


@bp.get("/api/agents/<agent_id:str>")
@openapi.summary("One agent, with installed and loaded models")
async def get_agent(request: Request, agent_id: str) -> HTTPResponse:
    a = _agent(request, agent_id)
    if isinstance(a, HTTPResponse):
        return a
    return json({**a.to_json(), "info": a.info, "installed": a.models, "running": a.loaded})


@bp.get("/api/agents/<agent_id:str>/models")
@openapi.summary("Models installed on an agent (size, digest, install time, loaded or not)")
async def agent_models(request: Request, agent_id: str) -> HTTPResponse:
    a = _agent(request, agent_id)
    if isinstance(a, HTTPResponse):
        return a
    models = readmodel.agent_models(a)
    return json({"agent_id": a.node_id, "models": models, "count": len(models)})


@bp.get("/api/agents/<agent_id:str>/metrics")
@openapi.summary("Stored metric history of an agent (`since`: epoch seconds, default one hour ago)")
async def agent_metrics(request: Request, agent_id: str) -> HTTPResponse:
    a = _agent(request, agent_id)
    if isinstance(a, HTTPResponse):
        return a
    try:
        since = float_param(request.args, "since", time.time() - 3600)
    except ParamError:
        return error(400, "since must be epoch seconds")
    fleet = fleet_of(request)
    return json({"agent_id": a.node_id, "samples": await fleet.store.read(store.query_metrics, a.node_id, since)})




@bp.put("/api/agents/<agent_id:str>/settings")
@openapi.summary("Rename an agent, set its tags and notes")
@require_admin
async def agent_settings(request: Request, agent_id: str) -> HTTPResponse:
    a = _agent(request, agent_id)
    if isinstance(a, HTTPResponse):
        return a
    body = json_body(request)
    if isinstance(body, HTTPResponse):
        return body
    parsed = parse_settings(body)
    if isinstance(parsed, str):
        return error(400, parsed)
    return json((await fleet_of(request).peers.update_settings(agent_id, parsed)).to_json())


@bp.post("/api/agents/<agent_id:str>/disconnect")
@openapi.summary("Force an agent offline until it re-announces (optional body: {pause_s})")
@require_admin
async def disconnect_agent(request: Request, agent_id: str) -> HTTPResponse:
    a = _agent(request, agent_id)
    if isinstance(a, HTTPResponse):
        return a
    body = json_body(request, optional=True)
    if isinstance(body, HTTPResponse):
        return body
    if set(body) - {"pause_s"}:
        return error(400, f"unknown field(s): {', '.join(sorted(set(body) - {'pause_s'}))}")
    pause: Any = body.get("pause_s")
    if pause is not None and (isinstance(pause, bool) or not isinstance(pause, (int, float))
                              or not 0 < pause <= 86400):
        return error(400, "pause_s must be a number of seconds between 0 and 86400")
    fleet = fleet_of(request)
    try:
        await fleet.ingest.publish_command(agent_id, "agent.disconnect", {"pause_s": pause} if pause else {})
    except aiomqtt.MqttError as e:
        return error(503, f"broker unavailable: {e}")
    return json(fleet.registry.force_offline(agent_id).to_json())


@bp.delete("/api/agents/<agent_id:str>")
@openapi.summary("Delete an agent and clear its retained topics")
@require_admin
async def delete_agent(request: Request, agent_id: str) -> HTTPResponse:
    a = _agent(request, agent_id)
    if isinstance(a, HTTPResponse):
        return a
    fleet = fleet_of(request)
    try:
        await fleet.ingest.clear_retained(agent_id)
    except aiomqtt.MqttError as e:
        return error(503, f"broker unavailable, nothing deleted: {e}")
    await fleet.peers.delete(agent_id)
    return json({"deleted": agent_id})


@bp.get("/api/events")
@openapi.summary("Event log, newest first (filters: agent, kind, since; paging: limit, before)")
async def events(request: Request) -> HTTPResponse:
    try:
        limit = int_param(request.args, "limit", 100, 1, EVENTS_MAX) or 100
        since = float_param(request.args, "since", None)
        before = int_param(request.args, "before", None, 1)
        agent, kind = text_param(request.args, "agent"), text_param(request.args, "kind")
    except ParamError as e:
        return error(400, str(e))
    fleet = fleet_of(request)
    await fleet.flush_registry()  # read-your-writes for events just emitted
    rows = await fleet.store.read(store.query_events, agent, kind, since, limit, before)
    return json({"events": rows, "next_before": rows[-1]["id"] if len(rows) == limit else None})


@bp.get("/api/ingest")
@openapi.summary("MQTT ingest counters: received, dropped by reason, heartbeat latency")
async def ingest_stats(request: Request) -> HTTPResponse:
    fleet = fleet_of(request)
    s = fleet.store
    return json({**fleet.ingest.stats(), "hub_dropped": fleet.hub.dropped,
                 "store": {"flushes": s.flushes, "rows_written": s.rows_written,
                           "rows_dropped": s.rows_dropped} if s else None,
                 "request_log": fleet.proxy.requests.stats()})


@bp.get("/healthz")
@openapi.summary("Liveness and readiness: 200 when the broker and database are reachable")
async def healthz(request: Request) -> HTTPResponse:
    fleet = fleet_of(request)
    mqtt_ok = fleet.ingest.connected.is_set()
    try:
        await fleet.store.read(store.count_agents)
        db_ok = True
    except Exception:
        db_ok = False
    ok = mqtt_ok and db_ok
    return json({"status": "ok" if ok else "degraded", "mqtt": mqtt_ok, "database": db_ok,
                 "agents": len(fleet.registry.agents), "uptime": round(time.time() - fleet.started, 1),
                 "instance": fleet.ingest.instance, "leader": fleet.leadership.is_leader, "pid": os.getpid()},
                status=200 if ok else 503)
