"""Who may do what: one decision for every HTTP request outside the proxy surface.

| admin_token | API keys in use | reads (GET/HEAD)                  | writes                     |
|-------------|-----------------|-----------------------------------|----------------------------|
| set         | any             | admin or viewer (token or login)  | admin (token, or login+CSRF)|
| unset       | no              | loopback clients only             | loopback clients only      |
| unset       | yes             | refused: set admin_token          | refused: set admin_token   |

Always open: `/healthz`, `/api/version`, `/`, the API docs, the login page and static assets. The proxy
surface (Ollama and OpenAI inference, `/api/tags`, `/api/ps`, `/v1/models`) follows the API keys instead
(controller/proxy.py). Wrong credentials are throttled (controller/throttle.py). docs/security.md.
"""

from __future__ import annotations

import hmac
from enum import Enum
from functools import wraps
from typing import Any, Awaitable, Callable

from sanic import Request
from sanic.response import HTTPResponse, json

from . import auth_web
from .http import bearer
from .peer import client_ip, is_local
from .throttle import too_many

Handler = Callable[..., Awaitable[HTTPResponse]]
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
PUBLIC_PATHS = frozenset({"/", "/healthz", "/api/version", "/dashboard/login", "/dashboard/logout"})
PUBLIC_PREFIXES = ("/docs", "/dashboard/static/")
SELF_GUARDED = frozenset({"proxy", "ollama_models"})  # blueprints that apply their own policy


class Role(str, Enum):
    ADMIN = "admin"
    VIEWER = "viewer"


def _cfg(request: Request) -> Any:
    return request.app.ctx.fleet.cfg


def keys_in_use(request: Request) -> bool:
    proxy = getattr(request.app.ctx.fleet, "proxy", None)
    return bool(proxy is not None and proxy.keys.enabled)


def token_role(request: Request, token: str) -> Role | None:
    cfg = _cfg(request)
    if cfg.admin_token and hmac.compare_digest(token.encode(), str(cfg.admin_token).encode()):
        return Role.ADMIN
    if cfg.admin_token and cfg.viewer_token and hmac.compare_digest(token.encode(), str(cfg.viewer_token).encode()):
        return Role.VIEWER
    return None


def throttled(request: Request, openai: bool = False) -> HTTPResponse | None:
    """429 when this client (or everyone) has failed too many credential checks lately."""
    wait = request.app.ctx.throttle.retry_after(client_ip(request))
    return too_many(openai, wait) if wait else None


def failed(request: Request, what: str) -> None:
    request.app.ctx.throttle.failed(client_ip(request), what)


def authorize(request: Request, need: Role) -> HTTPResponse | None:
    """None when the request may go on with at least role `need`; else the refusal, in the API's shape."""
    cfg = _cfg(request)
    if not cfg.admin_token:
        if keys_in_use(request):
            return _err(403, "forbidden: API keys are in use, so managing the fleet needs `admin_token` "
                             "(docs/security.md)")
        if is_local(request):
            return None
        return _err(403, "forbidden: this controller has no `admin_token`, so only loopback clients may "
                         "read or manage the fleet (docs/security.md)")
    token = bearer(request)
    if token:
        if denied := throttled(request):
            return denied
        role = token_role(request, token)
        if role is None:
            failed(request, "bearer token")
            return _err(401, "unauthorized: wrong token")
        return _enough(role, need)
    s = auth_web.session(request)
    if s is None:
        return _err(401, f"unauthorized: this endpoint needs `Authorization: Bearer <{'admin' if need is Role.ADMIN else 'admin or viewer'} token>`")
    if request.method not in SAFE_METHODS and not auth_web.csrf_ok(request, s):
        return _err(403, "forbidden: missing or invalid CSRF token")
    return _enough(Role(s.role), need)


def _enough(role: Role, need: Role) -> HTTPResponse | None:
    if need is Role.ADMIN and role is not Role.ADMIN:
        return _err(403, "forbidden: the viewer token is read-only")
    return None


def _err(status: int, message: str) -> HTTPResponse:
    return json({"error": message}, status=status)


def needs(request: Request) -> Role | None:
    """The role a request needs under the central policy; None: public or guarded elsewhere."""
    path = request.path
    if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
        return None
    route = request.route
    parts = route.name.split(".") if route is not None else []
    if len(parts) > 2 and parts[1] in SELF_GUARDED:
        return None
    if path.startswith("/dashboard"):
        return None  # pages: auth_web.login_required (a redirect to the login form, not a JSON 401)
    return Role.VIEWER if request.method in SAFE_METHODS else Role.ADMIN


async def guard(request: Request) -> HTTPResponse | None:
    """Request middleware: the central policy for every route that has no policy of its own."""
    if request.route is None:  # nothing was routed (a timed-out partial request): the error handler answers
        return None
    need = needs(request)
    if need is None or request.method == "OPTIONS":
        return None
    return authorize(request, need)


def require_admin(handler: Handler) -> Handler:
    """Management writes: the central guard already applies; kept on each handler as a second lock."""

    @wraps(handler)
    async def wrapper(request: Request, *args: Any, **kwargs: Any) -> HTTPResponse:
        denied = authorize(request, Role.ADMIN)
        return denied if denied is not None else await handler(request, *args, **kwargs)

    return wrapper
