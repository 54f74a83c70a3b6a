"""The structured access log (setting `access_log`): one JSON line per proxied request on stdout, with
exactly the request log's fields and values; nothing of it when the setting is off (the default)."""

from __future__ import annotations

import json
import logging
import queue
from typing import Any

import pytest

from ollama_fleet.controller.proxy import access_log
from ollama_fleet.controller.proxy.requestlog import COLUMNS
from tests.proxy_support import chat_body, start_fleet
from tests.support import Controller, wait_until


def _access_lines(c: Controller) -> list[dict[str, Any]]:
    """The controller's output lines that are JSON objects holding a request id: its access log."""
    out = []
    for line in c.log().splitlines():
        if line.startswith("{"):
            doc = json.loads(line)
            if "rid" in doc:
                out.append(doc)
    return out


def test_one_json_line_per_request_with_the_request_log_fields(fleet: Any) -> None:
    c, _ = start_fleet(fleet, "acc-a", controller_env={"fleet_access_log": "1"}, tokens=4)
    ok = c.http.post("/api/chat", json=chat_body())
    streamed = c.http.post("/api/generate", json={"model": "llama3.2", "prompt": "a b"})
    missing = c.http.post("/api/chat", json=chat_body("nope"))
    assert (ok.status_code, streamed.status_code, missing.status_code) == (200, 200, 404)
    rids = [r.headers["x-fleet-request-id"] for r in (ok, streamed, missing)]

    wait_until(lambda: len(_access_lines(c)) >= 3, what="three access lines")
    lines = _access_lines(c)
    assert [d["rid"] for d in lines] == rids  # one line each, in order, nothing else logged as a request
    for doc in lines:
        assert list(doc) == COLUMNS  # exactly the row's fields, in the table's order

    # the same values the request log stored (the database row is the reference)
    stored = c.http.get("/api/requests").json()["requests"]
    by_rid = {r["rid"]: r for r in stored}
    for doc in lines:
        assert doc == {k: by_rid[doc["rid"]][k] for k in COLUMNS}
    chat, gen, nope = lines
    assert (chat["agent"], chat["status"], chat["model"], chat["completion_tokens"]) == ("acc-a", 200, "llama3.2:latest", 4)
    assert gen["stream"] is True and gen["prompt_tokens"] == 2
    assert nope["status"] == 404 and nope["agent"] is None and nope["error"].startswith("model 'nope' not found")


def test_off_by_default(fleet: Any) -> None:
    c, _ = start_fleet(fleet, "acc-off")
    r = c.http.post("/api/chat", json=chat_body())
    assert r.status_code == 200
    rid = r.headers["x-fleet-request-id"]
    # the row is recorded (and flushed) like any other, yet no access line was written for it
    wait_until(lambda: any(x["rid"] == rid for x in c.http.get("/api/requests").json()["requests"]),
               what="the request in the request log")
    assert _access_lines(c) == [] and rid not in c.log()


def test_a_stalled_stdout_costs_lines_not_the_event_loop(caplog: pytest.LogCaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Nobody drains the queue (a stuck stdout): emitting never blocks; lines beyond the queue are dropped,
    counted, and said once on the diagnostic log."""
    monkeypatch.setattr(access_log._DropWhenFull, "dropped", 0)
    lines: queue.Queue[logging.LogRecord] = queue.Queue(2)
    handler = access_log._DropWhenFull(lines)
    caplog.set_level(logging.WARNING, logger="fleet.proxy")
    for i in range(5):
        handler.emit(logging.LogRecord("fleet.access", logging.INFO, __file__, 0, f"line {i}", None, None))
    assert lines.qsize() == 2 and [lines.get_nowait().getMessage() for _ in range(2)] == ["line 0", "line 1"]
    assert access_log._DropWhenFull.dropped == 3
    said = [r for r in caplog.records if "lines dropped" in r.getMessage()]
    assert len(said) == 1 and "1 lines dropped" in said[0].getMessage()
