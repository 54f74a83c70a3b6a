"""The admission queue as JSON: `GET /api/queue` (per model: depth by tier and the oldest wait; per agent: slots)."""

from __future__ import annotations

from dataclasses import asdict

from sanic import Blueprint, Request, json
from sanic.response import HTTPResponse
from sanic_ext import openapi

from ollama_fleet.controller.compose import fleet_of

bp = Blueprint("queue")


@bp.get("/api/queue")
@openapi.summary("Admission queue: waiting requests per model, slots per agent")
@openapi.description(
    "`models`: every model with waiting requests: `depth`, `by_tier` (high, normal, low) and `oldest_wait` "
    "(seconds). `agents`: per agent the `capacity` in force (its `ollama_num_parallel`, lowered for a while "
    "after its Ollama answered busy) and the slots `busy`. `waiting`: all queued requests.")
async def queue(request: Request) -> HTTPResponse:
    fleet = fleet_of(request)
    admission = fleet.proxy.admission
    sched = admission.sched
    models = [{**asdict(f), "oldest_wait": round(f.oldest_wait, 3)} for f in admission.figures()]
    agents = [{"id": a.node_id, "capacity": admission.capacity(a), "reported": a.capacity,
               "busy": sched.busy.get(a.node_id, 0)}
              for a in sorted(fleet.registry.agents.values(), key=lambda a: a.node_id)]
    return json({"waiting": sched.waiting, "models": models, "agents": agents})
