"""Poison-proof registry persistence (issue 9, item 3).

Two independent defences, each tested on its own:
* text is made safe where MQTT payloads enter (controller/registry/ingest.py +
  ollama_fleet/contract/protocol.py): a real controller and a real agent on the shipped Mosquitto
  config, hostile payloads published with a node's own credentials; later edits still persist and
  /api/events still answers;
* one bad row can never block a batch (controller/registry/store.py apply_batch): rows that bypass the
  sanitiser are forced into a Batch and written to a real SQLite database.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from ollama_fleet.controller.registry import store as store_mod
from ollama_fleet.controller.db import Agent, Event, Gpu, InstalledModel, MetricSample, init_db
from ollama_fleet.controller.registry.live import Batch
from tests.support import wait_until

PUBACK_OK = 0


class NodePublisher:
    """Speaks as one node over MQTT v5 with that node's own broker account (no agent process for it)."""

    def __init__(self, fleet: Any, node: str) -> None:
        fleet.credentials(node)
        self.node, self.session = node, uuid.uuid4().hex
        self.codes: dict[int, int] = {}
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=node, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(node, fleet.broker.passwords[node])
        self.client.on_publish = lambda _c, _u, mid, rc, _p: self.codes.__setitem__(mid, rc.value)
        self.client.connect(fleet.broker.host, fleet.broker.port)
        self.client.loop_start()

    def publish(self, kind: str, payload: bytes, retain: bool = False) -> None:
        info = self.client.publish(f"fleet/v1/nodes/{self.node}/{kind}", payload, qos=1, retain=retain)
        info.wait_for_publish(5)
        wait_until(lambda: info.mid in self.codes, 5, what="PUBACK")
        assert self.codes[info.mid] == PUBACK_OK, f"broker refused {kind}: {self.codes[info.mid]}"

    def doc(self, kind: str, body: dict[str, Any]) -> None:
        self.publish(kind, json.dumps({"v": 1, "session": self.session, "ts": time.time(), **body}).encode())

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


DEEP = 5000  # levels: json.loads raises RecursionError on this


def _poison(session: str) -> list[tuple[str, bytes]]:
    """Hostile payloads, raw (JSON escapes such as \\ud800 are exactly what a client would send)."""
    def j(body: dict[str, Any]) -> bytes:
        return json.dumps({"v": 1, "session": session, "ts": time.time(), **body}).encode()

    lone = "\ud800"
    return [
        ("events", j({"event": f"ev{lone}", "message": f"lone {lone} and NUL \x00 in a message"})),
        ("events", b'{"v":1,"event":"bytes","message":"invalid \xff\xfe utf-8"}'),
        ("events", j({"event": "huge", "message": "x" * 60_000})),
        ("events", b'{"v":1,"event":"deep","x":' + b"[" * DEEP + b"]" * DEEP + b"}"),
        ("events", b'"\\ud800"'),
        ("events", b"[1, 2]"),
        ("events", b"\xff\xfe\x00garbage"),
        ("info", j({"hostname": f"host{lone}", "ips": [lone], "os": "\x00",
                    "ollama": {"url": f"http://h{lone}:11434", "version": f"0.{lone}", "up": True}})),
        ("gpus", j({"gpus": [{"index": 0, "name": f"G{lone}", "uuid": "\x00"}, {"index": 0, "name": "dup"},
                             {"index": 1, "name": "big", "mem_total": 10**30}, {"index": 10**30, "name": "far"}]})),
        ("models", j({"models": [{"name": f"m{lone}", "digest": lone}, {"name": "dup"}, {"name": "dup"},
                                 {"name": "huge", "size": 10**30, "details": {lone: lone}}]})),
        ("running", j({"models": [{"name": lone, "x": {lone: "\x00"}}]})),
        ("heartbeat", j({"seq": 1, "cpu": lone, "mem": 10**30, "gpus": [{"index": 0, "util": lone}],
                         "nested": {lone: {"\x00": [lone] * 10}}})),
        ("heartbeat", j({"seq": 2, "deep": json.loads("[" * 200 + "]" * 200)})),
        ("events", j({"event": "last", "message": "the marker after the poison", "level": lone})),
    ]


def test_poisoned_mqtt_payloads_never_stop_registry_persistence(fleet):
    c = fleet.controller()
    fleet.agent("ok-node")
    c.wait_agent("ok-node", status="online")
    pub = NodePublisher(fleet, "poison-node")
    try:
        pub.publish("state", json.dumps({"v": 1, "state": "online", "session": pub.session, "ts": time.time(),
                                         "hb_interval": 5}).encode(), retain=True)
        c.wait_agent("poison-node", state="online")
        for kind, payload in _poison(pub.session):
            pub.publish(kind, payload)
        # MQTT keeps one publisher's order: once the marker is in, everything before it was handled
        wait_until(lambda: any(e["kind"] == "last" for e in c.http.get("/api/events").json()["events"]), 10,
                   what="marker event after the poison")
        for _ in range(3):  # several flush intervals: a poisoned batch would fail every one of them
            r = c.http.put("/api/agents/ok-node/settings", json={"notes": f"edited after the poison {_}"})
            assert r.status_code == 200, r.text
            r = c.http.get("/api/events", params={"limit": 1000})
            assert r.status_code == 200, r.text
        events = r.json()["events"]
        kinds = {e["kind"] for e in events}
        assert {"registered", "ev\ufffd", "bytes", "huge", "last"} <= kinds, kinds
        texts = json.dumps(events)  # every stored text is valid UTF-8 without NUL
        assert "\\ud800" not in texts and "\\u0000" not in texts
        assert next(e for e in events if e["kind"] == "bytes")["message"] == "invalid \ufffd\ufffd utf-8"
        assert len(next(e for e in events if e["kind"] == "huge")["message"]) <= 500
        counters = c.http.get("/api/ingest").json()["counters"]
        assert counters.get("dropped.bad_json", 0) >= 2 and counters.get("dropped.bad_payload", 0) >= 2, counters
        poisoned = c.agent("poison-node")
        assert poisoned["hostname"] == "host\ufffd" and poisoned["state"] == "online"
        assert sorted(poisoned["models"]) == ["dup", "huge", "m\ufffd"]
        assert "flush failed" not in c.log() and "rows lost" not in c.log()
    finally:
        pub.close()
    # persisted, not just in memory: a restarted controller reads it back from the database
    c.restart()
    assert c.agent("ok-node")["notes"] == "edited after the poison 2"
    back = c.agent("poison-node")
    assert back is not None and back["hostname"] == "host\ufffd"
    assert sorted(back["models"]) == ["dup", "huge", "m\ufffd"]
    assert c.http.get("/api/events").status_code == 200


# ---- the second defence on its own: a bad row in a Batch against real SQLite --------------------------


@pytest.fixture
def sqlite_db(tmp_path):
    database = init_db(f"sqlite:///{tmp_path / 'poison.db'}")
    with database.connection_context():
        yield database
    database.close()


def _agent_row(node: str, **over: Any) -> dict[str, Any]:
    now = time.time()
    row = {"node_id": node, "display_name": "", "tags": [], "notes": "", "state": "online", "session": "s",
           "forced_offline": False, "ollama_up": True, "ollama_url": "", "ollama_version": None, "hostname": node,
           "agent_version": None, "hb_interval": 5.0, "info": {}, "metrics": {}, "loaded": [],
           "first_seen": now, "last_seen": now, "online_since": now}
    return {**row, **over}


def _event(msg: str) -> dict[str, Any]:
    return {"ts": time.time(), "node_id": None, "kind": "test", "level": "info", "message": msg, "data": None}


def test_a_bad_row_is_dropped_and_counted_and_the_rest_written(sqlite_db, caplog):
    lone = "\ud800"  # forced into the batch: the sanitiser at the edge never saw these rows
    batch = Batch(
        agents=[_agent_row("good-a"), _agent_row("bad-a", notes=f"x{lone}"), _agent_row("good-b")],
        gpus={"good-a": [{"index": 0, "name": "ok"}], "bad-a": [{"index": 0, "name": "g"}, {"index": 0, "name": "g"}]},
        models={"good-a": [{"name": "m1", "installed_at": 1.0}], "bad-a": [{"name": "m", "size": 10**30,
                                                                           "installed_at": 1.0}]},
        events=[_event(f"e{i}") for i in range(450)] + [_event(lone)] + [_event("after")],
        samples=[{"node_id": "good-a", "ts": 1.0, "cpu": 1.0, "mem": 1.0, "gpu_util": None, "gpu_mem_used": 10**30,
                  "gpu_mem_total": None},
                 {"node_id": "good-a", "ts": 2.0, "cpu": 2.0, "mem": 2.0, "gpu_util": None, "gpu_mem_used": 1,
                  "gpu_mem_total": 2}],
    )
    stats = store_mod.BatchStats()
    written = store_mod.apply_batch(batch, stats)
    assert {a.node_id for a in Agent.select()} == {"good-a", "good-b"}
    assert [g.name for g in Gpu.select()] == ["ok"]
    assert [m.name for m in InstalledModel.select()] == ["m1"]
    assert Event.select().count() == 451 and Event.select().where(Event.message == "after").count() == 1
    assert [s.ts for s in MetricSample.select()] == [2.0]
    # dropped: the agent row, bad-a's two GPU rows and one model row, one event, one sample
    assert stats.dropped == 6 and written == 2 + 1 + 1 + 451 + 1
    assert "dropped" in caplog.text and "bad-a" in caplog.text


def test_a_transient_failure_raises_so_the_batch_is_requeued(tmp_path):
    """A locked database is not a bad row: nothing is dropped, the caller requeues the batch."""
    import sqlite3

    from ollama_fleet.controller.db import SQLITE_PRAGMAS

    path = tmp_path / "locked.db"
    database = init_db(f"sqlite:///{path}")
    database.execute_sql("PRAGMA busy_timeout = 50")
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # holds the write lock
    stats = store_mod.BatchStats()
    try:
        with database.connection_context():
            database.execute_sql("PRAGMA busy_timeout = 50")
            with pytest.raises(Exception) as exc:
                store_mod.apply_batch(Batch(events=[_event("a"), _event("b")]), stats)
            assert store_mod.transient(exc.value)
            assert stats.dropped == 0
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
        database.close()
    assert SQLITE_PRAGMAS["busy_timeout"] > 50


@pytest.mark.asyncio
async def test_store_flush_counts_dropped_rows(tmp_path):
    s = store_mod.Store(f"sqlite:///{tmp_path / 'count.db'}")
    try:
        await s.flush(Batch(events=[_event("ok"), _event("\ud800")]))
        assert s.rows_dropped == 1 and s.rows_written == 1
        rows = await s.read(store_mod.query_events, None, None, None, 10)
        assert [r["message"] for r in rows] == ["ok"]
    finally:
        s.close()
