"""Routing: which agent serves a request for a model. Pure (no I/O): reads AgentRecords, returns an order.

Candidates are routable agents that have the model installed. Agents that failed recently (cooldown) and
agents with `weight=0` are kept at the end of the order, as last resorts. The strategies:

- `round_robin`: smooth weighted round-robin per model (weights from agent tags `weight=N`).
- `least_busy`: fewest in-flight requests per weight (ours plus other controllers', `others`), then warm
  (model loaded) first, then the seed's metrics score, then round-robin among equals.
- `metrics`: the seed's score cpu% + mem% + gpu% + gpu_mem% + 10 x in-flight (all controllers'; divided by
  the weight), minus a bonus when the model is already loaded; every candidate above 80 % CPU -> round-robin;
  ties -> larger total GPU memory -> round-robin.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ollama_fleet.contract.model_names import normalize as normalize_model

from ollama_fleet.controller.registry.live import AgentRecord

STRATEGIES = ("round_robin", "least_busy", "metrics")
HOT_CPU = 80.0  # percent: when every candidate is above, load figures no longer discriminate
ACTIVE_WEIGHT = 10.0  # score points per in-flight request (seed)
WARM_BONUS = 15.0  # score points a loaded model is worth under `metrics` (a cold load costs seconds)
WEIGHT_TAG = "weight="


def weight(a: AgentRecord) -> float:
    """An operator's tag `weight=N` (N >= 0); 1 when absent or unreadable."""
    for tag in a.tags:
        if tag.startswith(WEIGHT_TAG):
            try:
                return max(float(tag[len(WEIGHT_TAG):]), 0.0)
            except ValueError:
                return 1.0
    return 1.0


def score(a: AgentRecord, others: int = 0) -> float:
    """The seed's load score (lower is better) from the last heartbeat and the in-flight count (this controller's
    plus `others`, other controllers')."""
    m = a.metrics
    gpus = [g for g in m.get("gpus") or () if isinstance(g, dict)]
    utils = [g["util"] for g in gpus if isinstance(g.get("util"), (int, float))]
    used = sum(g["mem_used"] for g in gpus if isinstance(g.get("mem_used"), (int, float)))
    total = sum(g["mem_total"] for g in gpus if isinstance(g.get("mem_total"), (int, float)))
    return (float(m.get("cpu") or 0.0) + float(m.get("mem") or 0.0)
            + (sum(utils) / len(utils) if utils else 0.0) + (used / total * 100.0 if total else 0.0)
            + ACTIVE_WEIGHT * (a.in_flight + others))


def gpu_memory(a: AgentRecord) -> int:
    return sum(int(g.get("mem_total") or 0) for g in a.gpus)


class _NameCache:
    """Normalised model names per agent, recomputed only when the registry replaces the list."""

    def __init__(self) -> None:
        # holding the list itself (not its id) keeps identity checks sound: ids of freed lists are reused
        self._cache: dict[str, tuple[list[dict[str, Any]], frozenset[str]]] = {}

    def names(self, node: str, models: list[dict[str, Any]]) -> frozenset[str]:
        hit = self._cache.get(node)
        if hit is not None and hit[0] is models:
            return hit[1]
        names = frozenset(normalize_model(str(m.get("name") or m.get("model") or "")) for m in models)
        self._cache[node] = (models, names)
        return names


@dataclass
class Decision:
    """Agents in the order to try them; `reason()` explains the choice (built only when asked for)."""

    model: str
    strategy: str
    order: list[AgentRecord]
    figures: list[tuple[str, str]] = field(default_factory=list)  # (node, what the strategy saw)
    note: str = ""

    def reason(self) -> str:
        parts = [f"{self.strategy}: {self.order[0].node_id}"]
        if self.note:
            parts.append(self.note)
        if self.figures:
            parts.append("candidates " + ", ".join(f"{n}({f})" for n, f in self.figures))
        return "; ".join(parts)


@dataclass
class NoRoute:
    """Why nothing can serve: `no_agents` (503), `not_found` (404), `unavailable` (503)."""

    kind: str
    message: str


class Router:
    def __init__(self, strategy: str = "least_busy", cooldown: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown routing strategy {strategy!r}")
        self.strategy = strategy
        self.cooldown = cooldown
        self.clock = clock
        self._cooling: dict[str, float] = {}  # node -> monotonic time its cooldown ends
        self._wrr: dict[str, dict[str, float]] = {}  # model -> node -> current weight (smooth WRR)
        self._turn: dict[str, int] = {}  # model -> tie-break rotation
        self._names = _NameCache()
        self._loaded = _NameCache()
        # agent -> requests other controllers have in flight on it (controller/cluster/load.py); read only here
        self.others: Mapping[str, int] = {}

    # ---- feedback from the proxy -------------------------------------------------------------
    def failed(self, node: str) -> None:
        self._cooling[node] = self.clock() + self.cooldown

    def succeeded(self, node: str) -> None:
        self._cooling.pop(node, None)

    def cooling(self, node: str) -> bool:
        until = self._cooling.get(node)
        if until is None:
            return False
        if until <= self.clock():
            del self._cooling[node]
            return False
        return True

    # ---- choice ------------------------------------------------------------------------------
    def has_model(self, a: AgentRecord, model: str) -> bool:
        return model in self._names.names(a.node_id, a.models)

    def warm(self, a: AgentRecord, model: str) -> bool:
        return model in self._loaded.names(a.node_id, a.loaded)

    def choose(self, agents: Iterable[AgentRecord], model: str, pin: str | None = None) -> Decision | NoRoute:
        """`model` as the client wrote it; `pin` restricts the choice to one agent id."""
        key = normalize_model(model)
        routable = [a for a in agents if a.routable]
        if not routable:
            return NoRoute("no_agents", "no available agents")
        cands = [a for a in routable if self.has_model(a, key)]
        if pin is not None:
            cands = [a for a in cands if a.node_id == pin]
            if not cands:
                return NoRoute("unavailable", f"agent '{pin}' is not available for model '{model}'")
        if not cands:
            return NoRoute("not_found", f"model '{model}' not found, try pulling it first")
        cands.sort(key=lambda a: a.node_id)
        primary = [a for a in cands if weight(a) > 0 and not self.cooling(a.node_id)]
        spare = [a for a in cands if a not in primary]
        spare.sort(key=lambda a: self._cooling.get(a.node_id, 0.0))  # soonest out of cooldown first
        if not primary:
            primary, spare = spare, []
        note = f"{len(spare)} cooling or weight 0" if spare else ""
        if self.strategy == "round_robin":
            d = Decision(key, "round_robin", self._round_robin(key, primary) + spare, note=note)
        elif self.strategy == "least_busy":
            d = self._least_busy(key, primary, note)
            d.order += spare
        else:
            d = self._metrics(key, primary, note)
            d.order += spare
        return d

    def _ranked(self, key: str, cands: list[AgentRecord], rank: Callable[[AgentRecord], Any]) -> list[AgentRecord]:
        """Sorted by `rank`; the agents tied for first take turns (round-robin per model)."""
        order = sorted(cands, key=rank)
        best = rank(order[0])
        n = 1
        while n < len(order) and rank(order[n]) == best:
            n += 1
        if n > 1:
            turn = self._turn[key] = self._turn.get(key, -1) + 1
            k = turn % n
            order[:n] = order[k:n] + order[:k]
        return order

    def _round_robin(self, key: str, cands: list[AgentRecord]) -> list[AgentRecord]:
        """Smooth weighted round-robin (nginx): exact proportions, no bursts; the rest follow in rotation."""
        state = self._wrr.setdefault(key, {})
        weights = {a.node_id: weight(a) or 1.0 for a in cands}
        for node in list(state):
            if node not in weights:
                del state[node]
        best: AgentRecord | None = None
        for a in cands:
            state[a.node_id] = state.get(a.node_id, 0.0) + weights[a.node_id]
            if best is None or state[a.node_id] > state[best.node_id]:
                best = a
        assert best is not None
        state[best.node_id] -= sum(weights.values())
        i = cands.index(best)
        return cands[i:] + cands[:i]

    def _least_busy(self, key: str, cands: list[AgentRecord], note: str) -> Decision:
        others = self.others
        busy = {a.node_id: a.in_flight + others.get(a.node_id, 0) for a in cands}
        figures = {a.node_id: ((busy[a.node_id] + 1) / (weight(a) or 1.0), not self.warm(a, key),
                               score(a, others.get(a.node_id, 0)))
                   for a in cands}
        order = self._ranked(key, cands, lambda a: figures[a.node_id])
        shown = [(a.node_id, f"in_flight={busy[a.node_id]} {'cold' if f[1] else 'warm'} score={f[2]:.1f}")
                 for a in order for f in (figures[a.node_id],)]
        return Decision(key, "least_busy", order, shown, note)

    def _metrics(self, key: str, cands: list[AgentRecord], note: str) -> Decision:
        if all(float(a.metrics.get("cpu") or 0.0) > HOT_CPU for a in cands):
            note = "; ".join(filter(None, [note, f"every candidate above {HOT_CPU:.0f}% CPU: round-robin"]))
            return Decision(key, "metrics", self._round_robin(key, cands), note=note)
        figures = {}
        for a in cands:
            w = weight(a) or 1.0
            figures[a.node_id] = (round(score(a, self.others.get(a.node_id, 0)) / w
                                        - (WARM_BONUS if self.warm(a, key) else 0.0), 3),
                                  -gpu_memory(a))
        order = self._ranked(key, cands, lambda a: figures[a.node_id])
        shown = [(a.node_id, f"score={figures[a.node_id][0]:.1f} cpu={a.metrics.get('cpu')}") for a in order]
        return Decision(key, "metrics", order, shown, note)
