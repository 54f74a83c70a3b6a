"""The fleet-wide scheduler: slots per agent, one queue per model, priorities with aging, fairness between
parties. Pure: no I/O, no timers, no asyncio; time comes from `clock`, which agents serve which model from
`serves`. Given the same arrivals, releases and clock it makes the same decisions (tests/test_scheduler.py).

A request first tries `acquire` (a free slot on the first agent of the router's order that has one). When
every eligible agent is at capacity it is `enqueue`d; a slot freed by `release` (or added by `pump` when an
agent joins or grows) goes at once to the best waiting ticket that agent can serve:
- the best tier first: high, normal, low; a tier's rank improves by one for every `aging` seconds its oldest
  ticket has waited, so low priority is never starved forever (ties: the older ticket);
- within a tier, parties (API keys, or client addresses without keys) take turns: one party's 500 queued
  requests wait behind another's single one only once;
- within a party, first come first served.
Invariant: after every call, no agent has a free slot that a waiting ticket could use.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from ollama_fleet.controller.admission.priority import RANK, TIERS

AGING = 30.0  # seconds of waiting that lift a tier by one rank
CORRECTION_HOLD = 60.0  # seconds a capacity lowered after Ollama said "busy" stays lowered
BURST = 1.0  # seconds after a correction in which further busy answers belong to the same overload


@dataclass(eq=False, slots=True)
class Ticket:
    """One request's place in the scheduler."""

    model: str
    tier: str
    party: str
    arrived: float
    only: frozenset[str] | None = None  # restricted to these agents (a pin, failover, or a warm-agent wait)
    node: str | None = None  # the agent whose slot it holds, once granted
    queued: bool = False


class _Tier:
    """One tier of one model's queue: a FIFO per party, parties in turn order."""

    __slots__ = ("parties",)

    def __init__(self) -> None:
        self.parties: OrderedDict[str, deque[Ticket]] = OrderedDict()

    def oldest(self) -> float:
        return min(q[0].arrived for q in self.parties.values())

    def take(self, node: str) -> Ticket | None:
        """The first ticket `node` may serve, parties in turn; its party goes to the back of the line."""
        for party, q in self.parties.items():
            for t in q:
                if t.only is None or node in t.only:
                    q.remove(t)
                    if q:
                        self.parties.move_to_end(party)
                    else:
                        del self.parties[party]
                    return t
        return None


@dataclass(slots=True)
class QueueFigures:
    """One model's queue, for the dashboard and metrics."""

    model: str
    depth: int
    by_tier: dict[str, int]
    oldest_wait: float  # seconds the oldest ticket has waited


@dataclass
class Scheduler:
    serves: Callable[[str, str], bool]  # (agent, model) -> the agent can serve the model now
    max_queue: int = 256  # per model
    aging: float = AGING
    clock: Callable[[], float] = time.monotonic
    reported: dict[str, int] = field(default_factory=dict)  # agent -> capacity it reported
    busy: dict[str, int] = field(default_factory=dict)  # agent -> slots held
    # agent -> slots other controllers hold (their load documents, controller/cluster/load.py); read only here
    others: Mapping[str, int] = field(default_factory=dict)
    _lowered: dict[str, tuple[int, float]] = field(default_factory=dict)  # agent -> (capacity, until)
    _queues: dict[str, list[_Tier]] = field(default_factory=dict)  # model -> one _Tier per tier
    _depth: dict[str, int] = field(default_factory=dict)

    # ---- capacity ----------------------------------------------------------------------------
    def capacity(self, node: str) -> int:
        cap = self.reported.get(node, 1)
        low = self._lowered.get(node)
        if low is not None:
            if low[1] > self.clock():
                return min(cap, low[0])
            del self._lowered[node]
        return cap

    def free(self, node: str) -> int:
        """Slots free on the agent, fleet-wide: its capacity less ours and other controllers' (may be < 0)."""
        return self.capacity(node) - self.busy.get(node, 0) - self.others.get(node, 0)

    def report(self, node: str, capacity: int) -> list[Ticket]:
        """An agent's capacity (as it reported it); returns tickets granted because it grew."""
        old = self.reported.get(node)
        self.reported[node] = max(1, capacity)
        return self.pump(node) if old is None or capacity > old else []

    def busy_signal(self, node: str) -> tuple[int, float]:
        """The agent's Ollama answered "server busy" with our `busy` requests on it (this one included) and the
        slots other controllers hold: for CORRECTION_HOLD its capacity is one less than that. A burst of busy
        answers is one overload: within BURST of a correction, a further answer extends the hold but lowers no
        further. Returns the capacity now in force and the clock time the hold ends."""
        now = self.clock()
        low = self._lowered.get(node)
        if low is not None and low[1] - CORRECTION_HOLD + BURST > now:
            cap = low[0]
        else:
            cap = max(1, min(self.capacity(node), self.busy.get(node, 1) + self.others.get(node, 0) - 1))
        until = now + CORRECTION_HOLD
        self._lowered[node] = (cap, until)
        return cap, until

    def forget(self, node: str) -> None:
        """An agent that left the registry. Slots still held are released by their requests."""
        self.reported.pop(node, None)
        self._lowered.pop(node, None)
        if not self.busy.get(node):
            self.busy.pop(node, None)

    # ---- requests ----------------------------------------------------------------------------
    def acquire(self, ticket: Ticket, order: Iterable[str]) -> str | None:
        """A slot on the first agent of `order` (the router's preference) with one free, or None."""
        for node in order:
            if (ticket.only is None or node in ticket.only) and self.free(node) > 0:
                self._grant(ticket, node)
                return node
        return None

    def enqueue(self, ticket: Ticket, first: bool = False) -> bool:
        """Wait for a slot; False when the model's queue is full. `first`: ahead of its party's other tickets
        (a request that failed over keeps its place)."""
        if self._depth.get(ticket.model, 0) >= self.max_queue:
            return False
        tiers = self._queues.get(ticket.model)
        if tiers is None:
            tiers = self._queues[ticket.model] = [_Tier() for _ in TIERS]
        q = tiers[RANK[ticket.tier]].parties.setdefault(ticket.party, deque())
        q.appendleft(ticket) if first else q.append(ticket)
        ticket.queued = True
        self._depth[ticket.model] = self._depth.get(ticket.model, 0) + 1
        return True

    def cancel(self, ticket: Ticket) -> bool:
        """Leave the queue (the client went away, or waited too long). False when it was not waiting."""
        if not ticket.queued:
            return False
        tier = self._queues[ticket.model][RANK[ticket.tier]]
        q = tier.parties[ticket.party]
        q.remove(ticket)
        if not q:
            del tier.parties[ticket.party]
        self._dequeued(ticket)
        return True

    def release(self, node: str) -> list[Ticket]:
        """A request on `node` finished; returns the tickets granted the slot(s) now free."""
        n = self.busy.get(node, 0) - 1
        if n > 0:
            self.busy[node] = n
        else:
            self.busy.pop(node, None)
        return self.pump(node)

    def widen(self, ticket: Ticket) -> str | None:
        """Lift a waiting ticket's restriction (a warm-agent wait that took too long); returns the agent that
        took it at once, if one had a free slot."""
        ticket.only = None
        if not ticket.queued:
            return None
        for node in list(self.reported):
            if self.free(node) > 0 and self.serves(node, ticket.model):
                self.cancel(ticket)
                self._grant(ticket, node)
                return node
        return None

    def pump(self, node: str) -> list[Ticket]:
        """Give `node`'s free slots to the best waiting tickets it can serve."""
        granted: list[Ticket] = []
        while self._queues and self.free(node) > 0:
            t = self._best(node)
            if t is None:
                break
            self._dequeued(t)
            self._grant(t, node)
            granted.append(t)
        return granted

    # ---- views -------------------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        return sum(self._depth.values())

    def depth(self, model: str) -> int:
        return self._depth.get(model, 0)

    def depths(self) -> dict[str, int]:
        """Waiting tickets per model (only models with some)."""
        return dict(self._depth)

    def figures(self) -> list[QueueFigures]:
        now = self.clock()
        out = []
        for model, tiers in sorted(self._queues.items()):
            by_tier = {name: sum(len(q) for q in t.parties.values()) for name, t in zip(TIERS, tiers)}
            oldest = min(t.oldest() for t in tiers if t.parties)
            out.append(QueueFigures(model, self._depth[model], by_tier, max(0.0, now - oldest)))
        return out

    # ---- internals ---------------------------------------------------------------------------
    def _grant(self, ticket: Ticket, node: str) -> None:
        ticket.node = node
        self.busy[node] = self.busy.get(node, 0) + 1

    def _dequeued(self, ticket: Ticket) -> None:
        ticket.queued = False
        left = self._depth[ticket.model] - 1
        if left:
            self._depth[ticket.model] = left
        else:  # an empty model queue is dropped: pump scans only models with waiting tickets
            del self._depth[ticket.model]
            del self._queues[ticket.model]

    def _best(self, node: str) -> Ticket | None:
        """The waiting ticket `node` should serve next, over every model it serves."""
        now = self.clock()
        ranked: list[tuple[float, float, _Tier]] = []
        for model, tiers in self._queues.items():
            if not self.serves(node, model):
                continue
            for rank, tier in enumerate(tiers):
                if tier.parties:
                    oldest = tier.oldest()
                    ranked.append((rank - (now - oldest) // self.aging, oldest, tier))
        ranked.sort(key=lambda r: (r[0], r[1]))
        for _, _, tier in ranked:  # a tier whose tickets are all pinned elsewhere yields to the next
            t = tier.take(node)
            if t is not None:
                return t
        return None
