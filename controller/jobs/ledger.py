"""The job ledger: every model job in the fleet, from its creation to its outcome, in memory and in the DB.

A job is one verb on one agent. The controller creates jobs (API, Ollama API, auto-distribution, the
MQTT `distribute` command) and learns the ones scripts send straight to an agent from their retained
status topic. It holds pulls as `pending` until a fleet slot (`max_concurrent_pulls`) and an agent slot
(the agent's `pull_concurrency`) are free, and an agent is online; dispatches them as MQTT commands;
applies the agent's status documents in `seq` order; fails jobs that go quiet for
`job_step_timeout`; re-sends the command when an agent comes back with a new session (a restarted
agent starts it again and Ollama resumes the download where it stopped; a running one just re-publishes);
persists in batches and clears each retained job topic once its final status is in the database.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any

import aiomqtt

from ollama_fleet.contract.model_names import normalize
from ollama_fleet.settings import Config

from ollama_fleet.controller.jobs import store as js
from ollama_fleet.controller.hub import Hub
from ollama_fleet.controller.registry.ingest import Ingest
from ollama_fleet.controller.jobs.store import COLUMNS, STATUSES, TERMINAL, job_json
from ollama_fleet.controller.registry.live import AgentRecord, Registry

log = logging.getLogger("fleet.jobs")

# module level so tests can shrink them
LEDGER_TICK = 0.25  # seconds between scans for dispatchable and timed-out jobs (in memory, cheap)
RECENT_KEPT = 5000  # finished jobs kept in memory for quick reads and late duplicates
PRUNE_EVERY = 600.0

DISPATCHED_VERBS = ("model.pull", "model.delete")  # verbs the controller can (re-)send


@dataclass
class JobRec:
    task_id: str
    job_id: str
    node_id: str
    verb: str
    model: str | None
    args: dict[str, Any]
    origin: str
    status: str = "pending"
    progress: float | None = 0.0
    completed: int | None = None
    total: int | None = None
    speed: float | None = None
    eta: float | None = None
    phase: str | None = None
    error_code: str | None = None
    error: str | None = None
    seq: int = 0
    session: str | None = None
    group_id: str | None = None
    queue_if_offline: bool = False
    attempts: int = 0
    created_at: float = field(default_factory=time.time)
    dispatched_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float = field(default_factory=time.time)
    # runtime only
    layers: dict[str, list[int]] = field(default_factory=dict)
    last_heard: float = field(default_factory=time.monotonic)  # dispatch or last status (monotonic)
    cancel_requested: bool = False
    persisted: bool = True  # False only while submit() writes it: not dispatched before that

    @property
    def key(self) -> tuple[str, str]:
        return self.node_id, self.job_id

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    @property
    def held(self) -> bool:
        """Still with the controller: not sent to the agent yet."""
        return self.dispatched_at is None and not self.done

    def row(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in COLUMNS}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> JobRec:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in row.items() if k in names})

    def to_json(self) -> dict[str, Any]:
        return job_json(self.row())


def _as_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _as_num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class JobLedger:
    def __init__(self, cfg: Config, registry: Registry, ingest: Ingest, hub: Hub) -> None:
        self.cfg = cfg
        self.registry, self.ingest, self.hub = registry, ingest, hub
        self.cap = max(1, int(cfg.get("max_concurrent_pulls") or 10))
        self.step_timeout = float(cfg.get("job_step_timeout") or 120.0)
        self.active: dict[tuple[str, str], JobRec] = {}
        self.recent: collections.OrderedDict[tuple[str, str], JobRec] = collections.OrderedDict()
        self.by_task: dict[str, JobRec] = {}
        self.counters: collections.Counter[str] = collections.Counter()
        self.store: Any = None
        self.ready = False
        self._early: list[tuple[str, str, dict[str, Any]]] = []  # statuses seen before the ledger loaded
        self._learning: dict[tuple[str, str], dict[str, Any] | None] = {}  # key -> latest doc while looked up
        self._dirty: set[str] = set()
        self._to_clear: list[tuple[str, str]] = []
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self._last_flush = 0.0
        self._last_prune = 0.0
        self._pump_due = False

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self, store: Any) -> None:
        self.store = store
        rows = await store.read(js.load_unfinished)
        now = time.monotonic()
        for row in rows:
            rec = JobRec.from_row(row)
            rec.last_heard = now  # a fresh step timeout: the agents report again after our restart
            self._index(rec)
        self.ready = True
        log.info("job ledger loaded: %d unfinished jobs", len(rows))
        early, self._early = self._early, []
        for node, job_id, doc in early:
            self.apply(node, job_id, doc)
        self._tasks = [asyncio.create_task(self._loop(), name="fleet-jobs")]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.flush()

    def _index(self, rec: JobRec) -> None:
        self.by_task[rec.task_id] = rec
        if rec.done:
            self.active.pop(rec.key, None)
            self.recent[rec.key] = rec
            self.recent.move_to_end(rec.key)
            while len(self.recent) > RECENT_KEPT:
                _, old = self.recent.popitem(last=False)
                if self.by_task.get(old.task_id) is old and old.task_id not in self._dirty:
                    del self.by_task[old.task_id]
        else:
            self.active[rec.key] = rec

    # ---- creating jobs ---------------------------------------------------------------------
    def new(self, node: str, verb: str, args: dict[str, Any], origin: str, group: str | None = None,
            queue_if_offline: bool = False) -> JobRec:
        job_id = uuid.uuid4().hex
        return JobRec(task_id=job_id, job_id=job_id, node_id=node, verb=verb, model=args.get("model"),
                      args=args, origin=origin, group_id=group, queue_if_offline=queue_if_offline,
                      phase="queued")

    async def submit(self, recs: list[JobRec]) -> None:
        """Persist before answering (a controller restart loses no accepted job), then dispatch."""
        if not recs:
            return
        for rec in recs:  # indexed at once so a concurrent identical request finds them (find_active)...
            rec.persisted = False
            self._index(rec)
        try:
            await self.store.write(js.upsert, [r.row() for r in recs])
        except BaseException:
            for rec in recs:
                self.active.pop(rec.key, None)
                self.by_task.pop(rec.task_id, None)
            raise
        for rec in recs:  # ...but dispatched only once they are in the database
            rec.persisted = True
            self._publish(rec)
        self.pump()

    def find_active(self, node: str, verb: str, model: str) -> JobRec | None:
        """An unfinished job doing the same thing: a second pull of one model would only race the first."""
        wanted = normalize(model)
        for rec in self.active.values():
            if rec.node_id == node and rec.verb == verb and rec.model and normalize(rec.model) == wanted:
                return rec
        return None

    # ---- dispatching -----------------------------------------------------------------------
    def running_pulls(self) -> list[JobRec]:
        return [r for r in self.active.values() if r.verb == "model.pull" and not r.held]

    @staticmethod
    def agent_slots(a: AgentRecord) -> int:
        jobs = a.info.get("jobs")
        n = jobs.get("pull_concurrency") if isinstance(jobs, dict) else None
        return n if isinstance(n, int) and n > 0 else 1

    def pump(self) -> None:
        """Dispatch every held job that may start now, oldest first."""
        self._pump_due = False
        held = sorted((r for r in self.active.values() if r.held and r.persisted), key=lambda r: r.created_at)
        if not held or not self.ready:
            return
        running = self.running_pulls()
        per_agent = collections.Counter(r.node_id for r in running)
        for rec in held:
            a = self.registry.agents.get(rec.node_id)
            if a is None:
                self._end_locally(rec, "failed", "agent_gone", f"agent {rec.node_id} was deleted before the job started")
                continue
            if not a.routable:
                if rec.queue_if_offline:
                    self._phase(rec, f"waiting for {rec.node_id} to come online ({a.status})")
                else:
                    self._end_locally(rec, "failed", "agent_offline",
                                      f"agent {rec.node_id} is {a.status}: the job did not start "
                                      "(queue_if_offline waits for it to come back)")
                continue
            if self.ingest.client is None:
                self._phase(rec, "waiting for the broker")
                continue
            if rec.verb == "model.pull":
                if len(running) >= self.cap:
                    self._phase(rec, f"waiting for a fleet pull slot ({self.cap} running: max_concurrent_pulls)")
                    continue
                if per_agent[rec.node_id] >= self.agent_slots(a):
                    self._phase(rec, f"waiting for a pull slot on {rec.node_id}")
                    continue
                running.append(rec)
                per_agent[rec.node_id] += 1
            self._dispatch(rec)

    def _dispatch(self, rec: JobRec, why: str = "dispatched") -> None:
        rec.dispatched_at = rec.dispatched_at or time.time()
        rec.attempts += 1
        rec.last_heard = time.monotonic()
        rec.phase = why
        self._touch(rec)
        asyncio.get_running_loop().create_task(self._send(rec))

    async def _send(self, rec: JobRec) -> None:
        payload = {"job_id": rec.job_id, **rec.args, "origin": rec.origin}
        try:
            await self.ingest.publish_command(rec.node_id, rec.verb, payload)
            self.counters["dispatched"] += 1
        except aiomqtt.MqttError as e:
            log.warning("could not send %s for job %s: %s", rec.verb, rec.task_id, e)
            if rec.seq == 0 and not rec.done:  # never acknowledged: hold it again
                rec.dispatched_at = None
                self._phase(rec, "broker unavailable, will retry")

    def _phase(self, rec: JobRec, phase: str) -> None:
        if rec.phase != phase:
            rec.phase = phase
            self._touch(rec)

    def agent_event(self, kind: str, node: str | None) -> None:
        """Registry events that change what can run: the hub consumer calls this."""
        if node is None:
            return
        if kind in ("online", "reconnected"):
            self._resend(node)
        if kind == "deleted":
            for rec in [r for r in self.active.values() if r.node_id == node]:
                self._end_locally(rec, "failed", "agent_gone", f"agent {node} was deleted")
        if kind in ("registered", "online", "reconnected", "ollama_up"):
            self._pump_due = True

    def _resend(self, node: str) -> None:
        """The agent has a new session: a restarted agent forgot its jobs, so send them again.

        A running agent treats the repeat as a duplicate and re-publishes; a restarted one starts the job
        again, and Ollama resumes the download from the blobs it already has.
        """
        a = self.registry.agents.get(node)
        for rec in list(self.active.values()):
            if (rec.node_id == node and not rec.held and rec.verb in DISPATCHED_VERBS and a is not None
                    and rec.session != a.session):
                if rec.cancel_requested:
                    self._end_locally(rec, "cancelled", "cancelled", "cancelled while the agent was away")
                    continue
                log.info("re-sending job %s to %s (new session)", rec.task_id, node)
                self._dispatch(rec, "re-sent after the agent reconnected")

    # ---- status from agents (the ingest job handler; runs in the MQTT loop, stays cheap) -------
    def apply(self, node: str, job_id: str, doc: dict[str, Any]) -> str | None:
        if not self.ready:
            self._early.append((node, job_id, doc))
            return None
        key = (node, job_id)
        version = _as_int(doc.get("seq"))
        if version is None:
            return "job_without_seq"
        if key in self._learning:
            self._learning[key] = doc  # the lookup below applies the latest one
            return None
        rec = self.active.get(key) or self.recent.get(key)
        if rec is None:
            self._learning[key] = None
            asyncio.get_running_loop().create_task(self._learn(node, job_id, doc))
            return None
        if rec.done:
            self._clear_later(rec)  # a late copy, or a duplicate command re-published a finished job
            return "finished_job"
        if not self._newer(rec, doc, version):
            return "stale_job_update"
        self._apply(rec, doc, version)
        return None

    def _newer(self, rec: JobRec, doc: dict[str, Any], version: int) -> bool:
        session = doc.get("session")
        if isinstance(session, str) and rec.session and session != rec.session:
            a = self.registry.agents.get(rec.node_id)
            return a is not None and session == a.session  # the agent's current connection numbers anew
        return version > rec.seq

    def _apply(self, rec: JobRec, doc: dict[str, Any], version: int) -> None:
        now = time.time()
        status = str(doc["status"]) if doc.get("status") in STATUSES else rec.status
        rec.seq = version
        if isinstance(doc.get("session"), str):
            rec.session = doc["session"]
        for name in ("progress", "speed", "eta"):
            if name in doc:
                setattr(rec, name, _as_num(doc[name]))
        for name in ("completed", "total"):
            if name in doc:
                setattr(rec, name, _as_int(doc[name]))
        if isinstance(doc.get("phase"), str) or doc.get("phase") is None and "phase" in doc:
            rec.phase = doc["phase"][:255] if doc.get("phase") else None  # agent text into VARCHAR(255)
        if isinstance(doc.get("layers"), dict):
            rec.layers = doc["layers"]
        err = doc.get("error")
        if isinstance(err, str) and err:
            rec.error = err[:2000]
            code = doc.get("error_code")
            if not isinstance(code, str) or not code:  # another agent: a rejection starts with its code
                head = err.split(":", 1)[0]
                code = head if status == "rejected" and head.isidentifier() else status
            rec.error_code = code[:32]
        elif isinstance(err, dict):  # tolerate the structured form {code, message}
            rec.error_code, rec.error = str(err.get("code") or status)[:32], str(err.get("message") or "")[:2000]
        if status == "in_progress" and rec.started_at is None:
            rec.started_at = _as_num(doc.get("started_at")) or now
        if rec.dispatched_at is None:
            rec.dispatched_at = now
        rec.status = status
        rec.last_heard = time.monotonic()
        if rec.done:
            rec.finished_at = _as_num(doc.get("finished_at")) or now
            if status == "completed":
                rec.progress = 1.0
            self._finished(rec, on_broker=True)
        else:
            self._touch(rec)

    async def _learn(self, node: str, job_id: str, doc: dict[str, Any]) -> None:
        """A status for a job we did not create (a script's command, an agent's own job): record it."""
        key = (node, job_id)
        try:
            row = await self.store.read(js.find, node, job_id)
            taken = row is None and await self.store.read(js.task_exists, job_id)
            # no await from here to _index(): two agents reporting one job id cannot both claim it
            if row is not None:
                rec = JobRec.from_row(row)
            else:
                task_id = f"{job_id}@{node}" if taken or job_id in self.by_task else job_id
                raw = doc.get("args")
                args: dict[str, Any] = raw if isinstance(raw, dict) else {}
                model = args.get("model")
                rec = JobRec(task_id=task_id, job_id=job_id, node_id=node, verb=str(doc.get("verb") or "unknown")[:32],
                             model=model[:255] if isinstance(model, str) else None, args=args,
                             origin=str(doc.get("origin") or "mqtt")[:32],
                             created_at=_as_num(doc.get("created_at")) or time.time(), dispatched_at=time.time())
                self.counters["learned"] += 1
                log.info("learned job %s on %s (%s %s, origin %s)", job_id, node, rec.verb, rec.model, rec.origin)
            latest = self._learning.pop(key, None) or doc
            if rec.done:
                self._index(rec)
                self._clear_later(rec)
                return
            self._index(rec)
            self._dirty.add(rec.task_id)
            version = _as_int(latest.get("seq")) or 0
            if self._newer(rec, latest, version) or rec.seq == 0:
                self._apply(rec, latest, version)
            else:
                self._touch(rec)
        except Exception:
            log.exception("could not record job %s on %s", job_id, node)
        finally:
            self._learning.pop(key, None)

    # ---- ending ----------------------------------------------------------------------------
    def _finished(self, rec: JobRec, on_broker: bool) -> None:
        rec.updated_at = time.time()
        self._index(rec)
        if on_broker:
            self._clear_later(rec)
        self._touch(rec)
        self._pump_due = True  # a slot freed

    def _end_locally(self, rec: JobRec, status: str, code: str, message: str) -> None:
        """Ends a job without the agent: it never started, or the agent cannot tell us any more."""
        rec.status, rec.error_code, rec.error = status, code, message
        rec.finished_at = time.time()
        log.warning("job %s on %s %s: %s", rec.task_id, rec.node_id, status, message)
        self._finished(rec, on_broker=rec.seq > 0)

    def cancel(self, rec: JobRec) -> None:
        if rec.done:
            return
        a = self.registry.agents.get(rec.node_id)
        if rec.held:
            self._end_locally(rec, "cancelled", "cancelled", "cancelled before it started")
        elif a is not None and a.state == "online" and self.ingest.client is not None:
            rec.cancel_requested = True
            self._phase(rec, "cancel requested")
            asyncio.get_running_loop().create_task(self._cancel_on_agent(rec))
        else:
            self._end_locally(rec, "cancelled", "cancelled",
                              f"cancelled while agent {rec.node_id} was unreachable; it may finish the download")

    async def _cancel_on_agent(self, rec: JobRec) -> None:
        try:
            await self.ingest.publish_command(rec.node_id, "job.cancel", {"job_id": rec.job_id})
        except aiomqtt.MqttError as e:
            self._end_locally(rec, "cancelled", "cancelled", f"cancelled; the broker was unavailable ({e})")

    def _timeouts(self) -> None:
        now = time.monotonic()
        for rec in list(self.active.values()):
            if not rec.held and now - rec.last_heard > self.step_timeout:
                quiet = now - rec.last_heard
                self._end_locally(rec, "failed", "timed_out",
                                  f"no status from agent {rec.node_id} for {quiet:.0f} s (job_step_timeout "
                                  f"{self.step_timeout:g} s)")
                if self.ingest.client is not None and rec.verb in DISPATCHED_VERBS:  # stop a zombie download
                    asyncio.get_running_loop().create_task(self._quiet_cancel(rec))

    async def _quiet_cancel(self, rec: JobRec) -> None:
        try:
            await self.ingest.publish_command(rec.node_id, "job.cancel", {"job_id": rec.job_id})
        except aiomqtt.MqttError:
            pass

    # ---- notification ----------------------------------------------------------------------
    def _touch(self, rec: JobRec) -> None:
        rec.updated_at = time.time()
        self._dirty.add(rec.task_id)
        self._publish(rec)

    def _publish(self, rec: JobRec) -> None:
        self.hub.publish("job", rec.to_json())
        for ev in self._waiters.get(rec.task_id, ()):
            ev.set()

    def watch(self, task_ids: Iterable[str]) -> asyncio.Event:
        """An event set whenever one of these jobs changes (the waiter clears it)."""
        ev = asyncio.Event()
        for t in task_ids:
            self._waiters.setdefault(t, set()).add(ev)
        return ev

    def unwatch(self, task_ids: Iterable[str], ev: asyncio.Event) -> None:
        for t in task_ids:
            waiters = self._waiters.get(t)
            if waiters is not None:
                waiters.discard(ev)
                if not waiters:
                    del self._waiters[t]

    # ---- persistence -----------------------------------------------------------------------
    def _clear_later(self, rec: JobRec) -> None:
        if rec.key not in self._to_clear:
            self._to_clear.append(rec.key)
        self._dirty.add(rec.task_id)  # cleared only after the row that holds the outcome is written

    async def flush(self) -> None:
        if self.store is None:
            return
        dirty, self._dirty = self._dirty, set()
        clear, self._to_clear = self._to_clear, []
        rows = [self.by_task[t].row() for t in dirty if t in self.by_task]
        try:
            if rows:
                await self.store.write(js.upsert, rows)
        except Exception:
            log.exception("job flush failed; retrying")
            self._dirty |= dirty
            self._to_clear = clear + self._to_clear
            return
        for node, job_id in clear:
            if self.ingest.client is None:
                self._to_clear.append((node, job_id))
                continue
            try:
                await self.ingest.client.publish(self.ingest.topics.job(node, job_id), b"", qos=1, retain=True)
                self.counters["cleared"] += 1
            except aiomqtt.MqttError:
                self._to_clear.append((node, job_id))

    async def _loop(self) -> None:
        flush_every = float(self.cfg.get("flush_interval") or 1.0)
        retention = float(self.cfg.get("event_retention_days") or 30.0) * 86400
        while True:
            await asyncio.sleep(LEDGER_TICK)
            try:
                self._timeouts()
                if self._pump_due or any(r.held for r in self.active.values()):
                    self.pump()
                now = time.monotonic()
                if now - self._last_flush >= flush_every:
                    self._last_flush = now
                    await self.flush()
                if now - self._last_prune >= PRUNE_EVERY:
                    self._last_prune = now
                    await self.store.write(js.prune, time.time() - retention)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("job ledger tick failed")

    # ---- reads -----------------------------------------------------------------------------
    async def get(self, task_id: str) -> dict[str, Any] | None:
        rec = self.by_task.get(task_id)
        if rec is not None:
            return rec.to_json()
        row = await self.store.read(js.get, task_id)
        return job_json(row) if row else None

    async def query(self, **filters: Any) -> tuple[list[dict[str, Any]], int]:
        await self.flush()  # read-your-writes: the database then holds every job
        rows, total = await self.store.read(js.query, filters)
        live = [self.by_task.get(r["task_id"]) for r in rows]
        return [rec.to_json() if rec else job_json(r) for rec, r in zip(live, rows)], total
