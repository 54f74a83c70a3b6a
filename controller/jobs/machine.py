"""The job ledger's state machine: every job's record and how each input moves it, without I/O.

Inputs are plain values: jobs accepted by the API, a status document from an agent, a tick of the
ledger's loop, a cancel request, an agent event, a command that could not be sent. The time comes in as
an argument (`Now`), agents as read-only views. Every input returns the effects that the I/O loop
(controller/jobs/ledger.py) performs: send a command over MQTT, tell watchers, look a job up in the
database, log. Records are changed in place, because the API holds on to them while it waits.

The persistence outbox (rows changed since the last flush, retained job topics to clear once the row with
their outcome is written) is state kept here rather than an effect: whether a finished record may be
forgotten depends on it.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any, Protocol, TypeAlias

from ollama_fleet.contract.jobs import JOB_VERBS, STATUSES, JobFigures, JobStatus, JobVerb
from ollama_fleet.contract.model_names import normalize
from ollama_fleet.contract.status import AgentStatus

CANCELLED_UNSENT = "cancelled before it started"
RECENT_KEPT = 5000  # finished jobs kept in memory for quick reads and late duplicates

Key: TypeAlias = tuple[str, str]  # (node_id, job_id): a job as its agent knows it
Doc: TypeAlias = dict[str, Any]  # a status document from `jobs/<job_id>`


@dataclass(frozen=True)
class Now:
    """When an input happens: wall-clock time for the records, monotonic time for step timeouts."""

    wall: float
    mono: float


class AgentView(Protocol):
    """What the machine reads of an agent (the registry's AgentRecord provides it)."""

    @property
    def state(self) -> str: ...

    @property
    def session(self) -> str: ...

    @property
    def routable(self) -> bool: ...

    @property
    def status(self) -> str: ...

    @property
    def info(self) -> Mapping[str, Any]: ...


Agents: TypeAlias = Mapping[str, AgentView]

_RUNTIME = {"runtime": True}  # field metadata: kept in memory, not a column of the job table


@dataclass(kw_only=True)
class JobRec(JobFigures):
    task_id: str
    job_id: str
    node_id: str
    verb: str
    model: str | None
    args: dict[str, Any]
    origin: str
    session: str | None = None
    group_id: str | None = None
    queue_if_offline: bool = False
    attempts: int = 0
    created_at: float
    dispatched_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float
    # runtime only
    layers: dict[str, list[int]] = field(default_factory=dict, metadata=_RUNTIME)
    last_heard: float = field(default=0.0, metadata=_RUNTIME)  # dispatch or last status (monotonic)
    cancel_requested: bool = field(default=False, metadata=_RUNTIME)
    persisted: bool = field(default=True, metadata=_RUNTIME)  # False while submitted: not dispatched before

    @property
    def key(self) -> Key:
        return self.node_id, self.job_id

    @property
    def done(self) -> bool:
        return self.status.terminal

    @property
    def held(self) -> bool:
        """Still with the controller: not sent to the agent yet."""
        return self.dispatched_at is None and not self.done

    def row(self) -> dict[str, Any]:
        """The job table's columns (controller/jobs/store.py)."""
        row = {name: getattr(self, name) for name in ROW_FIELDS}
        row["status"] = self.status.value
        return row

    @classmethod
    def from_row(cls, row: Mapping[str, Any], heard: float) -> JobRec:
        """A record from a database row; `heard` starts its step timeout (monotonic)."""
        rec = cls(**{k: v for k, v in row.items() if k in ROW_FIELDS and k != "status"},
                  status=JobStatus(row["status"]))
        rec.last_heard = heard
        return rec

    def to_json(self) -> dict[str, Any]:
        return job_json(self.row())


ROW_FIELDS = frozenset(f.name for f in fields(JobRec) if not f.metadata.get("runtime"))


def job_json(row: Mapping[str, Any]) -> dict[str, Any]:
    """The API's task document, from a JobRec's row or a database row."""
    return {
        "id": row["task_id"], "job_id": row["job_id"], "agent_id": row["node_id"], "verb": row["verb"],
        "model": row["model"], "origin": row["origin"], "status": row["status"], "progress": row["progress"],
        "completed": row["completed"], "total": row["total"], "speed": row["speed"], "eta": row["eta"],
        "phase": row["phase"], "error": row["error"], "error_code": row["error_code"], "args": row["args"],
        "group": row["group_id"], "queue_if_offline": row["queue_if_offline"], "attempts": row["attempts"],
        "created_at": row["created_at"], "dispatched_at": row["dispatched_at"], "started_at": row["started_at"],
        "finished_at": row["finished_at"], "updated_at": row["updated_at"],
    }


def new_job(job_id: str, node: str, verb: str, args: dict[str, Any], origin: str, now: Now,
            group: str | None = None, queue_if_offline: bool = False) -> JobRec:
    """A job the controller creates: held (`pending`) until accepted and dispatched."""
    model = args.get("model")
    return JobRec(task_id=job_id, job_id=job_id, node_id=node, verb=verb,
                  model=model if isinstance(model, str) else None, args=args, origin=origin, group_id=group,
                  queue_if_offline=queue_if_offline, phase="queued", created_at=now.wall, updated_at=now.wall,
                  last_heard=now.mono)


def agent_slots(a: AgentView) -> int:
    """Pulls an agent runs at once (its announced `jobs.pull_concurrency`, else one)."""
    jobs = a.info.get("jobs")
    n = jobs.get("pull_concurrency") if isinstance(jobs, dict) else None
    return n if isinstance(n, int) and n > 0 else 1


def _as_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _as_num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# ---- effects ---------------------------------------------------------------------------------------
class Purpose(StrEnum):
    """Why a command is sent, which decides what its failure means."""

    DISPATCH = "dispatch"  # start (or re-send) the job: a failure holds it again
    CANCEL = "cancel"  # the user cancels it: a failure ends it here
    STOP = "stop"  # it timed out here: stop a zombie download, failures do not matter


@dataclass(frozen=True)
class Command:
    """Publish `verb` with `payload` to the job's agent; report a failure with `send_failed`."""

    rec: JobRec
    verb: str
    payload: dict[str, Any]
    purpose: Purpose


@dataclass(frozen=True)
class Notify:
    """The job changed: tell the hub (dashboard, SSE) and anyone watching it."""

    rec: JobRec


@dataclass(frozen=True)
class Lookup:
    """A status for a job not in memory: look it up in the database, then call `learned`."""

    node: str
    job_id: str


@dataclass(frozen=True)
class Log:
    level: int
    text: str


Effect: TypeAlias = Command | Notify | Lookup | Log


@dataclass
class Outbox:
    """What a flush writes: the changed rows, then the retained topics whose outcome they hold."""

    dirty: set[str]
    rows: list[dict[str, Any]]
    clear: list[Key]


# ---- the machine -----------------------------------------------------------------------------------
class JobMachine:
    """Every job in memory: the unfinished ones, the latest finished ones, and what each input does."""

    def __init__(self, cap: int, step_timeout: float, recent_kept: int = RECENT_KEPT) -> None:
        self.cap = max(1, cap)  # fleet-wide pulls at once (max_concurrent_pulls)
        self.step_timeout = step_timeout
        self.recent_kept = recent_kept
        self.active: dict[Key, JobRec] = {}
        self.recent: collections.OrderedDict[Key, JobRec] = collections.OrderedDict()
        self.by_task: dict[str, JobRec] = {}
        self.counters: collections.Counter[str] = collections.Counter()
        self.dirty: set[str] = set()  # task ids whose row changed since the last flush
        self.to_clear: list[Key] = []  # retained job topics to clear once their outcome is written
        self.learning: dict[Key, Doc] = {}  # unknown jobs being looked up -> the latest status document
        self.pump_due = False  # something freed a slot or brought an agent: try the held jobs

    # ---- the index -------------------------------------------------------------------------
    def _index(self, rec: JobRec) -> None:
        self.by_task[rec.task_id] = rec
        if rec.done:
            self.active.pop(rec.key, None)
            self.recent[rec.key] = rec
            self.recent.move_to_end(rec.key)
            while len(self.recent) > self.recent_kept:
                _, old = self.recent.popitem(last=False)
                if self.by_task.get(old.task_id) is old and old.task_id not in self.dirty:
                    del self.by_task[old.task_id]
        else:
            self.active[rec.key] = rec

    def load(self, rows: Iterable[Mapping[str, Any]], now: Now) -> None:
        """The unfinished jobs of the database, at start: each gets a fresh step timeout, because the
        agents report again after a controller restart."""
        for row in rows:
            self._index(JobRec.from_row(row, heard=now.mono))

    def find_active(self, node: str, verb: str, model: str) -> JobRec | None:
        """An unfinished job doing the same thing: a second pull of one model would only race the first."""
        wanted = normalize(model)
        for rec in self.active.values():
            if rec.node_id == node and rec.verb == verb and rec.model and normalize(rec.model) == wanted:
                return rec
        return None

    def running_pulls(self) -> list[JobRec]:
        return [r for r in self.active.values() if r.verb == JobVerb.PULL and not r.held]

    # ---- new jobs ----------------------------------------------------------------------------
    def accept(self, recs: Iterable[JobRec]) -> None:
        """Indexed at once, so that a concurrent identical request finds them (find_active), but not
        dispatched before `accepted`: a controller restart must not lose a job the agent runs."""
        for rec in recs:
            rec.persisted = False
            self._index(rec)

    def withdraw(self, recs: Iterable[JobRec]) -> None:
        """They could not be written: forget them."""
        for rec in recs:
            self.active.pop(rec.key, None)
            self.by_task.pop(rec.task_id, None)

    def accepted(self, recs: Iterable[JobRec]) -> list[Effect]:
        """They are in the database: they may be dispatched now (the caller pumps next)."""
        effects: list[Effect] = []
        for rec in recs:
            rec.persisted = True
            effects.append(Notify(rec))
        return effects

    # ---- dispatching -------------------------------------------------------------------------
    def pump(self, agents: Agents, broker_up: bool, now: Now) -> list[Effect]:
        """Dispatch every held job that may start now, oldest first; end those that never can."""
        self.pump_due = False
        effects: list[Effect] = []
        held = sorted((r for r in self.active.values() if r.held and r.persisted), key=lambda r: r.created_at)
        if not held:
            return effects
        running = self.running_pulls()
        per_agent = collections.Counter(r.node_id for r in running)
        for rec in held:
            a = agents.get(rec.node_id)
            if a is None:
                self._end_locally(rec, JobStatus.FAILED, "agent_gone",
                                  f"agent {rec.node_id} was deleted before the job started", now, effects)
                continue
            if not a.routable:
                if rec.queue_if_offline:
                    self._phase(rec, f"waiting for {rec.node_id} to come online ({a.status})", now, effects)
                else:
                    self._end_locally(rec, JobStatus.FAILED, "agent_offline",
                                      f"agent {rec.node_id} is {a.status}: the job did not start "
                                      "(queue_if_offline waits for it to come back)", now, effects)
                continue
            if not broker_up:
                self._phase(rec, "waiting for the broker", now, effects)
                continue
            if rec.verb == JobVerb.PULL:
                if len(running) >= self.cap:
                    why = f"waiting for a fleet pull slot ({self.cap} running: max_concurrent_pulls)"
                    self._phase(rec, why, now, effects)
                    continue
                if per_agent[rec.node_id] >= agent_slots(a):
                    self._phase(rec, f"waiting for a pull slot on {rec.node_id}", now, effects)
                    continue
                running.append(rec)
                per_agent[rec.node_id] += 1
            self._dispatch(rec, "dispatched", now, effects)
        return effects

    def _dispatch(self, rec: JobRec, why: str, now: Now, effects: list[Effect]) -> None:
        rec.dispatched_at = rec.dispatched_at or now.wall
        rec.attempts += 1
        rec.last_heard = now.mono
        rec.phase = why
        self._touch(rec, now, effects)
        effects.append(Command(rec, rec.verb, {"job_id": rec.job_id, **rec.args, "origin": rec.origin},
                               Purpose.DISPATCH))

    def send_failed(self, command: Command, error: str, now: Now) -> list[Effect]:
        """A command could not be published (the broker is unavailable)."""
        effects: list[Effect] = []
        rec = command.rec
        if rec.done:
            return effects
        if command.purpose is Purpose.DISPATCH and rec.seq == 0:  # never acknowledged: hold it again
            rec.dispatched_at = None
            self._phase(rec, "broker unavailable, will retry", now, effects)
        elif command.purpose is Purpose.CANCEL:
            self._end_locally(rec, JobStatus.CANCELLED, "cancelled",
                              f"cancelled; the broker was unavailable ({error})", now, effects)
        return effects

    def tick(self, agents: Agents, broker_up: bool, now: Now) -> list[Effect]:
        """The ledger loop's regular step: time out quiet jobs, then dispatch what may start."""
        effects = self.timeouts(broker_up, now)
        if self.pump_due or any(r.held for r in self.active.values()):
            effects += self.pump(agents, broker_up, now)
        return effects

    def timeouts(self, broker_up: bool, now: Now) -> list[Effect]:
        """Fail dispatched jobs whose agent said nothing for `step_timeout`, and tell the agent to stop."""
        effects: list[Effect] = []
        for rec in list(self.active.values()):
            quiet = now.mono - rec.last_heard
            if not rec.held and quiet > self.step_timeout:
                self._end_locally(rec, JobStatus.FAILED, "timed_out",
                                  f"no status from agent {rec.node_id} for {quiet:.0f} s (job_step_timeout "
                                  f"{self.step_timeout:g} s)", now, effects)
                if broker_up and rec.verb in JOB_VERBS:  # stop a zombie download
                    effects.append(Command(rec, "job.cancel", {"job_id": rec.job_id}, Purpose.STOP))
        return effects

    def agent_event(self, kind: str, node: str | None, agents: Agents, now: Now) -> list[Effect]:
        """A registry event that changes what can run."""
        effects: list[Effect] = []
        if node is None:
            return effects
        if kind in ("online", "reconnected"):
            self._resend(node, agents, now, effects)
        if kind == "deleted":
            for rec in [r for r in self.active.values() if r.node_id == node]:
                self._end_locally(rec, JobStatus.FAILED, "agent_gone", f"agent {node} was deleted", now,
                                  effects)
        if kind in ("registered", "online", "reconnected", "ollama_up"):
            self.pump_due = True
        return effects

    def _resend(self, node: str, agents: Agents, now: Now, effects: list[Effect]) -> None:
        """The agent has a new session: a restarted agent forgot its jobs, so send them again.

        A running agent treats the repeat as a duplicate and re-publishes; a restarted one starts the job
        again, and Ollama resumes the download from the blobs it already has.
        """
        a = agents.get(node)
        if a is None:
            return
        for rec in list(self.active.values()):
            if rec.node_id == node and not rec.held and rec.verb in JOB_VERBS and rec.session != a.session:
                if rec.cancel_requested:
                    self._end_locally(rec, JobStatus.CANCELLED, "cancelled",
                                      "cancelled while the agent was away", now, effects)
                    continue
                effects.append(Log(logging.INFO, f"re-sending job {rec.task_id} to {node} (new session)"))
                self._dispatch(rec, "re-sent after the agent reconnected", now, effects)

    # ---- status from agents --------------------------------------------------------------------
    def report(self, node: str, job_id: str, doc: Doc, agents: Agents,
               now: Now) -> tuple[str | None, list[Effect]]:
        """A status document from `jobs/<job_id>`: the reason it was ignored (or None), and the effects."""
        effects: list[Effect] = []
        key = (node, job_id)
        version = _as_int(doc.get("seq"))
        if version is None:
            return "job_without_seq", effects
        if key in self.learning:
            self.learning[key] = doc  # the lookup under way applies the latest one
            return None, effects
        rec = self.active.get(key) or self.recent.get(key)
        if rec is None:
            self.learning[key] = doc
            effects.append(Lookup(node, job_id))
            return None, effects
        if rec.done:
            self._clear_later(rec)  # a late copy, or a duplicate command re-published a finished job
            return "finished_job", effects
        if not self._newer(rec, doc, version, agents):
            return "stale_job_update", effects
        self._apply(rec, doc, version, now, effects)
        return None, effects

    def learned(self, node: str, job_id: str, row: Mapping[str, Any] | None, taken: bool, agents: Agents,
                now: Now) -> list[Effect]:
        """The lookup of a job not in memory ended: `row` is its database row, if any; `taken` says its
        job id is already another agent's task id. Without a row it is a job we did not create (a script's
        command, an agent's own job): record it."""
        effects: list[Effect] = []
        doc = self.learning.pop((node, job_id), None)
        if doc is None:
            return effects
        if row is not None:
            rec = JobRec.from_row(row, heard=now.mono)
        else:
            task_id = f"{job_id}@{node}" if taken or job_id in self.by_task else job_id
            raw = doc.get("args")
            args: dict[str, Any] = raw if isinstance(raw, dict) else {}
            model = args.get("model")
            rec = JobRec(task_id=task_id, job_id=job_id, node_id=node,
                         verb=str(doc.get("verb") or "unknown")[:32],
                         model=model[:255] if isinstance(model, str) else None, args=args,
                         origin=str(doc.get("origin") or "mqtt")[:32],
                         created_at=_as_num(doc.get("created_at")) or now.wall, dispatched_at=now.wall,
                         updated_at=now.wall, last_heard=now.mono)
            self.counters["learned"] += 1
            effects.append(Log(logging.INFO, f"learned job {job_id} on {node} ({rec.verb} {rec.model}, "
                                             f"origin {rec.origin})"))
        self._index(rec)
        if rec.done:
            self._clear_later(rec)
            return effects
        self.dirty.add(rec.task_id)
        version = _as_int(doc.get("seq")) or 0
        if self._newer(rec, doc, version, agents) or rec.seq == 0:
            self._apply(rec, doc, version, now, effects)
        else:
            self._touch(rec, now, effects)
        return effects

    def forget_lookup(self, node: str, job_id: str) -> None:
        """The lookup failed: the next status document starts another."""
        self.learning.pop((node, job_id), None)

    def _newer(self, rec: JobRec, doc: Doc, version: int, agents: Agents) -> bool:
        session = doc.get("session")
        if isinstance(session, str) and rec.session and session != rec.session:
            a = agents.get(rec.node_id)
            return a is not None and session == a.session  # the agent's current connection numbers anew
        return version > rec.seq

    def _apply(self, rec: JobRec, doc: Doc, version: int, now: Now, effects: list[Effect]) -> None:
        reported = doc.get("status")
        status = JobStatus(reported) if isinstance(reported, str) and reported in STATUSES else rec.status
        rec.seq = version
        session = doc.get("session")
        if isinstance(session, str):
            rec.session = session
        if "progress" in doc:
            rec.progress = _as_num(doc["progress"])
        if "speed" in doc:
            rec.speed = _as_num(doc["speed"])
        if "eta" in doc:
            rec.eta = _as_num(doc["eta"])
        if "completed" in doc:
            rec.completed = _as_int(doc["completed"])
        if "total" in doc:
            rec.total = _as_int(doc["total"])
        phase = doc.get("phase")
        if isinstance(phase, str) or phase is None and "phase" in doc:
            rec.phase = phase[:255] if phase else None  # agent text into VARCHAR(255)
        layers = doc.get("layers")
        if isinstance(layers, dict):
            rec.layers = layers
        err = doc.get("error")
        if isinstance(err, str) and err:
            rec.error = err[:2000]
            code = doc.get("error_code")
            if not isinstance(code, str) or not code:  # another agent: a rejection starts with its code
                head = err.split(":", 1)[0]
                code = head if status is JobStatus.REJECTED and head.isidentifier() else status.value
            rec.error_code = code[:32]
        elif isinstance(err, dict):  # tolerate the structured form {code, message}
            rec.error_code = str(err.get("code") or status.value)[:32]
            rec.error = str(err.get("message") or "")[:2000]
        if status is JobStatus.IN_PROGRESS and rec.started_at is None:
            rec.started_at = _as_num(doc.get("started_at")) or now.wall
        if rec.dispatched_at is None:
            rec.dispatched_at = now.wall
        rec.status = status
        rec.last_heard = now.mono
        if rec.done:
            rec.finished_at = _as_num(doc.get("finished_at")) or now.wall
            if status is JobStatus.COMPLETED:
                rec.progress = 1.0
            self._finished(rec, True, now, effects)
        else:
            self._touch(rec, now, effects)

    # ---- ending ------------------------------------------------------------------------------
    def cancel(self, rec: JobRec, agents: Agents, broker_up: bool, now: Now) -> list[Effect]:
        """A held job ends at once; a running one through its agent (`job.cancel`), if it can be reached."""
        effects: list[Effect] = []
        if rec.done:
            return effects
        a = agents.get(rec.node_id)
        if rec.held:
            self._end_locally(rec, JobStatus.CANCELLED, "cancelled", CANCELLED_UNSENT, now,
                              effects)
        elif a is not None and a.state == AgentStatus.ONLINE and broker_up:
            rec.cancel_requested = True
            self._phase(rec, "cancel requested", now, effects)
            effects.append(Command(rec, "job.cancel", {"job_id": rec.job_id}, Purpose.CANCEL))
        else:
            self._end_locally(rec, JobStatus.CANCELLED, "cancelled",
                              f"cancelled while agent {rec.node_id} was unreachable; it may finish the "
                              "download", now, effects)
        return effects

    def _finished(self, rec: JobRec, on_broker: bool, now: Now, effects: list[Effect]) -> None:
        self._index(rec)
        if on_broker:
            self._clear_later(rec)
        self._touch(rec, now, effects)
        self.pump_due = True  # a slot freed

    def _end_locally(self, rec: JobRec, status: JobStatus, code: str, message: str, now: Now,
                     effects: list[Effect]) -> None:
        """Ends a job without the agent: it never started, or the agent cannot tell us any more."""
        rec.status, rec.error_code, rec.error = status, code, message
        rec.finished_at = now.wall
        effects.append(Log(logging.WARNING, f"job {rec.task_id} on {rec.node_id} {status}: {message}"))
        self._finished(rec, rec.seq > 0, now, effects)  # an agent that reported it holds a retained status

    def _phase(self, rec: JobRec, phase: str, now: Now, effects: list[Effect]) -> None:
        if rec.phase != phase:
            rec.phase = phase
            self._touch(rec, now, effects)

    def _touch(self, rec: JobRec, now: Now, effects: list[Effect]) -> None:
        rec.updated_at = now.wall
        self.dirty.add(rec.task_id)
        effects.append(Notify(rec))

    # ---- several controllers (controller/cluster/leader.py) ------------------------------------
    def adopt(self, rows: Iterable[Mapping[str, Any]], now: Now) -> list[Effect]:
        """Rows another controller wrote, read back: the newer of row and record wins.

        A job not in memory joins (submitted through another controller; or, for a new leader, any
        unfinished job). A row that ended a job we hold unfinished ends it here too (the leader timed it
        out; a follower cancelled it before it started). A record newer than its row (we heard the agent's
        final status, the old leader died before writing it) is written again and its topic cleared."""
        effects: list[Effect] = []
        for row in rows:
            try:
                status = JobStatus(row["status"])
            except ValueError:  # written by a newer release (a rolling upgrade): not ours to judge
                self.counters["unknown_status"] += 1
                continue
            key = (row["node_id"], row["job_id"])
            rec = self.active.get(key) or self.recent.get(key)
            if rec is None:
                if not status.terminal and key not in self.learning:
                    rec = JobRec.from_row(row, heard=now.mono)
                    self._index(rec)
                    effects += [Notify(rec), Log(logging.INFO, f"adopted job {rec.task_id} ({rec.status})")]
                    self.pump_due = True
                continue
            if status.terminal and not rec.done:
                sent = not rec.held
                for name in ROW_FIELDS - {"status", "task_id"}:  # a script's job may have another task id here
                    setattr(rec, name, row[name])
                rec.status = status
                self._index(rec)
                effects.append(Notify(rec))
                if sent and rec.verb in JOB_VERBS:  # ended elsewhere while its agent may still run it: stop it
                    effects.append(Command(rec, "job.cancel", {"job_id": rec.job_id}, Purpose.STOP))
                self.pump_due = True
                continue
            if rec.dispatched_at is None and row["dispatched_at"] is not None:  # the leader sent it
                rec.dispatched_at, rec.last_heard = row["dispatched_at"], now.mono
            rec.attempts = max(rec.attempts, row["attempts"] or 0)
            if (rec.done and not status.terminal) or rec.seq > (_as_int(row["seq"]) or 0):
                self.dirty.add(rec.task_id)
                if rec.done and rec.seq > 0:
                    self._clear_later(rec)
        return effects

    # ---- the persistence outbox ----------------------------------------------------------------
    def _clear_later(self, rec: JobRec) -> None:
        if rec.key not in self.to_clear:
            self.to_clear.append(rec.key)
        self.dirty.add(rec.task_id)  # cleared only after the row that holds the outcome is written

    def drain(self) -> Outbox:
        """Take what the next flush writes and clears."""
        dirty, self.dirty = self.dirty, set()
        clear, self.to_clear = self.to_clear, []
        return Outbox(dirty, [self.by_task[t].row() for t in dirty if t in self.by_task], clear)

    def restore(self, outbox: Outbox) -> None:
        """The rows could not be written: write them (and clear their topics) next time."""
        self.dirty |= outbox.dirty
        self.to_clear = outbox.clear + self.to_clear

    def clear_again(self, key: Key) -> None:
        """A retained topic could not be cleared: try again at the next flush."""
        self.to_clear.append(key)
