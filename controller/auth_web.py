"""Dashboard login: a signed session cookie (HttpOnly, SameSite=Strict) and a per-session CSRF token.

Only active when `admin_token` is set: the login form asks for that token. The session is stateless
(expiry, nonce and an HMAC keyed by the admin token), so it survives controller restarts and every
session ends when the token changes. The CSRF token is derived from the session's nonce; state-changing
requests authorised by the cookie must echo it (`X-CSRF-Token` header or `csrf_token` form field).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import wraps
from typing import Any
from urllib.parse import quote

from sanic import Request
from sanic.response import HTTPResponse, json, redirect

COOKIE = "fleet_session"
SESSION_TTL = 12 * 3600  # seconds
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"

Handler = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class Session:
    nonce: str
    expires: float
    csrf: str


def admin_token(request: Request) -> str:
    return str(request.app.ctx.fleet.cfg.admin_token or "")


def _key(token: str) -> bytes:
    return hashlib.sha256(b"ollama-fleet dashboard session\0" + token.encode()).digest()


def _sign(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def new_cookie(token: str, now: float | None = None) -> str:
    body = f"{int((now or time.time()) + SESSION_TTL)}.{secrets.token_hex(16)}"
    return f"{body}.{_sign(_key(token), body)}"


def read_cookie(token: str, value: str, now: float | None = None) -> Session | None:
    try:
        expires, nonce, sig = value.split(".")
        exp = float(expires)
    except ValueError:
        return None
    key = _key(token)
    if not hmac.compare_digest(sig, _sign(key, f"{expires}.{nonce}")) or exp < (now or time.time()):
        return None
    return Session(nonce, exp, _sign(key, "csrf\0" + nonce)[:32])


def session(request: Request) -> Session | None:
    """The request's dashboard session, when auth is on and the cookie is valid."""
    token = admin_token(request)
    value = request.cookies.get(COOKIE)
    return read_cookie(token, value) if token and value else None


def csrf_ok(request: Request, s: Session) -> bool:
    sent = request.headers.get(CSRF_HEADER, "")
    if not sent and request.form:
        sent = request.form.get(CSRF_FIELD) or ""
    return bool(sent) and hmac.compare_digest(sent.encode(), s.csrf.encode())


def session_denial(request: Request) -> HTTPResponse | None:
    """For require_admin: None when a dashboard session authorises this request (CSRF checked on writes)."""
    s = session(request)
    if s is None:
        return json({"error": "unauthorized: this endpoint needs `Authorization: Bearer <admin token>`"},
                    status=401)
    if request.method not in SAFE_METHODS and not csrf_ok(request, s):
        return json({"error": "forbidden: missing or invalid CSRF token"}, status=403)
    return None


def login_required(handler: Handler) -> Handler:
    """Dashboard pages: redirect to the login page when auth is on and there is no session."""

    @wraps(handler)
    async def wrapper(request: Request, *args: Any, **kwargs: Any) -> HTTPResponse:
        if admin_token(request) and session(request) is None:
            if request.path.startswith(("/dashboard/stream", "/dashboard/data/")):
                return json({"error": "login required"}, status=401)
            target = request.path + (f"?{request.query_string}" if request.query_string else "")
            return redirect(f"/dashboard/login?next={quote(target, safe='')}", status=303)
        return await handler(request, *args, **kwargs)

    return wrapper


def safe_next(value: str | None) -> str:
    """Only dashboard paths: the login form must not become an open redirect."""
    if value and value.startswith("/dashboard") and "//" not in value and "\\" not in value:
        return value
    return "/dashboard"


def set_session(resp: HTTPResponse, token: str, secure: bool) -> None:
    resp.add_cookie(COOKIE, new_cookie(token), path="/", httponly=True, samesite="Strict", secure=secure,
                    max_age=SESSION_TTL)


def clear_session(resp: HTTPResponse) -> None:
    resp.delete_cookie(COOKIE, path="/")


def wants_html(request: Request) -> bool:
    """True when the Accept header prefers text/html (a browser), not for Ollama clients (`*/*` or none)."""
    q_html, q_other = 0.0, 0.0
    for part in request.headers.get("accept", "").split(","):
        media, _, params = part.strip().partition(";")
        q = 1.0
        for p in params.split(";"):
            name, _, value = p.strip().partition("=")
            if name == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        media = media.strip().lower()
        if media in ("text/html", "application/xhtml+xml"):
            q_html = max(q_html, q)
        elif media in ("text/plain", "application/json"):
            q_other = max(q_other, q)
    return q_html > 0 and q_html >= q_other
