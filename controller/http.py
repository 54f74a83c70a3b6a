"""Small helpers shared by the HTTP blueprints: error shape, admin auth, JSON body parsing."""

from __future__ import annotations

import hmac
from functools import wraps
from typing import Any, Awaitable, Callable

from sanic import Request, json
from sanic.response import HTTPResponse

Handler = Callable[..., Awaitable[HTTPResponse]]


def error(status: int, message: str, **extra: Any) -> HTTPResponse:
    """Management API errors use Ollama's own shape: {"error": "..."}."""
    return json({"error": message, **extra}, status=status)


def bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    return header[7:].strip() if header.lower().startswith("bearer ") else ""


def require_admin(handler: Handler) -> Handler:
    """Management endpoints need the admin token when one is configured."""

    @wraps(handler)
    async def wrapper(request: Request, *args: Any, **kwargs: Any) -> HTTPResponse:
        token = request.app.ctx.fleet.cfg.admin_token
        if token and not hmac.compare_digest(bearer(request).encode(), token.encode()):
            from .auth_web import session_denial  # a dashboard session (cookie + CSRF token) also authorises

            denied = session_denial(request)
            if denied is not None:
                return denied
        return await handler(request, *args, **kwargs)

    return wrapper


def json_body(request: Request) -> dict[str, Any] | HTTPResponse:
    if not request.body:
        return error(400, "missing request body")
    try:
        body = request.json
    except Exception:
        return error(400, "invalid JSON body")
    if not isinstance(body, dict):
        return error(400, "request body must be a JSON object")
    return body
