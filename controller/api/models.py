"""Model distribution HTTP API (seed contract R-X8 and what operators expect around it).

Models: catalogue, distribute, matrix, per-agent pull/auto/delete. Tasks: one job each (GET, list, cancel).
Write endpoints need the admin token when one is configured.
"""

from __future__ import annotations

from typing import Any

from sanic import Blueprint, Request, json
from sanic.response import HTTPResponse
from sanic_ext import openapi

from ollama_fleet.contract.model_names import normalize, valid_model_name

from ollama_fleet.controller import readmodel
from ollama_fleet.controller.compose import fleet_of
from ollama_fleet.controller.edge.access import require_admin
from ollama_fleet.controller.jobs.distribution import DistributionError, Distributor, Plan, has_model
from ollama_fleet.controller.edge.http import error, json_body
from ollama_fleet.contract.jobs import STATUSES
from ollama_fleet.controller.jobs.ledger import JobLedger
from ollama_fleet.controller.edge.params import ParamError, int_param, text_param

bp = Blueprint("models")

MAX_PAGE = 500


def _dist(request: Request) -> Distributor:
    return fleet_of(request).distributor


def _ledger(request: Request) -> JobLedger:
    return fleet_of(request).jobs


def _flag(body: dict[str, Any], name: str) -> bool | HTTPResponse:
    value = body.get(name, False)
    if not isinstance(value, bool):
        return error(400, f"{name} must be true or false")
    return value


def _model_name(body: dict[str, Any]) -> str | HTTPResponse:
    name = body.get("model_name", body.get("model"))
    if not valid_model_name(name):
        return error(400, f"invalid model name {name!r}: expected [namespace/]model[:tag]")
    return str(name)


@bp.get("/api/models/available")
@openapi.summary("Models to distribute: the curated catalogue plus every model an agent has")
@openapi.description("Each model: name, size (bytes), description, required_memory (bytes), tags, installed_on "
                     "(agent ids) and source (`catalogue` or `agents`). Filters: `q` (substring), `tag`. "
                     "Names outside the list can still be pulled when they are valid Ollama names.")
async def available(request: Request) -> HTTPResponse:
    try:
        q, tag = (text_param(request.args, "q") or "").lower(), text_param(request.args, "tag")
    except ParamError as e:
        return error(400, str(e))
    dist = _dist(request)
    models = [_available_json(m) for m in readmodel.available_models(dist.registry, dist.catalogue, q, tag)]
    return json({"models": models, "source": "catalogue+agents", "catalogue": dist.catalogue.source})


def _available_json(m: readmodel.AvailableModel) -> dict[str, Any]:
    doc = {"name": m.name, "size": m.size, "description": m.description, "required_memory": m.required_memory,
           "tags": list(m.tags)}
    if m.details is not None:
        doc["details"] = m.details
    return {**doc, "installed_on": [a.node_id for a in m.agents], "source": m.source}


def _pull_args(body: dict[str, Any]) -> tuple[str, bool, bool] | HTTPResponse:
    """model_name, force, queue_if_offline: each checked, the first problem answered as a 400."""
    model = _model_name(body)
    force, queue = _flag(body, "force"), _flag(body, "queue_if_offline")
    for v in (model, force, queue):
        if isinstance(v, HTTPResponse):
            return v
    return str(model), bool(force), bool(queue)


async def _plan(request: Request, body: dict[str, Any], target: Any, agent_ids: Any) -> Plan | HTTPResponse:
    """A distribution from a checked pull body; its problems answered in the API's shape."""
    args = _pull_args(body)
    if isinstance(args, HTTPResponse):
        return args
    model, force, queue = args
    try:
        return await _dist(request).distribute(model, target, agent_ids, force=force, queue_if_offline=queue,
                                               origin="api")
    except DistributionError as e:
        return error(e.status, e.message)


@bp.post("/api/models/distribute")
@openapi.summary("Pull a model to all online agents, to chosen ones, or to those whose memory fits it")
@openapi.description("Body: `{model_name, target: all|specific|auto, agent_ids?, force?, queue_if_offline?}` -> "
                     "202 `{task_ids, tasks: {agent: task id}, skipped: [{agent_id, reason}]}`. `all` and `auto` "
                     "skip agents that have the model (unless `force`); an unfinished identical job is reused. "
                     "Errors: 400 bad name/body, 404 unknown agent, 503 agent offline (unless "
                     "`queue_if_offline`: the job then waits for it), 507 not enough disk on any target.")
@require_admin
async def distribute(request: Request) -> HTTPResponse:
    body = json_body(request)
    if isinstance(body, HTTPResponse):
        return body
    plan = await _plan(request, body, body.get("target", "all"), body.get("agent_ids"))
    return plan if isinstance(plan, HTTPResponse) else json(plan.to_json(), status=202)


@bp.post("/api/agents/<agent_id:str>/models/pull")
@openapi.summary("Pull a model onto one agent -> 202 {task_id}")
@require_admin
async def pull_one(request: Request, agent_id: str) -> HTTPResponse:
    body = json_body(request)
    if isinstance(body, HTTPResponse):
        return body
    plan = await _plan(request, body, "specific", [agent_id])
    if isinstance(plan, HTTPResponse):
        return plan
    rec = plan.recs[0]
    return json({"task_id": rec.task_id, "task": rec.to_json(), "reused": rec in plan.reused}, status=202)


@bp.post("/api/agents/<agent_id:str>/models/auto")
@openapi.summary("Pull the models of the agent's memory tier it lacks (what happens on first registration)")
@require_admin
async def auto(request: Request, agent_id: str) -> HTTPResponse:
    dist = _dist(request)
    if agent_id not in dist.registry.agents:
        return error(404, f"agent '{agent_id}' not found")
    return json(await dist.auto(agent_id, origin="api"), status=202)


@bp.delete("/api/agents/<agent_id:str>/models/<name:path>")
@openapi.summary("Delete a model from one agent -> 202 {task_id}")
@require_admin
async def delete_one(request: Request, agent_id: str, name: str) -> HTTPResponse:
    dist = _dist(request)
    a = dist.registry.agents.get(agent_id)
    if a is None:
        return error(404, f"agent '{agent_id}' not found")
    if not valid_model_name(name):
        return error(400, f"invalid model name {name!r}")
    if not has_model(a, name):
        return error(404, f"model '{name}' is not installed on {agent_id}")
    if not a.routable:
        return error(503, f"agent '{agent_id}' is {a.status}")
    plan = await dist.delete(name, [agent_id], origin="api")
    rec = plan.recs[0]
    return json({"task_id": rec.task_id, "task": rec.to_json()}, status=202)


@bp.get("/api/models/matrix")
@openapi.summary("Agents x models: installed, loaded, and pulls in progress with their progress")
async def matrix(request: Request) -> HTTPResponse:
    mx = readmodel.model_matrix(fleet_of(request).registry, _ledger(request).active.values())
    return json({
        "agents": [{"id": a.node_id, "name": a.name, "status": a.status} for a in mx.agents],
        "models": mx.columns,
        "matrix": {a.node_id: {mx.names[k]: _cell_json(c) for k, c in mx.occupied(a).items()}
                   for a in mx.agents},
    })


def _cell_json(c: readmodel.MatrixCell) -> dict[str, Any]:
    m, rec = c.installed, c.job
    return {"installed": m is not None, "loaded": m is not None and c.loaded,
            "size": m.get("size") if m else None, "installed_at": m.get("installed_at") if m else None,
            "job": {"id": rec.task_id, "verb": rec.verb, "status": rec.status, "progress": rec.progress,
                    "speed": rec.speed, "eta": rec.eta, "phase": rec.phase} if rec else None}


# ---- tasks ---------------------------------------------------------------------------------------
def _csv(request: Request, name: str) -> list[str] | None:
    raw = text_param(request.args, name)
    return [x for x in raw.split(",") if x][:MAX_PAGE] if raw else None


@bp.get("/api/tasks")
@openapi.summary("Jobs, newest first. Filters (comma-separated): agent, status, model, origin, verb, group; "
                 "paging: limit (<= 500, default 50), offset")
async def list_tasks(request: Request) -> HTTPResponse:
    try:
        limit = int_param(request.args, "limit", 50, 1, MAX_PAGE) or 50
        offset = int_param(request.args, "offset", 0) or 0
        status = _csv(request, "status")
        filters: dict[str, Any] = {k: _csv(request, k) for k in ("agent", "status", "origin", "verb", "group")}
        model = _csv(request, "model")
    except ParamError as e:
        return error(400, str(e))
    if status and not set(status) <= set(STATUSES):
        return error(400, f"status must be among {', '.join(STATUSES)}")
    if model:
        # stored as given; match the common spellings of the same model
        filters["model"] = sorted({m for name in model for m in (name, normalize(name))})
    tasks, total = await _ledger(request).query(**filters, limit=limit, offset=offset)
    return json({"tasks": tasks, "total": total, "limit": limit, "offset": offset,
                 "next_offset": offset + limit if offset + limit < total else None})


@bp.get("/api/tasks/<task_id:str>")
@openapi.summary("One job: status pending -> in_progress -> completed | failed | cancelled (or rejected), "
                 "progress 0-1, bytes, speed, ETA, error")
async def get_task(request: Request, task_id: str) -> HTTPResponse:
    task = await _ledger(request).get(task_id)
    return json(task) if task else error(404, f"task '{task_id}' not found")


@bp.post("/api/tasks/<task_id:str>/cancel")
@openapi.summary("Cancel a job: a held one at once, a running one through the agent (job.cancel)")
@require_admin
async def cancel_task(request: Request, task_id: str) -> HTTPResponse:
    ledger = _ledger(request)
    rec = ledger.by_task.get(task_id)
    if rec is None:
        task = await ledger.get(task_id)
        if task is None:
            return error(404, f"task '{task_id}' not found")
        rec = await ledger.held_elsewhere(task_id)  # several controllers: one another controller holds
        if rec is None:
            return error(409, f"task '{task_id}' already ended ({task['status']})")
    if rec.done:
        return error(409, f"task '{task_id}' already ended ({rec.status})")
    await ledger.cancel(rec)
    return json(rec.to_json(), status=202)
