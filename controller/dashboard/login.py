"""Dashboard login: server-side sessions behind an HttpOnly, SameSite=Strict cookie, and CSRF tokens.

Only active when `admin_token` is set: the login form takes the admin token (full access) or the
`viewer_token` (read-only). The cookie holds a random session id; the server keeps only its SHA-256,
the role and the expiry (table `websession`, so sessions survive a restart), and logging out deletes
it. A session also ends when the token it was opened with changes.

Several controllers share one database (docs/scaling.md), so the table, not a controller's memory, says
which sessions live: a cookie this controller does not know is looked up there (a login on another
controller holds here at once), and a known session's row is read again when it was last seen more than
RECHECK_EVERY ago, and before every write (a logout on another controller ends it here within
RECHECK_EVERY, and at once for writes). Cookies the table does not have are remembered for UNKNOWN_TTL
(at most UNKNOWN_MAX of them), and concurrent requests with one cookie share one read, so a flood of bogus
or ended cookies costs the database little. `access.guard` resolves the cookie once per request
(`resolve`, async); everything after it reads the result (`session`). The CSRF token is derived from the
session id, which scripts in other origins cannot read; state-changing requests authorised by the
cookie must echo it (`X-CSRF-Token` header or `csrf_token` form field). `Secure` is set when the
browser reached us over TLS, directly or through a trusted reverse proxy (`trusted_proxies`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import peewee as pw
from sanic import Request
from sanic.response import HTTPResponse

from ollama_fleet.controller.edge.context import settings_of
from ollama_fleet.controller.db import Base, register_models

log = logging.getLogger("fleet.login")

COOKIE = "fleet_session"
SESSION_TTL = 12 * 3600  # seconds
MAX_SESSIONS = 10_000  # live sessions kept; the oldest go first (bounded memory)
RECHECK_EVERY = 5.0  # seconds a session's row is trusted before it is read again (a logout elsewhere)
UNKNOWN_TTL = 5.0  # seconds a cookie the database does not have is refused without asking it again
UNKNOWN_MAX = 10_000  # such cookies remembered; the oldest go first (bounded memory)
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{43}")  # secrets.token_urlsafe(32): nothing else is looked up
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


Row = dict[str, Any]
Lookup = Callable[[str], Awaitable[Row | None]]  # id hash -> its `websession` row (find_session on the store)


class Sessions:
    """Live sessions in memory, backed by the database: written through by the caller (`rows` for load),
    read from it on a miss and every RECHECK_EVERY (`get`)."""

    def __init__(self) -> None:
        self._by_hash: dict[str, tuple[Session, float]] = {}  # id hash -> (session, monotonic time row seen)
        self._unknown: OrderedDict[str, float] = OrderedDict()  # id hash -> monotonic time it was refused
        self._reads: dict[str, asyncio.Future[Row | None]] = {}  # lookups in flight, shared by their waiters

    def load(self, rows: list[dict[str, Any]], now: float | None = None) -> None:
        now = time.time() if now is None else now
        for r in rows:
            if r["expires"] > now:
                self._keep(_session(r["id_hash"], r["role"], r["token_fp"], r["expires"]))

    def open(self, role: str, token: str) -> tuple[str, Session]:
        """A new session: (the cookie value, to give the browser only; the session)."""
        sid = secrets.token_urlsafe(32)
        s = _session(_hash(sid), role, fingerprint(token), time.time() + SESSION_TTL)
        self._keep(s)
        return sid, s

    async def get(self, cookie: str, tokens: dict[str, str], lookup: Lookup,
                  fresh: bool = False) -> Session | None:
        """The live session of this cookie, when the token of its role is still the one it was opened with.
        Reads its row when this controller has not seen it within RECHECK_EVERY, or always with `fresh`."""
        id_hash = _hash(cookie)
        now = time.monotonic()
        cached = self._by_hash.get(id_hash)
        if cached is not None and not fresh and now - cached[1] < RECHECK_EVERY:
            return self._valid(cached[0], tokens)
        if cached is None and self._refused(id_hash, now):
            return None
        try:
            row = await self._read(id_hash, lookup)
        except Exception as e:  # database unreachable: keep what we know, refuse what we do not
            log.warning("dashboard session lookup failed (%s: %s); %s", type(e).__name__, e,
                        "keeping the session this controller knows" if cached else "refusing the cookie")
            if cached is None or id_hash not in self._by_hash:
                return None
            self._by_hash[id_hash] = (cached[0], time.monotonic())  # ask again after RECHECK_EVERY
            return self._valid(cached[0], tokens)
        if self._ended_since(id_hash, now):  # logged out here while we read: the row may not be deleted yet
            return None
        if row is None:  # never opened, logged out (on any controller), expired or pruned
            self._forget(id_hash)
            return None
        return self._valid(self._keep(_session(row["id_hash"], row["role"], row["token_fp"], row["expires"])),
                           tokens)

    def close(self, id_hash: str) -> None:
        """Logged out here: refused at once, even by a request whose lookup races the row's deletion."""
        self._forget(id_hash)

    # ---- internals -------------------------------------------------------------------------------
    def _valid(self, s: Session, tokens: dict[str, str]) -> Session | None:
        token = tokens.get(s.role, "")
        if s.expires < time.time() or not token or not hmac.compare_digest(s.token_fp, fingerprint(token)):
            self._forget(s.id_hash)
            return None
        return s

    def _keep(self, s: Session) -> Session:
        self._by_hash[s.id_hash] = (s, time.monotonic())
        self._unknown.pop(s.id_hash, None)
        while len(self._by_hash) > MAX_SESSIONS:  # an evicted session comes back from the database
            del self._by_hash[next(iter(self._by_hash))]
        return s

    def _forget(self, id_hash: str) -> None:
        self._by_hash.pop(id_hash, None)
        self._unknown[id_hash] = time.monotonic()
        self._unknown.move_to_end(id_hash)
        while len(self._unknown) > UNKNOWN_MAX:
            self._unknown.popitem(last=False)

    def _ended_since(self, id_hash: str, when: float) -> bool:
        since = self._unknown.get(id_hash)
        return since is not None and since >= when

    def _refused(self, id_hash: str, now: float) -> bool:
        """Refused within UNKNOWN_TTL: no need to ask the database again."""
        since = self._unknown.get(id_hash)
        if since is None:
            return False
        if now - since < UNKNOWN_TTL:
            return True
        del self._unknown[id_hash]
        return False

    async def _read(self, id_hash: str, lookup: Lookup) -> Row | None:
        """One lookup per id hash at a time; a waiter that goes away does not cancel it for the others."""
        task = self._reads.get(id_hash)
        if task is None:
            task = self._reads[id_hash] = asyncio.ensure_future(lookup(id_hash))
            task.add_done_callback(lambda t: self._done(id_hash, t))
        return await asyncio.shield(task)

    def _done(self, id_hash: str, task: asyncio.Future[Row | None]) -> None:
        self._reads.pop(id_hash, None)
        if not task.cancelled():
            task.exception()  # retrieved: its waiters log it, and none may be left to


def save_session(s: Session) -> None:
    """Store a new session; drop expired ones and, past MAX_SESSIONS, the oldest (bounded table)."""
    WebSession.insert(id_hash=s.id_hash, role=s.role, token_fp=s.token_fp, expires=s.expires).execute()
    WebSession.delete().where(WebSession.expires < time.time()).execute()
    newest = WebSession.select(WebSession.id_hash).order_by(WebSession.expires.desc()).limit(MAX_SESSIONS)
    WebSession.delete().where(WebSession.id_hash.not_in(newest)).execute()


def delete_session(id_hash: str) -> None:
    WebSession.delete().where(WebSession.id_hash == id_hash).execute()


def find_session(id_hash: str) -> Row | None:
    """The session's row, when it is still in the table (live or not: Sessions checks expiry and token)."""
    return cast(Row | None, WebSession.select().where(WebSession.id_hash == id_hash).dicts().first())


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


async def resolve(request: Request, fresh: bool = False) -> Session | None:
    """Find the request's dashboard session (auth on, the cookie names a live session) and keep it for
    `session`. Called once per request, by access.guard; `fresh`: read its row even if seen just now."""
    value = request.cookies.get(COOKIE)
    s = None
    if value and admin_token(request) and SESSION_ID.fullmatch(value):
        fleet = request.app.ctx.fleet  # compose.Fleet: sessions and store built there, owned there
        sessions: Sessions = fleet.sessions
        read: Callable[..., Awaitable[Row | None]] = fleet.store.read
        s = await sessions.get(value, role_tokens(request), lambda h: read(find_session, h), fresh)
    request.ctx.fleet_session = s
    return s


def session(request: Request) -> Session | None:
    """The request's dashboard session as `resolve` found it; None when it did not run (fails closed)."""
    s: Session | None = getattr(request.ctx, "fleet_session", None)
    return s


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
