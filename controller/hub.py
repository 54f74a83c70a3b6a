"""The one event hub: MQTT ingest (through the registry) publishes, SSE streams and waiters subscribe."""

from __future__ import annotations

import asyncio
from typing import Any

Event = tuple[str, dict[str, Any]]


class Hub:
    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[Event]] = set()
        self.dropped = 0

    def subscribe(self, maxsize: int = 1000) -> asyncio.Queue[Event]:
        q: asyncio.Queue[Event] = asyncio.Queue(maxsize)
        self._subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[Event]) -> None:
        self._subscribers.discard(q)

    def publish(self, topic: str, data: dict[str, Any]) -> None:
        """Never blocks ingest: a subscriber that cannot keep up loses events (and re-syncs itself)."""
        for q in self._subscribers:
            try:
                q.put_nowait((topic, data))
            except asyncio.QueueFull:
                self.dropped += 1

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)
