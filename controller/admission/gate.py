"""Admission at the proxy: the pure Scheduler and KeyMeter on the event loop.

A generating request opens a Pass (per-key limits checked), then `place()` finds it a slot: at once on the
first free agent of the router's order, or by waiting in its model's queue until a slot frees (a future set
by whoever released it: no polling) — bounded by max_queue and max_queue_wait. A client that disconnects
while waiting leaves the queue at once (its task is cancelled). Every release goes through `done()`.
Agents' capacities follow the registry (a listener on its changes), so an agent that joins or grows takes
waiting requests at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ollama_fleet.settings import Config

from ollama_fleet.controller.admission.estimates import Estimates
from ollama_fleet.controller.admission.limits import KeyLimits, KeyMeter, Refusal
from ollama_fleet.controller.admission.scheduler import QueueFigures, Scheduler, Ticket
from ollama_fleet.controller.registry.live import AgentRecord, Registry

log = logging.getLogger("fleet.admission")

WIDEN_BEFORE = 0.9  # a warm-agent wait ends by this share of max_queue_wait, leaving time for any agent


class QueueRefused(Exception):
    """The queue cannot take or keep the request: 503 with Retry-After."""

    def __init__(self, reason: str, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.reason, self.message, self.retry_after = reason, message, retry_after


@dataclass(frozen=True, slots=True)
class QueueEvent:
    """What happened to a request at the queue, for metrics: `outcome` is served (it waited, then got a
    slot), full, timeout, gone (client left while waiting) or a key limit's reason (concurrency, rpm, tpm)."""

    model: str
    tier: str
    outcome: str
    waited: float


@dataclass(slots=True)
class Pass:
    """One request's admission: its ticket, the key it is metered under, its time in the queue."""

    ticket: Ticket
    key: str | None
    waited: float = 0.0  # seconds spent queued, all placements together
    queued: bool = False  # it waited at least once (the answer carries X-Fleet-Queue-Wait)
    settled: bool = False  # its queue outcome (timeout, gone) was reported: close() reports no "served"
    note: str = ""  # the warm-or-cold choice, for the route reason
    started: float = 0.0  # monotonic time its current slot was granted
    tried: list[str] = field(default_factory=list)


class Admission:
    def __init__(self, cfg: Config, registry: Registry, has_model: Callable[[AgentRecord, str], bool],
                 warm: Callable[[AgentRecord, str], bool], clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry
        self.has_model, self.warm = has_model, warm
        self.clock = clock
        self.max_wait = cfg.max_queue_wait
        self.sched = Scheduler(self._serves, cfg.max_queue, cfg.queue_aging, clock)
        self.meter = KeyMeter()
        self.estimates = Estimates()
        self.observers: list[Callable[[QueueEvent], None]] = []
        self._waiters: dict[Ticket, asyncio.Future[str]] = {}
        registry.listeners.append(self.agent_changed)

    def _serves(self, node: str, model: str) -> bool:
        a = self.registry.agents.get(node)
        return a is not None and a.routable and self.has_model(a, model)

    def _observe(self, ticket: Ticket, outcome: str, waited: float) -> None:
        if self.observers:
            ev = QueueEvent(ticket.model, ticket.tier, outcome, waited)
            for fn in self.observers:
                fn(ev)

    # ---- the registry ------------------------------------------------------------------------
    def agent_changed(self, node: str) -> None:
        """Called by the registry on every change of an agent: its capacity, models or state."""
        a = self.registry.agents.get(node)
        if a is None:
            self.sched.forget(node)
            return
        self._wake(self.sched.report(node, a.capacity))
        if a.routable:
            self._pump(node)

    def _wake(self, granted: list[Ticket]) -> None:
        for t in granted:
            fut = self._waiters.pop(t, None)
            if fut is not None and not fut.done():
                assert t.node is not None
                fut.set_result(t.node)
            elif t.node is not None:  # its waiter is gone: the slot goes on to the next
                self._wake(self.sched.release(t.node))

    # ---- a request ---------------------------------------------------------------------------
    def open(self, model: str, tier: str, party: str, key: str | None, limits: KeyLimits | None,
             pin: str | None) -> Pass | Refusal:
        """Admit a request under its key's limits (429 when over them), or refuse."""
        now = self.clock()
        if key is not None and limits is not None:
            refusal = self.meter.check(key, limits, now)
            if refusal is not None:
                self._observe(Ticket(model, tier, party, now), refusal.reason, 0.0)
                return refusal
            self.meter.admit(key, now)
        only = frozenset((pin,)) if pin is not None else None
        return Pass(Ticket(model, tier, party, now, only), key if limits is not None else None)

    async def place(self, p: Pass, order: list[AgentRecord]) -> str:
        """A slot for the request's next attempt: an agent of `order` (the router's preference, tried agents
        left out), or whichever eligible agent frees one first. Raises QueueRefused."""
        t, sched = p.ticket, self.sched
        for a in order:
            if a.node_id not in sched.reported:  # loaded from the database, not changed since
                self._wake(sched.report(a.node_id, a.capacity))
        names = [a.node_id for a in order]
        if p.tried:  # a failover waits only for the agents not tried yet
            t.only = frozenset(names) if t.only is None else t.only & frozenset(names)
        node = sched.acquire(t, names)
        patience = math.inf
        if node is not None and not p.tried:
            node, patience = self._warm_or_cold(p, order, node)
        if node is None:
            node = await self._wait(p, patience)
        p.started = self.clock()
        p.tried.append(node)
        return node

    def _warm_or_cold(self, p: Pass, order: list[AgentRecord], node: str) -> tuple[str | None, float]:
        """The free agent `node` would have to load the model while every agent that has it loaded is busy:
        keep the slot, or give it back and wait for a warm agent (for at most the cold agent's load time and
        what is left of max_queue_wait; after that any agent will do)."""
        model, sched = p.ticket.model, self.sched
        a = next(a for a in order if a.node_id == node)
        if self.warm(a, model):
            return node, math.inf
        warm = {w.node_id: sched.capacity(w.node_id) for w in order if self.warm(w, model)}
        if not warm or any(sched.free(w) > 0 for w in warm):  # none warm, or a warm one free: the router's choice
            return node, math.inf
        choice = self.estimates.choose(model, node, warm, sched.depth(model))
        p.note = choice.note
        if not choice.wait or sched.depth(model) >= sched.max_queue:  # a full queue: keep the slot in hand
            return node, math.inf
        self._wake(sched.release(node))
        p.ticket.node = None
        p.ticket.only = frozenset(warm) if p.ticket.only is None else p.ticket.only & frozenset(warm)
        return None, choice.patience

    async def _wait(self, p: Pass, patience: float) -> str:
        """Queued until a slot is granted; `patience`: seconds to wait for the agents in `ticket.only` before
        any eligible agent will do (a warm-agent wait; it ends before max_queue_wait does)."""
        t = p.ticket
        left = self.max_wait - p.waited
        if left <= 0:
            raise self._refuse(p, "timeout", p.waited)
        if not self.sched.enqueue(t, first=bool(p.tried)):
            raise self._refuse(p, "full", p.waited)
        p.queued = True
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiters[t] = fut
        start = self.clock()
        deadline = start + left
        widen_at = start + min(patience, left * WIDEN_BEFORE) if patience != math.inf else math.inf
        try:
            while not fut.done():
                now = self.clock()
                if now >= widen_at:  # the warm wait is over: any eligible agent will do
                    widen_at = math.inf
                    node = self.sched.widen(t)
                    if node is not None:
                        self._waiters.pop(t, None)
                        fut.set_result(node)
                        break
                if now >= deadline:
                    self._leave(t)
                    raise self._refuse(p, "timeout", p.waited + now - start)
                # asyncio.wait, not wait_for: on 3.11 wait_for can return a result that arrived in the same
                # tick as the task's cancellation and swallow the cancellation (a departed client kept its slot)
                await asyncio.wait((fut,), timeout=min(deadline, widen_at) - now)
        except asyncio.CancelledError:  # the client went away: leave the queue now
            self._leave(t)
            p.settled = True
            self._observe(t, "gone", p.waited + self.clock() - start)
            raise
        finally:
            p.waited += self.clock() - start
        return fut.result()

    def _refuse(self, p: Pass, reason: str, waited: float) -> QueueRefused:
        t = p.ticket
        if p.queued or reason != "full":  # a request refused at the door never waited
            p.settled = True
        self._observe(t, reason, waited)
        if reason == "full":
            message = f"every agent serving '{t.model}' is busy and its queue is full (max_queue)"
        else:
            message = f"no agent freed a slot for '{t.model}' within max_queue_wait ({self.max_wait:g}s)"
        return QueueRefused(reason, message, self.retry_after(t.model))

    def _leave(self, t: Ticket) -> None:
        """Out of the queue; a slot granted in the same instant goes on to the next ticket."""
        self._waiters.pop(t, None)
        if not self.sched.cancel(t) and t.node is not None:
            node, t.node = t.node, None
            self._wake(self.sched.release(node))

    def done(self, p: Pass, node: str, ok: bool, load_s: float | None = None, busy: bool = False) -> None:
        """The attempt on `node` is over: its slot is free. `busy`: the agent's Ollama said "server busy"."""
        if busy:
            cap, until = self.sched.busy_signal(node)
            log.info("agent %s answered busy: capacity %d for the next while", node, cap)
            # when the hold ends the capacity grows back: hand the new slots out then, not at the next heartbeat
            loop = asyncio.get_running_loop()
            loop.call_at(loop.time() + max(0.0, until - self.clock()) + 0.01, self._pump, node)
        elif ok:
            self.estimates.served(p.ticket.model, node, self.clock() - p.started, load_s)
        p.ticket.node = None
        self._wake(self.sched.release(node))

    def _pump(self, node: str) -> None:
        if self.sched.waiting:
            self._wake(self.sched.pump(node))

    def others_released(self, node: str) -> None:
        """Other controllers hold fewer slots on `node` (their load document said so, or it expired): the
        slots go to the requests waiting here at once."""
        self._pump(node)

    def close(self, p: Pass, tokens: int) -> None:
        """The request is over (whatever happened): its key's meter counts it out; one that waited and got a
        slot is reported "served" once, with its whole wait (failovers included)."""
        if p.key is not None:
            self.meter.finish(p.key, tokens, self.clock())
        if p.queued and not p.settled:
            self._observe(p.ticket, "served", p.waited)

    def capacity(self, a: AgentRecord) -> int:
        """The capacity in force: the scheduler's (lowered for a while after the agent's Ollama said busy) once
        it knows the agent, else the capacity the agent reported."""
        node = a.node_id
        return self.sched.capacity(node) if node in self.sched.reported else a.capacity

    def retry_after(self, model: str) -> int:
        """Whole seconds until a slot is likely: mean generation time x queue / slots; at least 1."""
        times = [s for (m, _), s in self.estimates.service.items() if m == model]
        slots = sum(self.sched.capacity(n) for n in self.sched.reported if self._serves(n, model)) or 1
        mean = sum(times) / len(times) if times else 1.0
        return max(1, math.ceil(mean * (self.sched.depth(model) + 1) / slots))

    # ---- views -------------------------------------------------------------------------------
    def figures(self) -> list[QueueFigures]:
        return self.sched.figures()
