"""The job table and its queries (run on the store's threads; the ledger is controller/jobs/ledger.py)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, cast

import peewee as pw

from ollama_fleet.contract.jobs import TERMINAL, JobStatus
from ollama_fleet.controller.db import Base, JSONField, register_models
from ollama_fleet.controller.jobs.machine import CANCELLED_UNSENT

log = logging.getLogger("fleet.jobs")

UNFINISHED = tuple(s.value for s in JobStatus if not s.terminal)  # what the ledger loads at start
FINAL = tuple(s.value for s in TERMINAL)
CHUNK = 200  # rows per INSERT


class Job(Base):
    task_id = pw.CharField(unique=True, max_length=200)  # the API's id: job_id, or job_id@node when shared
    job_id = pw.CharField(max_length=128)
    node_id = pw.CharField(max_length=63, index=True)
    verb = pw.CharField(max_length=32)
    model = pw.CharField(null=True, index=True)
    args = JSONField(default=dict)
    origin = pw.CharField(max_length=32, index=True)
    status = pw.CharField(max_length=16, index=True)
    progress = pw.DoubleField(null=True)
    completed = pw.BigIntegerField(null=True)
    total = pw.BigIntegerField(null=True)
    speed = pw.DoubleField(null=True)
    eta = pw.DoubleField(null=True)
    phase = pw.CharField(null=True)
    error_code = pw.CharField(null=True, max_length=32)
    error = pw.TextField(null=True)
    seq = pw.IntegerField(default=0)
    session = pw.CharField(null=True, max_length=64)
    group_id = pw.CharField(null=True, max_length=64, index=True)
    queue_if_offline = pw.BooleanField(default=False)
    attempts = pw.IntegerField(default=0)
    created_at = pw.DoubleField(index=True)
    dispatched_at = pw.DoubleField(null=True)
    started_at = pw.DoubleField(null=True)
    finished_at = pw.DoubleField(null=True)
    updated_at = pw.DoubleField()

    class Meta:
        indexes = ((("node_id", "job_id"), True),)


register_models(Job)
COLUMNS = tuple(f.name for f in Job._meta.sorted_fields if f.name != "id")


def upsert(rows: list[dict[str, Any]]) -> int:
    """Insert or update, keyed by (node, job id); a row that holds an outcome is never changed again (with
    several controllers a writer may be behind: a follower cancelled the job, another leader ended it), nor
    its task id (two controllers may have named a script's job differently). A row the database refuses
    (a task id another job has) is logged and skipped, not allowed to block the others."""
    written = 0
    for i in range(0, len(rows), CHUNK):
        written += _upsert_chunk(rows[i:i + CHUNK])
    return written


_PRESERVE = [f for f in Job._meta.sorted_fields if f.name not in ("id", "task_id")]


def _upsert_chunk(rows: list[dict[str, Any]]) -> int:
    try:
        Job.insert_many(rows).on_conflict(conflict_target=[Job.node_id, Job.job_id], preserve=_PRESERVE,
                                          where=Job.status.not_in(FINAL)).execute()
        return len(rows)
    except pw.IntegrityError as e:
        if len(rows) == 1:
            log.error("job %s on %s not written: %s", rows[0].get("task_id"), rows[0].get("node_id"), e)
            return 0
        half = len(rows) // 2
        return _upsert_chunk(rows[:half]) + _upsert_chunk(rows[half:])


def cancel_unsent(task_id: str, now: float) -> int:
    """Cancel a job only if no one has sent it yet (a follower's cancel): 1 if it was, else 0."""
    return int(Job.update(status=JobStatus.CANCELLED.value, error_code="cancelled", error=CANCELLED_UNSENT,
                          finished_at=now, updated_at=now)
               .where((Job.task_id == task_id) & (Job.status == JobStatus.PENDING.value)
                      & Job.dispatched_at.is_null()).execute())


def load_unfinished() -> list[dict[str, Any]]:
    q = Job.select().where(Job.status.in_(UNFINISHED)).order_by(Job.created_at)
    return cast(list[dict[str, Any]], list(q.dicts()))


def rows_for(keys: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """The rows of these jobs, by (node, job id): another controller may have changed them (and may know a
    script's job under another task id)."""
    rows: list[dict[str, Any]] = []
    for i in range(0, len(keys), CHUNK):
        where = pw.Tuple(Job.node_id, Job.job_id).in_(keys[i:i + CHUNK])
        rows += cast(list[dict[str, Any]], list(Job.select().where(where).dicts()))
    return rows


def find(node: str, job_id: str) -> dict[str, Any] | None:
    q = Job.select().where((Job.node_id == node) & (Job.job_id == job_id))
    return cast(dict[str, Any] | None, q.dicts().first())


def task_exists(task_id: str) -> bool:
    return bool(Job.select().where(Job.task_id == task_id).exists())


def get(task_id: str) -> dict[str, Any] | None:
    return cast(dict[str, Any] | None, Job.select().where(Job.task_id == task_id).dicts().first())


def query(filters: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    q = Job.select()
    for name, column in (("agent", Job.node_id), ("status", Job.status), ("origin", Job.origin),
                         ("verb", Job.verb), ("group", Job.group_id)):
        values: Iterable[str] | None = filters.get(name)
        if values:
            q = q.where(column.in_(list(values)))
    if filters.get("model"):
        q = q.where(Job.model.in_(list(filters["model"])))
    if filters.get("since"):
        q = q.where(Job.created_at >= filters["since"])
    total = q.count()
    page = (q.order_by(Job.created_at.desc(), Job._meta.fields["id"].desc())
            .limit(filters.get("limit", 100)).offset(filters.get("offset", 0)))
    return cast(list[dict[str, Any]], list(page.dicts())), total


def prune(before: float) -> int:
    finished = Job.status.in_([s.value for s in TERMINAL])
    return int(Job.delete().where(finished & (Job.finished_at < before)).execute())
