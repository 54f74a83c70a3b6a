"""Poison-proof request log: hostile text is cleaned where it enters, and a row the database refuses is
dropped alone (logged, counted) while the rest of its batch is written."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from ollama_fleet.controller import db as dbm
from ollama_fleet.controller.proxy.requestlog import COLUMNS, RequestRecord, write_rows
from tests.proxy_support import db_rows, start_fleet, wait_routable
from tests.support import wait_until

CHAT = b'"messages":[{"role":"user","content":"hi"}],"stream":false'


def _log(c: Any, **params: str) -> dict[str, Any]:
    r = c.http.get("/api/requests", params=params)
    assert r.status_code == 200, r.text
    return r.json()


def test_hostile_model_names_and_header_bytes_never_poison_the_log(fleet):
    c, _ = start_fleet(fleet, "poison-a")
    wait_routable(c, "poison-a")
    # a lone surrogate and a NUL in the model name: legal JSON escapes, illegal in UTF-8 and PostgreSQL text
    for model in (rb"\ud800", rb"llama\u0000x", rb"\udfff\ud83d"):
        r = c.http.post("/api/chat", content=b'{"model":"' + model + b'",' + CHAT + b"}")
        assert r.status_code == 404, r.text
        assert "not found" in r.json()["error"]
    # non-UTF-8 bytes in a header that reaches the log (the pinned agent is quoted in the error)
    r = c.http.post("/api/chat", content=b'{"model":"llama3.2",' + CHAT + b"}",
                    headers={"x-fleet-agent": b"\xff\xfe-node", "user-agent": b"\xc3\x28 bad"})
    assert r.status_code == 503 and r.json()["error"]
    r = c.http.post("/v1/chat/completions", content=b'{"model":"\\ud800",' + CHAT + b"}")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert c.http.post("/api/chat", content=b'{"model":"llama3.2",' + CHAT + b"}").status_code == 200

    page = _log(c, per_page="100")  # the flush that used to fail for good
    assert page["total"] == 6
    models = [x["model"] for x in page["requests"]]
    assert "\ufffd:latest" in models and "llama\ufffdx:latest" in models and "llama3.2:latest" in models
    pinned = next(x for x in page["requests"] if x["status"] == 503)
    assert "\ufffd\ufffd-node" in pinned["error"]
    # what is on disk is valid UTF-8 text, and the periodic flusher keeps working afterwards
    assert c.http.post("/api/chat", content=b'{"model":"llama3.2",' + CHAT + b"}").status_code == 200
    wait_until(lambda: db_rows(fleet.tmp, "select count(*) from requestrecord")[0][0] == 7, 10, what="7 rows")
    stats = c.http.get("/api/ingest").json()["request_log"]
    assert stats["dropped"] == 0 and stats["pending"] == 0 and stats["recorded"] == 7

    c.restart()  # SIGTERM: the shutdown flush has nothing it cannot write
    assert "rows lost" not in c.log() and "final flush failed" not in c.log()
    assert _log(c)["total"] == 7


# ---- the batch split, directly against real SQLite -------------------------------------------------
def _row(i: int, **over: Any) -> dict[str, Any]:
    row = {"rid": f"r{i:04d}", "ts": time.time(), "client": "127.0.0.1", "key": None, "endpoint": "/api/chat",
           "model": "llama3.2:latest", "stream": False, "agent": "a", "status": 200, "attempts": 1,
           "ttfb_ms": 1.0, "duration_ms": 2.0, "prompt_tokens": 1, "completion_tokens": 2, "error": None,
           "failover": None, "queue_ms": None, "priority": "normal"}
    row.update(over)
    assert set(row) == set(COLUMNS)
    return row


@pytest.fixture
def sqlite_db(tmp_path: Path):
    database = dbm.init_db(f"sqlite:///{tmp_path / 'log.db'}")
    database.connect(reuse_if_open=True)
    try:
        yield tmp_path / "log.db"
    finally:
        database.close()


def _rids(path: Path) -> list[str]:
    con = sqlite3.connect(path)
    try:
        return [r[0] for r in con.execute("select rid from requestrecord order by rid")]
    finally:
        con.close()


def test_a_bad_row_is_dropped_alone_and_the_rest_of_its_batch_is_written(sqlite_db, caplog):
    rows = [_row(i) for i in range(100)]
    rows[7]["model"] = "\ud800"  # rows that bypassed cleaning: the driver cannot encode them
    rows[42]["error"] = "x\udcff"
    rows[43]["status"] = None  # NOT NULL
    rows[99]["client"] = {"not": "text"}  # a type the driver refuses
    with caplog.at_level("WARNING", logger="fleet.requestlog"):
        written, dropped = write_rows(rows)
    assert (written, dropped) == (96, 4)
    bad = {"r0007", "r0042", "r0043", "r0099"}
    assert _rids(sqlite_db) == sorted(r["rid"] for r in rows if r["rid"] not in bad)
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert all(rid in logged for rid in bad)
    # a row already there (a journal replayed after a crash) is skipped, not an error
    assert write_rows([_row(1), _row(500)]) == (2, 0)
    assert RequestRecord.select().count() == 97


def test_a_transient_error_keeps_the_batch_for_the_next_flush(sqlite_db):
    dbm.db.execute_sql("PRAGMA busy_timeout = 50")
    blocker = sqlite3.connect(sqlite_db, timeout=0.05)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(Exception) as err:
            write_rows([_row(i) for i in range(10)])
        assert type(err.value).__name__ == "OperationalError"  # raised: the caller requeues, nothing dropped
    finally:
        blocker.rollback()
        blocker.close()
    assert write_rows([_row(i) for i in range(10)]) == (10, 0)


def test_a_row_without_the_newer_columns_is_written_with_null_there(sqlite_db):
    """A row made before queue_ms and priority existed (an older caller, a journal line) still writes."""
    old = {k: v for k, v in _row(1).items() if k not in ("queue_ms", "priority")}
    assert write_rows([old, _row(2, queue_ms=12.5, priority="low")]) == (2, 0)
    con = sqlite3.connect(sqlite_db)
    try:
        got = con.execute("select rid, queue_ms, priority from requestrecord order by rid").fetchall()
    finally:
        con.close()
    assert got == [("r0001", None, None), ("r0002", 12.5, "low")]
