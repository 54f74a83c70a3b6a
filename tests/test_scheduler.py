"""The pure scheduler (controller/admission/scheduler.py) and the warm-or-cold estimates: deterministic given
arrivals, releases and the clock."""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from ollama_fleet.controller.admission.estimates import Estimates
from ollama_fleet.controller.admission.scheduler import CORRECTION_HOLD, Scheduler, Ticket
from ollama_fleet.settings import CONTROLLER, ConfigError, load


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(caps: dict[str, int], models: dict[str, set[str]] | None = None, **kw: object) -> tuple[Scheduler, Clock]:
    clock = Clock()
    served = models or {n: {"m"} for n in caps}
    s = Scheduler(lambda node, model: model in served.get(node, set()), clock=clock, **kw)  # type: ignore[arg-type]
    for n, c in caps.items():
        assert s.report(n, c) == []
    return s, clock


def ticket(clock: Clock, party: str = "k", tier: str = "normal", model: str = "m",
           only: frozenset[str] | None = None) -> Ticket:
    return Ticket(model, tier, party, clock(), only)


def test_acquire_takes_the_first_free_agent_in_the_routers_order_and_never_exceeds_capacity() -> None:
    s, clock = make({"a": 2, "b": 1})
    got = [s.acquire(ticket(clock), ["b", "a"]) for _ in range(4)]
    assert got == ["b", "a", "a", None]
    assert s.busy == {"a": 2, "b": 1} and s.free("a") == 0 and s.free("b") == 0


def test_a_released_slot_goes_to_the_waiting_ticket_at_once_first_come_first_served() -> None:
    s, clock = make({"a": 1})
    assert s.acquire(ticket(clock), ["a"]) == "a"
    waiting = [ticket(clock) for _ in range(3)]
    for t in waiting:
        assert s.acquire(t, ["a"]) is None and s.enqueue(t)
    assert s.depth("m") == 3 and s.waiting == 3
    assert s.release("a") == [waiting[0]] and waiting[0].node == "a" and not waiting[0].queued
    assert s.release("a") == [waiting[1]]
    assert s.depth("m") == 1 and s.busy == {"a": 1}


def test_higher_tiers_first() -> None:
    s, clock = make({"a": 1})
    s.acquire(ticket(clock), ["a"])
    low, normal, high = ticket(clock, tier="low"), ticket(clock, tier="normal"), ticket(clock, tier="high")
    for t in (low, normal, high):
        s.enqueue(t)
    order = [s.release("a")[0] for _ in range(3)]
    assert order == [high, normal, low]


def test_parties_take_turns_within_a_tier_so_a_flood_cannot_starve_a_single_request() -> None:
    s, clock = make({"a": 1}, max_queue=1000)
    s.acquire(ticket(clock), ["a"])
    flood = [ticket(clock, party="noisy") for _ in range(500)]
    assert all(s.enqueue(t) for t in flood)
    clock.now += 1
    single = ticket(clock, party="quiet")
    assert s.enqueue(single)
    first_two = [s.release("a")[0] for _ in range(2)]
    assert first_two == [flood[0], single]


def test_two_busy_parties_are_served_alternately() -> None:
    s, clock = make({"a": 1})
    s.acquire(ticket(clock), ["a"])
    for i in range(100):
        s.enqueue(ticket(clock, party="x" if i < 70 else "y"))
    served = Counter(s.release("a")[0].party for _ in range(60))
    assert served == {"x": 30, "y": 30}


def test_aging_lifts_a_long_waiting_low_request_above_fresh_high_ones() -> None:
    s, clock = make({"a": 1}, aging=10.0)
    s.acquire(ticket(clock), ["a"])
    old_low = ticket(clock, tier="low")
    s.enqueue(old_low)
    clock.now += 25  # two agings: low (rank 2) now ranks 0, like high, and is older
    highs = [ticket(clock, tier="high") for _ in range(3)]
    for t in highs:
        s.enqueue(t)
    assert s.release("a") == [old_low]
    s2, c2 = make({"a": 1}, aging=10.0)
    s2.acquire(ticket(c2), ["a"])
    young_low = ticket(c2, tier="low")
    s2.enqueue(young_low)
    c2.now += 5  # not yet aged: high goes first
    h = ticket(c2, tier="high")
    s2.enqueue(h)
    assert s2.release("a") == [h]


def test_the_queue_is_bounded_per_model() -> None:
    s, clock = make({"a": 1}, {"a": {"m", "n"}}, max_queue=2)
    s.acquire(ticket(clock), ["a"])
    assert s.enqueue(ticket(clock)) and s.enqueue(ticket(clock))
    assert not s.enqueue(ticket(clock))
    assert s.enqueue(ticket(clock, model="n"))  # another model has its own bound
    assert s.depth("m") == 2 and s.depth("n") == 1


def test_cancel_leaves_the_queue_and_a_granted_ticket_cannot_be_cancelled() -> None:
    s, clock = make({"a": 1})
    s.acquire(ticket(clock), ["a"])
    t1, t2 = ticket(clock), ticket(clock)
    s.enqueue(t1)
    s.enqueue(t2)
    assert s.cancel(t1) and not t1.queued and s.depth("m") == 1
    assert not s.cancel(t1)
    assert s.release("a") == [t2] and not s.cancel(t2)
    assert s.figures() == [] and s.waiting == 0


def test_a_pinned_ticket_waits_for_its_agent_and_others_pass_it() -> None:
    s, clock = make({"a": 1, "b": 1})
    s.acquire(ticket(clock), ["a"])
    s.acquire(ticket(clock), ["b"])
    pinned = ticket(clock, only=frozenset({"a"}))
    other = ticket(clock)
    s.enqueue(pinned)
    s.enqueue(other)
    assert s.release("b") == [other]  # b cannot serve the pinned one: the next ticket takes the slot
    assert s.release("a") == [pinned]


def test_an_agent_serves_only_models_it_has() -> None:
    s, clock = make({"a": 1, "b": 1}, {"a": {"m"}, "b": {"n"}})
    s.acquire(ticket(clock), ["a"])
    s.acquire(ticket(clock, model="n"), ["b"])
    tm = ticket(clock)
    s.enqueue(tm)
    assert s.release("b") == []  # b does not have m
    assert s.busy == {"a": 1} and s.release("a") == [tm]


def test_busy_from_ollama_lowers_capacity_for_a_while() -> None:
    s, clock = make({"a": 4})
    for _ in range(4):
        assert s.acquire(ticket(clock), ["a"]) == "a"
    assert s.busy_signal("a") == (3, clock.now + CORRECTION_HOLD)  # four of ours were on it when it said busy
    s.release("a")
    clock.now += 0.5
    assert s.busy_signal("a")[0] == 3  # the same overload: not lowered again
    s.release("a")
    assert s.free("a") == 1
    clock.now += CORRECTION_HOLD + 1
    assert s.capacity("a") == 4 and s.free("a") == 2


def test_an_agent_that_grows_or_joins_takes_waiting_tickets_at_once() -> None:
    s, clock = make({"a": 1}, {"a": {"m"}, "b": {"m"}})
    s.acquire(ticket(clock), ["a"])
    waiting = [ticket(clock) for _ in range(3)]
    for t in waiting:
        s.enqueue(t)
    assert s.report("a", 2) == [waiting[0]]
    assert s.report("b", 2) == waiting[1:]
    assert s.report("b", 2) == []  # unchanged: nothing to do


def test_widen_lets_any_eligible_agent_take_a_restricted_ticket() -> None:
    s, clock = make({"warm": 1, "cold": 1})
    s.acquire(ticket(clock), ["warm"])
    t = ticket(clock, only=frozenset({"warm"}))
    s.enqueue(t)
    assert s.pump("cold") == []
    assert s.widen(t) == "cold" and t.node == "cold" and s.waiting == 0


def test_figures_show_depth_by_tier_and_the_oldest_wait() -> None:
    s, clock = make({"a": 1})
    s.acquire(ticket(clock), ["a"])
    s.enqueue(ticket(clock, tier="low"))
    clock.now += 3
    s.enqueue(ticket(clock, tier="high"))
    clock.now += 2
    (f,) = s.figures()
    assert (f.model, f.depth, f.by_tier, f.oldest_wait) == ("m", 2, {"high": 1, "normal": 0, "low": 1}, 5.0)


def simulate(seed: int, caps: dict[str, int]) -> list[tuple[int, str]]:
    """Random arrivals (two models, some pinned to one agent), completions and cancellations; checks the
    invariants after every step; returns the grants."""
    rnd = random.Random(seed)
    nodes = sorted(caps)
    models = {n: {"m", "n"} if i % 2 == 0 else {"m"} for i, n in enumerate(nodes)}
    s, clock = make(caps, models, max_queue=10_000)
    running: list[tuple[Ticket, int]] = []
    waiting: list[Ticket] = []
    grants: list[tuple[int, str]] = []
    ids: dict[int, int] = {}

    def granted(t: Ticket) -> None:
        assert t.node is not None and t.model in models[t.node] and (t.only is None or t.node in t.only)
        running.append((t, ids[id(t)]))
        grants.append((ids[id(t)], t.node))
        if t in waiting:
            waiting.remove(t)

    for step in range(400):
        clock.now += rnd.random()
        roll = rnd.random()
        if roll < 0.5:
            model = rnd.choice(("m", "m", "n"))
            servers = [n for n in nodes if model in models[n]]
            only = frozenset({rnd.choice(servers)}) if rnd.random() < 0.15 else None
            t = ticket(clock, party=rnd.choice("xyz"), tier=rnd.choice(("high", "normal", "low")), model=model,
                       only=only)
            ids[id(t)] = step
            if s.acquire(t, sorted(servers, key=lambda _: rnd.random())) is None:
                assert s.enqueue(t)
                waiting.append(t)
            else:
                granted(t)
        elif roll < 0.55 and waiting:
            t = waiting.pop(rnd.randrange(len(waiting)))
            assert s.cancel(t)
        elif running:
            t, _ = running.pop(rnd.randrange(len(running)))
            assert t.node is not None
            for g in s.release(t.node):
                granted(g)
        assert s.waiting == len(waiting)
        for node, cap in caps.items():
            assert 0 <= s.busy.get(node, 0) <= cap
            if s.free(node) > 0:  # a free slot never idles while a ticket it could serve waits
                assert not any(t.model in models[node] and (t.only is None or node in t.only) for t in waiting)
    return grants


def test_the_scheduler_is_deterministic_and_keeps_its_invariants() -> None:
    caps = {"a": 2, "b": 2, "c": 1}
    assert simulate(7, caps) == simulate(7, caps)
    assert simulate(7, caps) != simulate(8, caps)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.dictionaries(st.sampled_from("abcd"), st.integers(1, 4), min_size=1))
def test_invariants_hold_for_any_arrivals(seed: int, caps: dict[str, int]) -> None:
    grants = simulate(seed, caps)
    assert len({g for g, _ in grants}) == len(grants)  # no ticket granted twice


def test_warm_or_cold_decides_from_measured_times() -> None:
    e = Estimates()
    unknown = e.choose("m", "cold", {"warm": 2}, queued=0)
    assert not unknown.wait and "no measured load time" in unknown.note
    e.served("m", "cold", 1.0, load_s=8.0)  # a cold load measured at 8 s
    e.served("m", "warm", 2.0, load_s=0.01)  # a warm answer: 10 ms is not a load
    assert e.load == {("m", "cold"): 8.0}
    quick = e.choose("m", "cold", {"warm": 2}, queued=1)  # 2 s x 2 / 2 slots = 2 s < 8 s
    assert quick.wait and quick.patience == 8.0 and "warm wait for warm" in quick.note
    slow = e.choose("m", "cold", {"warm": 1}, queued=9)  # 2 s x 10 / 1 = 20 s > 8 s
    assert not slow.wait and "cold start on cold" in slow.note
    e.served("m", "cold", 1.0, load_s=3.0)
    assert e.load[("m", "cold")] == 8.0 + 0.2 * (3.0 - 8.0)


def test_the_queue_settings_refuse_values_that_would_break_the_order() -> None:
    for name, bad in (("queue_aging", "0"), ("queue_aging", "nan"), ("max_queue_wait", "-1"),
                      ("max_queue_wait", "inf"), ("max_queue", "-5")):
        try:
            load({CONTROLLER}, env={f"FLEET_{name.upper()}": bad})
        except ConfigError as e:
            assert name in str(e)
        else:
            raise AssertionError(f"{name}={bad} was accepted")
    assert load({CONTROLLER}, env={"FLEET_QUEUE_AGING": "0.5"}).queue_aging == 0.5
