"""Throttling of failed credential checks (dashboard logins, bearer tokens, API keys).

Per client address and fleet-wide, over a sliding window: once either budget is spent, requests that
present a credential get 429 with `Retry-After` until the window has room again. While throttled the
credential is not even checked, so a guesser learns nothing from the answer. Failures are logged with
the address and what was tried against, never the secret itself.
"""

from __future__ import annotations

import logging
import time
from collections import deque

from sanic.response import HTTPResponse, json

log = logging.getLogger("fleet.auth")

WINDOW = 60.0  # seconds
PER_ADDRESS = 10  # failed checks per address per window
GLOBAL = 100  # failed checks from all addresses per window (a distributed guesser)
MAX_ADDRESSES = 10_000  # addresses tracked; the oldest are forgotten first (bounded memory)


class Throttle:
    def __init__(self, window: float = WINDOW, per_address: int = PER_ADDRESS, global_: int = GLOBAL) -> None:
        self.window, self.per_address, self.global_ = window, per_address, global_
        self._by_addr: dict[str, deque[float]] = {}
        self._all: deque[float] = deque()
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
        if len(self._all) >= self.global_:
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


def too_many(openai: bool, wait: int) -> HTTPResponse:
    """429 with Retry-After, in the API's error shape (Ollama's or OpenAI's)."""
    msg = f"too many failed authentication attempts: retry in {wait} s"
    body = ({"error": {"message": msg, "type": "rate_limit_error", "param": None, "code": "rate_limited"}}
            if openai else {"error": msg})
    return json(body, status=429, headers={"retry-after": str(wait)})
