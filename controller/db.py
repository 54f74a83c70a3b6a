"""Peewee models for the registry; SQLite (WAL) by default, any Peewee URL (PostgreSQL) via database_url."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import peewee as pw
from playhouse.db_url import connect

from ollama_fleet.controller.migrations import MIGRATIONS, Migration, upgrade

db = pw.DatabaseProxy()

SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "synchronous": "normal",
    "busy_timeout": 5000,
    "foreign_keys": 1,
    "cache_size": -16000,
}


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


def init_db(url: str, migrations: Sequence[Migration] = MIGRATIONS) -> pw.Database:
    """Connect the proxy to `url`, create missing tables and apply missing schema migrations (see
    controller/migrations.py). Safe to call on every start; SchemaTooNew for a newer database."""
    if url.startswith("sqlite"):
        database = connect(url, pragmas=SQLITE_PRAGMAS, check_same_thread=False)
    else:
        database = connect(url)
    db.initialize(database)
    with database.connection_context():
        upgrade(database, MODELS, migrations)
    return cast(pw.Database, database)


def now() -> float:
    return time.time()
