"""The controller's composition root: every part built and typed here, started and stopped in one
written order (not in the order web-framework listeners happened to be registered).

Handlers reach the parts through `fleet_of(request)`; nothing adds parts to a `Fleet` after it is built.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from sanic import Request

from ollama_fleet.model_tiers import Tiers, TiersError, load_tiers
from ollama_fleet.settings import Config, ConfigError

from ollama_fleet.controller import db as dbm
from ollama_fleet.controller.cluster.leader import Leadership
from ollama_fleet.controller.cluster.load import SharedLoad
from ollama_fleet.controller.cluster.sync import RegistrySync
from ollama_fleet.controller.dashboard.login import Sessions, load_sessions
from ollama_fleet.controller.dashboard.sse import Stream
from ollama_fleet.controller.edge.throttle import Throttle
from ollama_fleet.controller.hub import Hub
from ollama_fleet.controller.jobs.catalogue import Catalogue, CatalogueError, load_catalogue
from ollama_fleet.controller.jobs.distribution import Distributor
from ollama_fleet.controller.jobs.ledger import JobLedger
from ollama_fleet.controller.metrics.fleet import FleetMetrics
from ollama_fleet.controller.metrics.requests import RequestStats
from ollama_fleet.controller.proxy.forward import Proxy
from ollama_fleet.controller.proxy.tracing import build as build_tracer
from ollama_fleet.controller.registry.ingest import Ingest
from ollama_fleet.controller.registry.live import Registry
from ollama_fleet.controller.registry.store import Store, load_registry, prune, transient

if TYPE_CHECKING:
    from ollama_fleet.broker.local import TrialBroker

log = logging.getLogger("fleet.controller")

STALE_CHECK_EVERY = 0.25  # seconds; cheap (a scan of the in-memory registry)
PRUNE_EVERY = 600.0
TRIAL_PORT = 1883
GOODBYE_TIMEOUT = 2.0  # seconds for the retained "controller offline" publish at shutdown
COMPANION_STOP_TIMEOUT = 5.0  # seconds a companion gets to leave before shutdown goes on without it


class Companion(Protocol):
    """A service run in the controller's event loop: `fleet up`'s local agent. The launcher supplies it,
    so the controller never imports agent code."""

    async def run(self) -> None: ...

    def stop(self) -> None: ...


# Built only once the broker URL is known (a trial broker starts inside Fleet.start).
CompanionFactory = Callable[[Config], Companion]


class Fleet:
    """The controller's parts. Built without I/O; `start()` opens the broker and database connections."""

    def __init__(self, cfg: Config, companion: CompanionFactory | None = None) -> None:
        self.cfg = cfg
        self.catalogue, self.tiers = _model_tables(cfg)
        self.hub = Hub()
        self.registry = Registry(self.hub, cfg.stale_after, cfg.metrics_sample_interval)
        self.ingest = Ingest(cfg, self.registry)
        # one controller of several does what must happen once; only while it is on the broker
        self.leadership = Leadership(self.ingest.connected.is_set)
        self.leadership.listeners.append(self._on_leadership)
        self.peers = RegistrySync(self.registry, self.ingest, lambda: self.store)  # operators' registry changes, to every controller
        self.stats = RequestStats(self._known_model)  # the proxy's request numbers: /metrics, dashboard
        self.tracer = build_tracer(cfg)  # no-op unless otel_endpoint is set; ConfigError without the extra
        self.proxy = Proxy(cfg, self.registry, tracer=self.tracer, stats=self.stats,
                           instance=self.ingest.instance)
        # the other controllers' load: their requests count in least_busy, their slots against each agent's capacity
        self.load = SharedLoad(self.ingest, self.registry, self.proxy.admission, lambda: self.leadership.is_leader)
        self.proxy.router.others = self.load.inflight
        self.proxy.admission.sched.others = self.load.slots
        self.jobs = JobLedger(cfg, self.registry, self.ingest, self.hub)
        self.distributor = Distributor(cfg, self.registry, self.jobs, self.catalogue, self.tiers)
        self.metrics = FleetMetrics(self.registry, self.ingest, self.jobs, self.stats,
                                    self.proxy.admission)  # GET /metrics
        if cfg.metrics:  # queue outcomes and waits: request-path work, like the proxy's observations
            self.proxy.admission.observers.append(self.stats.observe_queue)
        self.sessions = Sessions()  # dashboard logins
        self.throttle = Throttle()  # failed logins and tokens, per client
        self.broker: TrialBroker | None = None  # the trial broker, when we started one
        self.companion: Companion | None = None
        self.started = time.time()
        self._companion_factory = companion
        self._companion_task: asyncio.Task[None] | None = None
        self._store: Store | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # MQTT: job statuses that arrive before the ledger starts are buffered by it
        self.ingest.job_handler = self.jobs.apply
        self.ingest.commands["distribute"] = self.distributor.on_command
        self.ingest.commands["model.distribute"] = self.distributor.on_command  # the name specs/mqtt.md first planned

    def _on_leadership(self, leading: bool) -> None:
        if leading:  # followers wrote nothing: rows the old leader left may be behind the tree
            self.registry.rewrite_all()

    def _known_model(self, name: str) -> bool:
        """A model worth its own metric label: in the catalogue or installed on some agent (RequestStats
        caches the answer; anything else is one `other` label, so clients cannot grow the label set)."""
        has = self.proxy.router.has_model
        return self.catalogue.get(name) is not None or any(has(a, name) for a in self.registry.agents.values())

    @property
    def keys_in_use(self) -> bool:
        """API keys exist: the proxy wants one on every request (read by the access policy)."""
        return self.proxy.keys.enabled

    @property
    def store(self) -> Store:
        """The database; opened by start(), before the first request is served."""
        if self._store is None:
            raise RuntimeError("the controller's store is not open yet")
        return self._store

    async def start(self) -> None:
        """Broker, database and registry, the MQTT ingest and its timers, the companion (once the registry
        is up), dashboard sessions, then the job ledger and distribution (they need the store)."""
        cfg = self.cfg
        if not cfg.mqtt_url:
            from ollama_fleet.broker.local import start_trial_broker

            # the standard port when free, so more local agents can find it
            port = TRIAL_PORT if _port_free(TRIAL_PORT) else 0
            self.broker = await start_trial_broker(port, data_dir=cfg.data_path / "broker")
            log.warning("trial broker: agents on this host can join with --mqtt-url %s", self.broker.url)
            cfg = self.cfg = cfg.replace(mqtt_url=self.broker.url, mqtt_protocol=str(self.broker.mqtt_protocol))
            self.ingest.cfg = cfg
        url = cfg.database_url or dbm.default_url(cfg.data_path)
        store = self._store = Store(url)
        await self.leadership.open(url)
        self.jobs.leading = self.leadership.is_leader
        self.jobs.leads = lambda: self.leadership.is_leader
        self.registry.load(*await store.read(load_registry))
        await self.proxy.start(store)
        log.info("registry loaded: %d agents from %s", len(self.registry.agents), url.split("://")[0])
        self._tasks = [
            asyncio.create_task(self.ingest.run(), name="fleet-ingest"),
            asyncio.create_task(self._flusher(), name="fleet-flusher"),
            asyncio.create_task(self._stale_checker(), name="fleet-stale"),
            asyncio.create_task(self._pruner(), name="fleet-prune"),
            asyncio.create_task(self.leadership.run(), name="fleet-leader"),
            asyncio.create_task(self.load.run(), name="fleet-load"),
        ]
        if self._companion_factory is not None:
            self.companion = self._companion_factory(cfg)
            self._companion_task = asyncio.create_task(self.companion.run(), name="fleet-local-agent")
        self.sessions.load(await store.read(load_sessions))
        await self.jobs.start(store)
        self.distributor.start()

    async def stop(self) -> None:
        """Before open connections drain. Persist first, say goodbye second: a slow broker must not cost
        registry rows (a supervisor that loses patience SIGKILLs us)."""
        await _steps([
            ("dashboard streams", _close_streams),  # an open stream would hold the drain to its timeout
            ("distribution", self.distributor.stop),
            ("job ledger", self.jobs.stop),  # its last flush, while the store is open
            ("local agent", self._stop_companion),
            ("registry flush", self.flush_registry),
            ("leadership", self._hand_over),
            ("mqtt goodbye", lambda: asyncio.wait_for(self.ingest.stop(), GOODBYE_TIMEOUT)),
            ("tasks", self._cancel_tasks),
            ("registry flush", self.flush_registry),
        ])

    async def close(self) -> None:
        """After open connections drained: requests that finished during the drain are logged too."""
        await _steps([
            ("proxy", self.proxy.stop),  # flushes the request log before the store closes
            ("tracing", self.tracer.shutdown),  # the last spans, exported
            ("final flush", self.flush_registry),
        ])
        self.leadership.close()  # after the last writes: the next leader reads them
        if self._store is not None:
            self._store.close()
        if self.broker is not None:
            await self.broker.close()

    async def _hand_over(self) -> None:
        """With other controllers about, let one of them lead now, not after our connections drained
        (up to GRACEFUL_SHUTDOWN_TIMEOUT): they hear the same tree and write it from here on. Alone, we
        keep writing to the last flush."""
        if self.load.peers:
            self.jobs.leading = False
            await asyncio.to_thread(self.leadership.close)

    async def _stop_companion(self) -> None:
        if self.companion is not None and self._companion_task is not None:
            self.companion.stop()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._companion_task), COMPANION_STOP_TIMEOUT)

    async def flush_registry(self) -> None:
        """Write what the registry changed; on a transient failure (database locked or away) the rows go
        back to be written next time. Bad rows never come back: the store drops them and writes the rest.
        Also a read barrier: after it, reads see every earlier write."""
        if self._store is None:
            return
        batch = self.registry.drain()
        if not self.leadership.is_leader:
            return  # every controller hears the same tree; the leader writes it (docs/scaling.md)
        try:
            await self._store.flush(batch)
        except Exception as exc:
            if transient(exc):
                self.registry.requeue(batch)
            else:  # not the database's state but the batch itself: requeued, it would fail forever
                self._store.stats.dropped += batch.size()
            raise

    async def _cancel_tasks(self) -> None:
        tasks = [*self._tasks, *([self._companion_task] if self._companion_task else [])]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _flusher(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.flush_interval)
            try:
                await self.flush_registry()
            except Exception:
                log.exception("registry flush failed; its rows are kept for the next interval")

    async def _stale_checker(self) -> None:
        while True:
            await asyncio.sleep(STALE_CHECK_EVERY)
            if not self.ingest.connected.is_set():
                continue  # off the broker we cannot hear anyone: silence says nothing about the agents
            try:
                self.registry.check_stale(heard_since=self.ingest.connected_at)
            except Exception:  # one bad listener must not end liveness checking
                log.exception("stale check failed")

    async def _pruner(self) -> None:
        while True:
            now = time.time()
            try:
                if self.leadership.is_leader:  # once for the fleet
                    await self.store.write(prune, now - self.cfg.metrics_retention_hours * 3600,
                                           now - self.cfg.event_retention_days * 86400)
            except Exception:
                log.exception("pruning failed")
            await asyncio.sleep(PRUNE_EVERY)


def fleet_of(request: Request) -> Fleet:
    """The controller's parts, for a handler."""
    fleet: Fleet = request.app.ctx.fleet
    return fleet


def _model_tables(cfg: Config) -> tuple[Catalogue, Tiers]:
    """The models catalogue and the memory tiers; a broken file is a configuration error at startup."""
    try:
        return load_catalogue(cfg.models_catalogue_file or None), load_tiers(cfg.model_tiers_file or None)
    except (CatalogueError, TiersError) as e:
        raise ConfigError(str(e)) from None


async def _close_streams() -> None:
    Stream.close_all()


async def _steps(steps: list[tuple[str, Callable[[], Awaitable[Any]]]]) -> None:
    """Run every shutdown step even if an earlier one failed."""
    for name, step in steps:
        try:
            await step()
        except Exception:
            log.exception("shutdown step %r failed", name)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False
