"""The agent: one MQTT connection per session, birth + retained snapshots, heartbeats, commands.

Each connection gets a fresh session id carried in the birth, the Last Will and every snapshot,
so the controller can ignore a will left behind by an older connection (client-id takeover).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiomqtt

from ollama_fleet import __version__
from ollama_fleet import mqtt as fmqtt
from ollama_fleet.agent import collect
from ollama_fleet.agent.gpu import Gpus
from ollama_fleet.agent.jobs import CommandHandler, JobRunner
from ollama_fleet.agent.manager import OllamaManager
from ollama_fleet.agent.ollama import OllamaClient, OllamaStatus
from ollama_fleet.agent.outbox import Outbox
from ollama_fleet.contract.jobs import JOB_VERBS
from ollama_fleet.contract.protocol import (
    NODE_ID_RE,
    ROLE_ACCOUNT_RE,
    PROTO,
    PROTO_RANGE,
    ProtocolError,
    Topics,
    encode,
    new_session,
    state_payload,
)
from ollama_fleet.settings import Config, ConfigError

log = logging.getLogger("fleet.agent")

DISCONNECT_PAUSE = 30.0  # seconds an agent stays away after a forced disconnect, unless the command says


def default_node_id(ollama_url: str, hostname: str | None = None) -> str:
    host = (hostname or socket.gethostname()).split(".")[0].lower()
    host = re.sub(r"[^a-z0-9-]+", "-", host).strip("-") or "node"
    port = urlsplit(ollama_url).port or 11434
    return f"{host[:56]}-{port}"


class Agent:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        # the shipped ACL lets MQTT user X write only fleet/v1/nodes/X/#: the username is the best default
        self.brokers = fmqtt.Brokers(cfg)  # mqtt_url's nodes in turn (docs/scaling.md)
        username = self.brokers.current.username
        self.node_id = cfg.node_id or username or default_node_id(cfg.ollama_url)
        if not NODE_ID_RE.match(self.node_id):
            raise ConfigError(f"node_id {self.node_id!r} must match {NODE_ID_RE.pattern}")
        if ROLE_ACCOUNT_RE.match(self.node_id):
            raise ConfigError(f"node_id {self.node_id!r} is a role's account (broker/fleet.acl gives it more "
                              "than a node's rights): choose another node id and MQTT user")
        if username and username != self.node_id:
            log.warning("node id %r differs from MQTT username %r: with the shipped ACL every publish "
                        "will be denied", self.node_id, username)
        self.topics = Topics(cfg.topic_prefix)
        self.interval = cfg.heartbeat_interval
        self.ollama = OllamaClient(cfg.ollama_url, cfg.ollama_timeout)
        self.gpus = Gpus()
        self.disk_path = collect.models_dir(cfg.models_dir)
        self.started = time.time()
        self.session = ""
        self.seq = 0
        self.status = OllamaStatus(up=False)
        self.client: aiomqtt.Client | None = None
        self.controller_instance: str | None = None
        self.handlers: dict[str, CommandHandler] = {
            "agent.rebirth": self._cmd_rebirth,
            "agent.disconnect": self._cmd_disconnect,
        }
        self.extra_heartbeat: dict[str, Callable[[], Any]] = {}  # other modules add fields here
        self._published: dict[str, str] = {}  # snapshot kind -> last content, to publish only on change
        self._last_models: list[dict[str, Any]] = []
        self._stop = asyncio.Event()
        self._pause = 0.0
        self.wake = asyncio.Event()  # set to send a heartbeat (and changed snapshots) now
        # the one way to the broker; the parts below see it only as a Publisher
        self.outbox = Outbox(self.topics, self.node_id, refresh=self._report_now, wake=self.wake.set)
        # detect/install/supervise Ollama (detect-only unless asked); model.pull, model.delete, job.cancel
        self.manager = OllamaManager(cfg, self.outbox, ollama_up=lambda: self.status.up, gpus=self.gpus.inventory)
        self.jobs = JobRunner(cfg, self.outbox, self.ollama.http, self.disk_path)
        self.handlers.update(self.jobs.handlers())

    @property
    def connected(self) -> asyncio.Event:
        """Set while a broker connection is up and its birth is out."""
        return self.outbox.connected

    # ---- lifecycle -------------------------------------------------------------------------
    async def run(self) -> None:
        log.info("agent %s starting (ollama %s, broker %s)", self.node_id, self.cfg.ollama_url,
                 ", ".join(map(repr, self.brokers.addresses)))
        attempt = 0
        self.outbox.start()
        self.manager.start()  # before connecting: an install must not wait for the broker
        try:
            while not self._stop.is_set():
                round_failed = True  # a clean end (a pause, a rebirth) stays with this broker
                try:
                    await self._session()
                    attempt = 0
                except aiomqtt.MqttError as e:
                    log.warning("broker connection (%r): %s", self.brokers.current, e)
                    # the next node at once; a backoff only once every node failed in a row
                    round_failed = self.brokers.failed()
                    if round_failed:
                        attempt += 1
                delay = self._pause or (fmqtt.backoff(attempt) if round_failed else 0.0)
                self._pause = 0.0
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
        finally:
            await self.jobs.stop()
            await self.manager.stop()  # terminates a child `ollama serve`: it must not outlive the agent
            await self.outbox.stop()
            await self.ollama.aclose()
            self.gpus.close()

    def stop(self) -> None:
        self._stop.set()

    async def _session(self) -> None:
        self.session = new_session()
        state_topic = self.topics.node(self.node_id, "state")
        will = aiomqtt.Will(state_topic, encode(state_payload("lost", self.session)), qos=1, retain=True)
        async with self.brokers.client(f"fleet-agent-{self.node_id}", will) as client:
            self.brokers.connected()
            self.client = client
            self.outbox.attach(client.publish, self.session)
            self._published.clear()
            self.seq = 0  # heartbeats count 1, 2, ... within each session; the birth is 0
            for topic in self.topics.agent_subscriptions(self.node_id):
                await client.subscribe(topic, qos=1)
            await self._refresh()
            await self._publish_birth()
            self.outbox.open()
            log.info("connected as %s (session %s)", self.node_id, self.session[:8])
            tasks = [asyncio.create_task(self._heartbeats()), asyncio.create_task(self._commands())]
            stop: asyncio.Task[Any] = asyncio.create_task(self._stop.wait())
            try:
                done, _ = await asyncio.wait([*tasks, stop], return_when=asyncio.FIRST_COMPLETED)
                leaving = self._stop.is_set()
                for t in tasks:
                    if t in done and t.exception() is not None:
                        if not isinstance(t.exception(), _Leave):
                            raise t.exception()  # type: ignore[misc]  # MqttError -> reconnect
                        leaving = True
                if leaving:
                    # a clean stop says so before leaving: a normal DISCONNECT suppresses the will
                    await self.outbox.send("state", state_payload("offline", self.session))
            finally:
                self.outbox.detach()
                self.client = None
                for t in [*tasks, stop]:
                    t.cancel()
                await asyncio.gather(*tasks, stop, return_exceptions=True)

    # ---- publishing ------------------------------------------------------------------------
    async def _publish_birth(self) -> None:
        await self.outbox.send("state", state_payload(
            "online", self.session, seq=0, hb_interval=self.interval, started=self.started,
            agent={"version": __version__, "proto": list(PROTO_RANGE)}))
        await self._publish_snapshots(force=True)

    def snapshots(self) -> dict[str, dict[str, Any]]:
        facts = collect.host_facts(self.disk_path)
        facts.pop("disk_free", None)  # changes constantly: it travels in heartbeats
        s = self.status
        return {
            "info": {**facts, "agent_version": __version__, **self.jobs.info(),
                     "ollama": {"url": self.cfg.ollama_url, "advertise_url": self.cfg.advertise_url or None,
                                "version": s.version, "up": s.up, "error": s.error,
                                **self.manager.info()}},
            "gpus": {"gpus": self.gpus.inventory()},
            "models": {"models": self._models()},
            "running": {"models": s.loaded},
        }

    def _models(self) -> list[dict[str, Any]]:
        # Ollama down does not uninstall models: keep announcing the last list we saw, across reconnects
        if self.status.up:
            self._last_models = self.status.models
        return self._last_models

    async def _publish_snapshots(self, force: bool = False) -> None:
        for kind, body in self.snapshots().items():
            key = json.dumps(body, sort_keys=True, default=str)
            if force or self._published.get(kind) != key:
                await self.outbox.send(kind, {"v": PROTO, "session": self.session, "ts": time.time(), **body})
                self._published[kind] = key

    async def _report_now(self) -> None:
        """Re-probe and publish changed snapshots now (a job's models before its final status); when the
        connection is down or drops meanwhile, the next heartbeat or birth carries them."""
        if not self.connected.is_set():
            return
        try:
            await self._refresh()
            await self._publish_snapshots()
        except aiomqtt.MqttError as e:
            log.debug("snapshots deferred to the next heartbeat: %s", e)
            self.wake.set()

    async def _refresh(self) -> None:
        prev_up = self.status.up
        self.status = await self.ollama.probe()
        if self.status.up != prev_up:
            log.info("ollama %s is %s", self.cfg.ollama_url, "up" if self.status.up else f"down ({self.status.error})")

    def heartbeat(self) -> dict[str, Any]:
        self.seq += 1
        disk = collect.soft(lambda: collect._disk(self.disk_path))
        hb: dict[str, Any] = {
            "v": PROTO, "session": self.session, "seq": self.seq, "ts": time.time(),
            "uptime": round(time.time() - self.started, 1),
            **collect.load_figures(),
            "disk_free": disk.free if disk else None,
            "gpus": collect.soft(self.gpus.metrics, []),
            "ollama": {"up": self.status.up, **self.manager.heartbeat()},
            "loaded": [m["name"] for m in self.status.loaded],
        }
        for key, fn in self.extra_heartbeat.items():
            hb[key] = collect.soft(fn)
        return hb

    async def _heartbeats(self) -> None:
        next_at = time.monotonic()
        while True:
            self.wake.clear()
            await self._refresh()
            await self.outbox.send("heartbeat", self.heartbeat(), properties=fmqtt.expiry(self.cfg, 3 * self.interval))
            await self._publish_snapshots()
            next_at += self.interval
            with contextlib.suppress(asyncio.TimeoutError):  # woken early by an Ollama state change
                await asyncio.wait_for(self.wake.wait(), max(0.0, next_at - time.monotonic()))
            if self.wake.is_set():
                next_at -= self.interval  # an extra beat: keep the regular schedule

    # ---- commands --------------------------------------------------------------------------
    async def _commands(self) -> None:
        assert self.client is not None
        async for message in self.client.messages:
            topic = str(message.topic)
            try:
                if topic == self.topics.controller_status:
                    await self._on_controller_status(message.payload, message.retain)
                    continue
                _, verb = self.topics.parse_cmd_topic(topic)
                if message.retain or not message.payload:
                    # commands are never retained: a stale retained one (or its clearing) must not replay
                    raise ProtocolError("retained_or_empty", "ignored")
                doc = json.loads(message.payload)
                if not isinstance(doc, dict):
                    raise ProtocolError("bad_payload", "not a JSON object")
                if doc.get("v", PROTO) != PROTO and verb not in JOB_VERBS:  # job verbs answer `rejected`
                    raise ProtocolError("unsupported_version", f"v={doc.get('v')!r}")
                handler = self.handlers.get(verb)
                if handler is None:
                    raise ProtocolError("unknown_verb", verb)
                await handler(doc)
            except (ProtocolError, ValueError) as e:
                log.warning("command on %s dropped: %s", topic, e)
            except (_Leave, aiomqtt.MqttError, asyncio.CancelledError):
                raise
            except Exception:  # a handler bug must not take the connection down
                log.exception("command on %s failed", topic)

    async def _on_controller_status(self, payload: Any, retained: bool) -> None:
        try:
            doc = json.loads(payload)
        except (ValueError, TypeError):
            return
        if isinstance(doc, dict) and doc.get("online") and doc.get("instance") != self.controller_instance:
            self.controller_instance = doc.get("instance")
            if not retained:  # a retained status predates our connection: the birth we just sent covers it
                # a (re)started controller: give it our full picture at once (HA/Sparkplug pattern)
                await self._publish_birth()

    async def _cmd_rebirth(self, doc: dict[str, Any]) -> None:
        await self._publish_birth()

    async def _cmd_disconnect(self, doc: dict[str, Any]) -> None:
        pause = doc.get("pause_s", DISCONNECT_PAUSE)
        if isinstance(pause, bool) or not isinstance(pause, (int, float)) or not 0 < pause <= 86400:
            raise ProtocolError("bad_payload", "pause_s must be a number of seconds in (0, 86400]")
        self._pause = float(pause)
        log.warning("controller asked us to disconnect for %.0f s", self._pause)
        raise _Leave()


class _Leave(Exception):
    """Ends the session cleanly (offline published), then run() waits out the pause and reconnects."""
