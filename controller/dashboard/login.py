"""Dashboard login: server-side sessions behind an HttpOnly, SameSite=Strict cookie, and CSRF tokens.

Only active when `admin_token` is set: the login form takes the admin token (full access) or the
`viewer_token` (read-only). The cookie holds a random session id; the server keeps only its SHA-256,
the role and the expiry (table `websession`, so sessions survive a restart), and logging out deletes
it. A session also ends when the token it was opened with changes. The CSRF token is derived from the
session id, which scripts in other origins cannot read; state-changing requests authorised by the
cookie must echo it (`X-CSRF-Token` header or `csrf_token` form field). `Secure` is set when the
browser reached us over TLS, directly or through a trusted reverse proxy (`trusted_proxies`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any, cast

import peewee as pw
from sanic import Request
from sanic.response import HTTPResponse

from ollama_fleet.controller.edge.context import settings_of
from ollama_fleet.controller.db import Base, register_models

COOKIE = "fleet_session"
SESSION_TTL = 12 * 3600  # seconds
MAX_SESSIONS = 10_000  # live sessions kept; the oldest go first (bounded memory)
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"


class WebSession(Base):
    id_hash = pw.CharField(max_length=64, primary_key=True)
    role = pw.CharField(max_length=16)
    token_fp = pw.CharField(max_length=64)  # which token opened it: a changed token ends the session
    expires = pw.DoubleField()


register_models(WebSession)


@dataclass(frozen=True)
class Session:
    id_hash: str
    role: str
    token_fp: str
    expires: float
    csrf: str


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def fingerprint(token: str) -> str:
    return _hash("ollama-fleet session token\0" + token)


def _session(id_hash: str, role: str, token_fp: str, expires: float) -> Session:
    return Session(id_hash, role, token_fp, expires, _hash("csrf\0" + id_hash)[:32])


class Sessions:
    """Live sessions in memory, written through to the database by the caller (`rows` for load)."""

    def __init__(self) -> None:
        self._by_hash: dict[str, Session] = {}

    def load(self, rows: list[dict[str, Any]], now: float | None = None) -> None:
        now = time.time() if now is None else now
        for r in rows:
            if r["expires"] > now:
                self._by_hash[r["id_hash"]] = _session(r["id_hash"], r["role"], r["token_fp"], r["expires"])

    def open(self, role: str, token: str) -> tuple[str, Session]:
        """A new session: (the cookie value, to give the browser only; the session)."""
        sid = secrets.token_urlsafe(32)
        s = _session(_hash(sid), role, fingerprint(token), time.time() + SESSION_TTL)
        self._by_hash[s.id_hash] = s
        while len(self._by_hash) > MAX_SESSIONS:
            del self._by_hash[next(iter(self._by_hash))]
        return sid, s

    def get(self, cookie: str, tokens: dict[str, str]) -> Session | None:
        """The live session of this cookie, when the token of its role is still the one it was opened with."""
        s = self._by_hash.get(_hash(cookie))
        if s is None:
            return None
        token = tokens.get(s.role, "")
        if s.expires < time.time() or not token or not hmac.compare_digest(s.token_fp, fingerprint(token)):
            self._by_hash.pop(s.id_hash, None)
            return None
        return s

    def close(self, id_hash: str) -> None:
        self._by_hash.pop(id_hash, None)


def save_session(s: Session) -> None:
    """Store a new session; drop expired ones and, past MAX_SESSIONS, the oldest (bounded table)."""
    WebSession.insert(id_hash=s.id_hash, role=s.role, token_fp=s.token_fp, expires=s.expires).execute()
    WebSession.delete().where(WebSession.expires < time.time()).execute()
    newest = WebSession.select(WebSession.id_hash).order_by(WebSession.expires.desc()).limit(MAX_SESSIONS)
    WebSession.delete().where(WebSession.id_hash.not_in(newest)).execute()


def delete_session(id_hash: str) -> None:
    WebSession.delete().where(WebSession.id_hash == id_hash).execute()


def load_sessions() -> list[dict[str, Any]]:
    """The newest MAX_SESSIONS live sessions, oldest first (the order Sessions evicts in)."""
    q = (WebSession.select().where(WebSession.expires > time.time()).order_by(WebSession.expires.desc())
         .limit(MAX_SESSIONS))
    return cast(list[dict[str, Any]], list(q.dicts()))[::-1]


def admin_token(request: Request) -> str:
    cfg = settings_of(request)
    return cfg.admin_token


def role_tokens(request: Request) -> dict[str, str]:
    cfg = settings_of(request)
    return {"admin": cfg.admin_token, "viewer": cfg.viewer_token if cfg.admin_token else ""}


def session(request: Request) -> Session | None:
    """The request's dashboard session, when auth is on and the cookie names a live session."""
    value = request.cookies.get(COOKIE)
    if not value or not admin_token(request) or len(value) > 128 or not value.isascii():
        return None
    sessions: Sessions = request.app.ctx.fleet.sessions  # compose.Fleet: built there, owned there
    return sessions.get(value, role_tokens(request))


def csrf_ok(request: Request, s: Session) -> bool:
    sent = request.headers.get(CSRF_HEADER, "")
    if not sent and request.form:
        sent = request.form.get(CSRF_FIELD) or ""
    return bool(sent) and sent.isascii() and hmac.compare_digest(sent.encode(), s.csrf.encode())


def safe_next(value: str | None) -> str:
    """Only dashboard paths: the login form must not become an open redirect."""
    if value and value.startswith("/dashboard") and "//" not in value and "\\" not in value:
        return value
    return "/dashboard"


def set_cookie(resp: HTTPResponse, value: str, secure: bool) -> None:
    resp.add_cookie(COOKIE, value, path="/", httponly=True, samesite="Strict", secure=secure,
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
