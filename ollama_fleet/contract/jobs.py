"""The job contract: verbs that create jobs, the statuses a job moves through, and which are final.

One place for both sides: the agent reports these statuses on `jobs/<job_id>`, the controller's ledger
and API accept and filter by them (specs/mqtt.md, "Jobs").
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class JobStatus(StrEnum):
    """A job's status, as carried in the retained `jobs/<job_id>` document and the API."""

    PENDING = "pending"  # controller side: accepted, not yet sent (agent offline, or waiting its turn)
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REJECTED = "rejected"  # the agent refused the command (bad payload, unknown verb or version)

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL: frozenset[JobStatus] = frozenset(
    {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.REJECTED})
STATUSES: tuple[str, ...] = tuple(s.value for s in JobStatus)  # API and query order

class JobVerb(StrEnum):
    """Command verbs that create a job on the agent (the others are fire-and-forget or fleet-level)."""

    PULL = "model.pull"
    DELETE = "model.delete"


JOB_VERBS: tuple[str, ...] = tuple(v.value for v in JobVerb)


@dataclass(kw_only=True)
class JobFigures:
    """The figures a job's status document carries (`jobs/<job_id>`, specs/schemas/job-status.json): the
    agent's job and the controller's record of it both hold them, so both extend this one definition."""

    status: JobStatus = JobStatus.PENDING
    seq: int = 0  # the document's version: newer replaces older
    progress: float | None = 0.0  # 0..1
    completed: int | None = None  # bytes
    total: int | None = None
    speed: float | None = None  # bytes/s
    eta: float | None = None  # seconds
    phase: str | None = None
    error: str | None = None
    error_code: str | None = None
