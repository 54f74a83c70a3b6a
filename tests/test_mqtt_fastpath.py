"""Direct tests of the MQTT fast path, `ollama_fleet.mqtt.direct_dispatch` (issue 10): it hands paho's
messages straight to a handler and reads every buffered packet per socket wake-up, leaning on aiomqtt
2.x / paho internals. Exercised here without the controller process, against the real Mosquitto with the shipped
config: a burst of QoS 0 and QoS 1 messages reaches the handler exactly once and in order per topic,
with several packets drained per wake-up; a handler that raises costs only its own message; the broker
kicking the client (client-id takeover) and a broker restart on the same port surface as aiomqtt's
MqttError, and a new session dispatches again, retained messages included. The same path over TLS
(`mqtts://`, where decrypted bytes can wait inside the SSL object) is covered end to end in
tests/test_mqtt_tls.py. Packets no broker would forward (a bad remaining length, a topic longer than its
packet, a topic that is not UTF-8, a packet cut off) come from a raw broker on a loopback port (RawBroker).

Every connection has its own account: the broker binds client ids to usernames.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Self

import aiomqtt
import paho.mqtt.client as mqtt
import pytest

from ollama_fleet import mqtt as fmqtt
from ollama_fleet.settings import CONTROLLER, Config, load
from tests.mosquitto import CONNACK_ACCEPTED, MosquittoMissing, MosquittoProcess, start_mosquitto

BURST = 5000  # messages per burst test, spread over BURST_TOPICS
BURST_TOPICS = 4  # half QoS 0, half QoS 1
DEADLINE_S = 30.0  # for a whole burst to arrive, or a disconnect to surface
POLL_S = 0.02  # polling interval, bounded by a deadline
PROTOCOLS = ("5", "311")


async def until(predicate: Callable[[], bool], what: str, timeout: float = DEADLINE_S) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(POLL_S)


class Sink:
    """The handler: records messages per topic, and how many were dispatched per loop wake-up (a
    batch ends when the loop runs the callback the first message of the batch scheduled)."""

    def __init__(self, fail_on: Callable[[bytes], bool] = lambda _p: False) -> None:
        self.got: dict[str, list[bytes]] = defaultdict(list)
        self.batches = [0]
        self.raised = 0
        self._fail_on = fail_on
        self._open = False
        self._loop = asyncio.get_running_loop()

    def __call__(self, topic: str, payload: bytes) -> None:
        if not self._open:
            self._open = True
            self._loop.call_soon(self._close_batch)
        self.batches[-1] += 1
        self.got[topic].append(payload)
        if self._fail_on(payload):
            self.raised += 1
            raise ValueError(f"handler refuses {payload!r}")

    def _close_batch(self) -> None:
        self._open = False
        self.batches.append(0)


def cfg_for(mq: MosquittoProcess, user: str, proto: str = "5") -> Config:
    return load([CONTROLLER], env={"FLEET_MQTT_URL": mq.url(user), "FLEET_MQTT_PROTOCOL": proto})


@asynccontextmanager
async def session(mq: MosquittoProcess, user: str, topic: str, sink: Sink,
                  proto: str = "5") -> AsyncIterator[tuple[aiomqtt.Client, asyncio.Task[None]]]:
    """A subscriber like controller/registry/ingest.py: the fast path delivers, `client.messages` only watches
    the connection (the task ends with MqttError when the session ends). The fast path goes in before
    the subscription: retained messages can come in the same read as the SUBACK."""
    async with _fast_session(cfg_for(mq, user, proto), user, topic, sink) as pair:
        yield pair


@asynccontextmanager
async def _fast_session(cfg: Any, identifier: str, topic: str,
                        sink: Sink) -> AsyncIterator[tuple[aiomqtt.Client, asyncio.Task[None]]]:
    async with aiomqtt.Client(**fmqtt.client_kwargs(cfg, identifier)) as client:
        fmqtt.direct_dispatch(client, sink)
        await client.subscribe(topic, qos=1)
        watcher = asyncio.create_task(watch(client))
        try:
            yield client, watcher
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)


async def watch(client: aiomqtt.Client) -> None:
    async for message in client.messages:
        raise AssertionError(f"message bypassed the fast path: {message.topic}")


class Publisher:
    """A paho client on its own thread, so a burst is published while the subscriber's loop is busy."""

    def __init__(self, mq: MosquittoProcess, user: str) -> None:
        connected = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=user, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(user, mq.passwords[user])
        self.client.on_connect = lambda _c, _u, _f, rc, _p: connected.set() if rc == 0 else None
        self.client.connect(mq.host, mq.port)
        self.client.loop_start()
        assert connected.wait(DEADLINE_S), f"publisher {user} connected"

    def publish_all(self, messages: list[tuple[str, bytes, int]], retain: bool = False) -> None:
        """Publish in order; return when the broker has taken all of them (a broker handles one
        connection's packets in order, so the last QoS 1 PUBACK covers everything before it)."""
        infos = [self.client.publish(t, p, qos=q, retain=retain) for t, p, q in messages]
        last = self.client.publish(f"{messages[-1][0]}/end", b"end", qos=1)
        last.wait_for_publish(DEADLINE_S)
        assert last.is_published() and all(i.rc == mqtt.MQTT_ERR_SUCCESS for i in infos)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def publisher(mosquitto: MosquittoProcess) -> Iterator[Publisher]:
    pub = Publisher(mosquitto, mosquitto.add_account("controller"))
    try:
        yield pub
    finally:
        pub.close()


def burst(base: str, n: int = BURST) -> list[tuple[str, bytes, int]]:
    """n messages interleaved over BURST_TOPICS topics, payloads numbered per topic."""
    out = []
    for i in range(n):
        t = i % BURST_TOPICS
        out.append((f"{base}/t{t}", f"{t}:{i // BURST_TOPICS}".encode(), t % 2))
    return out


def per_topic(messages: list[tuple[str, bytes, int]]) -> dict[str, list[bytes]]:
    want: dict[str, list[bytes]] = defaultdict(list)
    for t, p, _q in messages:
        want[t].append(p)
    return dict(want)


@pytest.mark.parametrize("proto", PROTOCOLS)
async def test_a_burst_reaches_the_handler_exactly_once_in_order(
    mosquitto: MosquittoProcess, publisher: Publisher, proto: str
) -> None:
    base = f"fleet/v1/fastpath/{uuid.uuid4().hex[:8]}"
    sent = burst(base)
    sink = Sink()
    async with session(mosquitto, mosquitto.add_account("controller"), f"{base}/#", sink, proto) as (_c, watcher):
        # Publish while this loop is blocked on purpose: the burst piles up in the subscriber's socket,
        # so wake-ups find many packets in one read (what READ_BATCH is for).
        publisher.publish_all(sent)
        await until(lambda: f"{base}/t{BURST_TOPICS - 1}/end" in sink.got, "the burst and its end marker")
        assert not watcher.done()
    assert {t: ps for t, ps in sink.got.items() if not t.endswith("/end")} == per_topic(sent)
    assert sum(len(ps) for ps in sink.got.values()) == BURST + 1
    sizes = [b for b in sink.batches if b]
    assert max(sizes) > 1, "each wake-up dispatched a single packet: the buffered ones waited"
    assert max(sizes) <= fmqtt.READ_BATCH


async def test_a_handler_that_raises_does_not_stop_dispatch(
    mosquitto: MosquittoProcess, publisher: Publisher, caplog: pytest.LogCaptureFixture
) -> None:
    base = f"fleet/v1/fastpath/{uuid.uuid4().hex[:8]}"
    sent = burst(base, 400)
    sink = Sink(fail_on=lambda p: p.endswith(b"7"))  # ~1 in 10 of each topic, QoS 0 and 1
    async with session(mosquitto, mosquitto.add_account("controller"), f"{base}/#", sink) as (_c, watcher):
        publisher.publish_all(sent)
        await until(lambda: f"{base}/t{BURST_TOPICS - 1}/end" in sink.got, "the messages after the failures")
        assert not watcher.done(), "the handler's exception ended the session"
        # the session still works: a later message is dispatched once
        publisher.publish_all([(f"{base}/later", b"later", 1)])
        await until(lambda: f"{base}/later/end" in sink.got, "a message after the failures")
    assert sink.raised == sum(1 for _t, p, _q in sent if p.endswith(b"7")) > 0
    logged = [r for r in caplog.records if r.name == "fleet.mqtt" and "handler failed" in r.message]
    assert len(logged) == sink.raised  # each failure logged once, none re-dispatched
    assert {t: ps for t, ps in sink.got.items() if not t.endswith("/end")} == {
        **per_topic(sent), f"{base}/later": [b"later"]}


@pytest.mark.parametrize("proto", PROTOCOLS)
async def test_a_kicked_client_gets_mqtt_error_and_a_new_session_dispatches(
    mosquitto: MosquittoProcess, publisher: Publisher, proto: str
) -> None:
    base = f"fleet/v1/fastpath/{uuid.uuid4().hex[:8]}"
    user = mosquitto.add_account("controller")
    first, second = Sink(), Sink()
    async with session(mosquitto, user, f"{base}/#", first, proto) as (_c, watcher):
        publisher.publish_all([(f"{base}/a", b"before", 1)])
        await until(lambda: f"{base}/a/end" in first.got, "a message before the kick")
        # a second connection of the same account takes the client id over: the broker drops us
        assert await asyncio.to_thread(mosquitto.connect_rc, user) == CONNACK_ACCEPTED
        with pytest.raises(aiomqtt.MqttError):
            await asyncio.wait_for(watcher, DEADLINE_S)
    async with session(mosquitto, user, f"{base}/#", second, proto) as (_c, watcher):
        publisher.publish_all([(f"{base}/a", b"after", 1)])
        await until(lambda: f"{base}/a/end" in second.got, "a message after reconnecting")
        assert not watcher.done()
    assert first.got[f"{base}/a"] == [b"before"]  # the dropped session dispatched nothing more
    assert second.got[f"{base}/a"] == [b"after"]


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[list[MosquittoProcess]]:
    """A broker this test may stop and start again; the list holds the current process."""
    try:
        brokers = [start_mosquitto(tmp_path / "mosquitto")]
    except MosquittoMissing as e:
        pytest.skip(str(e))
    try:
        yield brokers
    finally:
        brokers[-1].stop()


async def test_broker_restart_on_the_same_port_redelivers_retained(own_broker: list[MosquittoProcess]) -> None:
    """The restarted broker rewrites the ACL from the shipped file, so only its built-in accounts:
    "operator" publishes commands (retained here), "controller" reads them."""
    mq = own_broker[0]
    base = f"fleet/v1/cmd/fastpath-{uuid.uuid4().hex[:8]}"
    retained = [(f"{base}/r{i}", f"r{i}".encode(), 1) for i in range(50)]
    pub = Publisher(mq, "operator")
    try:
        pub.publish_all(retained, retain=True)
    finally:
        pub.close()
    want = per_topic(retained)
    before, after = Sink(), Sink()
    async with session(mq, "controller", f"{base}/#", before) as (_c, watcher):
        await until(lambda: all(t in before.got for t in want), "retained messages on subscribe")
        await asyncio.to_thread(mq.stop)  # SIGTERM: mosquitto saves its retained messages and exits
        with pytest.raises(aiomqtt.MqttError):
            await asyncio.wait_for(watcher, DEADLINE_S)
    assert dict(before.got) == want
    with pytest.raises(aiomqtt.MqttError):  # while it is down, a connect fails the documented way
        async with aiomqtt.Client(**fmqtt.client_kwargs(cfg_for(mq, "controller"), "controller")):
            pass
    mq = await asyncio.to_thread(start_mosquitto, mq.tmp_dir, dict(mq.passwords), False, mq.port)
    own_broker.append(mq)
    async with session(mq, "controller", f"{base}/#", after) as (_c, watcher):
        await until(lambda: all(t in after.got for t in want), "retained messages after the restart")
        pub = Publisher(mq, "operator")
        try:
            pub.publish_all([(f"{base}/fresh", b"fresh", 0)])
        finally:
            pub.close()
        await until(lambda: f"{base}/fresh/end" in after.got, "a fresh message after the restart")
        assert not watcher.done()
    assert dict(after.got) == {**want, f"{base}/fresh": [b"fresh"], f"{base}/fresh/end": [b"end"]}


# ---- malformed packets, from a raw broker -------------------------------------------------------------

HANG_UP_S = 5.0  # for the client to close a connection that sent it a packet it cannot read (keepalive: 60 s)
RAW_TOPIC = "fleet/v1/raw/#"
SAME, GOOD = "fleet/v1/raw/same", "fleet/v1/raw/good"


def varint(n: int) -> bytes:
    """MQTT's variable byte integer (a packet's remaining length)."""
    out = bytearray()
    while True:
        n, byte = n >> 7, n & 0x7F
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish(topic: bytes, payload: bytes, v5: bool) -> bytes:
    """A well-formed QoS 0 PUBLISH (MQTT 5: an empty property list after the topic)."""
    body = len(topic).to_bytes(2, "big") + topic + (b"\x00" if v5 else b"") + payload
    return b"\x30" + varint(len(body)) + body


# name -> (the bytes, given MQTT 5 or not; what the client does: "drop" the message or "disconnect")
MALFORMED: dict[str, tuple[Callable[[bool], bytes], str]] = {
    # five bytes of remaining length (four at most): paho says protocol error
    "remaining length in five bytes": (lambda v5: b"\x30\xff\xff\xff\xff\x7f", "disconnect"),
    # a remaining length of 2 where the PUBLISH is longer: its topic length points past the packet, and
    # the rest would be read as the next packet
    "remaining length too short": (lambda v5: b"\x30\x02" + publish(b"fleet/v1/raw/x", b"p", v5)[2:],
                                   "disconnect"),
    "topic length beyond the packet": (
        lambda v5: b"\x30" + varint(len(t := b"\x03\xe8fleet/v1/raw/x" + (b"\x00" if v5 else b"") + b"p")) + t,
        "disconnect"),
    "topic not UTF-8": (lambda v5: publish(b"fleet/v1/raw/\xff\xfe", b"p", v5), "drop"),
    # the first bytes of a PUBLISH, then the broker hangs up
    "packet cut off": (lambda v5: publish(b"fleet/v1/raw/x", b"p" * 100, v5)[:20], "disconnect"),
}


class RawBroker:
    """Just enough of an MQTT 3.1.1 and 5 broker on a loopback port to send a client what no real broker
    would: CONNACK, SUBACK, PINGRESP; right after each SUBACK, the next of `scripts` (given MQTT 5 or not:
    the bytes to send and whether to hang up after them). Counts the connections that ended."""

    def __init__(self, scripts: list[Callable[[bool], tuple[bytes, bool]]]) -> None:
        self.scripts = scripts
        self.ended = 0
        self.port = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Self:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        v5 = False
        try:
            while True:
                first = (await reader.readexactly(1))[0]
                length, shift = 0, 0
                while True:
                    byte = (await reader.readexactly(1))[0]
                    length |= (byte & 0x7F) << shift
                    shift += 7
                    if not byte & 0x80:
                        break
                body = await reader.readexactly(length)
                kind = first >> 4
                if kind == 1:  # CONNECT: the protocol name, then its level (5, or 4 for 3.1.1)
                    v5 = body[6] == 5
                    writer.write(b"\x20\x03\x00\x00\x00" if v5 else b"\x20\x02\x00\x00")
                elif kind == 8:  # SUBSCRIBE: its one topic granted at QoS 1, then the script
                    pid = body[:2]
                    writer.write(b"\x90\x04" + pid + b"\x00\x01" if v5 else b"\x90\x03" + pid + b"\x01")
                    data, hang_up = self.scripts.pop(0)(v5)
                    writer.write(data)
                    if hang_up:
                        await writer.drain()
                        return
                elif kind == 12:  # PINGREQ
                    writer.write(b"\xd0\x00")
                elif kind == 14:  # DISCONNECT
                    return
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client hung up
        finally:
            self.ended += 1
            writer.close()


@asynccontextmanager
async def raw_session(broker: RawBroker, proto: str,
                      sink: Sink) -> AsyncIterator[tuple[aiomqtt.Client, asyncio.Task[None]]]:
    """session() against the raw broker."""
    cfg = load([CONTROLLER], env={"FLEET_MQTT_URL": f"mqtt://raw:pw@127.0.0.1:{broker.port}",
                                  "FLEET_MQTT_PROTOCOL": proto, "FLEET_MQTT_KEEPALIVE": "60"})
    async with _fast_session(cfg, "raw-client", RAW_TOPIC, sink) as pair:
        yield pair


@pytest.mark.parametrize("proto", PROTOCOLS)
@pytest.mark.parametrize("case", MALFORMED)
async def test_a_malformed_packet_is_dropped_or_ends_the_session_and_the_next_one_delivers(
    case: str, proto: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A packet the client cannot read either costs only its message (the session goes on: the message
    after it arrives) or ends the session: MqttError for the connect loop, and the client closes the
    connection at once (no keepalive wait, no reader left behind on a half-read packet). Nothing of the bad
    packet reaches the handler; the next session delivers."""
    bad, outcome = MALFORMED[case]
    hang_up = case == "packet cut off"
    scripts: list[Callable[[bool], tuple[bytes, bool]]] = [
        lambda v5: (bad(v5) + (b"" if hang_up else publish(SAME.encode(), b"same", v5)), hang_up),
        lambda v5: (publish(GOOD.encode(), b"good", v5), False),
    ]
    caplog.set_level(logging.WARNING, "fleet.mqtt")
    first, second = Sink(), Sink()
    async with RawBroker(scripts) as broker:
        async with raw_session(broker, proto, first) as (_c, watcher):
            if outcome == "drop":
                await until(lambda: SAME in first.got, "the message after the bad one")
                assert not watcher.done()
                assert any("message dropped" in r.message for r in caplog.records if r.name == "fleet.mqtt")
            else:
                with pytest.raises(aiomqtt.MqttError):
                    await asyncio.wait_for(watcher, DEADLINE_S)
                await until(lambda: broker.ended == 1, "the client to close the connection", HANG_UP_S)
        assert dict(first.got) == ({SAME: [b"same"]} if outcome == "drop" else {})
        async with raw_session(broker, proto, second) as (_c, watcher):
            await until(lambda: GOOD in second.got, "a message in the next session")
            assert not watcher.done()
        assert dict(second.got) == {GOOD: [b"good"]}
