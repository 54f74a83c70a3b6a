"""Direct tests of the MQTT fast path, `ollama_fleet.mqtt.direct_dispatch` (issue 10): it hands paho's
messages straight to a handler and reads every buffered packet per socket wake-up, leaning on aiomqtt
2.x / paho internals. Exercised here without the controller process, against the real Mosquitto with the shipped
config: a burst of QoS 0 and QoS 1 messages reaches the handler exactly once and in order per topic,
with several packets drained per wake-up; a handler that raises costs only its own message; the broker
kicking the client (client-id takeover) and a broker restart on the same port surface as aiomqtt's
MqttError, and a new session dispatches again, retained messages included. The same path over TLS
(`mqtts://`, where decrypted bytes can wait inside the SSL object) is covered end to end in
tests/test_mqtt_tls.py.

Every connection has its own account: the broker binds client ids to usernames.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

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
    async with aiomqtt.Client(**fmqtt.client_kwargs(cfg_for(mq, user, proto), user)) as client:
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
