"""The dashboard's SSE stream at the HTTP level: snapshot first, coalescing of heartbeat floods,
state changes at once, and the stream ending cleanly when the controller stops."""

from __future__ import annotations

import itertools
import re
import threading
import time
from typing import Any

import httpx

from tests.browser import SimAgent
from tests.support import wait_until


class StreamReader:
    """Reads one /dashboard/stream in a thread: every message with its wall-clock arrival time."""

    def __init__(self, url: str) -> None:
        self.messages: list[tuple[float, str]] = []
        self.comments: list[str] = []
        self.ended = threading.Event()
        self._stop = False
        self.thread = threading.Thread(target=self._run, args=(url,), daemon=True)
        self.thread.start()

    def _run(self, url: str) -> None:
        data: list[str] = []
        try:
            with httpx.stream("GET", url, timeout=httpx.Timeout(5, read=30), trust_env=False) as r:
                assert r.headers["content-type"].startswith("text/event-stream")
                for line in r.iter_lines():
                    if self._stop:
                        break
                    if line.startswith("data: "):
                        data.append(line[6:])
                    elif line.startswith(":"):
                        self.comments.append(line)
                    elif not line and data:
                        self.messages.append((time.time(), "\n".join(data)))
                        data = []
        except httpx.HTTPError:
            pass
        finally:
            self.ended.set()

    def since(self, t: float) -> list[tuple[float, str]]:
        return [(at, m) for at, m in list(self.messages) if at >= t]

    def close(self) -> None:
        self._stop = True


def row_updates(messages: list[tuple[float, str]], node: str) -> list[tuple[float, str]]:
    return [(at, m) for at, m in messages if f'id="agent-{node}"' in m]


def test_snapshot_first_then_coalesced_rows_and_immediate_state_changes(fleet):
    c = fleet.controller()
    sim = SimAgent(fleet, "flood-1", gpus=1)
    sim.heartbeat()
    c.wait_agent("flood-1", status="online")
    reader = StreamReader(c.url + "/dashboard/stream?view=agents")
    try:
        wait_until(lambda: reader.messages, 5, what="snapshot")
        snapshot = reader.messages[0][1]
        assert 'id="agent-rows"' in snapshot and 'id="agent-flood-1"' in snapshot and 'id="pulse"' in snapshot

        # 2 s of heartbeats at ~200/s: the browser gets at most one row update per 250 ms
        t0 = time.time()
        n = 0
        while time.time() - t0 < 2.0:
            sim.heartbeat(vram_gb=10 + n % 10, wait=False)  # VRAM is in the row: every heartbeat changes it
            n += 1
            if n % 20 == 0:
                time.sleep(0.1)  # pacing the generator (~200/s), not waiting for a condition
        wait_until(lambda: c.http.get("/api/agents/flood-1").json()["metrics"]["seq"] == sim.seq, 5,
                   what="all heartbeats ingested")
        flood_end = time.time()
        updates = row_updates(reader.since(t0), "flood-1")
        assert n > 300
        # coalesced: at most one per 250 ms (a loaded 2-core CI box may deliver fewer, never more)
        assert 1 <= len(updates) <= 2.0 / 0.25 + 3, f"{len(updates)} row updates for {n} heartbeats"
        gaps = [b - a for (a, _), (b, _) in itertools.pairwise(updates) if b <= flood_end]
        assert all(g >= 0.2 for g in gaps), gaps  # 250 ms apart, give or take delivery jitter

        # a state change right after a flood: sent at once
        sent = time.time()
        sim.state("offline")
        wait_until(lambda: any('data-status="offline"' in m for _, m in row_updates(reader.since(sent), "flood-1")),
                   3, what="offline row")
        at = next(at for at, m in row_updates(reader.since(sent), "flood-1") if 'data-status="offline"' in m)
        assert at - sent < 0.3, f"state change took {at - sent:.3f} s"
    finally:
        reader.close()
        sim.close()


def test_overview_refreshes_at_most_once_a_second(fleet):
    c = fleet.controller()
    sim = SimAgent(fleet, "flood-2", gpus=2)
    sim.heartbeat()
    c.wait_agent("flood-2", status="online")
    reader = StreamReader(c.url + "/dashboard/stream?view=overview")
    try:
        wait_until(lambda: reader.messages, 5, what="snapshot")
        t0 = time.time()
        while time.time() - t0 < 3.0:
            sim.heartbeat(util=float(int((time.time() - t0) * 50) % 100), wait=False)
            time.sleep(0.01)  # pacing the generator
        cards = [at for at, m in reader.since(t0) if 'id="cards"' in m]
        assert 2 <= len(cards) <= 4, f"{len(cards)} overview refreshes in 3 s"
    finally:
        reader.close()
        sim.close()


def test_views_render_their_regions_and_the_stream_ends_with_the_controller(fleet):
    c = fleet.controller()
    fleet.agent("view-a")
    c.wait_agent("view-a", status="online")
    expected: dict[str, Any] = {
        "overview": ['id="cards"', 'id="recent-events"'],
        "agent&id=view-a": ['id="agent-live"', 'id="agent-models"', 'id="agent-jobs"', 'id="agent-events"'],
        "models": ['id="model-jobs"', 'id="model-matrix"', 'id="catalogue"'],
        "events": ['id="event-rows"'],
        "pulse": ['id="pulse"'],
    }
    readers = {v: StreamReader(f"{c.url}/dashboard/stream?view={v}") for v in expected}
    try:
        for view, ids in expected.items():
            r = readers[view]
            wait_until(lambda r=r: r.messages, 5, what=f"{view} snapshot")
            assert all(i in r.messages[0][1] for i in ids), (view, r.messages[0][1][:500])
            assert re.search(r"<template>", r.messages[0][1])
        c.stop()
        for view, r in readers.items():
            assert r.ended.wait(5), f"{view} stream still open after the controller stopped"
    finally:
        for r in readers.values():
            r.close()


def test_closed_streams_unsubscribe_from_the_hub(fleet):
    c = fleet.controller()
    base = c.http.get("/dashboard/data/status.json").json()
    assert base["streams"] == 0
    readers = [StreamReader(f"{c.url}/dashboard/stream?view=agents") for _ in range(3)]
    wait_until(lambda: all(r.messages for r in readers), 5, what="three snapshots")
    status = c.http.get("/dashboard/data/status.json").json()
    assert status["streams"] == 3 and status["hub_subscribers"] == base["hub_subscribers"] + 3
    for r in readers:
        r.close()
    fleet.agent("wake-a")  # an event makes each reader thread see its stop flag and hang up
    wait_until(lambda: c.http.get("/dashboard/data/status.json").json()["streams"] == 0, 10,
               what="streams closed by their clients")
    assert c.http.get("/dashboard/data/status.json").json()["hub_subscribers"] == base["hub_subscribers"]
