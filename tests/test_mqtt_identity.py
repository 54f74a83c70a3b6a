"""MQTT identity (issue 9, item 4): with the shipped broker config a client id is bound to its account
(`use_username_as_clientid`), so node A's valid credentials cannot knock node B or the controller off
the broker by reusing their client ids.

A disconnect is an event that might still be on its way when we look, so each check watches for it over
a window (polling with a deadline) and then proves the victim's connection is the same, live one: it
receives a message published after the attack, and it never saw a disconnect.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt

from tests.mosquitto import CONNACK_ACCEPTED
from tests.support import wait_until

WATCH_WINDOW = 1.5  # seconds to watch for a disconnect that must not come (a takeover lands in ms)


class Client:
    """A paho MQTT v5 client on its own thread that records its connects, disconnects and messages."""

    def __init__(self, broker: Any, user: str, client_id: str, will: tuple[str, bytes] | None = None) -> None:
        self.connects: list[int] = []
        self.disconnects: list[str] = []
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(user, broker.passwords[user])
        if will:
            self.client.will_set(will[0], will[1], qos=1, retain=False)
        self.client.on_connect = lambda _c, _u, _f, rc, _p: self._add(self.connects, rc.value)
        self.client.on_disconnect = lambda _c, _u, _f, rc, _p: self._add(self.disconnects, str(rc))
        self.client.on_message = lambda _c, _u, m: self._add(self.messages, (m.topic, bytes(m.payload)))
        self.client.reconnect_delay_set(30, 30)  # a kicked victim must not quietly come back within the test
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        wait_until(lambda: self.connects, 5, what=f"CONNACK for {user}")
        assert self.connects == [CONNACK_ACCEPTED], self.connects

    def _add(self, into: list[Any], item: Any) -> None:
        with self._lock:
            into.append(item)

    def subscribe(self, topic: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *_a: done.set()
        self.client.subscribe(topic, qos=1)
        assert done.wait(5), f"SUBACK for {topic}"

    def received(self, topic: str, payload: bytes) -> bool:
        with self._lock:
            return (topic, payload) in self.messages

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _attack(broker: Any, user: str, client_ids: list[str]) -> None:
    """Connect with `user`'s valid credentials under each victim client id (the broker accepts the
    account; what it must not do is hand over the victim's connection)."""
    for cid in client_ids:
        attacker = Client(broker, user, cid)
        attacker.close()


def _still_connected(victim: Client, what: str) -> None:
    deadline = time.monotonic() + WATCH_WINDOW
    while time.monotonic() < deadline:  # polling for an event that must not happen, bounded
        assert not victim.disconnects, f"{what} was disconnected: {victim.disconnects}"
        time.sleep(0.05)
    assert victim.connects == [CONNACK_ACCEPTED], f"{what} reconnected: {victim.connects}"


def test_node_cannot_disconnect_another_node(mosquitto):
    for node in ("idn-a", "idn-b"):
        if node not in mosquitto.passwords:
            mosquitto.add_user(node)
    victim = Client(mosquitto, "idn-b", "fleet-agent-idn-b",
                    will=("fleet/v1/nodes/idn-b/state", b'{"v":1,"state":"lost","session":"x"}'))
    operator = Client(mosquitto, "operator", "any-id-the-operator-likes")
    try:
        victim.subscribe("fleet/v1/cmd/idn-b/+")
        # B's configured id, the id the broker actually gives it, and a fresh one for good measure
        _attack(mosquitto, "idn-a", ["fleet-agent-idn-b", "idn-b", f"x-{uuid.uuid4().hex[:6]}"])
        _still_connected(victim, "node idn-b")
        marker = json.dumps({"v": 1, "after": "attack"}).encode()
        operator.client.publish("fleet/v1/cmd/idn-b/agent.ping", marker, qos=1).wait_for_publish(5)
        wait_until(lambda: victim.received("fleet/v1/cmd/idn-b/agent.ping", marker), 5,
                   what="the victim's original connection still receives commands")
        assert victim.disconnects == []
    finally:
        operator.close()
        victim.close()


def test_node_cannot_disconnect_the_controller(fleet):
    c = fleet.controller()
    fleet.credentials("idn-c")
    watcher = Client(fleet.broker, fleet.broker.add_account("operator"), "watcher")
    statuses: list[dict[str, Any]] = []
    try:
        watcher.subscribe("fleet/v1/controller/status")
        wait_until(lambda: watcher.messages, 5, what="the controller's retained status")
        first = json.loads(watcher.messages[0][1])
        assert first["online"] is True
        # every id the controller is known by: the one it asks for and the one the broker gives it
        _attack(fleet.broker, "idn-c", [f"fleet-controller-{first['instance'][:12]}", "controller"])
        deadline = time.monotonic() + WATCH_WINDOW
        while time.monotonic() < deadline:  # a takeover would publish the controller's will (online false)
            statuses = [json.loads(p) for _, p in watcher.messages]
            assert all(s["online"] for s in statuses), statuses
            assert c.http.get("/api/ingest").json()["connected"] is True
            time.sleep(0.05)
        assert "broker connection lost" not in c.log()
        # and the same connection still ingests: a node that announces itself now is registered
        fleet.agent("idn-live")
        c.wait_agent("idn-live", state="online")
        assert "broker connection lost" not in c.log()
        assert all(json.loads(p)["online"] for _, p in watcher.messages)
    finally:
        watcher.close()


def test_two_connections_of_one_account_share_one_client_id(mosquitto):
    """What the binding costs, stated as a test: a second connection of the same account replaces the
    first (so every concurrently connected tool needs its own account, broker/README.md)."""
    user = mosquitto.add_account("operator")
    first = Client(mosquitto, user, "tool-1")
    second = Client(mosquitto, user, "tool-2")
    try:
        wait_until(lambda: first.disconnects, 5, what="the first connection taken over")
        assert second.disconnects == []
    finally:
        first.close()
        second.close()
