"""controller/edge/throttle.py on its own clock: the sliding windows, the fleet-wide budget and its exemption
for clients already at work, and bounded memory. (End to end: tests/test_security_http.py.)"""

from __future__ import annotations

from ollama_fleet.controller.edge.throttle import GOOD_FOR, MAX_ADDRESSES, Throttle


def test_per_address_window_slides():
    t = Throttle(window=60, per_address=3, global_=1000)
    for i in range(3):
        assert t.retry_after("a", now=100 + i) == 0
        t.failed("a", "token", now=100 + i)
    assert t.retry_after("a", now=103) == 57  # the first failure leaves the window at 160
    assert t.retry_after("b", now=103) == 0
    assert t.retry_after("a", now=160.5) == 0


def test_global_budget_spares_recent_successes_only():
    t = Throttle(window=60, per_address=100, global_=5)
    t.succeeded("worker", now=0)
    for i in range(5):
        t.failed(f"x{i}", "key", now=10)
    assert t.retry_after("newcomer", now=11) > 0
    assert t.retry_after("worker", now=11) == 0
    assert t.retry_after("worker", now=GOOD_FOR + 1) == 0  # the window has passed: budget free again
    for i in range(5):
        t.failed(f"y{i}", "key", now=GOOD_FOR + 2)
    assert t.retry_after("worker", now=GOOD_FOR + 3) > 0  # its success is too old to vouch for it


def test_memory_is_bounded():
    t = Throttle()
    for i in range(MAX_ADDRESSES + 500):
        t.failed(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", "token", now=float(i) * 1e-6)
        t.succeeded(f"s{i}", now=0)
    assert len(t._by_addr) == MAX_ADDRESSES and len(t._good) == MAX_ADDRESSES
    assert len(t._all) <= 2 * t.global_
