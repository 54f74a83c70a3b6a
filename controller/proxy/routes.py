"""The Ollama and OpenAI API at the controller: routed endpoints, and fleet views answered from the registry."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sanic import Blueprint, Request, json
from sanic.response import HTTPResponse, redirect, text

from ollama_fleet.contract.model_names import normalize as normalize_model

from ollama_fleet.controller.compose import fleet_of
from ollama_fleet.controller.dashboard.login import wants_html
from ollama_fleet.controller.edge.http import error_response
from ollama_fleet.controller.proxy.forward import Endpoint, Proxy
from ollama_fleet.controller.registry.live import AgentRecord

bp = Blueprint("proxy")
# GET+HEAD routes are registered with add_route: bp.route() is an untyped decorator (mypy --strict)

ROUTED = (
    Endpoint("/api/chat", api="ollama", stream_default=True, generates=True),
    Endpoint("/api/generate", api="ollama", stream_default=True, generates=True),
    Endpoint("/api/embed", api="ollama", stream_default=False),
    Endpoint("/api/embeddings", api="ollama", stream_default=False),
    Endpoint("/api/show", api="ollama", stream_default=False, name_alias=True),
    Endpoint("/v1/chat/completions", api="openai", stream_default=False, generates=True),
    Endpoint("/v1/completions", api="openai", stream_default=False, generates=True),
    Endpoint("/v1/embeddings", api="openai", stream_default=False),
    Endpoint("/v1/responses", api="openai", stream_default=False, generates=True),
    Endpoint("/v1/messages", api="anthropic", stream_default=False, generates=True),
)
NO_VERSION = "0.0.0"


def _proxy(request: Request) -> Proxy:
    return fleet_of(request).proxy


def _routed(ep: Endpoint) -> Callable[[Request], Any]:
    async def handler(request: Request) -> HTTPResponse | None:
        return await _proxy(request).forward(request, ep)

    return handler


for _ep in ROUTED:
    # stream=True: the proxy reads the body itself, bounded by max_body_bytes and spooled when large
    bp.add_route(_routed(_ep), _ep.path, methods=["POST"], name="proxy_" + re.sub(r"\W", "_", _ep.path),
                 stream=True)


# ---- fleet views ----------------------------------------------------------------------------------
def _routable(request: Request) -> list[AgentRecord]:
    agents = fleet_of(request).registry.agents.values()
    return sorted((a for a in agents if a.routable), key=lambda a: a.node_id)


def _denied(request: Request, openai: bool) -> HTTPResponse | None:
    return _proxy(request).authorize(request, openai)[1]


async def root(request: Request) -> HTTPResponse:
    if wants_html(request):  # a browser: the dashboard; Ollama clients (Accept */* or none) get the text
        return redirect("/dashboard", status=302)
    return text("Ollama is running")


bp.add_route(root, "/", methods=["GET", "HEAD"])


async def version(request: Request) -> HTTPResponse:
    """The lowest Ollama version in the fleet: what every agent can be assumed to support."""
    versions = [a.ollama_version for a in fleet_of(request).registry.agents.values() if a.ollama_version]
    return json({"version": min(versions, key=_version_key) if versions else NO_VERSION})


bp.add_route(version, "/api/version", methods=["GET", "HEAD"])


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3]) or (0,)


def _installed(request: Request) -> list[dict[str, Any]]:
    """Installed models of routable agents, one entry per name+digest, with the agents that have it."""
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for a in _routable(request):
        for m in a.models:
            entry = seen.get((m["name"], m.get("digest", "")))
            if entry is None:
                seen[(m["name"], m.get("digest", ""))] = entry = {
                    "name": m["name"], "model": m["name"], "modified_at": m.get("modified_at"),
                    "size": m.get("size", 0), "digest": m.get("digest", ""), "details": m.get("details") or {},
                    "agents": []}
            entry["agents"].append(a.node_id)
    return sorted(seen.values(), key=lambda e: e["modified_at"] or "", reverse=True)


async def tags(request: Request) -> HTTPResponse:
    return _denied(request, False) or json({"models": _installed(request)})


bp.add_route(tags, "/api/tags", methods=["GET", "HEAD"])


@bp.get("/api/ps")
async def ps(request: Request) -> HTTPResponse:
    if denied := _denied(request, False):
        return denied
    models = [{**m, "agent": a.node_id} for a in _routable(request) for m in a.loaded]
    return json({"models": sorted(models, key=lambda m: (m.get("name", ""), m["agent"]))})


def _v1_model(entry: dict[str, Any]) -> dict[str, Any]:
    name = entry["name"]
    return {"id": name, "object": "model", "created": _unix(entry.get("modified_at")),
            "owned_by": name.split("/")[-2] if "/" in name else "library"}


def _unix(go_time: str | None) -> int:
    if not go_time:
        return 0
    try:  # Go writes nanoseconds; Python reads at most microseconds
        return int(datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", go_time.replace("Z", "+00:00")))
                   .timestamp())
    except ValueError:
        return 0


@bp.get("/v1/models")
async def v1_models(request: Request) -> HTTPResponse:
    if denied := _denied(request, True):
        return denied
    unique = {e["name"]: e for e in reversed(_installed(request))}  # newest wins for `created`
    data = [_v1_model(e) for e in sorted(unique.values(), key=lambda e: e["name"])]
    return json({"object": "list", "data": data or None})  # like Ollama: a Go nil slice is `null`


@bp.get("/v1/models/<model:path>")
async def v1_model(request: Request, model: str) -> HTTPResponse:
    if denied := _denied(request, True):
        return denied
    key = normalize_model(model)
    for e in _installed(request):
        if normalize_model(e["name"]) == key:
            return json(_v1_model(e))
    return error_response(True, 404, f"model '{model}' not found")
