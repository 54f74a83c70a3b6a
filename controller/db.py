"""Peewee models for the registry; SQLite (WAL) by default, any Peewee URL (PostgreSQL) via database_url."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import peewee as pw
from playhouse.db_url import connect, parse
from playhouse.pool import PooledDatabase

from ollama_fleet.controller.migrations import MIGRATIONS, Migration, upgrade

db = pw.DatabaseProxy()

SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "synchronous": "normal",
    "busy_timeout": 5000,
    "foreign_keys": 1,
    "cache_size": -16000,
}

# PostgreSQL gets a connection pool per process (playhouse.pool): every Store call takes a connection and
# gives it back (connection_context), so a read costs a round trip instead of a new server backend. The
# pool checks a connection with a round trip when it hands it out and drops a broken one (killed by the
# server, lost in a restart), so a dead connection is never handed out twice. Each default below gives
# way to the same name in the URL's query (`postgresql://host/db?max_connections=16`).
POOLED_SCHEMES = {"postgres": "postgresql+pool", "postgresql": "postgresql+pool",
                  "postgres+pool": "postgresql+pool", "postgresql+pool": "postgresql+pool"}
POOL_MAX_CONNECTIONS = 8  # the Store asks for its threads + POOL_HEADROOM (registry/store.py)
POOL_HEADROOM = 3  # beyond the Store's threads: the thread that opened it, other short uses off its threads
POOL_STALE_TIMEOUT = 300  # seconds: a connection is replaced once this old, before idle cut-offs (NAT, poolers) do
POOL_WAIT_TIMEOUT = 10  # seconds a thread waits for a free connection before MaxConnectionsExceeded
CONNECT_TIMEOUT = 10  # seconds libpq waits for an unreachable server (the OS default is minutes)


class JSONField(pw.TextField):
    """JSON in a TEXT column: portable between SQLite and PostgreSQL."""

    def db_value(self, value: Any) -> str | None:
        return None if value is None else json.dumps(value, separators=(",", ":"), default=str)

    def python_value(self, value: Any) -> Any:
        return None if value is None else json.loads(value)


class Base(pw.Model):
    class Meta:
        database = db


class Agent(Base):
    node_id = pw.CharField(primary_key=True, max_length=63)
    display_name = pw.CharField(default="")
    tags = JSONField(default=list)
    notes = pw.TextField(default="")
    state = pw.CharField(default="online", max_length=16)
    session = pw.CharField(default="", max_length=64)
    forced_offline = pw.BooleanField(default=False)
    ollama_up = pw.BooleanField(default=False)
    ollama_url = pw.CharField(default="")
    ollama_version = pw.CharField(null=True)
    hostname = pw.CharField(default="")
    agent_version = pw.CharField(null=True)
    hb_interval = pw.DoubleField(default=5.0)
    info = JSONField(default=dict)       # last `info` snapshot (IPs, OS, RAM, disk, ...)
    metrics = JSONField(default=dict)    # last heartbeat figures
    loaded = JSONField(default=list)     # last `running` snapshot (/api/ps)
    first_seen = pw.DoubleField()
    last_seen = pw.DoubleField()
    online_since = pw.DoubleField(null=True)


class Gpu(Base):
    node_id = pw.CharField(max_length=63)
    gpu_index = pw.IntegerField(column_name="index")  # `index` would shadow Model.index()
    uuid = pw.CharField(null=True)
    name = pw.CharField(default="")
    mem_total = pw.BigIntegerField(null=True)
    driver = pw.CharField(null=True)

    class Meta:
        indexes = ((("node_id", "gpu_index"), True),)


class InstalledModel(Base):
    node_id = pw.CharField(max_length=63)
    name = pw.CharField()
    digest = pw.CharField(default="")
    size = pw.BigIntegerField(default=0)
    modified_at = pw.CharField(null=True)
    details = JSONField(default=dict)
    installed_at = pw.DoubleField()  # when the registry first saw it on this agent

    class Meta:
        indexes = ((("node_id", "name"), True),)


class MetricSample(Base):
    node_id = pw.CharField(max_length=63)
    ts = pw.DoubleField()
    cpu = pw.DoubleField(null=True)
    mem = pw.DoubleField(null=True)
    gpu_util = pw.DoubleField(null=True)
    gpu_mem_used = pw.BigIntegerField(null=True)
    gpu_mem_total = pw.BigIntegerField(null=True)

    class Meta:
        indexes = ((("node_id", "ts"), False),)


class Event(Base):
    id = pw.AutoField()
    ts = pw.DoubleField(index=True)
    node_id = pw.CharField(null=True, max_length=63, index=True)
    kind = pw.CharField(max_length=32)
    level = pw.CharField(default="info", max_length=8)
    message = pw.TextField(default="")
    data = JSONField(null=True)


MODELS: list[type[Base]] = [Agent, Gpu, InstalledModel, MetricSample, Event]


def register_models(*models: type[Base]) -> None:
    """Other modules (requests, jobs, keys) add their tables before init_db creates them."""
    for m in models:
        if m not in MODELS:
            MODELS.append(m)


def default_url(data_dir: Path) -> str:
    data_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{data_dir / 'fleet.db'}"


def init_db(url: str, migrations: Sequence[Migration] = MIGRATIONS, *,
            max_connections: int = POOL_MAX_CONNECTIONS) -> pw.Database:
    """Connect the proxy to `url`, create missing tables and apply missing schema migrations (see
    controller/migrations.py). Safe to call on every start; SchemaTooNew for a newer database.
    PostgreSQL is pooled, at most `max_connections` at once (unless the URL says otherwise)."""
    if url.startswith("sqlite"):
        database = connect(url, pragmas=SQLITE_PRAGMAS, check_same_thread=False)
    else:
        pool_url, options = pooled(url, max_connections)
        # a password with URL characters (`@`, `:`, `/`) is written percent-encoded in the URL
        database = connect(pool_url, unquote_password=True, unquote_user=True, **options)
    db.initialize(database)
    with database.connection_context():
        upgrade(database, MODELS, migrations)
    return cast(pw.Database, database)


def pooled(url: str, max_connections: int = POOL_MAX_CONNECTIONS) -> tuple[str, dict[str, Any]]:
    """(url, connect() keywords): a PostgreSQL URL on the pooled scheme with the pool's defaults for what
    its query leaves out; any other URL as it is."""
    scheme, sep, rest = url.partition("://")
    if scheme not in POOLED_SCHEMES:
        return url, {}
    url = f"{POOLED_SCHEMES[scheme]}{sep}{rest}"
    given = parse(url)
    defaults = {"max_connections": max_connections, "stale_timeout": POOL_STALE_TIMEOUT,
                "timeout": POOL_WAIT_TIMEOUT, "connect_timeout": CONNECT_TIMEOUT}
    return url, {k: v for k, v in defaults.items() if k not in given}


def close_db(database: pw.Database) -> None:
    """Close the calling thread's connection and, for a pool, every idle one (a connection another thread
    still holds stays open: it is returned, and closed with the process)."""
    if not database.is_closed():
        database.close()
    if isinstance(database, PooledDatabase):
        database.close_idle()


def now() -> float:
    return time.time()
