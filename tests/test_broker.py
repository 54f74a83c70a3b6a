"""Broker deliverables: shipped Mosquitto config + ACL on a real mosquitto, passwd.py, trial broker.

Negative checks ("nothing was delivered") never sleep: the same publisher sends a marker after the
denied message, and MQTT keeps one publisher's messages in order, so once the marker arrives any
wrongly delivered message would already have arrived before it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import os
import re
import select
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from ollama_fleet.broker import passwd
from ollama_fleet.broker.local import LOOPBACK, find_mosquitto, start_trial_broker
from tests.mosquitto import (
    CONNACK_ACCEPTED,
    CONNACK_NOT_AUTHORIZED,
    MosquittoProcess,
    connect_packet,
    mqtt_connect_rc,
    render_conf,
    start_mosquitto,
)

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 10.0
NOT_AUTHORIZED = 135  # MQTT v5 reason code 0x87
REQUIRE_MOSQUITTO = os.environ.get("FLEET_TEST_REQUIRE_MOSQUITTO") == "1"


def _need_mosquitto() -> str:
    binary = find_mosquitto()
    if binary is None:
        msg = "mosquitto binary not found (apt-get install mosquitto, or set FLEET_MOSQUITTO_BIN)"
        if REQUIRE_MOSQUITTO:
            pytest.fail(f"FLEET_TEST_REQUIRE_MOSQUITTO=1 but {msg}")
        pytest.skip(msg)
    return binary


@pytest.fixture
def mq(tmp_path: Path) -> Iterator[MosquittoProcess]:
    _need_mosquitto()
    proc = start_mosquitto(tmp_path / "mosquitto")
    yield proc
    proc.stop()
    assert proc.proc.returncode == 0, proc.log_text()


# --- a small, thread-free paho MQTT v5 peer -------------------------------------------------------


@dataclass
class Msg:
    topic: str
    payload: bytes
    retain: bool


class Peer:
    """paho client (MQTT v5 unless told) driven by explicit loop() calls from the test, no thread."""

    def __init__(
        self,
        mq: MosquittoProcess,
        user: str | None,
        password: str | None = None,
        client_id: str | None = None,
        will: tuple[str, bytes] | None = None,
        protocol: mqtt.MQTTProtocolVersion = mqtt.MQTTv5,
    ) -> None:
        self.mq = mq
        self.name = client_id or f"{user or 'anon'}-{uuid.uuid4().hex[:8]}"
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.name, protocol=protocol)
        if user is not None:
            self.client.username_pw_set(user, password if password is not None else mq.passwords[user])
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.connack: ReasonCode | None = None
        self.messages: list[Msg] = []
        self.pubacks: dict[int, ReasonCode] = {}
        self.subacks: dict[int, list[ReasonCode]] = {}
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda c, u, m: self.messages.append(
            Msg(m.topic, bytes(m.payload), m.retain)
        )
        self.client.on_publish = lambda c, u, mid, rc, props: self.pubacks.__setitem__(mid, rc)
        self.client.on_subscribe = lambda c, u, mid, rcs, props: self.subacks.__setitem__(mid, rcs)

    def _on_connect(
        self, client: mqtt.Client, userdata: object, flags: object, rc: ReasonCode, props: object
    ) -> None:
        self.connack = rc

    def pump(self) -> None:
        self.client.loop(timeout=0)  # non-blocking: Peers.wait() blocks in one select() for all peers

    def topics(self) -> list[str]:
        return [m.topic for m in self.messages]


class Peers:
    """Creates peers, pumps all of them while waiting, disconnects them at teardown."""

    def __init__(self, mq: MosquittoProcess) -> None:
        self.mq = mq
        self.all: list[Peer] = []

    def wait(self, predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out waiting for {what}")
            self._pump_all()

    def _pump_all(self) -> None:
        socks = [s for s in (p.client.socket() for p in self.all) if s is not None]
        if socks:  # sleep until any peer has data (at most 10 ms: pending writes need loop() too)
            select.select(socks, [], [], 0.01)
        for p in self.all:
            p.pump()

    def connect(self, user: str | None, **kw: object) -> Peer:
        """Connect and return the peer; CONNACK must be Success."""
        peer = self.connect_raw(user, **kw)
        assert peer.connack is not None and not peer.connack.is_failure, f"{user}: {peer.connack}"
        return peer

    def connect_raw(self, user: str | None, **kw: object) -> Peer:
        peer = Peer(self.mq, user, **kw)  # type: ignore[arg-type]
        self.all.append(peer)
        peer.client.connect(self.mq.host, self.mq.port, keepalive=30)
        self.wait(lambda: peer.connack is not None, f"CONNACK for {peer.name}")
        return peer

    def subscribe(self, peer: Peer, topic: str) -> list[ReasonCode]:
        rc, mid = peer.client.subscribe(topic, qos=1)
        assert rc == mqtt.MQTT_ERR_SUCCESS and mid is not None
        self.wait(lambda: mid in peer.subacks, f"SUBACK {topic}")
        return peer.subacks[mid]

    def publish(self, peer: Peer, topic: str, payload: bytes = b"x", retain: bool = False) -> ReasonCode:
        """QoS1 publish; returns the PUBACK reason code (v5: Not authorized when the ACL denies)."""
        info = peer.client.publish(topic, payload, qos=1, retain=retain)
        self.wait(lambda: info.mid in peer.pubacks, f"PUBACK {topic}")
        return peer.pubacks[info.mid]

    def barrier(self, publisher: Peer, subscriber: Peer, marker_topic: str) -> list[Msg]:
        """Publish a marker and wait for it; returns what ``subscriber`` got before the marker."""
        token = uuid.uuid4().bytes
        assert not self.publish(publisher, marker_topic, token).is_failure
        self.wait(lambda: any(m.payload == token for m in subscriber.messages), f"marker {marker_topic}")
        idx = next(i for i, m in enumerate(subscriber.messages) if m.payload == token)
        return subscriber.messages[:idx]

    def drop_connection(self, peer: Peer) -> None:
        """Abrupt loss (no DISCONNECT): the broker must publish the will."""
        sock = peer.client.socket()
        assert isinstance(sock, socket.socket)
        sock.shutdown(socket.SHUT_RDWR)
        self.wait(lambda: not peer.client.is_connected(), f"{peer.name} dropped")

    def close(self) -> None:
        for p in self.all:
            if p.client.is_connected():
                p.client.disconnect()
        with contextlib.suppress(AssertionError):
            self.wait(lambda: not any(p.client.is_connected() for p in self.all), "disconnects", 5)


@pytest.fixture
def peers(mq: MosquittoProcess) -> Iterator[Peers]:
    mq.add_user("node-a")
    mq.add_user("node-b")
    p = Peers(mq)
    yield p
    p.close()


# --- shipped config ---------------------------------------------------------------------------------


def test_shipped_conf_directives() -> None:
    conf = (ROOT / "broker" / "mosquitto.conf").read_text()
    directives: dict[str, str] = {}
    for line in conf.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            directives.setdefault(key, value)
    assert directives["per_listener_settings"] == "false"
    assert directives["listener"] == "1883"
    assert directives["allow_anonymous"] == "false"
    assert directives["password_file"] == "/mosquitto/config/fleet.passwd"
    assert directives["acl_file"] == "/mosquitto/config/fleet.acl"
    assert int(directives["max_queued_messages"]) >= 100000
    assert directives["persistence"] == "true"
    assert directives["persistence_location"] == "/mosquitto/data/"
    assert directives["log_dest"] == "stderr"  # stdout is block-buffered by mosquitto when piped
    # per_listener_settings must precede the listener, or mosquitto applies it inconsistently
    assert conf.index("per_listener_settings") < conf.index("\nlistener")
    acl = (ROOT / "broker" / "fleet.acl").read_text()
    rules = [line for line in acl.splitlines() if line.strip() and not line.startswith("#")]
    assert not any("%c" in r for r in rules), "client ids are not authenticated: use %u"


def test_render_conf_rewrites_only_environment_lines(tmp_path: Path) -> None:
    shipped = (ROOT / "broker" / "mosquitto.conf").read_text()
    rendered = render_conf(shipped, 12345, tmp_path, anonymous=False)
    changed = {a for a, b in zip(shipped.splitlines(), rendered.splitlines(), strict=True) if a != b}
    assert {line.split()[0] for line in changed} == {
        "listener",
        "password_file",
        "acl_file",
        "persistence_location",
        "user",
    }
    assert "listener 12345 127.0.0.1" in rendered


# --- ACL on the real broker ---------------------------------------------------------------------------


def test_agent_publishes_own_state_retained(peers: Peers) -> None:
    agent = peers.connect("node-a")
    rc = peers.publish(agent, "fleet/v1/nodes/node-a/state", b'{"state":"online"}', retain=True)
    assert not rc.is_failure  # v5 Success or "No matching subscribers"
    controller = peers.connect("controller")
    assert all(not rc.is_failure for rc in peers.subscribe(controller, "fleet/v1/nodes/+/state"))
    peers.wait(lambda: "fleet/v1/nodes/node-a/state" in controller.topics(), "retained state")
    msg = controller.messages[0]
    assert msg.retain and msg.payload == b'{"state":"online"}'


def test_agent_cannot_write_other_node(peers: Peers) -> None:
    controller = peers.connect("controller")
    peers.subscribe(controller, "fleet/v1/#")
    agent = peers.connect("node-a")
    for topic in ("fleet/v1/nodes/node-b/state", "fleet/v1/nodes/node-b/jobs/j1", "fleet/v1/nodes/x"):
        assert peers.publish(agent, topic, b"forged", retain=True).value == NOT_AUTHORIZED, topic
    before = peers.barrier(agent, controller, "fleet/v1/nodes/node-a/marker")
    assert before == []
    # Nothing forged was retained either: retained messages are sent right after SUBACK, so they
    # would arrive before a marker published afterwards.
    # a second controller-role account: client ids are bound to accounts, so a second connection of
    # "controller" would take the first one over
    late = peers.connect(peers.mq.add_account("controller"))
    peers.subscribe(late, "fleet/v1/nodes/node-b/#")
    assert peers.barrier(controller, late, "fleet/v1/nodes/node-b/marker") == []


def test_agent_cannot_write_commands(peers: Peers) -> None:
    controller = peers.connect("controller")
    peers.subscribe(controller, "fleet/v1/#")
    agent = peers.connect("node-a")
    for topic in (
        "fleet/v1/cmd/node-b/model.pull",
        "fleet/v1/cmd/node-a/model.pull",
        "fleet/v1/cmd/_all/agent.rebirth",
        "fleet/v1/cmd/_controller/drain",
        "fleet/v1/controller/status",
    ):
        assert peers.publish(agent, topic, b"{}").value == NOT_AUTHORIZED, topic
    assert peers.barrier(agent, controller, "fleet/v1/nodes/node-a/marker") == []


def test_agent_receives_only_own_and_broadcast_commands(peers: Peers) -> None:
    agent = peers.connect("node-a")
    peers.subscribe(agent, "fleet/v1/cmd/#")
    peers.subscribe(agent, "fleet/v1/controller/status")
    peers.subscribe(agent, "fleet/v1/nodes/#")  # other nodes' state is not readable
    operator = peers.connect("operator")
    controller = peers.connect("controller")
    other = peers.connect("node-b")
    peers.publish(other, "fleet/v1/nodes/node-b/state", b"b")
    for topic in (
        "fleet/v1/cmd/node-b/model.pull",
        "fleet/v1/cmd/node-a/model.pull",
        "fleet/v1/cmd/_controller/drain",
        "fleet/v1/cmd/_all/agent.rebirth",
    ):
        assert not peers.publish(operator, topic, b"{}").is_failure
    assert not peers.publish(controller, "fleet/v1/controller/status", b'{"online":true}').is_failure
    assert not peers.publish(controller, "fleet/v1/cmd/node-a/job.cancel", b"{}").is_failure
    peers.wait(lambda: "fleet/v1/cmd/node-a/job.cancel" in agent.topics(), "controller command")
    got = peers.barrier(operator, agent, "fleet/v1/cmd/node-a/marker")
    assert sorted(m.topic for m in got) == sorted(
        [
            "fleet/v1/cmd/node-a/model.pull",
            "fleet/v1/cmd/_all/agent.rebirth",
            "fleet/v1/controller/status",
            "fleet/v1/cmd/node-a/job.cancel",
        ]
    )


def test_will_on_foreign_topic_not_delivered(peers: Peers) -> None:
    controller = peers.connect("controller")
    peers.subscribe(controller, "fleet/v1/nodes/#")
    forger = peers.connect("node-a", will=("fleet/v1/nodes/node-b/state", b'{"state":"lost"}'))
    honest = peers.connect("node-b", will=("fleet/v1/nodes/node-b/state", b'{"state":"lost","own":1}'))
    peers.drop_connection(forger)
    # mosquitto logs the disconnect in the same call that handles the will: wait for it.
    # the broker knows the connection by its username (use_username_as_clientid)
    peers.wait(lambda: "Client node-a closed its connection" in peers.mq.log_text(), "forger gone")
    peers.drop_connection(honest)
    # Positive control: node-b's own will is delivered, and it is the only will.
    peers.wait(lambda: any(m.payload.endswith(b'"own":1}') for m in controller.messages), "own will")
    assert [m.payload for m in controller.messages] == [b'{"state":"lost","own":1}']


def test_operator_commands_and_controller_reads_all(peers: Peers) -> None:
    controller = peers.connect("controller")
    peers.subscribe(controller, "fleet/v1/#")
    assert not peers.subscribe(controller, "$SYS/broker/version")[0].is_failure
    peers.wait(lambda: "$SYS/broker/version" in controller.topics(), "$SYS for controller")
    agent = peers.connect("node-a")
    peers.subscribe(agent, "fleet/v1/cmd/node-a/#")
    operator = peers.connect("operator")
    peers.subscribe(operator, "fleet/v1/#")

    assert not peers.publish(operator, "fleet/v1/cmd/node-a/model.pull", b'{"model":"m"}').is_failure
    assert not peers.publish(operator, "fleet/v1/cmd/_controller/rebalance", b"{}").is_failure
    assert not peers.publish(
        agent, "fleet/v1/nodes/node-a/jobs/j1", b'{"status":"QUEUED"}', retain=True
    ).is_failure
    peers.wait(lambda: "fleet/v1/cmd/node-a/model.pull" in agent.topics(), "command at agent")
    want = {
        "fleet/v1/cmd/node-a/model.pull",
        "fleet/v1/cmd/_controller/rebalance",
        "fleet/v1/nodes/node-a/jobs/j1",
    }
    peers.wait(lambda: want <= set(controller.topics()), "controller sees everything")
    peers.wait(lambda: "fleet/v1/nodes/node-a/jobs/j1" in operator.topics(), "operator reads nodes")
    # The operator cannot forge node state, not even as a node named "operator"; the controller may
    # write node topics (decommission = empty retained payloads).
    assert peers.publish(operator, "fleet/v1/nodes/node-a/state", b"forged").value == NOT_AUTHORIZED
    assert peers.publish(operator, "fleet/v1/nodes/operator/state", b"forged").value == NOT_AUTHORIZED
    assert not peers.publish(controller, "fleet/v1/nodes/node-a/jobs/j1", b"", retain=True).is_failure


def test_retained_snapshot_burst_not_dropped(peers: Peers) -> None:
    """max_queued_messages: a controller (re)subscribing gets every retained snapshot, not ~1000."""
    n = 2500
    writer = peers.connect("controller")
    infos = [
        writer.client.publish(f"fleet/v1/nodes/n{i:04d}/models", b"{}", qos=1, retain=True) for i in range(n)
    ]
    peers.wait(lambda: all(i.mid in writer.pubacks for i in infos), f"{n} PUBACKs")
    reader = peers.connect(peers.mq.add_account("controller"))  # its own account: see add_account
    peers.subscribe(reader, "fleet/v1/nodes/+/models")
    seen = peers.barrier(writer, reader, "fleet/v1/nodes/zz-marker/models")
    assert len({m.topic for m in seen if m.retain}) == n


def test_oversized_message_dropped(peers: Peers) -> None:
    """message_size_limit 262144. Checked over v3.1.1: for an oversized v5 QoS1 publish mosquitto
    2.0.11 answers PUBACK 0x95, a code the spec does not allow in PUBACK, and paho 2.2 then drops
    the connection as "malformed packet"."""
    controller = peers.connect("controller")
    peers.subscribe(controller, "fleet/v1/nodes/#")
    agent = peers.connect("node-a", protocol=mqtt.MQTTv311)
    peers.publish(agent, "fleet/v1/nodes/node-a/models", b"x" * 262145)  # v3.1.1: PUBACK, then dropped
    assert peers.barrier(agent, controller, "fleet/v1/nodes/node-a/marker") == []
    peers.publish(agent, "fleet/v1/nodes/node-a/models", b"y" * 262144)
    peers.wait(lambda: "fleet/v1/nodes/node-a/models" in controller.topics(), "max-size message")


def test_anonymous_and_wrong_password_refused(mq: MosquittoProcess, peers: Peers) -> None:
    assert mqtt_connect_rc(mq.host, mq.port) == CONNACK_NOT_AUTHORIZED
    assert mqtt_connect_rc(mq.host, mq.port, "node-a", "wrong") != CONNACK_ACCEPTED
    assert mqtt_connect_rc(mq.host, mq.port, "nobody", "x") != CONNACK_ACCEPTED
    anon = peers.connect_raw(None)
    assert anon.connack is not None and anon.connack.is_failure
    bad = peers.connect_raw("node-a", password="wrong")
    assert bad.connack is not None and bad.connack.is_failure
    assert mqtt_connect_rc(mq.host, mq.port, "node-a", mq.passwords["node-a"]) == CONNACK_ACCEPTED


def test_passwd_output_accepted_and_remove(mq: MosquittoProcess) -> None:
    pw = mq.add_user("gpu-01", "s3cret with spaces")
    assert pw == "s3cret with spaces"
    assert mq.url("gpu-01").startswith("mqtt://gpu-01:s3cret%20with%20spaces@127.0.0.1:")
    assert mq.connect_rc("gpu-01") == CONNACK_ACCEPTED
    generated = mq.add_user("gpu-02")
    assert len(generated) >= 24 and mq.connect_rc("gpu-02") == CONNACK_ACCEPTED
    # Rotating a password: the old one stops working after the reload.
    mq.add_user("gpu-01", "rotated")
    assert mqtt_connect_rc(mq.host, mq.port, "gpu-01", "s3cret with spaces") != CONNACK_ACCEPTED
    mq.remove_user("gpu-01")
    assert mqtt_connect_rc(mq.host, mq.port, "gpu-01", "rotated") != CONNACK_ACCEPTED
    assert mq.connect_rc("gpu-02") == CONNACK_ACCEPTED
    assert mq.connect_rc("controller") == CONNACK_ACCEPTED


def test_revocation_semantics(mq: MosquittoProcess, peers: Peers) -> None:
    """What broker/README.md promises about revoking a node and check_retain_source."""
    a, b = peers.connect("node-a"), peers.connect("node-b")
    assert not peers.publish(a, "fleet/v1/nodes/node-a/state", b"A", retain=True).is_failure
    assert not peers.publish(b, "fleet/v1/nodes/node-b/state", b"B", retain=True).is_failure
    # Password removal + SIGHUP kicks the connected client ...
    mq.remove_user("node-a")
    peers.wait(lambda: not a.client.is_connected(), "node-a disconnected by the reload")
    # ... an ACL deny block makes its publishes fail and hides its retained state.
    mq.acl_path.write_text(mq.acl_path.read_text() + "\nuser node-b\ntopic deny fleet/v1/#\n")
    mq.reload()
    assert peers.publish(b, "fleet/v1/nodes/node-b/state", b"B2", retain=True).value == NOT_AUTHORIZED
    controller = peers.connect("controller")
    peers.subscribe(controller, "fleet/v1/nodes/#")
    seen = peers.barrier(controller, controller, "fleet/v1/nodes/zz-marker/state")
    # node-a's retained state survives a mere password removal; node-b's is hidden by the deny.
    assert [(m.topic, m.payload) for m in seen] == [("fleet/v1/nodes/node-a/state", b"A")]


def test_anonymous_variant_keeps_shipped_rules(tmp_path: Path) -> None:
    _need_mosquitto()
    with start_mosquitto(tmp_path, anonymous=True) as mq:
        assert "max_queued_messages 100000" in mq.conf_path.read_text()
        mq.add_user("node-a")
        p = Peers(mq)
        try:
            anon, agent = p.connect(None), p.connect("node-a")
            p.subscribe(anon, "fleet/v1/#")
            assert not p.publish(anon, "fleet/v1/nodes/bench-1/heartbeat").is_failure
            # Authenticated users still get the shipped rules.
            assert p.publish(agent, "fleet/v1/nodes/node-b/state").value == NOT_AUTHORIZED
            seen = p.barrier(anon, anon, "fleet/v1/nodes/bench-1/marker")
            assert [m.topic for m in seen] == ["fleet/v1/nodes/bench-1/heartbeat"]
        finally:
            p.close()


# --- passwd.py ---------------------------------------------------------------------------------------


def test_hash_format_matches_mosquitto_passwd_vector() -> None:
    # Line produced by mosquitto_passwd 2.0.11 for password "secret".
    line = (
        "alice:$7$101$6ESL9aaeAgcbw+Zu$JWK6d+xv03g12tODvQf4tQqZeLdgGK2j6RrY7cG0fvwl12nfQAkKy3CzGyT5H"
        "WBABjy8hkBCpHELlUYD4kic1Q=="
    )
    hashed = line.split(":", 1)[1]
    assert passwd.hash_password("secret", base64.b64decode("6ESL9aaeAgcbw+Zu")) == hashed
    assert passwd.verify_password("secret", hashed)
    assert not passwd.verify_password("Secret", hashed)
    fresh = passwd.hash_password("pw")
    assert re.fullmatch(r"\$7\$101\$[A-Za-z0-9+/]{16}\$[A-Za-z0-9+/]{86}==", fresh)


def test_add_remove_credentials_file(tmp_path: Path) -> None:
    f = tmp_path / "sub" / "fleet.passwd"
    pw = passwd.add_credentials(f, "node-a")
    assert len(pw) >= 24
    passwd.add_credentials(f, "controller", "c")
    passwd.add_credentials(f, "node-a", "new")  # update keeps one line per user
    entries = passwd.read_entries(f)
    assert list(entries) == ["node-a", "controller"]
    assert passwd.verify_password("new", entries["node-a"])
    assert oct(f.stat().st_mode & 0o777) == "0o640"
    assert passwd.remove_credentials(f, "node-a") is True
    assert passwd.remove_credentials(f, "node-a") is False
    assert list(passwd.read_entries(f)) == ["controller"]


@pytest.mark.parametrize("bad", ["", "Node-A", "-x", "_all", "a/b", "a+b", "a#", "a b", "x" * 64, "a:b"])
def test_username_validation(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="invalid MQTT username"):
        passwd.add_credentials(tmp_path / "p", bad, "pw")
    assert not (tmp_path / "p").exists()


def test_password_validation(tmp_path: Path) -> None:
    for bad in ("", "a\nb"):
        with pytest.raises(ValueError):
            passwd.add_credentials(tmp_path / "p", "node-a", bad)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "fleet.passwd"
    assert passwd.main(["add", "gpu-01", "--file", str(f)]) == 0
    out, err = capsys.readouterr()
    generated = out.strip()
    assert len(generated) >= 24 and generated not in err
    assert passwd.verify_password(generated, passwd.read_entries(f)["gpu-01"])

    monkeypatch.setattr("sys.stdin", io.StringIO("from-stdin\n"))
    assert passwd.main(["add", "gpu-02", "--password-stdin", "--file", str(f)]) == 0
    assert passwd.main(["add", "gpu-03", "--password", "given", "--file", str(f)]) == 0
    out, _ = capsys.readouterr()
    assert out == ""  # a password the user chose is never echoed
    assert passwd.verify_password("from-stdin", passwd.read_entries(f)["gpu-02"])
    assert passwd.verify_password("given", passwd.read_entries(f)["gpu-03"])

    assert passwd.main(["remove", "gpu-02", "--file", str(f)]) == 0
    assert passwd.main(["remove", "gpu-02", "--file", str(f)]) == 1
    assert passwd.main(["add", "Bad_Name", "--file", str(f)]) == 2
    assert "invalid MQTT username" in capsys.readouterr().err
    assert sorted(passwd.read_entries(f)) == ["gpu-01", "gpu-03"]


# --- trial broker -----------------------------------------------------------------------------------


def _non_loopback_ipv4() -> str | None:
    """An address of this machine other than 127.x (UDP connect sends nothing)."""
    candidates: list[str] = []
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))
        candidates.append(s.getsockname()[0])
    with contextlib.suppress(OSError):
        candidates += socket.gethostbyname_ex(socket.gethostname())[2]
    return next((a for a in candidates if not a.startswith("127.") and a != "0.0.0.0"), None)


async def _round_trip(url_host: str, port: int, protocol: int) -> None:
    version = aiomqtt.ProtocolVersion.V5 if protocol == 5 else aiomqtt.ProtocolVersion.V311
    payload = uuid.uuid4().hex.encode()
    async with aiomqtt.Client(url_host, port, protocol=version, identifier=f"rt-{payload[:6].decode()}") as c:
        await c.subscribe("fleet/v1/nodes/trial/#", qos=1)
        await c.publish("fleet/v1/nodes/trial/state", payload, qos=1)
        async with asyncio.timeout(TIMEOUT):
            async for msg in c.messages:
                if msg.payload == payload:
                    assert str(msg.topic) == "fleet/v1/nodes/trial/state"
                    return


async def _assert_unreachable_off_loopback(port: int) -> None:
    addr = _non_loopback_ipv4()
    if addr is None:
        return  # no non-loopback address on this machine: nothing to check
    with pytest.raises(OSError):
        _, writer = await asyncio.wait_for(asyncio.open_connection(addr, port), 5)
        writer.close()
        await writer.wait_closed()


async def _assert_port_closed(port: int) -> None:
    with pytest.raises(OSError):
        _, writer = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, port), 5)
        writer.close()
        await writer.wait_closed()


async def test_trial_broker_mosquitto(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _need_mosquitto()
    broker = await start_trial_broker(data_dir=tmp_path / "data", prefer="mosquitto")
    try:
        assert (broker.kind, broker.mqtt_protocol) == ("mosquitto", 5)
        assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
        assert any("SINGLE-HOST TRIAL" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
        conf = (tmp_path / "data" / "mosquitto-trial.conf").read_text()
        assert f"listener {broker.port} 127.0.0.1" in conf and "max_queued_messages 100000" in conf
        await _round_trip(LOOPBACK, broker.port, broker.mqtt_protocol)
        await _assert_unreachable_off_loopback(broker.port)
    finally:
        await broker.close()
    assert broker.proc.returncode == 0  # type: ignore[attr-defined]
    await _assert_port_closed(broker.port)
    assert (tmp_path / "data" / "mosquitto.db").exists()  # persistence in data_dir


async def test_trial_broker_mosquitto_temp_dir_removed() -> None:
    _need_mosquitto()
    broker = await start_trial_broker()
    work_dir = broker.work_dir  # type: ignore[attr-defined]
    assert broker.kind == "mosquitto" and work_dir.exists()
    await broker.close()
    assert not work_dir.exists()


async def test_trial_broker_amqtt(caplog: pytest.LogCaptureFixture) -> None:
    broker = await start_trial_broker(prefer="amqtt")
    try:
        assert (broker.kind, broker.mqtt_protocol) == ("amqtt", 311)
        assert broker.url == f"mqtt://127.0.0.1:{broker.port}" and broker.port > 0
        assert any("SINGLE-HOST TRIAL" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
        await _round_trip(LOOPBACK, broker.port, broker.mqtt_protocol)
        await _assert_unreachable_off_loopback(broker.port)
        # A client still connected at shutdown (Ctrl-C during `fleet up`) must not block close().
        reader, writer = await asyncio.open_connection(LOOPBACK, broker.port)
        writer.write(connect_packet(client_id="lingering"))
        assert (await asyncio.wait_for(reader.readexactly(4), TIMEOUT))[3] == CONNACK_ACCEPTED
    finally:
        await asyncio.wait_for(broker.close(), TIMEOUT)
    await _assert_port_closed(broker.port)
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""  # the broker closed our connection
    writer.close()
    await writer.wait_closed()
    # No amqtt task left behind in the caller's loop.
    current = asyncio.current_task()
    deadline = time.monotonic() + TIMEOUT
    while leftovers := [t for t in asyncio.all_tasks() if t is not current and not t.done()]:
        assert time.monotonic() < deadline, f"tasks left after close: {leftovers}"
        await asyncio.sleep(0.01)


async def test_trial_broker_rejects_bad_prefer() -> None:
    with pytest.raises(ValueError):
        await start_trial_broker(prefer="rabbitmq")  # type: ignore[arg-type]
