"""Database access off the event loop: one writer thread (batched, in order) and a few reader threads."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar, cast

from .db import Agent, Event, Gpu, InstalledModel, MetricSample, db, init_db
from .registry import Batch

T = TypeVar("T")
CHUNK = 200  # rows per INSERT: well under SQLite's bound-variable limit


class Store:
    def __init__(self, url: str) -> None:
        self.url = url
        self.database = init_db(url)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="fleet-db-writer")
        self._readers = ThreadPoolExecutor(4, thread_name_prefix="fleet-db-reader")
        self.flushes = 0
        self.rows_written = 0

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
            self.rows_written += await self.write(apply_batch, batch)
            self.flushes += 1
        else:
            await asyncio.get_running_loop().run_in_executor(self._writer, lambda: None)

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        if not self.database.is_closed():
            self.database.close()


def _chunks(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    return [rows[i:i + CHUNK] for i in range(0, len(rows), CHUNK)]


def apply_batch(batch: Batch) -> int:
    """One transaction per flush: coalesced agent upserts, replaced GPU/model sets, appended logs."""
    written = 0
    with db.atomic():
        if batch.deleted:
            for model in (Agent, Gpu, InstalledModel, MetricSample):
                model.delete().where(model.node_id.in_(batch.deleted)).execute()
        preserve = [f for f in Agent._meta.sorted_fields if f.name != "node_id"]
        for rows in _chunks(batch.agents):
            Agent.insert_many(rows).on_conflict(conflict_target=[Agent.node_id], preserve=preserve).execute()
            written += len(rows)
        if batch.beats:
            # executemany on the driver's cursor: no per-row query building while holding the GIL
            p = db.obj.param
            sql = f"UPDATE agent SET last_seen = {p}, metrics = {p} WHERE node_id = {p}"
            db.obj.cursor().executemany(sql, batch.beats)
            written += len(batch.beats)
        for model, sets in ((Gpu, batch.gpus), (InstalledModel, batch.models)):
            if not sets:
                continue
            model.delete().where(model.node_id.in_(list(sets))).execute()
            fields = {f.name for f in model._meta.sorted_fields} - {"id"}
            rows = [{k: v for k, v in {**item, "node_id": node, "gpu_index": item.get("index")}.items() if k in fields}
                    for node, items in sets.items() for item in items]
            for chunk in _chunks(rows):
                model.insert_many(chunk).execute()
            written += len(rows)
        if batch.samples:  # many rows, every flush: executemany, like the heartbeats
            p = db.obj.param
            cols = ("node_id", "ts", "cpu", "mem", "gpu_util", "gpu_mem_used", "gpu_mem_total")
            sql = (f"INSERT INTO {MetricSample._meta.table_name} ({', '.join(cols)}) "
                   f"VALUES ({', '.join([p] * len(cols))})")
            db.obj.cursor().executemany(sql, [tuple(r[c] for c in cols) for r in batch.samples])
            written += len(batch.samples)
        for chunk in _chunks(batch.events):
            Event.insert_many(chunk).execute()
        written += len(batch.events)
    return written


def load_registry() -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    gpus = [{**{k: v for k, v in g.items() if k != "gpu_index"}, "index": g["gpu_index"]} for g in _rows(Gpu.select())]
    return _rows(Agent.select()), gpus, _rows(InstalledModel.select())


def _rows(query: Any) -> list[dict[str, Any]]:
    """Rows as plain dicts (peewee's stubs type `.dicts()` as model instances)."""
    return cast(list[dict[str, Any]], list(query.dicts()))


def prune(metrics_before: float, events_before: float) -> int:
    n = MetricSample.delete().where(MetricSample.ts < metrics_before).execute()
    return n + Event.delete().where(Event.ts < events_before).execute()


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
