"""Ollama endpoints the controller does not offer, answered 501 in Ollama's error shape.

/api/pull, /api/push, /api/create, /api/copy and /api/delete are fleet-wide now
(controller/api/ollama_models.py). /api/blobs/* stays here: an upload reaches one machine, and a model
created from it would exist on that machine only; create it on one agent's Ollama, then distribute it.
"""

from __future__ import annotations

from sanic import Blueprint, Request, json
from sanic.response import HTTPResponse

bp = Blueprint("unsupported")

MESSAGE = ("{what} is not supported yet by ollama-fleet: blob uploads would reach one agent only; create "
           "the model on an agent's Ollama directly, then distribute it (POST /api/models/distribute)")


def _not_yet(request: Request) -> HTTPResponse:
    return json({"error": MESSAGE.format(what=f"{request.method} {request.path}")}, status=501)


async def blobs(request: Request, digest: str) -> HTTPResponse:
    return _not_yet(request)


# stream=True: answer without reading a GGUF upload first; add_route: bp.route() is an untyped decorator
bp.add_route(blobs, "/api/blobs/<digest:str>", methods=["HEAD", "POST"], stream=True)
