"""The job ledger: every model job in the fleet, from its creation to its outcome, in memory and in the DB.

A job is one verb on one agent. The controller creates jobs (API, Ollama API, auto-distribution, the
MQTT `distribute` command) and learns the ones scripts send straight to an agent from their retained
status topic. It holds pulls as `pending` until a fleet slot (`max_concurrent_pulls`) and an agent slot
(the agent's `pull_concurrency`) are free, and an agent is online; dispatches them as MQTT commands;
applies the agent's status documents in `seq` order; fails jobs that go quiet for
`job_step_timeout`; re-sends the command when an agent comes back with a new session (a restarted
agent starts it again and Ollama resumes the download where it stopped; a running one just re-publishes);
persists in batches and clears each retained job topic once its final status is in the database.

What happens to a job is decided by the pure state machine in controller/jobs/machine.py; this module is
its I/O loop: it feeds the machine its inputs with the time and the registry's agents, and performs the
effects it returns (MQTT commands through ingest, the database through the store, waiters, hub events).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

import aiomqtt

from ollama_fleet.controller.hub import Hub
from ollama_fleet.controller.jobs import store as js
from ollama_fleet.controller.jobs.machine import (
    Command,
    Doc,
    Effect,
    JobMachine,
    JobRec,
    Key,
    Log,
    Lookup,
    Notify,
    Now,
    Outbox,
    Purpose,
    job_json,
    new_job,
)
from ollama_fleet.controller.registry.ingest import Ingest
from ollama_fleet.controller.registry.live import Registry
from ollama_fleet.controller.registry.store import Store
from ollama_fleet.settings import Config

__all__ = ["JobLedger", "JobRec"]  # JobRec: the record callers hold (defined with the machine)

log = logging.getLogger("fleet.jobs")

# module level so tests can shrink them
LEDGER_TICK = 0.25  # seconds between scans for dispatchable and timed-out jobs (in memory, cheap)
PRUNE_EVERY = 600.0
SYNC_EVERY = 1.0  # seconds between reads of the rows other controllers may have written


def _now() -> Now:
    return Now(time.time(), time.monotonic())


class JobLedger:
    def __init__(self, cfg: Config, registry: Registry, ingest: Ingest, hub: Hub) -> None:
        self.cfg = cfg
        self.registry, self.ingest, self.hub = registry, ingest, hub
        self.machine = JobMachine(cfg.max_concurrent_pulls, cfg.job_step_timeout)
        self.store: Store | None = None
        self.ready = False
        self._early: list[tuple[str, str, Doc]] = []  # statuses seen before the ledger loaded
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()  # sends and lookups in flight (kept referenced)
        self._last_flush = 0.0
        self._last_prune = 0.0
        self._last_sync = 0.0
        # Several controllers (controller/cluster/leader.py): only the leader dispatches, times out, writes
        # and clears; a follower follows the agents' reports for its readers and writes only what its own
        # API did (new jobs, a cancel). Alone, a controller leads.
        self.leading = True
        self.leads: Callable[[], bool] = lambda: True  # the election's verdict (controller/cluster/leader.py)

    # ---- the machine's state, as callers read it ----------------------------------------------
    @property
    def active(self) -> dict[Key, JobRec]:
        return self.machine.active

    @property
    def recent(self) -> collections.OrderedDict[Key, JobRec]:
        return self.machine.recent

    @property
    def by_task(self) -> dict[str, JobRec]:
        return self.machine.by_task

    @property
    def counters(self) -> collections.Counter[str]:
        return self.machine.counters

    @property
    def cap(self) -> int:
        return self.machine.cap

    @property
    def step_timeout(self) -> float:
        return self.machine.step_timeout

    @property
    def _broker_up(self) -> bool:
        return self.ingest.client is not None

    def _db(self) -> Store:
        if self.store is None:
            raise RuntimeError("the job ledger has not started")
        return self.store

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self, store: Store) -> None:
        self.store = store
        rows = await store.read(js.load_unfinished)
        self.machine.load(rows, _now())
        self.ready = True
        log.info("job ledger loaded: %d unfinished jobs", len(rows))
        early, self._early = self._early, []
        for node, job_id, doc in early:
            self.apply(node, job_id, doc)
        self._tasks = [asyncio.create_task(self._loop(), name="fleet-jobs")]

    async def _follow_the_election(self) -> None:
        """Make `leading` what the election says, once per tick: a new leader first reads back what the
        old one wrote (if that read fails it stays a follower and tries again next tick, and it never
        leads once the election has moved on meanwhile)."""
        if not self.leads():
            if self.leading:
                self.leading = False
                log.info("job ledger follows")
            return
        if self.leading:
            return
        effects = await self._sync(everything=True, perform=False)
        if self.leads():
            self.leading = True
            log.info("job ledger leads: %d unfinished jobs", len(self.active))
            self._perform(effects)  # as the leader: a job it adopted as ended elsewhere is stopped on its agent
            self.pump()

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.flush()

    # ---- inputs ------------------------------------------------------------------------------
    def new(self, node: str, verb: str, args: dict[str, Any], origin: str, group: str | None = None,
            queue_if_offline: bool = False) -> JobRec:
        return new_job(uuid.uuid4().hex, node, verb, args, origin, _now(), group, queue_if_offline)

    async def submit(self, recs: list[JobRec]) -> None:
        """Persist before answering (a controller restart loses no accepted job), then dispatch."""
        if not recs:
            return
        self.machine.accept(recs)
        try:
            await self._db().write(js.upsert, [r.row() for r in recs])
        except BaseException:
            self.machine.withdraw(recs)
            raise
        self._perform(self.machine.accepted(recs))
        self.pump()  # a follower's jobs wait for the leader's next read (SYNC_EVERY)

    def find_active(self, node: str, verb: str, model: str) -> JobRec | None:
        return self.machine.find_active(node, verb, model)

    def running_pulls(self) -> list[JobRec]:
        return self.machine.running_pulls()

    def pump(self) -> None:
        """Dispatch every held job that may start now, oldest first."""
        if not self.ready or not self.leading:
            self.machine.pump_due = False
            return
        self._perform(self.machine.pump(self.registry.agents, self._broker_up, _now()))

    def agent_event(self, kind: str, node: str | None) -> None:
        """Registry events that change what can run: the hub consumer calls this."""
        self._perform(self.machine.agent_event(kind, node, self.registry.agents, _now()))

    def apply(self, node: str, job_id: str, doc: Doc) -> str | None:
        """The ingest job handler (runs in the MQTT loop, stays cheap): the reason a status was ignored."""
        if not self.ready:
            self._early.append((node, job_id, doc))
            return None
        ignored, effects = self.machine.report(node, job_id, doc, self.registry.agents, _now())
        self._perform(effects)
        return ignored

    async def cancel(self, rec: JobRec) -> None:
        """A held job ends at once, a running one through its agent. On a follower a job it holds as not yet
        sent may have been sent by the leader meanwhile: the row decides (cancelled only while still
        pending and unsent), else the agent is told; the leader reads the row back (SYNC_EVERY)."""
        if not self.leading and rec.held:
            now = _now()
            unsent = await self._db().write(js.cancel_unsent, rec.task_id, now.wall)
            if rec.done:  # ended meanwhile (another cancel, a report)
                return
            if not unsent:
                rec.dispatched_at = rec.dispatched_at or now.wall  # the leader sent it: stop it on the agent
        self._perform(self.machine.cancel(rec, self.registry.agents, self._broker_up, _now()))
        if rec.done:  # ended here (held, or its agent unreachable): in the database before the answer
            await self._db().write(js.upsert, [rec.row()])

    async def held_elsewhere(self, task_id: str) -> JobRec | None:
        """An unfinished job this controller has not seen yet (accepted by another controller, not started):
        read from its row and kept, so that it can be cancelled here like any other."""
        row = await self._db().read(js.get, task_id)
        if row is None:
            return None
        self._perform(self.machine.adopt([row], _now()))
        rec = self.by_task.get(task_id)
        return rec if rec is not None and not rec.done else None

    # ---- effects -----------------------------------------------------------------------------
    def _perform(self, effects: Iterable[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, Notify):
                self.hub.publish("job", effect.rec.to_json())
                for ev in self._waiters.get(effect.rec.task_id, ()):
                    ev.set()
            elif isinstance(effect, Command):
                if self.leading or effect.purpose is Purpose.CANCEL:  # a follower's cancel goes out itself
                    self._spawn(self._send(effect))
            elif isinstance(effect, Lookup):
                self._spawn(self._learn(effect.node, effect.job_id))
            elif isinstance(effect, Log):
                log.log(effect.level, "%s", effect.text)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send(self, command: Command) -> None:
        rec = command.rec
        try:
            await self.ingest.publish_command(rec.node_id, command.verb, command.payload)
            if command.purpose is Purpose.DISPATCH:
                self.counters["dispatched"] += 1
        except aiomqtt.MqttError as e:
            if command.purpose is Purpose.DISPATCH:
                log.warning("could not send %s for job %s: %s", command.verb, rec.task_id, e)
            self._perform(self.machine.send_failed(command, str(e), _now()))

    async def _learn(self, node: str, job_id: str) -> None:
        """A status for a job not in memory: its row, if we have one, then the machine records it."""
        try:
            db = self._db()
            row = await db.read(js.find, node, job_id)
            taken = row is None and await db.read(js.task_exists, job_id)
            # no await from here on: two agents reporting one job id cannot both claim it
            self._perform(self.machine.learned(node, job_id, row, taken, self.registry.agents, _now()))
        except Exception:
            log.exception("could not record job %s on %s", job_id, node)
        finally:
            self.machine.forget_lookup(node, job_id)

    # ---- watchers ----------------------------------------------------------------------------
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
    async def flush(self) -> None:
        """Write the changed rows, then clear the retained topics whose outcome they hold."""
        if self.store is None:
            return
        outbox = self.machine.drain()
        if not self.leading:
            # The leader writes progress. A follower writes only outcomes (a row never leaves one: the upsert
            # keeps it), so one that ended a job here (a cancel, its agent deleted) is not lost.
            ended = [row for row in outbox.rows if row["status"] in js.FINAL]
            if ended:
                try:
                    await self.store.write(js.upsert, ended)
                except Exception:
                    log.exception("could not write %d ended jobs; the next flush tries again", len(ended))
                    self.machine.restore(Outbox({r["task_id"] for r in ended}, [], []))
            return
        try:
            if outbox.rows:
                await self.store.write(js.upsert, outbox.rows)
        except Exception:
            log.exception("job flush failed; retrying")
            self.machine.restore(outbox)
            return
        for node, job_id in outbox.clear:
            client = self.ingest.client
            if client is None:
                self.machine.clear_again((node, job_id))
                continue
            try:
                await client.publish(self.ingest.topics.job(node, job_id), b"", qos=1, retain=True)
                self.counters["cleared"] += 1
            except aiomqtt.MqttError:
                self.machine.clear_again((node, job_id))

    async def _loop(self) -> None:
        flush_every = self.cfg.flush_interval
        retention = self.cfg.event_retention_days * 86400
        while True:
            await asyncio.sleep(LEDGER_TICK)
            try:
                await self._follow_the_election()
                now = time.monotonic()
                if now - self._last_sync >= SYNC_EVERY:
                    self._last_sync = now
                    await self._sync(everything=self.leading)
                if not self.leading:
                    if now - self._last_flush >= flush_every:
                        self._last_flush = now
                        await self.flush()  # drops the outbox: the leader writes
                    continue
                self._perform(self.machine.tick(self.registry.agents, self._broker_up, _now()))
                if now - self._last_flush >= flush_every:
                    self._last_flush = now
                    await self.flush()
                if now - self._last_prune >= PRUNE_EVERY:
                    self._last_prune = now
                    await self._db().write(js.prune, time.time() - retention)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("job ledger tick failed")

    async def _sync(self, everything: bool, perform: bool = True) -> list[Effect]:
        """Read back the rows of the jobs we hold (another controller may have ended them) and, for the
        leader, every unfinished job (a follower's new ones; at promotion, all of the old leader's)."""
        db = self._db()
        rows = await db.read(js.rows_for, list(self.active))
        if everything:
            rows += await db.read(js.load_unfinished)
        effects = self.machine.adopt(rows, _now())
        if not perform:
            return effects
        self._perform(effects)
        if self.leading:
            self.pump()
        return []

    # ---- reads -----------------------------------------------------------------------------
    async def get(self, task_id: str) -> dict[str, Any] | None:
        rec = self.by_task.get(task_id)
        if rec is not None:
            return rec.to_json()
        row = await self._db().read(js.get, task_id)
        return job_json(row) if row else None

    async def query(self, **filters: Any) -> tuple[list[dict[str, Any]], int]:
        await self.flush()  # read-your-writes: the database then holds every job
        rows, total = await self._db().read(js.query, filters)
        live = [self.by_task.get(r["task_id"]) for r in rows]
        return [rec.to_json() if rec else job_json(r) for rec, r in zip(live, rows)], total
