"""Schema migrations: a database made by the last release without schema versions is upgraded with its rows,
a new step runs once, a newer database is refused, and two processes starting at once apply a step once.

On real SQLite files and on the local PostgreSQL (a fresh database per test; skipped when there is none).
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import peewee as pw
import pytest
from playhouse.migrate import SchemaMigrator

import ollama_fleet.controller.dashboard.login  # noqa: F401  (registers its table; with the imports below MODELS is a controller's)
from ollama_fleet.broker.local import free_loopback_port
from ollama_fleet.controller.proxy import keys
from ollama_fleet.controller.db import MODELS, Agent, Event, init_db
from ollama_fleet.controller.jobs.store import Job
from ollama_fleet.controller.migrations import MIGRATIONS, Migration, SchemaTooNew, add_column, latest
from ollama_fleet.controller.proxy.requestlog import RequestRecord
from ollama_fleet.controller.registry.store import load_registry
from tests.proxy_support import fleet_cli
from tests.support import ROOT, fresh_postgres_db

DATA = Path(__file__).parent / "data"
RELEASE = "e20eba6"  # the last release without schema versions; its DDL is in tests/data/
RACERS = 4

KEY = "fk-release-key-still-opens-the-proxy"
# Rows as release e20eba6 stored them (JSON as text), one or more per kind of table.
RELEASE_ROWS: dict[str, list[dict[str, Any]]] = {
    "agent": [
        {"node_id": "node-a", "display_name": "GPU box", "tags": '["lab","a100"]', "notes": "rack 3",
         "state": "online", "session": "s-1", "forced_offline": False, "ollama_up": True,
         "ollama_url": "http://10.0.0.5:11434", "ollama_version": "0.6.2", "hostname": "gpu-a",
         "agent_version": "0.1.0", "hb_interval": 5.0, "info": '{"os":"linux","ram":68719476736}',
         "metrics": '{"cpu":12.5,"seq":41}', "loaded": '[{"name":"llama3:8b"}]', "first_seen": 1700000000.0,
         "last_seen": 1700000900.0, "online_since": 1700000000.0},
        {"node_id": "node-b", "display_name": "", "tags": "[]", "notes": "", "state": "lost", "session": "",
         "forced_offline": True, "ollama_up": False, "ollama_url": "", "ollama_version": None,
         "hostname": "cpu-b", "agent_version": None, "hb_interval": 5.0, "info": "{}", "metrics": "{}",
         "loaded": "[]", "first_seen": 1700000100.0, "last_seen": 1700000200.0, "online_since": None},
    ],
    "gpu": [{"node_id": "node-a", "index": 0, "uuid": "GPU-1", "name": "A100", "mem_total": 85899345920,
             "driver": "550.54"}],
    "installedmodel": [{"node_id": "node-a", "name": "llama3:8b", "digest": "sha256:abc", "size": 4661224676,
                        "modified_at": "2024-05-01T00:00:00Z", "details": '{"family":"llama"}',
                        "installed_at": 1700000050.0}],
    "metricsample": [{"node_id": "node-a", "ts": 1700000600.0, "cpu": 20.0, "mem": 40.0, "gpu_util": 90.0,
                      "gpu_mem_used": 1 << 33, "gpu_mem_total": 85899345920}],
    "event": [
        {"ts": 1700000000.0, "node_id": "node-a", "kind": "registered", "level": "info",
         "message": "node-a joined", "data": '{"session":"s-1"}'},
        {"ts": 1700000200.0, "node_id": "node-b", "kind": "lost", "level": "warn", "message": "will",
         "data": None},
        {"ts": 1700000300.0, "node_id": None, "kind": "controller", "level": "info", "message": "started",
         "data": None},
    ],
    "requestrecord": [
        {"rid": "r-1", "ts": 1700000700.0, "client": "10.0.0.9", "key": "ci", "endpoint": "/api/chat",
         "model": "llama3:8b", "stream": True, "agent": "node-a", "status": 200, "attempts": 1,
         "ttfb_ms": 120.5, "duration_ms": 900.0, "prompt_tokens": 12, "completion_tokens": 80, "error": None,
         "failover": None},
        {"rid": "r-2", "ts": 1700000800.0, "client": "10.0.0.9", "key": None, "endpoint": "/v1/chat/completions",
         "model": "nope", "stream": False, "agent": None, "status": 404, "attempts": 0, "ttfb_ms": None,
         "duration_ms": 1.5, "prompt_tokens": None, "completion_tokens": None, "error": "model not found",
         "failover": '[{"agent":"node-b","error":"down"}]'},
    ],
    "apikey": [
        {"name": "ci", "prefix": KEY[:10], "hash": hashlib.sha256(KEY.encode()).hexdigest(),
         "created": 1700000000.0, "revoked": None},
        {"name": "old", "prefix": "fk-oldoldo", "hash": "0" * 64, "created": 1690000000.0,
         "revoked": 1695000000.0},
    ],
    "job": [{"task_id": "t-1", "job_id": "j-1", "node_id": "node-a", "verb": "pull", "model": "llama3:8b",
             "args": '{"model":"llama3:8b"}', "origin": "operator", "status": "succeeded", "progress": 1.0,
             "completed": 4661224676, "total": 4661224676, "speed": None, "eta": None, "phase": "success",
             "error_code": None, "error": None, "seq": 7, "session": "s-1", "group_id": None,
             "queue_if_offline": False, "attempts": 1, "created_at": 1700000400.0, "dispatched_at": 1700000401.0,
             "started_at": 1700000402.0, "finished_at": 1700000500.0, "updated_at": 1700000500.0}],
}


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: a SQLite file, or a fresh PostgreSQL database dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fleet.db'}"
        return
    with fresh_postgres_db("fleet_migrate") as pg:
        yield pg


def _connect(url: str) -> pw.Database:
    """A plain connection, not through init_db (which would migrate)."""
    from playhouse.db_url import connect
    return connect(url)


def _dialect(url: str) -> str:
    return "sqlite" if url.startswith("sqlite") else "postgresql"


def make_release_database(url: str) -> None:
    """What release e20eba6 left behind: its tables (no schema_version), filled with RELEASE_ROWS."""
    database = _connect(url)
    lines = (DATA / f"release-{RELEASE}.{_dialect(url)}.sql").read_text().splitlines()
    ddl = "\n".join(line for line in lines if not line.startswith("--"))
    statements = [s.strip() for s in ddl.split(";\n") if s.strip()]
    with database.connection_context(), database.atomic():
        for sql in statements:
            database.execute_sql(sql)
        for table, rows in RELEASE_ROWS.items():
            for row in rows:
                cols = ", ".join(f'"{c}"' for c in row)
                marks = ", ".join([database.param] * len(row))
                database.execute_sql(f'INSERT INTO "{table}" ({cols}) VALUES ({marks})', list(row.values()))


def snapshot(url: str, columns: dict[str, list[str]] | None = None) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every release table (only the release's columns, when given), in key order."""
    database = _connect(url)
    out = {}
    with database.connection_context():
        for table in RELEASE_ROWS:
            cols = columns[table] if columns else [c.name for c in database.get_columns(table)]
            sql = f'SELECT {", ".join(chr(34) + c + chr(34) for c in cols)} FROM "{table}" ORDER BY 1'
            out[table] = [tuple(_exact(v, url) for v in r) for r in database.execute_sql(sql).fetchall()]
    return out


def _exact(value: Any, url: str) -> Any:
    """PostgreSQL prints a REAL (the release's float columns) as its shortest decimal, not the value it holds;
    step 2 widens the column to the value held. Compare held values: a float as its 4-byte value there."""
    if isinstance(value, float) and _dialect(url) == "postgresql":
        return struct.unpack("f", struct.pack("f", value))[0]
    return value


def release_columns(url: str) -> dict[str, list[str]]:
    database = _connect(url)
    with database.connection_context():
        return {t: [c.name for c in database.get_columns(t)] for t in RELEASE_ROWS}


def schema_version(url: str) -> list[tuple[Any, ...]]:
    database = _connect(url)
    with database.connection_context():
        return [tuple(r) for r in database.execute_sql("SELECT version, applied_at FROM schema_version").fetchall()]


def tables(url: str) -> set[str]:
    database = _connect(url)
    with database.connection_context():
        return set(database.get_tables())


def columns_of(url: str, table: str) -> dict[str, bool]:
    """column name -> nullable"""
    database = _connect(url)
    with database.connection_context():
        return {c.name: c.null for c in database.get_columns(table)}


def test_fresh_database_is_created_at_the_latest_version(url: str) -> None:
    init_db(url)
    assert [v for v, _ in schema_version(url)] == [latest()]
    assert {m._meta.table_name for m in MODELS} | {"schema_version"} <= tables(url)


def test_a_current_schema_gets_only_its_missing_tables(url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Another controller's start must not run DDL on tables in use: CREATE INDEX IF NOT EXISTS locks a
    table and deadlocked with the leader's writes on PostgreSQL (several controllers, docs/scaling.md)."""
    init_db(url)
    database = _connect(url)
    with database.connection_context():
        database.execute_sql(f'DROP TABLE "{Event._meta.table_name}"')
    with caplog.at_level("DEBUG", logger="peewee"):
        init_db(url)
    ddl = [r.getMessage() for r in caplog.records if r.name == "peewee" and "CREATE" in r.getMessage()]
    assert ddl and all(f'"{Event._meta.table_name}"' in line for line in ddl), ddl
    assert Event._meta.table_name in tables(url)


def test_release_database_is_upgraded_and_keeps_every_row(url: str) -> None:
    make_release_database(url)
    assert "schema_version" not in tables(url) and "websession" not in tables(url)  # as the release left it
    cols = release_columns(url)
    before = snapshot(url)
    assert all(len(before[t]) == len(rows) for t, rows in RELEASE_ROWS.items())

    database = init_db(url)

    assert [v for v, _ in schema_version(url)] == [latest()]
    assert snapshot(url, cols) == before
    assert "websession" in tables(url)  # a table added since the release is created on upgrade
    # and the product reads them through its models
    with database.connection_context():
        agents, gpus, models = load_registry()
        by_id = {a["node_id"]: a for a in agents}
        assert by_id["node-a"]["tags"] == ["lab", "a100"] and by_id["node-a"]["ollama_up"] is True
        assert by_id["node-b"]["forced_offline"] is True and by_id["node-b"]["online_since"] is None
        assert [(g["node_id"], g["index"]) for g in gpus] == [("node-a", 0)]
        assert [m["details"] for m in models] == [{"family": "llama"}]
        assert keys.active() == {keys.digest(KEY): "ci"}
        assert [e.kind for e in Event.select().order_by(Event.id)] == ["registered", "lost", "controller"]
        assert [(r.rid, r.stream) for r in RequestRecord.select().order_by(RequestRecord.id)] == [
            ("r-1", True), ("r-2", False)]
        assert Job.get(Job.task_id == "t-1").args == {"model": "llama3:8b"}
        # and writes new ones next to them: ids continue after the release's rows
        assert Event.create(ts=1700001000.0, kind="registered", message="after upgrade").id == 4
        Agent.update(notes="edited").where(Agent.node_id == "node-b").execute()

    stamped = schema_version(url)
    init_db(url)  # the next start: nothing to do
    assert schema_version(url) == stamped


def _extra_steps(calls: list[str]) -> list[Migration]:
    """The product's steps plus one a later release might ship: a plain nullable column, and a NOT NULL
    column with a default (SQLite before 3.53 rebuilds the table for that: indexes and rows must survive)."""

    def step(migrator: SchemaMigrator) -> None:
        calls.append("applied")
        add_column(migrator, "requestrecord", "cost", pw.FloatField(null=True))
        add_column(migrator, "event", "source", pw.CharField(max_length=16, default="mqtt"))

    return [*MIGRATIONS, Migration(latest() + 1, "requestrecord.cost, event.source", step)]


def test_a_new_step_is_applied_once_and_rows_keep_their_data(url: str) -> None:
    make_release_database(url)
    cols = release_columns(url)
    before = snapshot(url)
    calls: list[str] = []
    steps = _extra_steps(calls)

    database = init_db(url, steps)

    assert calls == ["applied"]
    assert [v for v, _ in schema_version(url)] == [latest(steps)]
    assert snapshot(url, cols) == before
    assert columns_of(url, "requestrecord")["cost"] is True
    assert columns_of(url, "event")["source"] is False  # NOT NULL, filled with the default
    with database.connection_context():
        assert {ix.name for ix in database.get_indexes("event")} >= {"event_ts", "event_node_id"}
        assert [r[0] for r in database.execute_sql('SELECT cost FROM "requestrecord" ORDER BY id')] == [None, None]
        assert [r[0] for r in database.execute_sql('SELECT source FROM "event" ORDER BY id')] == ["mqtt"] * 3

    stamped = schema_version(url)
    init_db(url, steps)
    assert calls == ["applied"], "a step ran twice"
    assert schema_version(url) == stamped


def test_a_failing_step_leaves_the_database_as_it_was(url: str) -> None:
    make_release_database(url)
    before = snapshot(url)

    def broken(migrator: SchemaMigrator) -> None:
        add_column(migrator, "event", "source", pw.CharField(null=True))
        raise RuntimeError("step 2 failed half-way")

    with pytest.raises(RuntimeError, match="half-way"):
        init_db(url, [*MIGRATIONS, Migration(latest() + 1, "broken", broken)])

    assert "source" not in columns_of(url, "event")  # DDL is transactional on SQLite and PostgreSQL
    assert "schema_version" not in tables(url) and "websession" not in tables(url)
    assert snapshot(url) == before
    init_db(url)  # and a later start with working code upgrades it
    assert [v for v, _ in schema_version(url)] == [latest()]


def test_a_newer_database_is_refused_before_anything_is_written(url: str) -> None:
    init_db(url)
    database = _connect(url)
    with database.connection_context():
        database.execute_sql(f"UPDATE schema_version SET version = {latest() + 1}")
        database.execute_sql('DROP TABLE "websession"')

    with pytest.raises(SchemaTooNew, match=rf"schema is version {latest() + 1}.*up to {latest()} only"):
        init_db(url)
    assert "websession" not in tables(url)


def test_fleet_keys_against_a_newer_database_says_why(tmp_path: Path) -> None:
    """What an operator sees: the command stops with the reason, and writes nothing."""
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    init_db(url)
    database = _connect(url)
    with database.connection_context():
        database.execute_sql("UPDATE schema_version SET version = 99")
    proc = fleet_cli("keys", "add", "ci", "--database-url", url)
    assert proc.returncode != 0
    assert "schema is version 99" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    with database.connection_context():
        assert database.execute_sql('SELECT count(*) FROM "apikey"').fetchone()[0] == 0


def test_a_controller_refuses_to_start_on_a_newer_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    init_db(url)
    database = _connect(url)
    with database.connection_context():
        database.execute_sql("UPDATE schema_version SET version = 99")
    port = free_loopback_port()  # no broker there either: it must stop before it needs one
    proc = fleet_cli("controller", "--mqtt-url", f"mqtt://127.0.0.1:{port}", "--port", str(port),
                     "--database-url", url, "--data-dir", str(tmp_path))
    assert proc.returncode != 0
    assert "schema is version 99" in proc.stderr, proc.stderr[-2000:]


# Each racer announces itself, then runs init_db with one extra step. The step logs that it ran, then holds
# its transaction until every racer has announced itself (on PostgreSQL: until the others wait on a lock),
# so without the schema lock the others would read the old version and run the step too.
RACER = r"""
import os, sys, time
from pathlib import Path
import peewee as pw
from ollama_fleet.controller.db import init_db
from ollama_fleet.controller.migrations import MIGRATIONS, Migration, add_column

url, work, n = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
WAITING = ("SELECT count(*) FROM pg_stat_activity"
           " WHERE datname = current_database() AND wait_event_type = 'Lock'")

def others_are_in(database):
    if len(list(work.glob("arrived-*"))) < n:
        return False
    return url.startswith("sqlite") or database.execute_sql(WAITING).fetchone()[0] == n - 1

def step(migrator):
    with open(work / "applied", "a") as f:
        f.write(f"{os.getpid()}\n")
    deadline = time.monotonic() + 60
    while not others_are_in(migrator.database):
        if time.monotonic() > deadline:
            sys.exit("the other racers never came in")
        time.sleep(0.02)
    add_column(migrator, "event", "source", pw.CharField(null=True))

(work / f"arrived-{os.getpid()}").touch()
init_db(url, [*MIGRATIONS, Migration(len(MIGRATIONS) + 1, "event.source", step)])
"""


def test_processes_starting_together_apply_a_step_once(url: str, tmp_path: Path) -> None:
    make_release_database(url)
    init_db(url)  # at version 1 with a schema_version table: nothing but the lock orders the racers
    before = snapshot(url)
    work = tmp_path / "race"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", RACER, url, str(work), str(RACERS)], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(RACERS)]
    outputs = [p.communicate(timeout=90)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * RACERS, outputs
    assert len((work / "applied").read_text().splitlines()) == 1, "more than one process applied the step"
    assert [v for v, _ in schema_version(url)] == [latest() + 1]
    assert "source" in columns_of(url, "event")
    cols = {t: [c for c in cs if c != "source"] for t, cs in release_columns(url).items()}
    assert snapshot(url, cols) == before


def test_timestamps_keep_their_fractions_after_the_upgrade(url: str) -> None:
    """Step 2: release e20eba6 stored float columns as 4-byte REAL on PostgreSQL (an epoch timestamp lost
    up to a minute); after the upgrade they are double precision, and a fresh database has them too."""
    from ollama_fleet.controller.migrations import DOUBLE_COLUMNS

    make_release_database(url)
    init_db(url)
    database = _connect(url)
    precise = 1700000123.456
    with database.connection_context():
        for table, cols in DOUBLE_COLUMNS.items():
            if _dialect(url) == "postgresql" and database.table_exists(table):
                kinds = {c.name: c.data_type.lower() for c in database.get_columns(table)}
                assert all(kinds[c] == "double precision" for c in cols), (table, kinds)
        database.execute_sql(f"UPDATE event SET ts = {database.param}", (precise,))
        got = {r[0] for r in database.execute_sql("SELECT ts FROM event").fetchall()}
    assert got == {precise}


def test_keys_of_a_release_database_gain_limits(url: str) -> None:
    """Step 3: apikey gets nullable limit columns; the release's keys keep working, unlimited, and take limits."""
    from ollama_fleet.controller.admission.limits import NONE, KeyLimits

    make_release_database(url)
    database = init_db(url)
    cols = columns_of(url, "apikey")
    assert all(cols[c] is True for c in ("max_concurrent", "rpm", "tpm", "max_priority")), cols
    with database.connection_context():
        ring = keys.KeyRing()
        ring.load(*keys.state())
        assert ring.check(KEY) == "ci" and ring.limits("ci") == NONE
        assert [r["name"] for r in keys.set_limits("ci", {"rpm": 30, "max_priority": "low"})] == ["ci"]
        ring.load(*keys.state())
        assert ring.limits("ci") == KeyLimits(rpm=30, max_priority="low")
        assert [(r["name"], r["rpm"]) for r in keys.list_keys()] == [("ci", 30), ("old", None)]


def test_request_log_of_a_release_database_gains_queue_columns(url: str) -> None:
    """Step 4: requestrecord gets nullable queue_ms and priority; the release's rows read them as null, new
    rows write them, and the priority filter reads them."""
    from ollama_fleet.controller.proxy.requestlog import Filters, query_page, write_rows

    make_release_database(url)
    database = init_db(url)
    cols = columns_of(url, "requestrecord")
    assert cols["queue_ms"] is True and cols["priority"] is True, cols
    with database.connection_context():
        kinds = {c.name: c.data_type.lower() for c in database.get_columns("requestrecord")}
        if _dialect(url) == "postgresql":
            assert (kinds["queue_ms"], kinds["priority"]) == ("double precision", "character varying")
        row = {**RELEASE_ROWS["requestrecord"][0], "rid": "r-3", "ts": 1700000900.0, "queue_ms": 1234.5,
               "priority": "high"}
        assert write_rows([row]) == (1, 0)
        rows = {r["rid"]: r for r in query_page(Filters({}), 1, 25)["requests"]}
        assert [(rows[r]["queue_ms"], rows[r]["priority"]) for r in ("r-1", "r-2", "r-3")] == [
            (None, None), (None, None), (1234.5, "high")]
        assert [r["rid"] for r in query_page(Filters({"priority": "high"}), 1, 25)["requests"]] == ["r-3"]
