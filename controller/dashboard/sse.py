"""The dashboard's one live stream: hub events in, coalesced HTML fragments out (Server-Sent Events).

A page opens `/dashboard/stream?view=...`; the stream first sends a snapshot of every live region of
that page (so a reconnect re-syncs), then out-of-band fragments that htmx swaps in place by id. What
is sent is coalesced: a row or block is re-rendered at most every `every` seconds (heartbeats of a
big fleet arrive many times a second), the whole stream sends at most every MIN_GAP seconds, and
identical renders are not sent at all; a state change (agent new, lost, offline, deleted, job status)
skips every wait.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, ClassVar, Protocol

from sanic import Request

from ollama_fleet.controller.hub import Event, Hub
from ollama_fleet.controller.jobs.ledger import JobLedger
from ollama_fleet.controller.registry.live import Registry

PING_EVERY = 15.0  # seconds of silence before a `: ping` comment keeps proxies and the browser happy
MIN_GAP = 0.05  # seconds between two non-urgent messages on one stream
QUEUE = 5000  # hub events buffered per stream; a full queue means events were lost: re-sync
MAX_ROWS = 10  # row updates per message (so at most ~200 a second) beyond urgent ones: the browser's budget
RETRY_MS = 1000  # EventSource reconnect delay
CLOSE: Event = ("_close", {})

Render = Callable[[], Awaitable[str]]


def frame(parts: list[str], event: str = "update") -> str:
    """One SSE message of fragments. Each goes in its own <template>: the HTML parser then accepts table
    parts (<tbody>, <tr>) next to other elements, and htmx swaps out-of-band elements found in templates.
    Every line becomes a `data:` line."""
    html = "\n".join(f"<template>{p}</template>" for p in parts if p)
    lines = "\n".join("data: " + line for line in html.splitlines())  # \r too: never a new SSE field
    return f"event: {event}\n{lines}\n\n"


class Section:
    """One live region of a page."""

    urgent = False

    async def snapshot(self) -> str:
        raise NotImplementedError

    def note(self, topic: str, data: dict[str, Any], urgent: bool) -> None:
        raise NotImplementedError

    def due(self) -> float | None:
        """Monotonic time at which `flush` has something to do; None when nothing is pending."""
        raise NotImplementedError

    async def flush(self, now: float) -> str:
        raise NotImplementedError


class Block(Section):
    """A region re-rendered whole: cards, an agent's live facts, a job list.

    `wants(topic, data)` says whether an event concerns it; `poll` re-renders on a timer as well (for
    figures without hub events, like request counters); unchanged renders are not sent.
    """

    def __init__(self, render: Render, wants: Callable[[str, dict[str, Any]], bool], every: float,
                 poll: float | None = None) -> None:
        self.render, self.wants, self.every, self.poll = render, wants, every, poll
        self.dirty = False
        self.urgent = False
        self.last_sent = float("-inf")
        self.last_check = time.monotonic()
        self.last_html = ""

    async def snapshot(self) -> str:
        self.last_html = await self.render()
        self.dirty = self.urgent = False
        self.last_sent = self.last_check = time.monotonic()
        return self.last_html

    def note(self, topic: str, data: dict[str, Any], urgent: bool) -> None:
        if self.wants(topic, data):
            self.dirty = True
            self.urgent = self.urgent or urgent

    def due(self) -> float | None:
        if self.urgent:
            return 0.0
        if self.dirty:
            return self.last_sent + self.every
        return self.last_check + self.poll if self.poll else None

    async def flush(self, now: float) -> str:
        d = self.due()
        if d is None or d > now:
            return ""
        self.dirty = self.urgent = False
        self.last_check = now
        html = await self.render()
        if html == self.last_html:
            return ""
        self.last_html, self.last_sent = html, now
        return html


class Keyed(Section):
    """A list of rows (agents table, model matrix): rows are updated one by one while the list keeps
    its shape (same keys, same order, same columns); any change of shape re-renders the list whole.

    `tick`, every `poll` seconds, names rows whose figures changed without a hub event (request rates).
    """

    def __init__(self, shape: Callable[[], Any], keys_of: Callable[[str, dict[str, Any]], list[str]],
                 row: Callable[[str], Awaitable[str]], whole: Render, every: float = 0.25,
                 every_whole: float = 1.0, sig: Callable[[str], Any] | None = None,
                 poll: float | None = None, tick: Callable[[], Iterable[str]] | None = None) -> None:
        self.shape, self.keys_of, self.row, self.whole = shape, keys_of, row, whole
        self.every, self.every_whole = every, every_whole
        self.sig = sig  # what a row shows, cheaper than rendering it: unchanged rows are not rendered
        self.poll: float | None = poll if tick is not None else None
        self.tick: Callable[[], Iterable[str]] | None = tick if poll else None
        self.last_tick = time.monotonic()
        self.last_sig: dict[str, Any] = {}
        self.sent_shape: Any = None
        self.last_whole = float("-inf")
        self.last_sent: dict[str, float] = {}
        self.last_html: dict[str, str] = {}
        self.dirty: set[str] = set()
        self.urgent_keys: set[str] = set()
        self.reshape_at: float | None = None  # a re-shape waiting for every_whole

    @property
    def urgent(self) -> bool:  # type: ignore[override]
        return bool(self.urgent_keys)

    async def snapshot(self) -> str:
        self.sent_shape = self.shape()
        self.last_whole = time.monotonic()
        self.last_sent.clear()
        self.last_html.clear()
        self.last_sig.clear()
        self.dirty.clear()
        self.urgent_keys.clear()
        self.reshape_at = None
        return await self.whole()

    def note(self, topic: str, data: dict[str, Any], urgent: bool) -> None:
        for k in self.keys_of(topic, data):
            self.dirty.add(k)
            if urgent:
                self.urgent_keys.add(k)

    def due(self) -> float | None:
        if self.urgent_keys:
            return 0.0
        if self.reshape_at is not None:
            return self.reshape_at
        due = min((self.last_sent.get(k, float("-inf")) + self.every for k in self.dirty), default=None)
        if self.poll is not None:
            due = min(self.last_tick + self.poll, due if due is not None else float("inf"))
        return due

    async def flush(self, now: float) -> str:
        if self.tick is not None and self.poll is not None and now >= self.last_tick + self.poll:
            self.last_tick = now
            self.dirty.update(self.tick())
        shape = self.shape()
        if shape != self.sent_shape:
            if not self.urgent_keys and now - self.last_whole < self.every_whole:
                self.reshape_at = self.last_whole + self.every_whole  # re-shaped again so soon: wait
                return ""
            return await self.snapshot()
        out = []
        budget = MAX_ROWS
        # urgent rows first, then the longest-waiting: under a flood every row still gets its turn
        for k in sorted(self.dirty, key=lambda k: (k not in self.urgent_keys, self.last_sent.get(k, float("-inf")))):
            urgent = k in self.urgent_keys
            if not urgent and (budget <= 0 or self.last_sent.get(k, float("-inf")) + self.every > now):
                continue
            self.dirty.discard(k)
            self.urgent_keys.discard(k)
            if self.sig is not None:
                sig = self.sig(k)
                if k in self.last_sig and sig == self.last_sig[k]:
                    continue
                self.last_sig[k] = sig
            html = await self.row(k)
            if html and html != self.last_html.get(k):
                self.last_html[k], self.last_sent[k] = html, now
                out.append(html)
                budget -= 0 if urgent else 1
        return "\n".join(out)


class Prepend(Section):
    """New items on top of a list (events): sent at once, never re-rendered."""

    def __init__(self, initial: Render, wants: Callable[[dict[str, Any]], bool],
                 rows: Callable[[list[dict[str, Any]]], Awaitable[str]], seen: Callable[[], set[Any]]) -> None:
        self.initial, self.wants, self.rows, self.seen_now = initial, wants, rows, seen
        self.pending: list[dict[str, Any]] = []
        self.seen: set[Any] = set()

    @staticmethod
    def key(ev: dict[str, Any]) -> Any:
        return ev.get("ts"), ev.get("node_id"), ev.get("kind")

    async def snapshot(self) -> str:
        html = await self.initial()
        self.seen = self.seen_now()  # events of the snapshot: their hub copies may still be queued
        self.pending = [e for e in self.pending if self.key(e) not in self.seen]
        return html

    def note(self, topic: str, data: dict[str, Any], urgent: bool) -> None:
        if topic == "event" and self.wants(data) and self.key(data) not in self.seen:
            self.pending.append(data)

    @property
    def urgent(self) -> bool:  # type: ignore[override]
        return bool(self.pending)

    def due(self) -> float | None:
        return 0.0 if self.pending else None

    async def flush(self, now: float) -> str:
        if not self.pending:
            return ""
        items, self.pending = self.pending, []
        self.seen.clear()  # only needed right after a snapshot
        return await self.rows(list(reversed(items)))


class Parts(Protocol):
    """What a stream reads of the fleet: compose.Fleet, which imports this module (Stream.close_all), so
    named here by what it has rather than imported."""

    @property
    def hub(self) -> Hub: ...

    @property
    def registry(self) -> Registry: ...

    @property
    def jobs(self) -> JobLedger: ...


class Classifier:
    """Says which hub events are state changes (sent at once) rather than figures (coalesced)."""

    def __init__(self, fleet: Parts) -> None:
        self.fleet = fleet
        self.status: dict[str, str | None] = {}
        self.jobs: dict[str, str] = {}

    def reset(self) -> None:
        self.status = {k: a.status for k, a in self.fleet.registry.agents.items()}
        self.jobs = {r.task_id: r.status for r in self.fleet.jobs.active.values()}

    def urgent(self, topic: str, data: dict[str, Any]) -> bool:
        if topic == "agent":
            node = data.get("id", "")
            a = self.fleet.registry.agents.get(node)
            now = None if a is None or data.get("deleted") else a.status
            before = self.status.get(node, "new")
            if now is None:
                self.status.pop(node, None)
            else:
                self.status[node] = now
            return before != now
        if topic == "job":
            task, status = str(data.get("id")), str(data.get("status"))
            before = self.jobs.get(task)
            self.jobs[task] = status
            if len(self.jobs) > 10000:
                self.jobs.clear()
            return before != status
        return topic == "event"


class Stream:
    """One browser's stream: sections of its page, fed by a hub subscription."""

    streams: ClassVar[set[asyncio.Queue[Event]]] = set()  # every open stream, to end them at shutdown

    def __init__(self, fleet: Parts, sections: list[Section]) -> None:
        self.fleet, self.sections = fleet, sections
        self.classifier = Classifier(fleet)

    @classmethod
    def close_all(cls) -> None:
        for q in list(cls.streams):
            try:
                q.put_nowait(CLOSE)
            except asyncio.QueueFull:
                q.get_nowait()
                q.put_nowait(CLOSE)

    async def snapshot(self) -> str:
        self.classifier.reset()
        return frame([await s.snapshot() for s in self.sections])

    def due(self, last_flush: float) -> float | None:
        dues = [d for s in self.sections if (d := s.due()) is not None]
        if not dues:
            return None
        if any(s.urgent for s in self.sections):
            return 0.0
        return max(min(dues), last_flush + MIN_GAP)

    async def run(self, request: Request) -> None:
        hub = self.fleet.hub
        q = hub.subscribe(QUEUE)  # before the snapshot: nothing between the two is lost
        Stream.streams.add(q)
        try:
            resp = await request.respond(content_type="text/event-stream; charset=utf-8",
                                         headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
            await resp.send(f"retry: {RETRY_MS}\n\n" + await self.snapshot())
            last_write = last_flush = time.monotonic()
            while True:
                now = time.monotonic()
                due = self.due(last_flush)
                wait = PING_EVERY - (now - last_write)
                if due is not None:
                    wait = min(wait, due - now)
                item: Event | None = None
                if wait > 0:
                    try:
                        item = await asyncio.wait_for(q.get(), wait)
                    except TimeoutError:
                        pass
                if item is not None:
                    overflow = q.full()
                    items = [item]
                    while not q.empty():
                        items.append(q.get_nowait())
                    if CLOSE in items:
                        break
                    if overflow:  # the hub dropped events for us: start over from the registry
                        await resp.send(await self.snapshot())
                        last_write = last_flush = time.monotonic()
                        continue
                    for topic, data in items:
                        urgent = self.classifier.urgent(topic, data)
                        for s in self.sections:
                            s.note(topic, data, urgent)
                now = time.monotonic()
                due = self.due(last_flush)
                if due is not None and due <= now:
                    parts = [p for s in self.sections if (p := await s.flush(now))]
                    last_flush = now
                    if parts:
                        await resp.send(frame(parts))
                        last_write = now
                if now - last_write >= PING_EVERY:
                    await resp.send(": ping\n\n")
                    last_write = now
            await resp.eof()
        finally:
            Stream.streams.discard(q)
            hub.unsubscribe(q)
