"""API keys for the proxy endpoints: stored as SHA-256 of a high-entropy random key, shown once.

No key ever created -> the proxy is open. Once a key exists, every proxy request needs
`Authorization: Bearer <key>` (what the ollama and openai SDKs send) -- also after the last key is
revoked: keys fail closed. Only `fleet keys purge` (deleting revoked keys) can open the proxy again. The controller re-reads the
active set every few seconds, so `fleet keys add|revoke` take effect without a restart.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Any

import peewee as pw

from ollama_fleet.controller.db import Base, register_models

KEY_PREFIX = "fk-"
SHOWN_CHARS = 10  # characters of a key kept in clear, to tell keys apart in listings


class ApiKey(Base):
    id = pw.AutoField()
    name = pw.CharField(max_length=64)
    prefix = pw.CharField(max_length=16)
    hash = pw.CharField(max_length=64, unique=True)
    created = pw.DoubleField()
    revoked = pw.DoubleField(null=True)


register_models(ApiKey)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create(name: str) -> tuple[str, dict[str, Any]]:
    """A new key: (the key itself, to show once; its row)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey.create(name=name, prefix=key[:SHOWN_CHARS], hash=digest(key), created=time.time())
    return key, _public(row)


def _public(row: ApiKey) -> dict[str, Any]:
    return {"id": row.id, "name": row.name, "prefix": row.prefix, "created": row.created, "revoked": row.revoked}


def list_keys() -> list[dict[str, Any]]:
    return [_public(r) for r in ApiKey.select().order_by(ApiKey.id)]


def revoke(ref: str) -> list[dict[str, Any]]:
    """Revoke active keys whose id, name or shown prefix is `ref`; returns them."""
    cond = (ApiKey.name == ref) | (ApiKey.prefix == ref)
    if ref.isdigit():
        cond = cond | (ApiKey.id == int(ref))
    rows = list(ApiKey.select().where(cond & ApiKey.revoked.is_null()))
    now = time.time()
    for r in rows:
        r.revoked = now
        r.save()
    return [_public(r) for r in rows]


def active() -> dict[str, str]:
    """hash -> key name, for every key not revoked."""
    return {r.hash: r.name for r in ApiKey.select(ApiKey.hash, ApiKey.name).where(ApiKey.revoked.is_null())}


def state() -> tuple[dict[str, str], bool]:
    """(active keys, whether keys are in use at all: any key row, revoked ones included)."""
    return active(), ApiKey.select().exists()


def purge() -> int:
    """Delete revoked keys; when no active key is left, the proxy is open again. Returns the rows deleted."""
    return int(ApiKey.delete().where(ApiKey.revoked.is_null(False)).execute())


class KeyRing:
    """The controller's in-memory copy of the active keys (refreshed by the proxy's reloader)."""

    def __init__(self) -> None:
        self.hashes: dict[str, str] = {}
        self.in_use = False

    def load(self, hashes: dict[str, str], in_use: bool) -> None:
        self.hashes, self.in_use = hashes, in_use or bool(hashes)

    @property
    def enabled(self) -> bool:
        """Keys are required: once any key was created, until `fleet keys purge` leaves none."""
        return self.in_use

    def check(self, bearer: str) -> str | None:
        """The key's name when `bearer` is an active key."""
        return self.hashes.get(digest(bearer)) if bearer else None
