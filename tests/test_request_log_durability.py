"""Request-log durability: a request that got its answer is in the log even when the controller is
SIGKILLed right after (the journal), and the journal is emptied as rows reach the database."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from tests.proxy_support import chat_body, db_rows, start_fleet, wait_routable

JOURNAL = "requests.journal"


def _journal_rows(data_dir: Path) -> int:
    return sum(len(p.read_bytes().splitlines()) for p in (data_dir / JOURNAL).glob("*.jsonl"))


def _answered(c: Any, i: int) -> str | None:
    """One request of a mix (plain, NDJSON stream, OpenAI SSE, an error answered before routing), read to
    its end; its request id."""
    with httpx.Client(base_url=c.url, timeout=30, trust_env=False) as http:
        kind = i % 4
        if kind == 0:
            r = http.post("/api/chat", json=chat_body())
        elif kind == 1:
            with http.stream("POST", "/api/chat", json=chat_body(stream=True)) as r:
                assert json.loads([x for x in r.iter_lines() if x][-1])["done"] is True
        elif kind == 2:
            with http.stream("POST", "/v1/chat/completions", json=chat_body(stream=True)) as r:
                assert [x for x in r.iter_lines() if x][-1] == "data: [DONE]"
        else:
            r = http.post("/api/chat", json=chat_body("missing"))
        assert r.status_code == (404 if kind == 3 else 200)
        return r.headers["x-fleet-request-id"]


def test_every_answered_request_survives_a_sigkill_right_after_its_answer(fleet):
    # no periodic flush during the test: only the journal can keep these rows
    c, _ = start_fleet(fleet, "wal-a", controller_env={"fleet_flush_interval": "3600"})
    wait_routable(c, "wal-a")
    with ThreadPoolExecutor(8) as pool:
        rids = list(pool.map(lambda i: _answered(c, i), range(80)))
    rids.append(_answered(c, 1))  # the last one a stream, killed the moment its end arrived
    c.kill()
    assert db_rows(fleet.tmp, "select count(*) from requestrecord")[0][0] == 0  # nothing flushed before the kill
    assert _journal_rows(fleet.tmp) == len(rids)

    c.start()
    c.wait_ready()
    r = c.http.get("/api/requests", params={"export": "json"})
    logged = {x["rid"]: x for x in r.json()}
    assert len(logged) == len(rids)
    assert set(rids) == set(logged), f"lost: {set(rids) - set(logged)}"
    assert sum(1 for x in logged.values() if x["status"] == 404) == 20
    assert all(x["duration_ms"] > 0 and x["endpoint"] for x in logged.values())
    assert c.http.get("/api/ingest").json()["request_log"]["replayed"] == len(rids)
    assert _journal_rows(fleet.tmp) == 0  # replayed segments are gone

    # rows written by a flush leave the journal; a clean stop leaves nothing to replay
    assert _answered(c, 0)
    assert c.http.get("/api/requests").json()["total"] == len(rids) + 1  # a read flushes first
    assert _journal_rows(fleet.tmp) == 0
    c.stop()  # SIGTERM
    assert not list((fleet.tmp / JOURNAL).glob("*.jsonl"))
    c.start()
    c.wait_ready()
    assert c.http.get("/api/requests").json()["total"] == len(rids) + 1
    assert c.http.get("/api/ingest").json()["request_log"]["replayed"] == 0


def test_a_torn_journal_line_is_skipped_and_the_rest_replayed(fleet):
    c, _ = start_fleet(fleet, "wal-b", controller_env={"fleet_flush_interval": "3600"})
    wait_routable(c, "wal-b")
    rids = [_answered(c, i) for i in range(3)]  # routed ones: each has its id
    c.kill()
    seg = max((fleet.tmp / JOURNAL).glob("*.jsonl"))
    with open(seg, "ab") as f:  # a write cut short by the kill, and a foreign line
        f.write(b'["deadbeef", 1.0, "127.0.0.1"\n{"not": "a row"}\n')
    c.start()
    c.wait_ready()
    logged = {x["rid"] for x in c.http.get("/api/requests", params={"export": "json"}).json()}
    assert logged == set(rids)
    stats = c.http.get("/api/ingest").json()["request_log"]
    assert stats["replayed"] == 3 and stats["dropped"] == 2


def test_a_journal_written_by_the_previous_release_still_replays(fleet):
    """Journal lines are arrays in column order; the previous release's lacked queue_ms and priority."""
    c = fleet.controller(fleet_flush_interval="3600")
    c.kill()
    now = time.time()  # recent: rows older than the retention are pruned at start
    old = ["0ld0000000000001", now - 2, "10.0.0.9", None, "/api/chat", "llama3.2:latest", True, "gpu-a",
           200, 1, 120.5, 900.0, 12, 80, None, None]
    new = ["new0000000000002", now - 1, "10.0.0.9", "ci", "/api/generate", "llama3.2:latest", False,
           "gpu-a", 503, 1, None, 2100.0, None, None, "the queue is full", None, 2000.4, "low"]
    (fleet.tmp / JOURNAL / "000000000999.jsonl").write_text(f"{json.dumps(old)}\n{json.dumps(new)}\n")
    c.start()
    c.wait_ready()
    logged = {x["rid"]: x for x in c.http.get("/api/requests", params={"export": "json"}).json()}
    assert set(logged) == {old[0], new[0]}
    assert (logged[old[0]]["ttfb_ms"], logged[old[0]]["queue_ms"], logged[old[0]]["priority"]) == (120.5, None, None)
    assert (logged[new[0]]["queue_ms"], logged[new[0]]["priority"], logged[new[0]]["status"]) == (2000.4, "low", 503)
    stats = c.http.get("/api/ingest").json()["request_log"]
    assert stats["replayed"] == 2 and stats["dropped"] == 0
