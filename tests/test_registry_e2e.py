"""End to end over a real Mosquitto (shipped config + ACL): agents as processes, the controller as a
process, fake Ollamas as processes. Timings: heartbeat 0.5 s, stale after 3 intervals."""

from __future__ import annotations

import json
import signal
import time
import uuid

import paho.mqtt.client as mqtt
import pytest

from tests.support import TEST_HEARTBEAT, wait_until


def _publish_as(broker, user: str, items: list[tuple[str, bytes, bool]]) -> list[int]:
    """Publish as `user` with MQTT v5, wait for each PUBACK and return its reason codes (135 = denied)."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-{user}-{uuid.uuid4().hex[:6]}",
                         protocol=mqtt.MQTTv5)
    codes: dict[int, int] = {}
    client.on_publish = lambda _c, _u, mid, rc, _p: codes.__setitem__(mid, rc.value)
    client.username_pw_set(user, broker.passwords[user])
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        mids = []
        for topic, payload, retain in items:
            info = client.publish(topic, payload, qos=1, retain=retain)
            info.wait_for_publish(5)
            mids.append(info.mid)
        wait_until(lambda: all(m in codes for m in mids), 5, what="PUBACKs")
        return [codes[m] for m in mids]
    finally:
        client.loop_stop()
        client.disconnect()


def test_agent_joins_with_its_facts_within_5s(fleet):
    c = fleet.controller()
    fake = fleet.fake_ollama("gpu-a")
    t0 = time.monotonic()
    fleet.agent("gpu-a", fake.url)
    a = c.wait_agent("gpu-a", timeout=5, status="online")
    assert time.monotonic() - t0 < 5
    a = wait_until(lambda: (x := c.agent("gpu-a")) and x["models"] and x["metrics"]["seq"] and x, 5)
    assert a["hostname"] and a["ips"], a
    assert a["ollama"] == {"url": fake.url, "version": "0.12.6", "up": True}
    assert a["routable"] is True
    assert "llama3.2:latest" in a["models"]
    assert a["metrics"]["cpu"] is not None and a["metrics"]["mem"] is not None
    assert a["gpus"] == []  # no NVML on this machine: empty list, not an error
    models = c.http.get("/api/agents/gpu-a/models").json()
    assert {m["name"] for m in models["models"]} >= {"llama3.2:latest"}
    assert all(m["size"] > 0 and m["digest"] and m["installed_at"] for m in models["models"])
    kinds = [e["kind"] for e in c.http.get("/api/events", params={"agent": "gpu-a"}).json()["events"]]
    assert "registered" in kinds


def test_kill_9_is_lost_within_2s_and_leaves_routing(fleet):
    c = fleet.controller()
    agent = fleet.agent("node-k9")
    c.wait_agent("node-k9", status="online")
    t0 = time.monotonic()
    agent.kill()
    c.wait_agent("node-k9", timeout=2, state="lost", routable=False)
    assert time.monotonic() - t0 < 2
    assert "node-k9" not in c.agents(status="online")
    assert "node-k9" in c.agents(status="lost")


def test_clean_stop_is_offline_not_lost(fleet):
    c = fleet.controller()
    agent = fleet.agent("node-clean")
    c.wait_agent("node-clean", status="online")
    assert agent.stop() == 0
    a = c.wait_agent("node-clean", state="offline")
    assert a["routable"] is False


def test_frozen_agent_goes_stale_then_recovers(fleet):
    c = fleet.controller()
    agent = fleet.agent("node-frozen", mqtt_keepalive="30")  # TCP stays open: only the heartbeat tells
    c.wait_agent("node-frozen", status="online")
    agent.signal(signal.SIGSTOP)
    t0 = time.monotonic()
    c.wait_agent("node-frozen", timeout=5, state="stale", routable=False)
    elapsed = time.monotonic() - t0
    assert 3 * TEST_HEARTBEAT * 0.5 <= elapsed < 3 * TEST_HEARTBEAT + 2, elapsed
    agent.signal(signal.SIGCONT)
    c.wait_agent("node-frozen", timeout=5, state="online", routable=True)
    kinds = [e["kind"] for e in c.http.get("/api/events", params={"agent": "node-frozen"}).json()["events"]]
    assert "stale" in kinds and "online" in kinds


def test_ollama_down_is_its_own_state_and_recovers(fleet):
    c = fleet.controller()
    fake = fleet.fake_ollama("od")
    fleet.agent("node-od", fake.url)
    c.wait_agent("node-od", status="online", routable=True)
    fake.stop()
    t0 = time.monotonic()
    a = c.wait_agent("node-od", timeout=3, status="ollama_down")
    assert time.monotonic() - t0 < 2 * TEST_HEARTBEAT + 1.5
    assert a["state"] == "online" and a["routable"] is False
    fake.restart()
    c.wait_agent("node-od", timeout=5, status="online", routable=True)
    kinds = [e["kind"] for e in c.http.get("/api/events", params={"agent": "node-od"}).json()["events"]]
    assert "ollama_down" in kinds and "ollama_up" in kinds


def test_hung_ollama_counts_as_down(fleet):
    c = fleet.controller()
    fake = fleet.fake_ollama("hung")
    fleet.agent("node-hung", fake.url)
    c.wait_agent("node-hung", status="online", routable=True)
    fake.set_config(hang=True)
    c.wait_agent("node-hung", timeout=4, status="ollama_down")


def test_controller_restart_keeps_every_agent(fleet):
    c = fleet.controller()
    live = fleet.agent("node-live")
    dead = fleet.agent("node-dead")
    c.wait_agent("node-live", status="online")
    c.wait_agent("node-dead", status="online")
    c.http.put("/api/agents/node-live/settings", json={"display_name": "Big Box", "tags": ["gpu", "lab"]})
    dead.kill()
    c.wait_agent("node-dead", state="lost")
    c.restart()
    agents = c.agents()
    assert agents["node-live"]["name"] == "Big Box" and agents["node-live"]["tags"] == ["gpu", "lab"]
    assert agents["node-dead"]["state"] == "lost"
    c.wait_agent("node-live", status="online")
    assert live.proc.poll() is None
    # the agent answered the new controller's announcement with a fresh birth
    assert wait_until(lambda: c.http.get("/api/ingest").json()["counters"].get("state", 0) >= 1)


def test_agent_cannot_write_into_another_agents_subtree(fleet):
    c = fleet.controller()
    fleet.agent("node-b")
    b = c.wait_agent("node-b", status="online")
    fleet.credentials("node-a")  # no agent process: its account is ours (one connection per account)
    before = c.http.get("/api/ingest").json()["counters"]
    # node-a forges node-b's death certificate and a command; the ACL must drop both
    forged = json.dumps({"v": 1, "state": "lost", "session": "x"}).encode()
    birth = json.dumps({"v": 1, "state": "online", "session": "a" * 32}).encode()
    codes = _publish_as(fleet.broker, "node-a", [
        ("fleet/v1/nodes/node-b/state", forged, True),
        ("fleet/v1/cmd/node-b/agent.disconnect", b'{"v":1}', False),
        ("fleet/v1/nodes/node-a/state", birth, False),
        ("fleet/v1/nodes/node-a/events", json.dumps({"v": 1, "event": "probe"}).encode(), False),
    ])
    # the last publish is allowed: once it is counted, the forged ones would have been seen before it
    wait_until(lambda: c.http.get("/api/ingest").json()["counters"].get("events", 0) > before.get("events", 0))
    after = c.agent("node-b")
    assert after["state"] == "online" and after["routable"] is True
    assert after["last_seen"] >= b["last_seen"]
    assert codes == [135, 135, 0, 0]  # v5 PUBACK: Not authorized, Not authorized, Success, Success


def test_will_of_an_older_session_is_ignored(fleet):
    c = fleet.controller()
    fleet.agent("node-s")
    c.wait_agent("node-s", status="online")
    old_will = json.dumps({"v": 1, "state": "lost", "session": "0" * 32}).encode()
    # sent with a controller-role account: node-s's own would take the running agent's connection over
    _publish_as(fleet.broker, fleet.broker.add_account("controller"),
                [("fleet/v1/nodes/node-s/state", old_will, False)])
    wait_until(lambda: c.http.get("/api/ingest").json()["counters"].get("ignored.stale_session", 0) >= 1)
    assert c.agent("node-s")["state"] == "online"


BAD_PAYLOADS = [
    ("fleet/v1/nodes/node-m/heartbeat", b"{not json", "dropped.bad_json"),
    ("fleet/v1/nodes/node-m/heartbeat", b"[1,2,3]", "dropped.bad_payload"),
    ("fleet/v1/nodes/node-m/heartbeat", b'{"v": 99, "session": "s", "ts": 1}', "dropped.unsupported_version"),
    ("fleet/v1/nodes/node-m/info", b'{"v": 1, "hostname": 5}', "dropped.bad_payload"),
    ("fleet/v1/nodes/node-m/whatever", b'{"v": 1}', "dropped.unknown_topic"),
    ("fleet/v1/nodes/node-m/heartbeat", b'{"v":1,"pad":"' + b"x" * 70000 + b'"}', "dropped.oversized"),
    ("fleet/v1/nodes/node-m/state", b'{"v": 1, "state": "exploded", "session": "s"}', "dropped.bad_payload"),
]


def test_malformed_messages_are_dropped_counted_and_ingest_goes_on(fleet):
    c = fleet.controller()
    fleet.agent("node-m")
    c.wait_agent("node-m", status="online")
    # a controller-role account: node-m's own would take the running agent's connection over
    _publish_as(fleet.broker, fleet.broker.add_account("controller"), [(t, p, False) for t, p, _ in BAD_PAYLOADS])
    expected: dict[str, int] = {}
    for _, _, key in BAD_PAYLOADS:
        expected[key] = expected.get(key, 0) + 1

    def counted() -> bool:
        counters = c.http.get("/api/ingest").json()["counters"]
        return all(counters.get(k, 0) >= n for k, n in expected.items())

    wait_until(counted, what=f"drop counters {expected}")
    seq = c.agent("node-m")["metrics"]["seq"]
    wait_until(lambda: c.agent("node-m")["metrics"]["seq"] > seq, what="heartbeats still ingested")
    assert c.agent("node-m")["state"] == "online"
    events = c.http.get("/api/events", params={"kind": "ingest_error"}).json()["events"]
    assert events and all(e["level"] == "warning" for e in events)


def test_operator_settings_validation_and_auth(fleet):
    c = fleet.controller(fleet_admin_token="s3cret")
    fleet.agent("node-op")
    c.wait_agent("node-op", status="online")
    url = "/api/agents/node-op/settings"
    assert c.http.put(url, json={"display_name": "x"}).status_code == 401
    auth = {"Authorization": "Bearer s3cret"}
    bad = c.http.put(url, json={"tags": "not-a-list"}, headers=auth)
    assert bad.status_code == 400 and "tags" in bad.json()["error"]
    assert c.http.put(url, content=b"{oops", headers=auth).status_code == 400
    assert c.http.put(url, json={"colour": "red"}, headers=auth).status_code == 400
    ok = c.http.put(url, json={"display_name": " Rack 3 ", "tags": ["b", "a", "a"], "notes": "n"}, headers=auth)
    assert ok.status_code == 200 and ok.json()["name"] == "Rack 3" and ok.json()["tags"] == ["a", "b"]
    assert c.http.put("/api/agents/nope/settings", json={}, headers=auth).status_code == 404
    assert c.http.get("/api/agents").status_code == 401  # reads need the token too (issue 9)
    assert c.api.get("/api/agents").status_code == 200
    assert "s3cret" not in c.log()


def test_force_disconnect_holds_offline_until_reannounce(fleet):
    c = fleet.controller()
    agent = fleet.agent("node-fd")
    first = c.wait_agent("node-fd", status="online")
    r = c.http.post("/api/agents/node-fd/disconnect", json={"pause_s": 2})
    assert r.status_code == 200 and r.json()["state"] == "offline"
    assert "node-fd" not in c.agents(status="online")
    # the agent leaves, waits out the pause, then re-announces with a new session
    a = c.wait_agent("node-fd", timeout=10, status="online", forced_offline=False)
    assert a["online_since"] > first["online_since"]
    assert agent.proc.poll() is None


def test_delete_removes_agent_and_its_retained_topics(fleet):
    c = fleet.controller()
    agent = fleet.agent("node-del")
    c.wait_agent("node-del", status="online")
    agent.kill()
    c.wait_agent("node-del", state="lost")
    assert c.http.delete("/api/agents/node-del").status_code == 200
    assert c.agent("node-del") is None
    assert c.http.delete("/api/agents/node-del").status_code == 404
    c.restart()  # neither the database nor retained topics bring it back
    assert "node-del" not in c.agents()


@pytest.mark.parametrize("path", ["/api/agents/ghost", "/api/agents/ghost/models"])
def test_unknown_agent_is_404_in_error_shape(fleet, path):
    c = fleet.controller()
    r = c.http.get(path)
    assert r.status_code == 404 and "ghost" in r.json()["error"]


def test_deleted_live_agent_stays_deleted_until_it_reannounces(fleet):
    c = fleet.controller()
    agent = fleet.agent("node-zombie")
    c.wait_agent("node-zombie", status="online")
    assert c.http.delete("/api/agents/node-zombie").status_code == 200
    # its heartbeats keep arriving (counted as unknown) but do not resurrect it
    seen = c.http.get("/api/ingest").json()["counters"].get("ignored.unknown_agent", 0)
    wait_until(lambda: c.http.get("/api/ingest").json()["counters"].get("ignored.unknown_agent", 0) > seen + 2)
    assert c.agent("node-zombie") is None
    assert agent.stop() == 0  # a clean stop of a deleted agent is no reason to list it again
    agent.start()
    c.wait_agent("node-zombie", status="online")  # a fresh birth is


def test_agent_reconnects_after_broker_restart(fleet, tmp_path):
    from tests.mosquitto import start_mosquitto
    from tests.support import AgentProc, Controller

    broker = start_mosquitto(tmp_path / "own-broker")
    broker.add_user("node-rc")
    fake = fleet.fake_ollama("rc")
    c = Controller(tmp_path, broker.url("controller"))
    agent = AgentProc(tmp_path, "node-rc", broker.url("node-rc"), fake.url)
    try:
        c.wait_agent("node-rc", status="online")
        port = broker.port
        broker.stop()
        # mosquitto publishes its clients' wills as it shuts down: lost, and out of routing
        c.wait_agent("node-rc", timeout=10, state="lost", routable=False)
        broker = start_mosquitto(tmp_path / "own-broker", users=broker.passwords, port=port)
        a = c.wait_agent("node-rc", timeout=30, status="online")
        assert a["routable"]
        assert c.http.get("/healthz").json()["mqtt"] is True
    finally:
        agent.stop()
        c.close()
        broker.stop()


def test_http_api_is_documented_at_docs(fleet):
    c = fleet.controller()
    spec = c.http.get("/docs/openapi.json").json()
    for path in ("/api/agents", "/api/agents/{agent_id}", "/api/agents/{agent_id}/models",
                 "/api/agents/{agent_id}/settings", "/api/agents/{agent_id}/disconnect", "/api/events",
                 "/healthz"):
        assert path in spec["paths"], path
    assert spec["paths"]["/api/agents/{agent_id}"]["delete"]["summary"]
    assert c.http.get("/docs").status_code == 200
