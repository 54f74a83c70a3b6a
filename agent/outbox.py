"""The agent's one way to the broker: direct sends for its session, and one queue for everything else.

The job runner and the Ollama manager work whether or not the broker is reachable; what they have to say
(events, job status) waits here until the agent is connected and its birth is out, then goes out in the
order it was posted. Job status documents are retained, so only the latest per topic matters: a newer
one replaces a queued one in place, and a reconnect never replays a superseded document. A job still
running is announced again on every new connection (the controller learns it is alive on this session).

The parts see only `Publisher`; the agent (service.py) owns the Outbox and attaches each connection.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import aiomqtt
from paho.mqtt.properties import Properties

from ollama_fleet.contract.protocol import NODE_TOPICS, Topics, encode

log = logging.getLogger("fleet.agent.outbox")

# module level so tests can shrink them
EVENTS_KEPT = 200  # events kept while the broker is unreachable (oldest dropped first)
FLUSH_RETRY = 0.5  # seconds before re-trying a publish that failed mid-reconnect

Doc = dict[str, Any]
# A document rendered when it goes out, for the broker session it goes out on; None: nothing to say any more
Render = Callable[[str], Doc | None]
# aiomqtt.Client.publish, or a test's stand-in: (topic, payload, qos, retain, properties)
Transport = Callable[[str, bytes, int, bool, Properties | None], Awaitable[None]]


class Publisher(Protocol):
    """What the agent's parts (job runner, Ollama manager) may ask of the broker side; none of it blocks
    on the broker."""

    def event(self, doc: Doc) -> None:
        """Queue an event (`events`); the session is added when it goes out."""

    def job_status(self, job_id: str, doc: Doc | Render, *, live: bool = False) -> None:
        """Queue the job's status (`jobs/<job_id>`, retained): a static document (the session is added when it
        goes out) or a render called then. `live`: announce it again on every new connection until a later
        status of the job says otherwise."""

    async def refresh(self) -> None:
        """Re-probe Ollama and publish changed snapshots now, when connected (a job's models before its final
        status); otherwise the next connection's birth carries them."""

    def wake(self) -> None:
        """The agent's state changed: send a heartbeat and the changed snapshots now, not at the next tick."""


class NotConnected(aiomqtt.MqttError):
    """A send while no broker connection is attached."""


@dataclass(frozen=True)
class Message:
    kind: str
    topic: str
    payload: Doc | Render


class Outbox:
    """Implements `Publisher` for the agent's parts; the agent attaches and detaches each connection."""

    def __init__(self, topics: Topics, node_id: str, refresh: Callable[[], Awaitable[None]],
                 wake: Callable[[], None], events_kept: int = EVENTS_KEPT) -> None:
        self.topics, self.node_id = topics, node_id
        self._refresh, self._wake = refresh, wake
        self.events_kept = events_kept
        # waiting messages in order; retained ones keyed by topic (coalesced), events by a counter
        self._queue: collections.OrderedDict[str | int, Message] = collections.OrderedDict()
        self._live: dict[str, Message] = {}  # topic -> latest status of a running job, re-announced per session
        self._counter = 0
        self._queued = asyncio.Event()
        self.connected = asyncio.Event()  # attached and the birth is out: the queue may flow
        self._transport: Transport | None = None
        self._session = ""
        self._task: asyncio.Task[None] | None = None

    # ---- Publisher ---------------------------------------------------------------------------
    def event(self, doc: Doc) -> None:
        self._counter += 1
        if len(self._queue) >= self.events_kept:
            events = [k for k in self._queue if isinstance(k, int)]
            if len(events) >= self.events_kept:
                del self._queue[events[0]]  # the oldest event gives way
        self._queue[self._counter] = Message("events", self.topics.node(self.node_id, "events"), doc)
        self._queued.set()

    def job_status(self, job_id: str, doc: Doc | Render, *, live: bool = False) -> None:
        topic = self.topics.job(self.node_id, job_id)
        message = Message("jobs", topic, doc)
        self._queue[topic] = message  # replaces a queued one in its place
        if live:
            self._live[topic] = message
        else:
            self._live.pop(topic, None)
        self._queued.set()

    async def refresh(self) -> None:
        await self._refresh()

    def wake(self) -> None:
        self._wake()

    # ---- the agent's side --------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._flush(), name="agent-outbox")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def attach(self, transport: Transport, session: str) -> None:
        """A new broker connection: direct sends work; the queue waits for `open` (after the birth)."""
        self._transport, self._session = transport, session
        self.connected.clear()

    def open(self) -> None:
        """The birth is out: running jobs are announced again on this session, then the queue flows."""
        for topic, message in self._live.items():
            self._queue.setdefault(topic, message)
        self.connected.set()
        self._queued.set()

    def detach(self) -> None:
        self.connected.clear()
        self._transport = None

    async def send(self, kind: str, payload: Doc, topic: str | None = None,
                   properties: Properties | None = None) -> None:
        """Publish now on the attached connection; NotConnected (an MqttError) when there is none."""
        transport = self._transport
        if transport is None:
            raise NotConnected("no broker connection")
        qos, retain = NODE_TOPICS[kind]
        await transport(topic or self.topics.node(self.node_id, kind), encode(payload), qos, retain, properties)

    def pending(self) -> list[Message]:
        """The messages waiting for the broker, in the order they will go out (diagnostics, tests)."""
        return list(self._queue.values())

    async def _flush(self) -> None:
        while True:
            await self._queued.wait()
            await self.connected.wait()
            self._queued.clear()
            while self._queue and self.connected.is_set():
                key, message = next(iter(self._queue.items()))
                del self._queue[key]  # before the await: a newer status meanwhile queues again, behind
                try:
                    await self._send_queued(message)
                except asyncio.CancelledError:
                    raise
                except aiomqtt.MqttError as e:  # the connection ended under us: the next one sends it
                    log.debug("%s deferred: %s", message.kind, e)
                    if key not in self._queue:
                        self._queue[key] = message
                        self._queue.move_to_end(key, last=False)  # first again: order is kept
                    self._queued.set()
                    await asyncio.sleep(FLUSH_RETRY)
                    break
                except Exception:  # a document that cannot be sent would block every later one
                    log.exception("%s on %s dropped", message.kind, message.topic)

    async def _send_queued(self, message: Message) -> None:
        session = self._session
        payload = message.payload
        doc = payload(session) if callable(payload) else {**payload, "session": session}
        if doc is not None:
            await self.send(message.kind, doc, message.topic)
