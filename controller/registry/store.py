"""Database access off the event loop: one writer thread (batched, in order) and a few reader threads."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import peewee as pw
from playhouse.pool import MaxConnectionsExceeded

from ollama_fleet.controller.db import (POOL_HEADROOM, Agent, Event, Gpu, InstalledModel, MetricSample, close_db, db,
                                        init_db)
from ollama_fleet.controller.registry.live import Batch

log = logging.getLogger("fleet.store")

T = TypeVar("T")
CHUNK = 200  # rows per INSERT: well under SQLite's bound-variable limit
WRITER_THREADS = 1  # one writer: batches are written in order
READER_THREADS = 4
# Connection-level failures (database locked or busy, server gone, no pooled connection free in time): the
# batch goes back to the registry and is written next time. Anything else (encoding, integrity, overflow,
# value errors) is about a row.
TRANSIENT = (pw.OperationalError, pw.InterfaceError, MaxConnectionsExceeded)


def transient(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT)


@dataclass
class BatchStats:
    """Rows apply_batch refused to write (logged each time), across the Store's lifetime."""

    dropped: int = 0


class Store:
    def __init__(self, url: str) -> None:
        self.url = url
        # a pooled database (PostgreSQL): a connection for each of our threads, and a few for others
        self.database = init_db(url, max_connections=WRITER_THREADS + READER_THREADS + POOL_HEADROOM)
        self._writer = ThreadPoolExecutor(WRITER_THREADS, thread_name_prefix="fleet-db-writer")
        self._readers = ThreadPoolExecutor(READER_THREADS, thread_name_prefix="fleet-db-reader")
        self.flushes = 0
        self.rows_written = 0
        self.stats = BatchStats()

    @property
    def rows_dropped(self) -> int:
        """Rows the database refused (a bad row is dropped so the rest of its batch is written)."""
        return self.stats.dropped

    async def _run(self, pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
        def call() -> T:
            with self.database.connection_context():
                return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(pool, call)

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._run(self._readers, fn, *args)

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._run(self._writer, fn, *args)

    async def flush(self, batch: Batch) -> None:
        """Write `batch`; also a barrier: returns only after every earlier write has finished, so a
        reader that flushes first sees what a concurrent periodic flush was still writing."""
        if batch:
            self.rows_written += await self.write(apply_batch, batch, self.stats)
            self.flushes += 1
        else:
            await asyncio.get_running_loop().run_in_executor(self._writer, lambda: None)

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        close_db(self.database)


def _chunks(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    return [rows[i:i + CHUNK] for i in range(0, len(rows), CHUNK)]


def apply_batch(batch: Batch, stats: BatchStats | None = None) -> int:
    """One transaction per flush: coalesced agent upserts, replaced GPU/model sets, appended logs.

    Returns the rows written. If the database refuses the batch for a reason other than a transient
    one, it is written again part by part (halving the failing part down to single rows, each try in
    its own savepoint): a bad row is logged, counted in `stats.dropped` and left out, the rest is
    written. So one poisoned row can never make every later flush fail. Transient errors (TRANSIENT)
    are raised for the caller to requeue the batch."""
    stats = stats if stats is not None else BatchStats()
    try:
        with db.atomic():
            return sum(write(items) for _, items, write, _ in _sections(batch) if items)
    except Exception as exc:
        if transient(exc):
            raise
        log.warning("registry batch refused by the database (%r); writing it in parts to find the bad rows", exc)
    with db.atomic():
        return sum(_bisect(name, items, write, size, stats) for name, items, write, size in _sections(batch))


Section = tuple[str, Sequence[Any], Callable[[Sequence[Any]], int], Callable[[Sequence[Any]], int]]


def _sections(batch: Batch) -> list[Section]:
    """(name, items, write(items) -> rows written, size(items) -> rows they hold), in write order."""
    one: Callable[[Sequence[Any]], int] = len
    sets: Callable[[Sequence[Any]], int] = lambda items: sum(max(1, len(s)) for _, s in items)
    return [
        ("deleted agent", batch.deleted, _delete_nodes, one),
        ("agent", batch.agents, _upsert_agents, one),
        ("heartbeat", batch.beats, _write_beats, one),
        ("gpu", list(batch.gpus.items()), lambda items: _replace_sets(Gpu, items), sets),
        ("model", list(batch.models.items()), lambda items: _replace_sets(InstalledModel, items), sets),
        ("metric sample", batch.samples, _insert_samples, one),
        ("event", batch.events, _insert_events, one),
    ]


def _bisect(name: str, items: Sequence[Any], write: Callable[[Sequence[Any]], int],
            size: Callable[[Sequence[Any]], int], stats: BatchStats) -> int:
    if not items:
        return 0
    try:
        with db.atomic():  # a savepoint: a failure undoes only this part (PostgreSQL needs it to go on)
            return write(items)
    except Exception as exc:
        if transient(exc):
            raise
        if len(items) > 1:
            mid = len(items) // 2
            return _bisect(name, items[:mid], write, size, stats) + _bisect(name, items[mid:], write, size, stats)
        stats.dropped += size(items)
        log.error("dropped %d %s row(s) the database refuses (%d dropped so far): %r; row: %.300r",
                  size(items), name, stats.dropped, exc, items[0])
        return 0


def save_settings(node: str, display_name: str | None, tags: list[str] | None, notes: str | None) -> int:
    """An operator's settings for an agent (None: unchanged), written by the controller that took them,
    leader or not: the others' flushes leave these columns alone."""
    changed = {k: v for k, v in (("display_name", display_name), ("tags", tags), ("notes", notes)) if v is not None}
    return int(Agent.update(**changed).where(Agent.node_id == node).execute()) if changed else 0


def delete_nodes(nodes: Sequence[str]) -> int:
    """An operator's delete, written at once by the controller that took it."""
    return _delete_nodes(nodes)


def _delete_nodes(nodes: Sequence[str]) -> int:
    for model in (Agent, Gpu, InstalledModel, MetricSample):
        model.delete().where(model.node_id.in_(list(nodes))).execute()
    return 0  # deletions are not rows written


OPERATOR_COLUMNS = ("display_name", "tags", "notes")  # an operator's: written by save_settings, not by flushes


def _upsert_agents(rows: Sequence[dict[str, Any]]) -> int:
    # the operator's columns only on insert: a flush from a registry that missed an operator's change
    # (several controllers) must not undo it; save_settings writes them
    preserve = [f for f in Agent._meta.sorted_fields if f.name != "node_id" and f.name not in OPERATOR_COLUMNS]
    for chunk in _chunks(list(rows)):
        Agent.insert_many(chunk).on_conflict(conflict_target=[Agent.node_id], preserve=preserve).execute()
    return len(rows)


def _write_beats(beats: Sequence[tuple[float, str, str]]) -> int:
    # executemany on the driver's cursor: no per-row query building while holding the GIL
    p = db.obj.param
    sql = f"UPDATE agent SET last_seen = {p}, metrics = {p} WHERE node_id = {p}"
    db.obj.cursor().executemany(sql, list(beats))
    return len(beats)


def _replace_sets(model: Any, sets: Sequence[tuple[str, list[dict[str, Any]]]]) -> int:
    """A node's whole GPU (or model) list replaces the stored one, in one piece."""
    model.delete().where(model.node_id.in_([node for node, _ in sets])).execute()
    fields = {f.name for f in model._meta.sorted_fields} - {"id"}
    rows = [{k: v for k, v in {**item, "node_id": node, "gpu_index": item.get("index")}.items() if k in fields}
            for node, items in sets for item in items]
    for chunk in _chunks(rows):
        model.insert_many(chunk).execute()
    return len(rows)


def _insert_samples(samples: Sequence[dict[str, Any]]) -> int:
    # many rows, every flush: executemany, like the heartbeats
    p = db.obj.param
    cols = ("node_id", "ts", "cpu", "mem", "gpu_util", "gpu_mem_used", "gpu_mem_total")
    sql = f"INSERT INTO {MetricSample._meta.table_name} ({', '.join(cols)}) VALUES ({', '.join([p] * len(cols))})"
    db.obj.cursor().executemany(sql, [tuple(r[c] for c in cols) for r in samples])
    return len(samples)


def _insert_events(events: Sequence[dict[str, Any]]) -> int:
    for chunk in _chunks(list(events)):
        Event.insert_many(chunk).execute()
    return len(events)


def load_registry() -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    gpus = [{**{k: v for k, v in g.items() if k != "gpu_index"}, "index": g["gpu_index"]} for g in _rows(Gpu.select())]
    return _rows(Agent.select()), gpus, _rows(InstalledModel.select())


def _rows(query: Any) -> list[dict[str, Any]]:
    """Rows as plain dicts (peewee's stubs type `.dicts()` as model instances)."""
    return cast(list[dict[str, Any]], list(query.dicts()))


def prune(metrics_before: float, events_before: float) -> int:
    n: int = MetricSample.delete().where(MetricSample.ts < metrics_before).execute()
    m: int = Event.delete().where(Event.ts < events_before).execute()
    return n + m


def query_events(node: str | None, kind: str | None, since: float | None, limit: int,
                 before_id: int | None = None) -> list[dict[str, Any]]:
    q = Event.select().order_by(Event.id.desc()).limit(limit)
    if node:
        q = q.where(Event.node_id == node)
    if kind:
        q = q.where(Event.kind == kind)
    if since:
        q = q.where(Event.ts >= since)
    if before_id:
        q = q.where(Event.id < before_id)
    return _rows(q)


def query_metrics(node: str, since: float) -> list[dict[str, Any]]:
    q = (MetricSample.select().where((MetricSample.node_id == node) & (MetricSample.ts >= since))
         .order_by(MetricSample.ts))
    return [{k: v for k, v in r.items() if k not in ("id", "node_id")} for r in _rows(q)]


def count_agents() -> int:
    return Agent.select().count()
