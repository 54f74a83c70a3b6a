"""Who may do what: one decision for every HTTP request outside the proxy surface.

| admin_token | API keys in use | reads (GET/HEAD)                  | writes                       |
|-------------|-----------------|-----------------------------------|------------------------------|
| set         | any             | admin or viewer (token or login)  | admin (token, or login+CSRF) |
| unset       | no              | direct loopback clients only      | direct loopback clients only |
| unset       | yes             | refused: set admin_token          | refused: set admin_token     |

Reads include `GET /metrics` (Prometheus sends the token with its `authorization` scrape option).
Always open: `/healthz`, `/api/version`, `/`, the API docs, the login page and static assets. The proxy
surface (Ollama and OpenAI inference, `/api/tags`, `/api/ps`, `/v1/models`) follows the API keys instead
(controller/proxy/forward.py). Wrong credentials are throttled (controller/edge/throttle.py).
docs/security.md.
"""

from __future__ import annotations

import hmac
from enum import Enum
from functools import wraps
from html import escape
from typing import Any, Awaitable, Callable, NamedTuple
from urllib.parse import quote

from sanic import Request
from sanic.response import HTTPResponse, html, redirect

from ollama_fleet.controller.dashboard import login as auth_web
from ollama_fleet.controller.edge.context import edge_of, settings_of
from ollama_fleet.controller.edge.http import Api, bearer, error, error_response
from ollama_fleet.controller.edge.origin import allowed_host
from ollama_fleet.controller.edge.peer import client_ip, is_local
from ollama_fleet.settings import Config

Handler = Callable[..., Awaitable[HTTPResponse | None]]  # a streaming handler answers through response_stream
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
PUBLIC_PATHS = frozenset({"/", "/healthz", "/api/version"})
PUBLIC_PREFIXES = ("/docs", "/dashboard/static/")
PROXY_BLUEPRINT = "proxy"  # the LLM proxy: API keys, never a dashboard session
SELF_GUARDED = frozenset({PROXY_BLUEPRINT, "ollama_models"})  # blueprints that apply their own policy


class Role(str, Enum):
    ADMIN = "admin"
    VIEWER = "viewer"


class Denial(NamedTuple):
    status: int
    message: str
    retry_after: int = 0

    def json(self, api: Api | bool = False) -> HTTPResponse:
        resp = error_response(api, self.status, self.message, "rate_limited" if self.status == 429 else None)
        if self.retry_after:
            resp.headers["retry-after"] = str(self.retry_after)
        return resp


def _cfg(request: Request) -> Config:
    return settings_of(request)


def keys_in_use(request: Request) -> bool:
    return edge_of(request).keys_in_use


def _same(given: str, secret: str) -> bool:
    return bool(secret) and hmac.compare_digest(given.encode(), secret.encode())


def token_role(request: Request, token: str) -> Role | None:
    cfg = _cfg(request)
    if not cfg.admin_token:
        return None
    if _same(token, cfg.admin_token):
        return Role.ADMIN
    if _same(token, cfg.viewer_token):
        return Role.VIEWER
    return None


def throttled(request: Request) -> Denial | None:
    """429 when this client (or, for clients not recently authenticated, everyone) failed too often lately."""
    wait = edge_of(request).throttle.retry_after(client_ip(request))
    return Denial(429, f"too many failed authentication attempts: retry in {wait} s", wait) if wait else None


def failed(request: Request, what: str) -> None:
    edge_of(request).throttle.failed(client_ip(request), what)


def succeeded(request: Request) -> None:
    edge_of(request).throttle.succeeded(client_ip(request))


def is_local_newcomer(request: Request) -> bool:
    """A direct loopback client addressing us by a local name: a DNS-rebinding page is not one."""
    return is_local(request) and allowed_host(request.headers.get("host", ""))


def authorize(request: Request, need: Role) -> Denial | None:
    """None when the request may go on with at least role `need`; else why not."""
    cfg = _cfg(request)
    if not cfg.admin_token:
        if keys_in_use(request):
            return Denial(403, "forbidden: API keys are in use, so managing the fleet needs `admin_token` "
                               "(docs/security.md)")
        if is_local_newcomer(request):
            return None
        return Denial(403, "forbidden: this controller has no `admin_token`, so only direct loopback clients "
                           "may read or manage the fleet (docs/security.md)")
    token = bearer(request)
    if token:
        if denied := throttled(request):
            return denied
        role = token_role(request, token)
        if role is None:
            failed(request, "bearer token")
            return Denial(401, "unauthorized: wrong token")
        succeeded(request)
        return _enough(role, need)
    s = auth_web.session(request)
    if s is None:
        which = "admin" if need is Role.ADMIN else "admin or viewer"
        return Denial(401, f"unauthorized: this endpoint needs `Authorization: Bearer <{which} token>`")
    if request.method not in SAFE_METHODS and not auth_web.csrf_ok(request, s):
        return Denial(403, "forbidden: missing or invalid CSRF token")
    return _enough(Role(s.role), need)


def _enough(role: Role, need: Role) -> Denial | None:
    if need is Role.ADMIN and role is not Role.ADMIN:
        return Denial(403, "forbidden: the viewer token is read-only")
    return None


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
        return None  # pages: login_required (a redirect to the login form, not a JSON 401); login/logout: open
    return Role.VIEWER if request.method in SAFE_METHODS else Role.ADMIN


def _may_use_session(request: Request) -> bool:
    path = request.path
    if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES) or bearer(request):
        return False
    parts = request.route.name.split(".") if request.route is not None else []
    return not (len(parts) > 2 and parts[1] == PROXY_BLUEPRINT)


async def guard(request: Request) -> HTTPResponse | None:
    """Request middleware: the central policy for every route that has no policy of its own."""
    if request.route is None:  # unrouted (404/405, a timed-out partial request): the error handler answers
        return None
    # the dashboard session, once per request (it may read the database); a write re-reads its row, so a
    # logout on another controller holds at once for writes (controller/dashboard/login.py). Not for what
    # never looks at it (public paths, the LLM proxy, a bearer token): a forged cookie there costs nothing.
    if _may_use_session(request):
        await auth_web.resolve(request, fresh=request.method not in SAFE_METHODS)
    need = needs(request)
    if need is None or request.method == "OPTIONS":
        return None
    denied = authorize(request, need)
    return denied.json() if denied else None


def require_admin(handler: Handler) -> Handler:
    """Management writes: the central guard already applies; kept on each handler as a second lock in case
    a route moves to a self-guarded blueprint."""

    @wraps(handler)
    async def wrapper(request: Request, *args: Any, **kwargs: Any) -> HTTPResponse | None:
        denied = authorize(request, Role.ADMIN)
        return denied.json() if denied else await handler(request, *args, **kwargs)

    return wrapper


def login_required(handler: Handler) -> Handler:
    """Dashboard pages: a live session when auth is on (else the login form); the same rules as reads."""

    @wraps(handler)
    async def wrapper(request: Request, *args: Any, **kwargs: Any) -> HTTPResponse | None:
        if auth_web.admin_token(request) and auth_web.session(request) is None \
                and not request.headers.get("authorization"):
            if request.path.startswith(("/dashboard/stream", "/dashboard/data/")):
                return error(401, "login required")
            target = request.path + (f"?{request.query_string}" if request.query_string else "")
            return redirect(f"/dashboard/login?next={quote(target, safe='')}", status=303)
        denied = authorize(request, Role.VIEWER)
        if denied is None:
            return await handler(request, *args, **kwargs)
        if denied.status == 403 and auth_web.wants_html(request):
            return html(f"<!doctype html><title>ollama-fleet: forbidden</title><h1>Forbidden</h1>"
                        f"<p>{escape(denied.message)}</p><p>See docs/security.md.</p>", status=403)
        return denied.json()

    return wrapper
