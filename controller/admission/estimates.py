"""Learned timings per model and agent, for the warm-or-cold choice: how long a generation holds a slot, and
how long the agent's Ollama takes to load the model (Ollama's own `load_duration`). Pure: figures in, figures out.

When the model is loaded only on busy agents and an idle agent would have to load it, waiting is faster when
the warm agents free a slot sooner than the cold one can load: expected wait = mean generation time x (the
model's queue + 1) / the warm agents' slots. Without a measured load time (or generation time) the idle agent
is used: an unmeasured guess must not hold requests back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ALPHA = 0.2  # weight of the newest sample in the moving averages
LOAD_MIN = 0.25  # seconds: a shorter load_duration means the model was already in memory (not a load)


@dataclass(frozen=True, slots=True)
class Choice:
    """`wait`: queue for the warm agents (for at most `patience` seconds); otherwise load on the idle one."""

    wait: bool
    patience: float
    note: str


@dataclass
class Estimates:
    service: dict[tuple[str, str], float] = field(default_factory=dict)  # (model, agent) -> seconds a slot is held
    load: dict[tuple[str, str], float] = field(default_factory=dict)  # (model, agent) -> seconds to load

    def served(self, model: str, node: str, seconds: float, load_s: float | None) -> None:
        """A generation finished: its slot time and, when the answer carried one, Ollama's load time."""
        _ewma(self.service, (model, node), seconds)
        if load_s is not None and load_s >= LOAD_MIN:
            _ewma(self.load, (model, node), load_s)

    def choose(self, model: str, cold: str, warm: dict[str, int], queued: int) -> Choice:
        """`cold`: the idle agent that would load the model; `warm`: busy agents that have it loaded, with
        their capacity; `queued`: the model's waiting requests."""
        load = self.load.get((model, cold))
        times = [self.service[(model, n)] for n in warm if (model, n) in self.service]
        names = ",".join(sorted(warm))
        if load is None or not times:
            return Choice(False, 0.0, f"cold start on {cold}: no measured "
                                      f"{'load' if load is None else 'generation'} time to weigh against {names}")
        wait = sum(times) / len(times) * (queued + 1) / max(1, sum(warm.values()))
        if wait < load:
            return Choice(True, load, f"warm wait for {names} (~{wait:.1f}s) beats loading on {cold} (~{load:.1f}s)")
        return Choice(False, 0.0, f"cold start on {cold}: loading (~{load:.1f}s) beats waiting for {names} (~{wait:.1f}s)")


def _ewma(table: dict[tuple[str, str], float], key: tuple[str, str], sample: float) -> None:
    old = table.get(key)
    table[key] = sample if old is None else old + ALPHA * (sample - old)
