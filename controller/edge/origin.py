"""Browser origins and host names, after Ollama's own model (OLLAMA_ORIGINS and its Host check).

- A request that carries an `Origin` is served only when that origin is the controller's own (the
  same host and port as the `Host` it was sent to) or matches `allowed_origins` (`*` wildcards).
  Anything else, `null` included, gets 403 before any handler runs: a web page cannot drive the fleet
  with a "simple" cross-origin POST. Clients without `Origin` (curl, the SDKs, server-side apps) pass.
- On a loopback bind only loopback-ish host names are served, so a DNS-rebinding page (`Host:
  evil.example`) cannot read the API through the victim's browser.
- Allowed cross-origin requests get CORS headers; their preflights are answered here.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from functools import lru_cache
from urllib.parse import urlsplit

from sanic import Request
from sanic.response import HTTPResponse, empty

from ollama_fleet.controller.edge.context import settings_of
from ollama_fleet.controller.edge.http import api_of, error_response
from ollama_fleet.controller.edge.peer import from_trusted_proxy

CORS_METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type, User-Agent, Accept, X-Requested-With, X-Stainless-Lang, " \
               "X-Stainless-Package-Version, X-Stainless-OS, X-Stainless-Arch, X-Stainless-Runtime, " \
               "X-Stainless-Runtime-Version, X-Stainless-Async, OpenAI-Organization, OpenAI-Project"
CORS_MAX_AGE = "600"


@lru_cache(maxsize=16)
def _patterns(origins: tuple[str, ...]) -> re.Pattern[str] | None:
    parts = [re.escape(o.strip().rstrip("/").lower()).replace(r"\*", ".*") for o in origins if o.strip()]
    return re.compile("^(?:" + "|".join(parts) + ")$") if parts else None


@lru_cache(maxsize=8)
def is_loopback_bind(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _split(netloc: str) -> tuple[str, int | None] | None:
    """(host name, port) of a `Host` value; None when it is malformed (an IPv6 literal left open, a bad port)."""
    try:
        parts = urlsplit("//" + netloc)
        return (parts.hostname or "").lower(), parts.port
    except ValueError:
        return None


@lru_cache(maxsize=256)  # checked on every request, the proxy's included: parse each Host value once
def allowed_host(host_header: str) -> bool:
    """Ollama's rule: IP literals, localhost, *.localhost, .local, .internal and this machine's name."""
    if not host_header:
        return True
    split = _split(host_header)
    if split is None:
        return False
    host = split[0]
    if not host or host == "localhost" or host.endswith((".localhost", ".local", ".internal")):
        return True
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    return host == _hostname()


@lru_cache(maxsize=1)
def _hostname() -> str:
    return socket.gethostname().lower()


def _same_origin(origin: str, host_header: str) -> bool:
    try:
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return False
        default = 443 if parts.scheme == "https" else 80
        have = (parts.hostname, parts.port or default)
    except ValueError:
        return False
    want = _split(host_header)
    return want is not None and have == (want[0], want[1] or default)


def origin_allowed(request: Request, origin: str) -> bool:
    if _same_origin(origin, request.headers.get("host", "")):
        return True
    cfg = settings_of(request)
    pattern = _patterns(cfg.allowed_origins)
    return pattern is not None and pattern.match(origin.strip().rstrip("/").lower()) is not None


def _refuse(request: Request, message: str) -> HTTPResponse:
    return error_response(api_of(request.path), 403, message)


async def check(request: Request) -> HTTPResponse | None:
    """Request middleware (first in line)."""
    if request.route is None:  # unrouted (404/405, a timed-out partial request): the error handler answers
        return None
    cfg = settings_of(request)
    if is_loopback_bind(cfg.host) and not allowed_host(request.headers.get("host", "")) \
            and not from_trusted_proxy(request):  # a TLS proxy in front forwards the public name
        return _refuse(request, "forbidden: this controller listens on loopback and serves only local host names")
    origin = request.headers.get("origin")
    if origin is None:
        return None
    if not origin_allowed(request, origin):
        return _refuse(request, f"forbidden: origin {origin[:100]!r} is not allowed (setting allowed_origins)")
    if request.method == "OPTIONS" and request.headers.get("access-control-request-method"):
        resp = empty(status=204)
        _cors(resp, origin)
        resp.headers["access-control-allow-methods"] = CORS_METHODS
        resp.headers["access-control-allow-headers"] = CORS_HEADERS
        resp.headers["access-control-max-age"] = CORS_MAX_AGE
        return resp
    return None


async def decorate(request: Request, response: HTTPResponse) -> None:
    """Response middleware: CORS headers on answers to allowed cross-origin requests."""
    origin = request.headers.get("origin")
    if origin and not _same_origin(origin, request.headers.get("host", "")) and origin_allowed(request, origin):
        _cors(response, origin)


def _cors(resp: HTTPResponse, origin: str) -> None:
    resp.headers["access-control-allow-origin"] = origin
    vary = resp.headers.get("vary", "")
    if "origin" not in vary.lower():
        resp.headers["vary"] = f"{vary}, Origin" if vary else "Origin"
