"""MQTT in: one aiomqtt client on the event loop that feeds the registry and never dies from input."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine
from typing import Any

import aiomqtt

from ollama_fleet import mqtt as fmqtt
from ollama_fleet.contract.protocol import (
    CONTROLLER_NODE,
    NODE_TOPICS,
    PEER_KINDS,
    PROTO,
    PROTO_RANGE,
    RETAINED_KINDS,
    ProtocolError,
    Topics,
    check,
    decode,
    encode,
    new_session,
)
from ollama_fleet.contract.sanitize import clean_text
from ollama_fleet.settings import Config

from ollama_fleet.controller.registry.live import Registry

log = logging.getLogger("fleet.ingest")

REBIRTH_EVERY = 30.0  # seconds between rebirth requests to one agent whose session we missed
LOG_EVERY = 10.0  # seconds between log lines for the same kind of dropped message
EVENT_EVERY = 60.0  # seconds between event-log rows for the same kind of dropped message
DROPPED = "dropped."  # counters: `dropped.<reason>` per reason, beside the total `dropped`

ControllerCommand = Callable[[dict[str, Any]], Coroutine[Any, Any, None]]


class Ingest:
    def __init__(self, cfg: Config, registry: Registry) -> None:
        self.cfg = cfg
        self.registry = registry
        self.topics = Topics(cfg.topic_prefix)
        self.max_bytes = cfg.max_payload_bytes
        self.instance = new_session()
        self.counters: Counter[str] = Counter()
        self.latency: deque[float] = deque(maxlen=20000)  # heartbeat publish -> registry, seconds
        self.client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()
        self.connected_at = 0.0  # wall time the current broker connection was made (stale checks count from it)
        self.commands: dict[str, ControllerCommand] = {}  # fleet-level verbs (cmd/_controller/<verb>)
        # what other controllers say (controllers/<instance>/<kind>, PEER_KINDS): kind -> handler(instance, doc)
        self.peers: dict[str, Callable[[str, dict[str, Any]], None]] = {}
        self._pending: dict[str, dict[str, dict[str, Any]]] = {}  # snapshots seen before their node's state
        self._last_log: dict[str, float] = {}
        self._rebirth_asked: dict[str, float] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._last_event: dict[str, float] = {}
        self._handlers = {
            "state": registry.on_state, "heartbeat": registry.on_heartbeat, "info": registry.on_info,
            "gpus": registry.on_gpus, "models": registry.on_models, "running": registry.on_running,
            "events": registry.on_event,
        }
        self.job_handler: Callable[[str, str, dict[str, Any]], str | None] | None = None

    def _status(self, online: bool) -> bytes:
        return encode({"v": PROTO, "online": online, "instance": self.instance, "ts": time.time(),
                       "proto": list(PROTO_RANGE)})

    async def run(self) -> None:
        attempt = 0
        brokers = fmqtt.Brokers(self.cfg)  # mqtt_url's nodes in turn (docs/scaling.md)
        while True:
            will = aiomqtt.Will(self.topics.controller_status, self._status(False), qos=1, retain=True)
            try:
                # the broker replaces this id by the account's name (use_username_as_clientid, broker/)
                async with brokers.client(f"fleet-controller-{self.instance[:12]}", will) as client:
                    # the fast path first: retained snapshots that follow the SUBACK must not wait in
                    # aiomqtt's queue while newer messages overtake them on the fast path
                    fmqtt.direct_dispatch(client, self.handle)
                    await client.subscribe(self.topics.nodes_wildcard, qos=1)
                    await client.subscribe(self.topics.controller_cmd_wildcard, qos=1)
                    # each peer kind at its own QoS (PEER_KINDS): load documents at 0 (on a clustered broker
                    # every QoS 1 subscription is a replicated consumer that slows reconnects), registry changes
                    # at 1 (a missed delete would let the leader write the agent back)
                    for kind, (qos, _) in PEER_KINDS.items():
                        await client.subscribe(self.topics.peer("+", kind), qos=qos)
                    # announce after subscribing: agents answer with births we must not miss
                    await client.publish(self.topics.controller_status, self._status(True), qos=1, retain=True)
                    self.client, attempt = client, 0
                    brokers.connected()
                    self.connected_at = time.time()
                    self.connected.set()
                    log.info("ingest connected to %r", brokers.current)
                    async for message in client.messages:  # only raises on disconnect now
                        self.handle(str(message.topic), message.payload)
            except aiomqtt.MqttError as e:
                log.warning("broker connection lost: %s", e)
            except Exception:  # never end ingest for good: log, back off, reconnect
                log.exception("ingest loop failed; reconnecting")
            finally:
                self.client = None
                self.connected.clear()
            if brokers.failed():  # the next node at once; a backoff only once every node failed in a row
                await asyncio.sleep(fmqtt.backoff(attempt))
                attempt += 1

    async def stop(self) -> None:
        """Say goodbye on the status topic (the will only fires on an unclean loss)."""
        if self.client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await self.client.publish(self.topics.controller_status, self._status(False), qos=1, retain=True)

    # ---- message handling ------------------------------------------------------------------
    def handle(self, topic: str, payload: Any) -> None:
        self.counters["received"] += 1
        try:
            if topic.startswith(self.topics.prefix + "/cmd/"):
                self._controller_command(topic, payload)
                return
            if topic.startswith(self.topics.prefix + "/controllers/"):
                self._peer(topic, payload)
                return
            node, kind, job_id = self.topics.parse_node_topic(topic)
            if not payload:
                self.counters["cleared"] += 1  # an empty retained message: a topic being cleared
                return
            doc = check(kind, decode(payload, self.max_bytes))
            if kind == "jobs":
                ignored = self.job_handler(node, job_id or "", doc) if self.job_handler else "no_job_handler"
            else:
                ignored = self._handlers[kind](node, doc)
            if ignored:
                self._ignored(node, kind, doc, ignored)
            else:
                self.counters[kind] += 1
                if kind == "heartbeat":
                    self.latency.append(time.time() - doc["ts"])
                elif kind == "state" and node in self._pending:
                    for k, d in self._pending.pop(node).items():
                        self._handlers[k](node, d)
        except ProtocolError as e:
            self.drop(topic, e.reason, str(e))
        except Exception as e:  # a bug on one message must not stop ingest
            log.exception("ingest handler failed on %s", topic)
            self.drop(topic, "handler_error", repr(e)[:200])

    def _ignored(self, node: str, kind: str, doc: dict[str, Any], why: str) -> None:
        self.counters[f"ignored.{why}"] += 1
        if why == "unknown_agent" and kind in RETAINED_KINDS:
            self._pending.setdefault(node, {})[kind] = doc  # replayed when its state arrives
        elif kind == "heartbeat":
            self._ask_rebirth(node)

    def _ask_rebirth(self, node: str) -> None:
        """A live agent we have no birth for (missed, or the broker lost its retained state): ask again.

        Not for agents an operator deleted or forced offline: they come back only by re-announcing."""
        a = self.registry.agents.get(node)
        now = time.time()
        if (a is not None and a.forced_offline) or node in self.registry.deleted or self.client is None \
                or now - self._rebirth_asked.get(node, 0.0) < REBIRTH_EVERY:
            return
        self._rebirth_asked[node] = now
        self.counters["rebirth_requests"] += 1
        self._spawn(self.publish_command(node, "agent.rebirth", {}))

    def _controller_command(self, topic: str, payload: Any) -> None:
        node, verb = self.topics.parse_cmd_topic(topic)
        if node != CONTROLLER_NODE or verb not in self.commands:
            raise ProtocolError("unknown_verb", topic)
        doc = decode(payload, self.max_bytes)
        self.counters["controller_commands"] += 1
        self._spawn(self.commands[verb](doc))

    def _peer(self, topic: str, payload: Any) -> None:
        instance, kind = self.topics.parse_peer_topic(topic)
        if instance == self.instance or not payload:
            return  # our own message comes back to us too
        handler = self.peers.get(kind)
        if handler is None:
            raise ProtocolError("unknown_topic", topic)
        handler(instance, decode(payload, self.max_bytes))
        self.counters["peer_messages"] += 1

    async def publish_peer(self, kind: str, doc: dict[str, Any]) -> None:
        """Tell the other controllers (PEER_KINDS); MqttError when off the broker."""
        if self.client is None:
            raise aiomqtt.MqttError("not connected to the broker")
        qos, retain = PEER_KINDS[kind]
        await self.client.publish(self.topics.peer(self.instance, kind), encode({"v": PROTO, **doc}),
                                  qos=qos, retain=retain)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Work started from a message: kept referenced (not garbage-collected mid-flight) and its
        failure logged instead of lost."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background work from ingest failed", exc_info=task.exception())

    def drop(self, topic: str, reason: str, detail: str = "") -> None:
        topic, detail = clean_text(topic, 200), clean_text(detail, 300)  # both may quote the sender's bytes
        self.counters["dropped"] += 1
        self.counters[DROPPED + reason] += 1
        now = time.time()
        if now - self._last_log.get(reason, 0) >= LOG_EVERY:
            self._last_log[reason] = now
            log.warning("dropped MQTT message on %s: %s (%d so far)", topic, detail or reason,
                        self.counters[DROPPED + reason])
        if now - self._last_event.get(reason, 0) >= EVENT_EVERY:
            self._last_event[reason] = now
            self.registry.event("ingest_error", None, f"dropped message on {topic}: {detail or reason}",
                                "warning", reason=reason)

    # ---- publishing (controller -> agents) -------------------------------------------------
    async def publish_command(self, node: str, verb: str, payload: dict[str, Any]) -> None:
        if self.client is None:
            raise aiomqtt.MqttError("not connected to the broker")
        await self.client.publish(self.topics.cmd(node, verb), encode({"v": PROTO, **payload}), qos=1)

    async def clear_retained(self, node: str) -> None:
        if self.client is None:
            raise aiomqtt.MqttError("not connected to the broker")
        for kind in RETAINED_KINDS:
            await self.client.publish(self.topics.node(node, kind), b"", qos=1, retain=True)

    # ---- counters, as /metrics reads them (controller/metrics/fleet.py) -----------------------
    def messages_by_kind(self) -> dict[str, int]:
        """Messages applied, per node topic kind: every kind, 0 too (`counters` keys them by kind)."""
        return {kind: self.counters[kind] for kind in NODE_TOPICS}

    def dropped_by_reason(self) -> dict[str, int]:
        """Messages dropped, per reason (the keys `drop()` writes as `dropped.<reason>`)."""
        return {key[len(DROPPED):]: n for key, n in self.counters.items() if key.startswith(DROPPED)}

    def stats(self) -> dict[str, Any]:
        lat = sorted(self.latency)

        def pct(p: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 2) if lat else None

        return {"connected": self.connected.is_set(), "counters": dict(self.counters),
                "heartbeat_latency_ms": {"p50": pct(0.5), "p99": pct(0.99), "samples": len(lat)}}
