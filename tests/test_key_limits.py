"""Per-key limits (controller/admission/limits.py): the meter with a clock the test holds, every refusal and its
Retry-After, the window sliding, memory staying bounded; and the parsing of limits typed on the command line."""

from __future__ import annotations

import pytest

from ollama_fleet.controller.admission.limits import (
    MAX_LIMIT,
    NONE,
    RESOLUTION,
    WINDOW,
    KeyLimits,
    KeyMeter,
    LimitError,
    Refusal,
    describe,
    parse_ceiling,
    parse_count,
    strictest,
)

T0 = 1000.0  # a monotonic clock's value; any start works


def admit(meter: KeyMeter, key: str, limits: KeyLimits, now: float) -> Refusal | None:
    """What the proxy does: check, and admit when allowed."""
    refusal = meter.check(key, limits, now)
    if refusal is None:
        meter.admit(key, now)
    return refusal


def reason(refusal: Refusal | None) -> str | None:
    return None if refusal is None else refusal.reason


def test_no_limits_never_refuse_and_usage_is_counted() -> None:
    meter = KeyMeter()
    for i in range(50):
        assert admit(meter, "a", NONE, T0 + i * 0.01) is None
    meter.finish("a", 30, T0 + 1)
    assert meter.usage("a", T0 + 1) == {"in_flight": 49, "requests_last_minute": 50, "tokens_last_minute": 30}


def test_concurrency_counts_admitted_requests_until_they_finish() -> None:
    meter, limits = KeyMeter(), KeyLimits(max_concurrent=2)
    assert admit(meter, "a", limits, T0) is None
    assert admit(meter, "a", limits, T0) is None
    refusal = meter.check("a", limits, T0 + 5)
    assert refusal is not None and refusal.reason == "concurrency" and refusal.retry_after == 1.0
    assert "2 at once" in refusal.message
    assert meter.check("b", limits, T0 + 5) is None  # per key
    meter.finish("a", 0, T0 + 6)
    assert admit(meter, "a", limits, T0 + 6) is None
    assert meter.check("a", limits, T0 + 7) is not None
    assert meter.usage("a", T0 + 7)["in_flight"] == 2


def test_rpm_refuses_until_the_oldest_request_leaves_the_minute() -> None:
    meter, limits = KeyMeter(), KeyLimits(rpm=3)
    for t in (T0, T0 + 10, T0 + 20):
        assert admit(meter, "a", limits, t) is None
        meter.finish("a", 0, t + 1)  # finished requests still count for rpm
    refusal = meter.check("a", limits, T0 + 30)
    assert refusal is not None and refusal.reason == "rpm"
    assert refusal.retry_after == pytest.approx(30.0)  # T0 leaves at T0 + 60
    assert refusal.retry_after_header == "30"
    assert "3 requests per minute" in refusal.message
    assert meter.check("a", limits, T0 + WINDOW - 0.5) is not None
    assert meter.check("a", limits, T0 + WINDOW) is None  # the window is (now - 60, now]
    assert meter.usage("a", T0 + WINDOW)["requests_last_minute"] == 2


def test_rpm_lowered_below_the_usage_waits_for_enough_requests_to_leave() -> None:
    meter = KeyMeter()
    for t in (T0, T0 + 10, T0 + 20, T0 + 30):
        admit(meter, "a", NONE, t)
    refusal = meter.check("a", KeyLimits(rpm=2), T0 + 40)
    # 4 in the window, a new one fits once fewer than 2 are: T0, T0+10 and T0+20 must leave
    assert refusal is not None and refusal.retry_after == pytest.approx(40.0)


def test_tpm_counts_finished_tokens_and_refuses_the_next_request() -> None:
    meter, limits = KeyMeter(), KeyLimits(tpm=100)
    assert admit(meter, "a", limits, T0) is None
    assert admit(meter, "a", limits, T0) is None  # nothing finished yet: tokens are known at the end
    meter.finish("a", 60, T0 + 5)
    assert meter.check("a", limits, T0 + 6) is None  # 60 < 100
    meter.finish("a", 70, T0 + 15)  # this one takes the key over: it completed anyway
    refusal = meter.check("a", limits, T0 + 20)
    assert refusal is not None and refusal.reason == "tpm" and "100 tokens per minute" in refusal.message
    assert refusal.retry_after == pytest.approx(45.0)  # 130 - 60 = 70 < 100 once T0+5 leaves at T0+65
    assert meter.usage("a", T0 + 20) == {"in_flight": 0, "requests_last_minute": 2, "tokens_last_minute": 130}
    assert meter.check("a", limits, T0 + 65) is None


def test_tpm_over_by_much_waits_for_as_many_entries_as_needed() -> None:
    meter, limits = KeyMeter(), KeyLimits(tpm=50)
    for t, tokens in ((T0, 40), (T0 + 10, 40), (T0 + 20, 40)):
        meter.admit("a", t)
        meter.finish("a", tokens, t)
    refusal = meter.check("a", limits, T0 + 30)
    assert refusal is not None and refusal.retry_after == pytest.approx(40.0)  # two must leave: 40 < 50


def test_the_first_limit_reached_is_the_one_named() -> None:
    meter, limits = KeyMeter(), KeyLimits(max_concurrent=1, rpm=1, tpm=1)
    meter.admit("a", T0)
    assert reason(meter.check("a", limits, T0 + 1)) == "concurrency"
    meter.finish("a", 5, T0 + 1)
    assert reason(meter.check("a", limits, T0 + 2)) == "rpm"
    assert reason(meter.check("a", KeyLimits(tpm=5), T0 + 2)) == "tpm"
    assert meter.check("a", KeyLimits(tpm=6), T0 + 2) is None


def test_a_request_without_tokens_records_none() -> None:
    meter = KeyMeter()
    meter.admit("a", T0)
    meter.finish("a", 0, T0 + 1)
    assert meter.usage("a", T0 + 1)["tokens_last_minute"] == 0


def test_retry_after_header_rounds_up_to_whole_seconds() -> None:
    assert Refusal("rpm", "x", 0.2).retry_after_header == "1"
    assert Refusal("rpm", "x", 29.01).retry_after_header == "30"
    assert Refusal("rpm", "x", 30.0).retry_after_header == "30"


def test_requests_within_one_second_share_an_entry_that_leaves_with_the_latest() -> None:
    """Memory per key is bounded by the window's seconds, never by the request rate; an entry leaves the
    window with its newest request (the limit is kept strictly, at most RESOLUTION late)."""
    meter, limits = KeyMeter(), KeyLimits(rpm=3)
    for t in (T0 + 0.1, T0 + 0.5, T0 + 0.9):
        assert admit(meter, "a", limits, t) is None
    refusal = meter.check("a", limits, T0 + 1.0)
    assert refusal is not None and refusal.retry_after == pytest.approx(59.9)  # T0+0.9 leaves at T0+60.9
    assert meter.check("a", limits, T0 + 60.5) is not None
    assert meter.check("a", limits, T0 + 60.9) is None


def test_memory_per_key_stays_bounded_at_any_rate() -> None:
    meter = KeyMeter()
    now = T0
    for _ in range(20_000):  # 100 requests a second for 200 s
        now += 0.01
        meter.admit("a", now)
        meter.finish("a", 3, now)
    usage = meter._keys["a"]
    assert len(usage.requests.entries) <= WINDOW / RESOLUTION + 1
    assert len(usage.tokens.entries) <= WINDOW / RESOLUTION + 1
    got = meter.usage("a", now)
    assert got["in_flight"] == 0
    # 60 s at 100 a second, plus at most one second's entry that has not left yet (never early)
    assert 6000 <= got["requests_last_minute"] <= 6000 + 100 * RESOLUTION
    assert got["tokens_last_minute"] == 3 * got["requests_last_minute"]


def test_idle_keys_are_forgotten_busy_ones_kept() -> None:
    meter = KeyMeter()
    meter.admit("gone", T0)
    meter.finish("gone", 10, T0 + 1)
    meter.admit("busy", T0)  # never finishes within the test: in flight keeps it
    assert len(meter) == 2
    assert meter.check("other", NONE, T0 + WINDOW + 2) is None  # any call sweeps every key
    assert len(meter) == 1 and set(meter._keys) == {"busy"}
    assert meter.usage("busy", T0 + 500) == {"in_flight": 1, "requests_last_minute": 0, "tokens_last_minute": 0}
    meter.finish("busy", 0, T0 + 501)
    assert len(meter) == 0  # finishing the last request with nothing in the window forgets the key


def test_usage_and_check_of_unknown_keys_remember_nothing() -> None:
    meter = KeyMeter()
    assert meter.usage("x", T0) == {"in_flight": 0, "requests_last_minute": 0, "tokens_last_minute": 0}
    assert meter.check("x", KeyLimits(max_concurrent=1, rpm=1, tpm=1), T0) is None
    assert len(meter) == 0


def test_a_finish_without_admit_never_goes_below_zero() -> None:
    meter = KeyMeter()
    meter.finish("a", 5, T0)
    assert meter.usage("a", T0) == {"in_flight": 0, "requests_last_minute": 0, "tokens_last_minute": 5}


def test_the_meter_is_deterministic() -> None:
    def run() -> list[object]:
        meter, limits, out = KeyMeter(), KeyLimits(max_concurrent=3, rpm=5, tpm=40), list[object]()
        for i in range(40):
            t = T0 + i * 2.7
            out.append(admit(meter, "k", limits, t))
            if i % 2:
                meter.finish("k", i, t + 0.5)
        return out

    first = run()
    assert first == run() and any(first) and not all(first)


# --- limits as values, and as typed ------------------------------------------------------------------------

def test_parse_count() -> None:
    assert parse_count("5") == 5 and parse_count(" 12 ") == 12 and parse_count(str(MAX_LIMIT)) == MAX_LIMIT
    assert parse_count("0") is None and parse_count("none") is None and parse_count("NONE") is None
    for bad in ("-1", "1.5", "abc", "", "٣", str(MAX_LIMIT + 1), "1e3"):
        with pytest.raises(LimitError):
            parse_count(bad)


def test_parse_ceiling() -> None:
    assert parse_ceiling("high") == "high" and parse_ceiling(" Low ") == "low"
    assert parse_ceiling("none") is None and parse_ceiling("0") is None
    with pytest.raises(LimitError, match="high, normal, low"):
        parse_ceiling("urgent")


def test_limits_validate_themselves_and_read_stored_values_tolerantly() -> None:
    for bad in ({"rpm": 0}, {"tpm": -5}, {"max_concurrent": True}, {"max_priority": "urgent"},
                {"rpm": MAX_LIMIT + 1}):
        with pytest.raises(LimitError):
            KeyLimits(**bad)
    assert KeyLimits.of(0, -1, "7", "urgent") == NONE  # a hand-edited row: no limit, not a crash
    assert KeyLimits.of(2, 60, 1000, "low") == KeyLimits(2, 60, 1000, "low")


def test_changed_replaces_only_the_named_limits() -> None:
    base = KeyLimits(max_concurrent=2, rpm=60, max_priority="normal")
    assert base.changed({"rpm": None, "tpm": 500}) == KeyLimits(max_concurrent=2, tpm=500, max_priority="normal")
    assert base.changed({}) == base
    with pytest.raises(LimitError):
        base.changed({"burst": 3})
    assert not NONE and base


def test_strictest_of_two_keys_with_one_name() -> None:
    a = KeyLimits(max_concurrent=4, rpm=None, tpm=100, max_priority="high")
    b = KeyLimits(max_concurrent=2, rpm=60, tpm=None, max_priority="low")
    assert strictest(a, b) == KeyLimits(max_concurrent=2, rpm=60, tpm=100, max_priority="low")
    assert strictest(NONE, NONE) == NONE
    assert strictest(NONE, a) == a == strictest(a, NONE)


def test_describe() -> None:
    assert describe(NONE) == "no limits"
    assert describe(KeyLimits(2, 60, 1000, "normal")) == "2 concurrent, 60 rpm, 1000 tpm, priority at most normal"
