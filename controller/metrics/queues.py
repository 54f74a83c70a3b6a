"""Admission control's live figures as /metrics and the dashboard show them: each model's queue under its
bounded label, and the generation slots of the agents. Read from memory (controller/admission/gate.py's
Admission), on the event loop; one source for both readers, so a page and a Prometheus query agree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ollama_fleet.controller.admission.gate import Admission
from ollama_fleet.controller.admission.priority import TIERS
from ollama_fleet.controller.registry.live import AgentRecord


@dataclass(slots=True)
class Queue:
    """One model label's waiting requests (several models when they share names.OTHER_MODEL)."""

    depth: int
    by_tier: dict[str, int]
    oldest_wait: float  # seconds

    @property
    def mixed(self) -> bool:
        """Some waiting request is not of the normal tier (the dashboard then shows the tiers)."""
        return self.by_tier.get("normal", 0) != self.depth


@dataclass(frozen=True, slots=True)
class Slots:
    busy: int
    capacity: int


def queues(admission: Admission, label: Callable[[str], str]) -> dict[str, Queue]:
    """Waiting requests by model label (`label`: RequestStats' bounded one); only models with a queue."""
    out: dict[str, Queue] = {}
    for f in admission.figures():
        key = label(f.model)
        q = out.get(key)
        if q is None:
            out[key] = Queue(f.depth, {t: f.by_tier.get(t, 0) for t in TIERS}, f.oldest_wait)
            continue
        q.depth += f.depth
        for t in TIERS:
            q.by_tier[t] += f.by_tier.get(t, 0)
        q.oldest_wait = max(q.oldest_wait, f.oldest_wait)
    return out


def busy(admission: Admission, node: str) -> int:
    """Slots held on an agent by this controller's requests."""
    return admission.sched.busy.get(node, 0)


def slots(admission: Admission, a: AgentRecord) -> Slots:
    """An agent's slots held, and its capacity in force (Admission.capacity)."""
    return Slots(busy(admission, a.node_id), admission.capacity(a))


def fleet_slots(admission: Admission, agents: Iterable[AgentRecord]) -> Slots:
    """The slots of the agents that can take requests now (routable), together."""
    busy = capacity = 0
    for a in agents:
        if a.routable:
            s = slots(admission, a)
            busy += s.busy
            capacity += s.capacity
    return Slots(busy, capacity)
