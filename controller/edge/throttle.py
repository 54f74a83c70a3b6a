"""Throttling of failed credential checks (dashboard logins, bearer tokens, API keys).

Per client address and fleet-wide, over a sliding window: once either budget is spent, requests that
present a credential get 429 with `Retry-After` until the window has room again. While throttled the
credential is not even checked, so a guesser learns nothing from the answer. The fleet-wide budget
does not apply to addresses that authenticated successfully within `GOOD_FOR`: a distributed guesser
can stop new clients from logging in for a while, but not lock out the clients already at work. Failures are logged with
the address and what was tried against, never the secret itself.
"""

from __future__ import annotations

import logging
import time
from collections import deque

log = logging.getLogger("fleet.auth")

WINDOW = 60.0  # seconds
PER_ADDRESS = 10  # failed checks per address per window
GLOBAL = 100  # failed checks from all addresses per window (a distributed guesser)
MAX_ADDRESSES = 10_000  # addresses tracked; the oldest are forgotten first (bounded memory)
GOOD_FOR = 3600.0  # seconds an address that authenticated stays exempt from the fleet-wide budget


class Throttle:
    def __init__(self, window: float = WINDOW, per_address: int = PER_ADDRESS, global_: int = GLOBAL) -> None:
        self.window, self.per_address, self.global_ = window, per_address, global_
        self._by_addr: dict[str, deque[float]] = {}
        self._all: deque[float] = deque()
        self._good: dict[str, float] = {}  # address -> last successful authentication (monotonic)
        self.failures = 0
        self.refused = 0

    def _trim(self, q: deque[float], now: float) -> None:
        while q and q[0] <= now - self.window:
            q.popleft()

    def retry_after(self, addr: str, now: float | None = None) -> int:
        """Seconds until `addr` may present a credential again; 0 when it may now."""
        now = time.monotonic() if now is None else now
        self._trim(self._all, now)
        wait = 0.0
        if len(self._all) >= self.global_ and now - self._good.get(addr, -GOOD_FOR) >= GOOD_FOR:
            wait = self._all[len(self._all) - self.global_] + self.window - now
        q = self._by_addr.get(addr)
        if q is not None:
            self._trim(q, now)
            if not q:
                del self._by_addr[addr]
            elif len(q) >= self.per_address:
                wait = max(wait, q[len(q) - self.per_address] + self.window - now)
        if wait > 0:
            self.refused += 1
            return max(1, int(wait + 0.999))
        return 0

    def failed(self, addr: str, what: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.failures += 1
        self._all.append(now)
        while len(self._all) > self.global_ * 2:  # older entries no longer decide anything
            self._all.popleft()
        q = self._by_addr.pop(addr, None) or deque(maxlen=self.per_address)
        q.append(now)
        self._by_addr[addr] = q  # re-inserted: dict order is least recently failed first
        if len(self._by_addr) > MAX_ADDRESSES:
            del self._by_addr[next(iter(self._by_addr))]
        if len(q) == 1 or len(q) == self.per_address:
            log.warning("auth: wrong %s from %s (%d in the last %.0f s%s)", what, addr, len(q), self.window,
                        "; throttled" if len(q) >= self.per_address else "")

    def succeeded(self, addr: str, now: float | None = None) -> None:
        """`addr` presented a valid credential: exempt from the fleet-wide budget for a while."""
        self._good.pop(addr, None)
        self._good[addr] = time.monotonic() if now is None else now
        if len(self._good) > MAX_ADDRESSES:
            del self._good[next(iter(self._good))]
