"""Numbered schema migrations: the database records its schema version, and init_db applies the missing steps.

Version 1 is the schema of the releases before this module (every table `create_tables` made from the
registered models); a database with our tables but no `schema_version` table is such a database. Each
later change to a table is one `Migration` appended to MIGRATIONS, and the model gets the same change.

How a start goes (`upgrade`, in one transaction that holds the schema lock, so two controllers
starting at once never both apply a step):
- a fresh database gets every registered table at the models' shape, which already includes every
  step, and is stamped with the latest version;
- an older database gets the missing steps in order, then the tables it lacks (a table added since,
  or one a partial process such as `fleet keys` never created), and its new version;
- a database newer than this code is refused (SchemaTooNew) before anything is written.

Existing tables are never touched outside a step, not even with CREATE INDEX IF NOT EXISTS: on PostgreSQL
that waits behind another controller's open writes and deadlocked a second controller's start. So a new
index on an existing table, like a new column, needs its own step.

A step is a function of a playhouse.migrate SchemaMigrator (SqliteMigrator or PostgresqlMigrator).
It works on table and column names, never on models (a model may not be registered in this process),
and must tolerate a table that does not exist yet: `create_tables` makes it afterwards at the model's
shape. `add_column` below does both.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import peewee as pw
from playhouse.migrate import SchemaMigrator

log = logging.getLogger("fleet.db")

# How long a second process starting at the same time waits for the first one's migration (SQLite's
# busy handler; PostgreSQL's advisory lock waits without limit) before it gives up with "locked".
LOCK_WAIT_MS = 120_000
# One advisory lock key for the whole schema, the same in every process of every version.
PG_LOCK_KEY = zlib.crc32(b"ollama-fleet schema")


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer release than this code."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    apply: Callable[[SchemaMigrator], None]


class SchemaVersion(pw.Model):
    """One row: the schema version of this database and when it was reached."""

    version = pw.IntegerField()
    applied_at = pw.DoubleField()  # FloatField is a 4-byte REAL on PostgreSQL: whole minutes lost

    class Meta:
        table_name = "schema_version"


def _baseline(migrator: SchemaMigrator) -> None:
    """Version 1 needs no work: its tables are what `create_tables` makes from the models."""


# Every float column of version 1. Peewee's FloatField is a 4-byte REAL on PostgreSQL: an epoch timestamp
# kept ~7 significant digits there (1700000123.456 read back as 1700000128). SQLite's REAL is 8 bytes.
DOUBLE_COLUMNS = {
    "agent": ("hb_interval", "first_seen", "last_seen", "online_since"),
    "installedmodel": ("installed_at",),
    "metricsample": ("ts", "cpu", "mem", "gpu_util"),
    "event": ("ts",),
    "job": ("progress", "speed", "eta", "created_at", "dispatched_at", "started_at", "finished_at", "updated_at"),
    "apikey": ("created", "revoked"),
    "requestrecord": ("ts", "ttfb_ms", "duration_ms"),
    "websession": ("expires",),
}


def _double_precision(migrator: SchemaMigrator) -> None:
    """PostgreSQL: REAL columns become DOUBLE PRECISION (nothing to do on SQLite)."""
    database = migrator.database
    if not isinstance(database, pw.PostgresqlDatabase):
        return
    for table, columns in DOUBLE_COLUMNS.items():
        if not database.table_exists(table):
            continue
        reals = {c.name for c in database.get_columns(table) if c.data_type.lower() == "real"}
        for column in columns:
            if column in reals:
                database.execute_sql(f'ALTER TABLE "{table}" ALTER COLUMN "{column}" TYPE DOUBLE PRECISION')  # type: ignore[no-untyped-call]


def _key_limits(migrator: SchemaMigrator) -> None:
    """Per-API-key limits (controller/proxy/keys.py); None in each: existing keys stay unlimited."""
    for column in ("max_concurrent", "rpm", "tpm"):
        add_column(migrator, "apikey", column, pw.IntegerField(null=True))
    add_column(migrator, "apikey", "max_priority", pw.CharField(max_length=8, null=True))


def _request_queue(migrator: SchemaMigrator) -> None:
    """The request log's admission columns (controller/proxy/requestlog.py); NULL in the rows before them."""
    add_column(migrator, "requestrecord", "queue_ms", pw.DoubleField(null=True))
    add_column(migrator, "requestrecord", "priority", pw.CharField(max_length=8, null=True))


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "baseline: the tables of releases before schema versions", _baseline),
    Migration(2, "float columns as double precision on PostgreSQL", _double_precision),
    Migration(3, "apikey limits: max_concurrent, rpm, tpm, max_priority", _key_limits),
    Migration(4, "requestrecord: queue_ms, priority", _request_queue),
)


def add_column(migrator: SchemaMigrator, table: str, column: str, field: pw.Field) -> None:
    """Add `column` unless the table is absent (created whole later) or already has it (tolerant step)."""
    database = migrator.database
    if not database.table_exists(table):
        return
    if column in {c.name for c in database.get_columns(table)}:
        return
    migrator.add_column(table, column, field).run()


def latest(migrations: Sequence[Migration] = MIGRATIONS) -> int:
    return _checked(migrations)[-1].version


def _checked(migrations: Sequence[Migration]) -> Sequence[Migration]:
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise ValueError(f"migrations must be numbered 1, 2, 3, ... in order; got {versions}")
    return migrations


@contextmanager
def _schema_lock(database: pw.Database) -> Iterator[None]:
    """A transaction that only one process at a time can be in."""
    if isinstance(database, pw.SqliteDatabase):
        # BEGIN IMMEDIATE takes the write lock up front; a second process waits in the busy handler.
        # init_db's connection is closed afterwards, so the longer wait does not outlive it.
        database.pragma("busy_timeout", LOCK_WAIT_MS)
        with database.atomic("IMMEDIATE"):
            yield
    elif isinstance(database, pw.PostgresqlDatabase):
        with database.atomic():
            database.execute_sql("SELECT pg_advisory_xact_lock(%s)", (PG_LOCK_KEY,))  # type: ignore[no-untyped-call]  # freed at COMMIT
            yield
    else:  # other Peewee back ends: one transaction, no lock between processes
        with database.atomic():
            yield


def upgrade(database: pw.Database, models: Sequence[type[pw.Model]],
            migrations: Sequence[Migration] = MIGRATIONS) -> int:
    """Bring `database` to the latest version of `migrations`; return that version."""
    steps = _checked(migrations)
    target = steps[-1].version
    with _schema_lock(database), database.bind_ctx([SchemaVersion]):
        if not database.table_exists(SchemaVersion._meta.table_name):
            SchemaVersion.create_table(safe=True)
        row = SchemaVersion.select().order_by(SchemaVersion.version.desc()).first()
        if row is not None:
            current = row.version
        elif any(database.table_exists(m._meta.table_name) for m in models):
            current = 1
            log.info("database made by a release before schema versions: taken as version 1")
        else:
            current = 0  # fresh
        if current > target:
            raise SchemaTooNew(
                f"the database schema is version {current}, but this ollama-fleet knows versions up to "
                f"{target} only: it was upgraded by a newer release. Run that release (or newer), or "
                f"restore a backup taken before the upgrade.")
        if current == 0:
            database.create_tables(list(models), safe=True)
            log.info("database created at schema version %d", target)
        else:
            migrator = SchemaMigrator.from_database(database)
            for step in steps:
                if step.version > current:
                    log.info("schema migration %d: %s", step.version, step.name)
                    step.apply(migrator)
            # Only the tables that are missing: CREATE INDEX IF NOT EXISTS on a table in use takes a lock that
            # deadlocks with another controller's writes (several controllers share the database).
            missing = [m for m in models if not database.table_exists(m._meta.table_name)]
            if missing:
                database.create_tables(missing, safe=True)
            if current < target:
                log.info("database schema upgraded from version %d to %d", current, target)
        if current != target or row is None:
            SchemaVersion.delete().execute()
            SchemaVersion.create(version=target, applied_at=time.time())
    return target
