"""The controllers sharing this broker: `GET /api/cluster` (this one, and the load the others publish)."""

from __future__ import annotations

from sanic import Blueprint, Request, json
from sanic.response import HTTPResponse
from sanic_ext import openapi

from ollama_fleet.controller.compose import fleet_of

bp = Blueprint("cluster")


@bp.get("/api/cluster")
@openapi.summary("Controllers sharing the broker, and their load")
@openapi.description(
    "`instance` and `leader`: this controller. `controllers`: every other controller whose load document "
    "arrived within `load_ttl` seconds (they publish every `load_every` seconds): its `instance`, `leader`, "
    "`age` (seconds since its last document), `in_flight` (requests it has on agents), `slots` (admission slots "
    "it holds), `queued` (requests in its queue) and `agents` (its in-flight requests per agent). Routing and "
    "admission count these with this controller's own (docs/scaling.md).")
async def cluster(request: Request) -> HTTPResponse:
    return json(fleet_of(request).load.view())
