"""Per-API-key limits and the meter that enforces them: requests in flight, requests per minute and tokens
per minute. Pure: no I/O, the caller passes a monotonic `now` (seconds), so the same calls give the same answers.

Tokens are Ollama's own counts (prompt + completion), known only when a request finishes: a request that
takes the key over its tokens per minute still completes, and the next one is refused until enough of
the minute's tokens leave the window.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ollama_fleet.controller.admission.priority import RANK, TIERS

WINDOW = 60.0  # seconds: the "per minute" of rpm and tpm
# Admissions (and finished tokens) within one second share one window entry, kept with the latest time:
# a key's memory stays at most ~61 entries per window at any request rate, and an entry never leaves
# the window before the newest request in it does (the limit is never exceeded, at most 1 s strict).
RESOLUTION = 1.0
MAX_LIMIT = 2**31 - 1  # the database column is a 32-bit integer
CLEAR = ("0", "none")  # what clears a limit on the command line
CONCURRENCY, RPM, TPM = "concurrency", "rpm", "tpm"


class LimitError(ValueError):
    """A value that is not a limit (typed on the command line, or given in code); the message is for the operator."""


@dataclass(frozen=True)
class KeyLimits:
    """None: no limit of that kind. max_priority: the best tier the key's requests get (priority.capped)."""

    max_concurrent: int | None = None
    rpm: int | None = None
    tpm: int | None = None
    max_priority: str | None = None

    def __post_init__(self) -> None:
        for name in ("max_concurrent", "rpm", "tpm"):
            value = getattr(self, name)
            if value is not None and _count_or_none(value) is None:
                raise LimitError(f"{name} must be a whole number from 1 to {MAX_LIMIT}, or None; got {value!r}")
        if self.max_priority is not None and self.max_priority not in RANK:
            raise LimitError(f"max_priority must be one of {', '.join(TIERS)}, or None; got {self.max_priority!r}")

    @classmethod
    def of(cls, max_concurrent: Any = None, rpm: Any = None, tpm: Any = None,
           max_priority: Any = None) -> KeyLimits:
        """Limits from stored values, tolerant: a value that is not a valid limit (a hand-edited row) is no limit,
        so one bad row never stops the controller from loading its keys."""
        return cls(_count_or_none(max_concurrent), _count_or_none(rpm), _count_or_none(tpm),
                   max_priority if max_priority in RANK else None)

    def as_dict(self) -> dict[str, int | str | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def changed(self, changes: dict[str, int | str | None]) -> KeyLimits:
        """These limits with the named ones replaced (None clears one)."""
        unknown = set(changes) - set(LIMIT_NAMES)
        if unknown:
            raise LimitError(f"unknown limit {min(unknown)!r}")
        return replace(self, **changes)  # type: ignore[arg-type]  # names checked above

    def __bool__(self) -> bool:
        return any(v is not None for v in self.as_dict().values())


NONE = KeyLimits()
LIMIT_NAMES: tuple[str, ...] = tuple(f.name for f in fields(KeyLimits))


def _count_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_LIMIT else None


def parse_count(text: str) -> int | None:
    """A count limit as typed: a positive integer; 0 or "none" clears it (None). LimitError otherwise."""
    t = text.strip().lower()
    if t in CLEAR:
        return None
    if not t.isdigit() or not t.isascii():
        raise LimitError(f"{text!r} is not a limit: give a positive whole number, or 0 or 'none' for no limit")
    n = int(t)
    if n > MAX_LIMIT:
        raise LimitError(f"{text!r} is too large: at most {MAX_LIMIT}")
    return n


def parse_ceiling(text: str) -> str | None:
    """A priority ceiling as typed: one of TIERS; "none" (or 0) clears it (None). LimitError otherwise."""
    t = text.strip().lower()
    if t in CLEAR:
        return None
    if t not in RANK:
        raise LimitError(f"{text!r} is not a priority: give one of {', '.join(TIERS)}, or 'none' for no ceiling")
    return t


def strictest(a: KeyLimits, b: KeyLimits) -> KeyLimits:
    """Per kind, the tighter of two limits (None is no limit): for keys that share one name, and one budget."""
    def low(x: int | None, y: int | None) -> int | None:
        return y if x is None else x if y is None else min(x, y)

    ceilings = [c for c in (a.max_priority, b.max_priority) if c is not None]
    return KeyLimits(low(a.max_concurrent, b.max_concurrent), low(a.rpm, b.rpm), low(a.tpm, b.tpm),
                     max(ceilings, key=RANK.__getitem__) if ceilings else None)


def describe(limits: KeyLimits) -> str:
    """One line for listings: "2 concurrent, 60 rpm, 100000 tpm, priority at most normal" or "no limits"."""
    parts = [f"{v} {label}" for v, label in ((limits.max_concurrent, "concurrent"), (limits.rpm, "rpm"),
                                             (limits.tpm, "tpm")) if v is not None]
    if limits.max_priority is not None:
        parts.append(f"priority at most {limits.max_priority}")
    return ", ".join(parts) or "no limits"


@dataclass(frozen=True)
class Refusal:
    """Why a key's request is refused now (the caller answers 429), and when trying again can succeed."""

    reason: str  # CONCURRENCY, RPM or TPM
    message: str
    retry_after: float  # seconds, > 0

    @property
    def retry_after_header(self) -> str:
        """The Retry-After header's value: whole seconds, rounded up, at least 1."""
        return str(max(1, math.ceil(self.retry_after)))


@dataclass
class _Window:
    """(second bucket, time of the latest event in it, amount) entries of the last WINDOW seconds, and their sum."""

    entries: deque[tuple[int, float, int]] = field(default_factory=deque)
    total: int = 0

    def add(self, now: float, amount: int) -> None:
        bucket = math.floor(now / RESOLUTION)
        if self.entries and self.entries[-1][0] == bucket:
            amount_before = self.entries.pop()[2]
            self.total -= amount_before
            amount += amount_before
        self.entries.append((bucket, now, amount))
        self.total += amount

    def prune(self, now: float) -> None:
        while self.entries and self.entries[0][1] <= now - WINDOW:
            self.total -= self.entries.popleft()[2]

    def wait_below(self, limit: int, now: float) -> float:
        """Seconds until the total in the window is below `limit` again (the oldest entries leaving first)."""
        left = self.total
        for _, ts, amount in self.entries:
            left -= amount
            if left < limit:
                return ts + WINDOW - now
        return WINDOW  # not reached: a total at or over a positive limit has entries


@dataclass
class _Usage:
    in_flight: int = 0  # admitted and not finished: queued or running
    requests: _Window = field(default_factory=_Window)  # admissions
    tokens: _Window = field(default_factory=_Window)  # tokens of finished requests

    def prune(self, now: float) -> None:
        self.requests.prune(now)
        self.tokens.prune(now)

    @property
    def idle(self) -> bool:
        return not self.in_flight and not self.requests.entries and not self.tokens.entries


class KeyMeter:
    """What each key is using now and in the last minute, against its limits. Keys are key names.

    The caller asks `check` before admitting a request, calls `admit` when it does (the request is then
    in flight, queued or running, and counts for rpm) and `finish` exactly once when it ends, with the
    tokens Ollama counted (0 when none). A key with nothing in flight and nothing in its windows is forgotten.
    """

    def __init__(self) -> None:
        self._keys: dict[str, _Usage] = {}
        self._swept = -math.inf

    def __len__(self) -> int:
        """How many keys are remembered (in flight or within the window)."""
        return len(self._keys)

    def check(self, key: str, limits: KeyLimits, now: float) -> Refusal | None:
        """Why a new request with `key` must be refused now, or None when it may be admitted."""
        u = self._current(key, now)
        if u is None:
            return None
        if limits.max_concurrent is not None and u.in_flight >= limits.max_concurrent:
            return Refusal(CONCURRENCY, f"too many concurrent requests for this API key: its limit is "
                                        f"{limits.max_concurrent} at once", 1.0)
        if limits.rpm is not None and u.requests.total >= limits.rpm:
            return Refusal(RPM, f"rate limit: this API key may make {limits.rpm} requests per minute",
                           u.requests.wait_below(limits.rpm, now))
        if limits.tpm is not None and u.tokens.total >= limits.tpm:
            return Refusal(TPM, f"token limit: this API key may use {limits.tpm} tokens per minute "
                                f"(prompt and completion)", u.tokens.wait_below(limits.tpm, now))
        return None

    def admit(self, key: str, now: float) -> None:
        u = self._current(key, now) or self._keys.setdefault(key, _Usage())
        u.in_flight += 1
        u.requests.add(now, 1)

    def finish(self, key: str, tokens: int, now: float) -> None:
        """The request ended (answered, failed or cancelled); `tokens`: prompt + completion as Ollama counted."""
        u = self._current(key, now) or self._keys.setdefault(key, _Usage())
        u.in_flight = max(0, u.in_flight - 1)
        if tokens > 0:
            u.tokens.add(now, tokens)
        if u.idle:
            del self._keys[key]

    def usage(self, key: str, now: float) -> dict[str, int]:
        u = self._current(key, now) or _Usage()
        return {"in_flight": u.in_flight, "requests_last_minute": u.requests.total,
                "tokens_last_minute": u.tokens.total}

    def _current(self, key: str, now: float) -> _Usage | None:
        """The key's usage with its windows pruned to `now`; None (and forgotten) when nothing is left."""
        self._sweep(now)
        u = self._keys.get(key)
        if u is None:
            return None
        u.prune(now)
        if u.idle:
            del self._keys[key]
            return None
        return u

    def _sweep(self, now: float) -> None:
        """Forget every idle key, not only the one asked about (at most once a RESOLUTION: keys are few,
        calls many): a key used once and never again does not stay."""
        if now - self._swept < RESOLUTION:
            return
        self._swept = now
        for key in list(self._keys):
            u = self._keys[key]
            u.prune(now)
            if u.idle:
                del self._keys[key]
