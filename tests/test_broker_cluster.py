"""A broker that survives a node loss: a three-node NATS cluster (JetStream, MQTT 3.1.1), controllers and
agents as real processes, each given every node's URL in `mqtt_url`. Killing a node under proxied traffic
must cost neither the registry nor the retained topic tree, and every client must move to a live node.

docs/scaling.md ("Clustered broker") quotes the figures this test prints.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from ollama_fleet import mqtt as fmqtt
from ollama_fleet.settings import AGENT, load
from tests.fake_ollama import start_fake_ollama
from tests.nats_cluster import NatsCluster, NatsMissing, start_nats_cluster
from tests.proxy_support import chat_body, wait_routable
from tests.support import AgentProc, Controller, wait_until

AGENTS = ("gpu-a", "gpu-b")
# The shipped heartbeat (5 s) and stale_after (3): an agent unheard for 15 s is stale. The fast timings of
# the other tests (0.5 s, stale after 1.5 s) are shorter than one JetStream leader election (4-9 s in NATS
# 2.9), which a node loss costs whenever the dead node led a stream the MQTT layer needs.
HEARTBEAT = 5.0
STALE_BOUND = 3.0 * HEARTBEAT
# Measured here: 5-50 s (docs/scaling.md). A JetStream leader election (4-9 s); then, while a node is
# down, about one new QoS 1 subscription in three (a replicated JetStream consumer) times out after
# NATS' fixed 4 s, and a client needs all of its two or three to connect.
RECONNECT_DEADLINE = 60.0
# NATS 2.9 speaks MQTT 3.1.1 only. During that election a node holds a client's reads up to its 4 s
# JetStream API timeout: the shipped keepalive (15 s) rides that out, the other tests' 2 s would drop
# healthy connections.
MQTT = {"FLEET_MQTT_PROTOCOL": "311", "FLEET_MQTT_KEEPALIVE": "15"}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    try:
        c = start_nats_cluster(tmp_path / "nats")
    except NatsMissing as e:
        pytest.skip(str(e))
    try:
        yield c
    finally:
        c.stop()


class Fleet:
    """Controllers, agents and fake Ollamas on the cluster; everything stops at teardown."""

    def __init__(self, tmp: Path, cluster: NatsCluster) -> None:
        self.tmp, self.cluster = tmp, cluster
        self.procs: list[Any] = []

    def controller(self, order: tuple[int, ...], name: str, timeout: float = 20.0) -> Controller:
        data = self.tmp / name  # its own database: a fresh one knows the fleet only from the broker
        data.mkdir()
        c = Controller(data, self.cluster.url("controller", order), {**MQTT}, wait=False)
        self.procs.append(c)
        c.wait_ready(timeout)
        return c

    def agent(self, node: str, order: tuple[int, ...]) -> AgentProc:
        fake = start_fake_ollama(name=node)
        self.procs.append(fake)
        self.cluster.add_user(node)
        a = AgentProc(self.tmp, node, self.cluster.url(node, order), fake.url,
                      {**MQTT, "FLEET_HEARTBEAT_INTERVAL": str(HEARTBEAT)})
        self.procs.append(a)
        return a

    def close(self) -> None:
        for p in reversed(self.procs):
            with contextlib.suppress(Exception):  # one failed stop must not leave the others running
                p.close() if hasattr(p, "close") else p.stop()


@pytest.fixture
def fleet(tmp_path: Path, cluster: NatsCluster) -> Iterator[Fleet]:
    f = Fleet(tmp_path, cluster)
    try:
        yield f
    finally:
        f.close()


class Watch:
    """Background load and observation while nodes die: proxied chats back to back, and each agent's
    routability as the controller reports it, both with timestamps."""

    PACE = 0.2  # seconds between looks (and between requests): load, not a stress test

    def __init__(self, c: Controller) -> None:
        self.url = c.url
        self.requests: list[tuple[float, int]] = []  # (time, status; 0 = no answer)
        self.routable: list[tuple[float, dict[str, bool]]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._chat, daemon=True),
                         threading.Thread(target=self._look, daemon=True)]
        for t in self._threads:
            t.start()

    def _chat(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10, trust_env=False) as http:
            while not self._stop.wait(self.PACE):
                try:
                    status = http.post("/api/chat", json=chat_body()).status_code
                except httpx.HTTPError:
                    status = 0
                self.requests.append((time.monotonic(), status))

    def _look(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10, trust_env=False) as http:
            while not self._stop.wait(self.PACE):
                try:
                    agents = {a["id"]: a["routable"] for a in http.get("/api/agents").json()["agents"]}
                except (httpx.HTTPError, ValueError, KeyError):
                    continue
                self.routable.append((time.monotonic(), agents))

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)

    def failed_since(self, t0: float) -> tuple[int, int]:
        after = [s for t, s in self.requests if t >= t0]
        return sum(s != 200 for s in after), len(after)

    def ok_after(self, t0: float) -> int:
        return sum(s == 200 for t, s in self.requests if t >= t0)

    def unroutable_at(self, node: str) -> list[float]:
        return [t for t, agents in self.routable if not agents.get(node)]

    def longest_unroutable(self, node: str) -> float:
        """The longest stretch the controller reported `node` unroutable (or missing)."""
        longest, since = 0.0, None
        for t, agents in self.routable:
            if not agents.get(node):
                since = t if since is None else since
                longest = max(longest, t - since)
            else:
                since = None
        return longest


def _healthy(c: Controller) -> bool:
    """/healthz is 200 only while the controller's ingest is connected and subscribed."""
    return c.http.get("/healthz").status_code == 200


def _reborn(c: Controller, node: str, since: float) -> bool:
    """The controller saw a new session (a birth) of `node` after wall-clock time `since`."""
    events = c.api.get("/api/events", params={"agent": node, "since": since}).json()["events"]
    return any(e["kind"] == "reconnected" or e["kind"] == "online" and "(birth)" in e["message"] for e in events)


def _lost_spells(c: Controller) -> int:
    """How often an agent was declared lost or offline. A dead node takes its clients' wills with it, but
    NATS also drops a client on a live node when a QoS 1 publish times out in JetStream, and then its
    will fires: agents may be lost for a moment, never gone."""
    kinds = [e["kind"] for n in AGENTS for e in c.api.get("/api/events", params={"agent": n}).json()["events"]]
    return sum(k in ("lost", "offline") for k in kinds)


def _reconnected(c: Controller, wall_kill: float, t_kill: float) -> dict[str, float]:
    """Seconds from the kill until the controller is subscribed again and until it saw gpu-a's new
    session, each taken when first seen."""
    back: dict[str, float] = {}

    def both() -> bool:
        if "controller" not in back and _healthy(c):
            back["controller"] = time.monotonic() - t_kill
        if "gpu-a" not in back and _reborn(c, "gpu-a", wall_kill):
            back["gpu-a"] = time.monotonic() - t_kill
        return len(back) == 2
    wait_until(both, RECONNECT_DEADLINE, what="the controller and gpu-a reconnected")
    return back


DRILL = "FLEET_TEST_BROKER_DRILL"


@pytest.mark.skipif(os.environ.get(DRILL) != "1", reason=f"the node-loss drill takes 45-95 s and NATS 2.9's "
                    f"failover (5-56 s, erratic) makes it unreliable on a loaded machine: run it with {DRILL}=1")
@pytest.mark.timeout(240)  # two NATS failovers of up to RECONNECT_DEADLINE each, in the worst case
def test_fleet_survives_the_loss_of_a_broker_node(cluster: NatsCluster, fleet: Fleet) -> None:
    # The controller and gpu-a share node 1, so that one kill (a NATS 2.9 failover takes 5-50 s here) moves a
    # controller and an agent; their lists continue at different nodes (2 and 3), gpu-b lives on node 2.
    c = fleet.controller((0, 1, 2), "controller-1")
    fleet.agent("gpu-a", (0, 2, 1))
    fleet.agent("gpu-b", (1, 2, 0))
    wait_routable(c, *AGENTS)
    assert cluster.where("controller") == [0] and cluster.where("gpu-a") == [0] and cluster.where("gpu-b") == [1]
    r = c.http.post("/api/chat", json=chat_body())
    assert r.status_code == 200 and r.headers["x-fleet-agent"] in AGENTS, r.text

    watch = Watch(c)
    try:
        wait_until(lambda: watch.ok_after(0) >= 5, 10, what="traffic flowing before the kill")
        t_kill, wall_kill = time.monotonic(), time.time()
        cluster.kill(0)
        wait_until(lambda: not _healthy(c), 5, what="the controller noticing its broker node died")
        back = _reconnected(c, wall_kill, t_kill)
        assert all(cluster.where(u) in ([1], [2]) for u in ("controller", "gpu-a"))  # live nodes only
        wait_routable(c, *AGENTS, timeout=RECONNECT_DEADLINE)  # an agent dropped by a live node, too
        t_healed = time.monotonic()
        wait_until(lambda: watch.ok_after(t_healed) >= 5, 10, what="requests served after the kill")
    finally:
        watch.stop()

    # A controller started now, with an empty database and its list starting at the dead node, builds the
    # whole registry from the retained topic tree that survived on the other nodes.
    t_new = time.monotonic()
    c2 = fleet.controller((0, 1, 2), "controller-2", timeout=RECONNECT_DEADLINE)
    wait_routable(c2, *AGENTS)
    rebuilt = time.monotonic() - t_new
    assert len(cluster.where("controller")) == 2 and 0 not in cluster.where("controller")
    assert {a["id"]: a["status"] for a in c2.agents().values()} == {n: "online" for n in AGENTS}
    assert c2.http.post("/api/chat", json=chat_body()).status_code == 200

    failed, total = watch.failed_since(t_kill)
    lost = _lost_spells(c)
    gaps = {n: round(watch.longest_unroutable(n), 1) for n in AGENTS}
    print(f"\nbroker-cluster drill (NATS 2.9, 3 nodes, one killed): controller reconnected after "
          f"{back['controller']:.1f} s, gpu-a after {back['gpu-a']:.1f} s; a fresh controller rebuilt the "
          f"registry from retained messages in {rebuilt:.1f} s; longest unroutable stretch per agent {gaps} "
          f"(stale bound {STALE_BOUND:.0f} s); {lost} agent(s) briefly declared lost; {failed} of {total} "
          f"proxied requests failed from the kill on")
    assert set(c.agents()) == set(AGENTS)  # the registry kept every agent
    # Unroutable only during the disruption: from the kill until the controller saw every agent again.
    # (How long, against the stale bound, depends on NATS' failover: printed above, docs/scaling.md.)
    assert all(t_kill <= t <= t_healed for n in AGENTS for t in watch.unroutable_at(n)), gaps


async def test_a_refused_subscription_fails_the_connection(cluster: NatsCluster) -> None:
    """NATS answers a subscription it will not serve (here: outside the account's rights, as when it cannot
    create the JetStream consumer) with SUBACK 0x80. Our client raises, so the connect loop tries again
    instead of sitting on a connection that hears nothing."""
    cluster.add_user("gpu-x")
    cfg = load([AGENT], {"mqtt_url": cluster.url("gpu-x"), "mqtt_protocol": "311"}, env={})
    brokers = fmqtt.Brokers(cfg)
    async with brokers.client("fleet-agent-gpu-x") as client:
        granted = await client.subscribe("fleet/v1/cmd/gpu-x/+", qos=1)
        assert granted == [ReasonCode(PacketTypes.SUBACK, "Granted QoS 1")]
        with pytest.raises(aiomqtt.MqttError, match="subscription to 'fleet/v1/nodes/#' refused: Unspecified"):
            await client.subscribe("fleet/v1/nodes/#", qos=1)  # another node's state: not for an agent
