"""The controller: one Sanic process holding the registry, the MQTT ingest and the HTTP surface."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from typing import Any

from sanic import Sanic
from sanic_ext import Extend

from fleet import __version__
from fleet.settings import Config

from . import db as dbm
from .hub import Hub
from .ingest import Ingest
from .registry import Registry
from .store import Store, load_registry, prune

log = logging.getLogger("fleet.controller")

STALE_CHECK_EVERY = 0.25  # seconds; cheap (a scan of the in-memory registry)
PRUNE_EVERY = 600.0
TRIAL_PORT = 1883


class Fleet:
    """Everything the HTTP handlers need, in one object on `app.ctx.fleet`."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.hub = Hub()
        self.registry = Registry(self.hub, float(cfg.stale_after), float(cfg.metrics_sample_interval))
        self.ingest = Ingest(cfg, self.registry)
        self.store: Store | None = None
        self.broker: Any = None  # trial broker, when we started one
        self.local_agent: Any = None
        self.started = time.time()
        self._tasks: list[asyncio.Task[Any]] = []

    async def start(self, with_local_agent: bool = False) -> None:
        cfg = self.cfg
        if not cfg.mqtt_url:
            from broker.local import start_trial_broker

            # the standard port when free, so more local agents can find it
            port = TRIAL_PORT if _port_free(TRIAL_PORT) else 0
            self.broker = await start_trial_broker(port, data_dir=cfg.data_path / "broker")
            log.warning("trial broker: agents on this host can join with --mqtt-url %s", self.broker.url)
            cfg = self.cfg = cfg.replace(mqtt_url=self.broker.url, mqtt_protocol=str(self.broker.mqtt_protocol))
            self.ingest.cfg = cfg
        url = cfg.database_url or dbm.default_url(cfg.data_path)
        self.store = Store(url)
        self.registry.load(*await self.store.read(load_registry))
        log.info("registry loaded: %d agents from %s", len(self.registry.agents), url.split("://")[0])
        self._tasks = [
            asyncio.create_task(self.ingest.run(), name="fleet-ingest"),
            asyncio.create_task(self._flusher(), name="fleet-flusher"),
            asyncio.create_task(self._stale_checker(), name="fleet-stale"),
            asyncio.create_task(self._pruner(), name="fleet-prune"),
        ]
        if with_local_agent:
            from agent.service import Agent

            self.local_agent = Agent(cfg)
            self._tasks.append(asyncio.create_task(self.local_agent.run(), name="fleet-local-agent"))

    async def stop(self) -> None:
        if self.local_agent is not None:
            self.local_agent.stop()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._tasks[-1]), 5)
        await self.ingest.stop()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.store is not None:
            await self.store.flush(self.registry.drain())
            self.store.close()
        if self.broker is not None:
            await self.broker.close()

    async def _flusher(self) -> None:
        assert self.store is not None
        while True:
            await asyncio.sleep(float(self.cfg.flush_interval))
            try:
                await self.store.flush(self.registry.drain())
            except Exception:
                log.exception("registry flush failed; retrying next interval")

    async def _stale_checker(self) -> None:
        while True:
            await asyncio.sleep(STALE_CHECK_EVERY)
            self.registry.check_stale()

    async def _pruner(self) -> None:
        assert self.store is not None
        while True:
            now = time.time()
            try:
                await self.store.write(prune, now - float(self.cfg.metrics_retention_hours) * 3600,
                                       now - float(self.cfg.event_retention_days) * 86400)
            except Exception:
                log.exception("pruning failed")
            await asyncio.sleep(PRUNE_EVERY)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def create_app(cfg: Config, with_local_agent: bool = False, name: str = "fleet") -> Sanic:
    app = Sanic(name, configure_logging=False)
    app.config.MOTD = False
    app.config.ACCESS_LOG = False
    app.config.RESPONSE_TIMEOUT = 3600  # proxied generations and model loads are slow to first byte
    app.config.REQUEST_MAX_SIZE = 100 * 1024 * 1024
    app.config.FALLBACK_ERROR_FORMAT = "json"
    app.config.OAS_UI_DEFAULT = "swagger"
    app.config.API_TITLE = "ollama-fleet controller"
    app.config.API_VERSION = __version__
    Extend(app)
    fleet = Fleet(cfg)
    app.ctx.fleet = fleet

    from . import api_agents

    app.blueprint(api_agents.bp)

    @app.before_server_start
    async def _start(app: Sanic) -> None:
        await fleet.start(with_local_agent)

    @app.before_server_stop
    async def _stop(app: Sanic) -> None:
        await fleet.stop()

    return app
