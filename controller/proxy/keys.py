"""API keys for the proxy endpoints: stored as SHA-256 of a high-entropy random key, shown once.

No key ever created -> the proxy is open. Once a key exists, every proxy request needs
`Authorization: Bearer <key>` (what the ollama and openai SDKs send) -- also after the last key is
revoked: keys fail closed. Only `fleet keys purge` (deleting revoked keys) can open the proxy again. The controller re-reads the
active set every few seconds, so `fleet keys add|revoke|limit` take effect without a restart.

Each key may carry limits (controller/admission/limits.py): requests in flight, requests and tokens per
minute, and a priority ceiling. Keys that share a name share one budget (the meter counts by name); where
their limits differ, the strictest applies.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Any

import peewee as pw

from ollama_fleet.controller.admission.limits import NONE, KeyLimits, strictest
from ollama_fleet.controller.db import Base, db, register_models

KEY_PREFIX = "fk-"
SHOWN_CHARS = 10  # characters of a key kept in clear, to tell keys apart in listings


class ApiKey(Base):
    id = pw.AutoField()
    name = pw.CharField(max_length=64)
    prefix = pw.CharField(max_length=16)
    hash = pw.CharField(max_length=64, unique=True)
    created = pw.DoubleField()
    revoked = pw.DoubleField(null=True)
    # limits (None: no limit); added by migration 3
    max_concurrent = pw.IntegerField(null=True)
    rpm = pw.IntegerField(null=True)
    tpm = pw.IntegerField(null=True)
    max_priority = pw.CharField(max_length=8, null=True)


register_models(ApiKey)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create(name: str, limits: KeyLimits = NONE) -> tuple[str, dict[str, Any]]:
    """A new key: (the key itself, to show once; its row)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey.create(name=name, prefix=key[:SHOWN_CHARS], hash=digest(key), created=time.time(),
                        **limits.as_dict())
    return key, _public(row)


def limits_of(row: ApiKey) -> KeyLimits:
    return KeyLimits.of(row.max_concurrent, row.rpm, row.tpm, row.max_priority)


def _public(row: ApiKey) -> dict[str, Any]:
    return {"id": row.id, "name": row.name, "prefix": row.prefix, "created": row.created, "revoked": row.revoked,
            **limits_of(row).as_dict()}


def list_keys() -> list[dict[str, Any]]:
    return [_public(r) for r in ApiKey.select().order_by(ApiKey.id)]


def _matching(ref: str) -> list[ApiKey]:
    """Active keys whose id, name or shown prefix is `ref`."""
    cond = (ApiKey.name == ref) | (ApiKey.prefix == ref)
    if ref.isdigit():
        cond = cond | (ApiKey.id == int(ref))
    return list(ApiKey.select().where(cond & ApiKey.revoked.is_null()))


def revoke(ref: str) -> list[dict[str, Any]]:
    """Revoke active keys whose id, name or shown prefix is `ref`; returns them."""
    rows = _matching(ref)
    now = time.time()
    for r in rows:
        r.revoked = now
        r.save()
    return [_public(r) for r in rows]


def set_limits(ref: str, changes: dict[str, int | str | None]) -> list[dict[str, Any]]:
    """Change the named limits (None clears one; the others stay) of the active keys `ref` matches, as
    revoke does; returns them."""
    rows = _matching(ref)
    with db.atomic():  # every matching key changes, or none
        for r in rows:
            for name, value in limits_of(r).changed(changes).as_dict().items():
                setattr(r, name, value)
            r.save()
    return [_public(r) for r in rows]


def active() -> dict[str, str]:
    """hash -> key name, for every key not revoked."""
    return {r.hash: r.name for r in ApiKey.select(ApiKey.hash, ApiKey.name).where(ApiKey.revoked.is_null())}


def state() -> tuple[dict[str, tuple[str, KeyLimits]], bool]:
    """(hash -> (name, limits) of every active key, whether keys are in use at all: any key row, revoked
    ones included). What KeyRing.load takes."""
    rows = ApiKey.select().where(ApiKey.revoked.is_null())
    return {r.hash: (r.name, limits_of(r)) for r in rows}, ApiKey.select().exists()


def purge() -> int:
    """Delete revoked keys; when no active key is left, the proxy is open again. Returns the rows deleted."""
    return int(ApiKey.delete().where(ApiKey.revoked.is_null(False)).execute())


class KeyRing:
    """The controller's in-memory copy of the active keys (refreshed by the proxy's reloader)."""

    def __init__(self) -> None:
        self.hashes: dict[str, str] = {}  # hash -> name
        self.by_name: dict[str, KeyLimits] = {}
        self.in_use = False

    def load(self, keys: dict[str, tuple[str, KeyLimits]], in_use: bool) -> None:
        """`keys`: hash -> (name, limits), as `state()` reads them."""
        by_name: dict[str, KeyLimits] = {}
        for name, limits in keys.values():
            by_name[name] = strictest(by_name[name], limits) if name in by_name else limits
        self.hashes = {h: name for h, (name, _) in keys.items()}
        self.by_name, self.in_use = by_name, in_use or bool(keys)

    @property
    def enabled(self) -> bool:
        """Keys are required: once any key was created, until `fleet keys purge` leaves none."""
        return self.in_use

    def check(self, bearer: str) -> str | None:
        """The key's name when `bearer` is an active key."""
        return self.hashes.get(digest(bearer)) if bearer else None

    def limits(self, name: str) -> KeyLimits:
        """The limits of the key(s) called `name`; none for a name no active key has (e.g. just revoked)."""
        return self.by_name.get(name, NONE)
