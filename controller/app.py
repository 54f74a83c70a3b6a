"""The controller: one Sanic process holding the registry, the MQTT ingest and the HTTP surface."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sanic import Sanic
from sanic.exceptions import SanicException
from sanic_ext import Extend

from ollama_fleet import __version__
from ollama_fleet.settings import Config, ConfigError

from ollama_fleet.controller.edge import access
from ollama_fleet.controller.edge import origin
from ollama_fleet.controller.edge import peer
from ollama_fleet.controller import db as dbm
from ollama_fleet.controller.dashboard.login import Sessions, load_sessions
from ollama_fleet.controller.edge.http import sanic_error, unexpected_error
from ollama_fleet.controller.hub import Hub
from ollama_fleet.controller.registry.ingest import Ingest
from ollama_fleet.controller.proxy.forward import Proxy
from ollama_fleet.controller.registry.live import Registry
from ollama_fleet.controller.registry.store import Store, load_registry, prune, transient
from ollama_fleet.controller.edge.throttle import Throttle

log = logging.getLogger("fleet.controller")

STALE_CHECK_EVERY = 0.25  # seconds; cheap (a scan of the in-memory registry)
PRUNE_EVERY = 600.0
TRIAL_PORT = 1883
GOODBYE_TIMEOUT = 2.0  # seconds for the retained "controller offline" publish at shutdown


class Fleet:
    """Everything the HTTP handlers need, in one object on `app.ctx.fleet`."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.hub = Hub()
        self.registry = Registry(self.hub, float(cfg.stale_after), float(cfg.metrics_sample_interval))
        self.ingest = Ingest(cfg, self.registry)
        self.store: Store | None = None
        self.proxy = Proxy(cfg, self.registry)
        self.broker: Any = None  # trial broker, when we started one
        self.local_agent: Any = None
        self.started = time.time()
        self._tasks: list[asyncio.Task[Any]] = []

    async def start(self, with_local_agent: bool = False) -> None:
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
        self.store = Store(url)
        self.registry.load(*await self.store.read(load_registry))
        await self.proxy.start(self.store)
        log.info("registry loaded: %d agents from %s", len(self.registry.agents), url.split("://")[0])
        self._tasks = [
            asyncio.create_task(self.ingest.run(), name="fleet-ingest"),
            asyncio.create_task(self._flusher(), name="fleet-flusher"),
            asyncio.create_task(self._stale_checker(), name="fleet-stale"),
            asyncio.create_task(self._pruner(), name="fleet-prune"),
        ]
        if with_local_agent:
            from ollama_fleet.agent.service import Agent

            self.local_agent = Agent(cfg)
            self._tasks.append(asyncio.create_task(self.local_agent.run(), name="fleet-local-agent"))

    async def stop(self) -> None:
        """Before Sanic drains open connections. Persist first, say goodbye second: a slow broker must
        not cost registry rows (a supervisor that loses patience SIGKILLs us)."""
        await _steps([
            ("local agent", self._stop_local_agent),
            ("registry flush", self.flush_registry),
            ("mqtt goodbye", lambda: asyncio.wait_for(self.ingest.stop(), GOODBYE_TIMEOUT)),
            ("tasks", self._cancel_tasks),
            ("registry flush", self.flush_registry),
        ])

    async def close(self) -> None:
        """After Sanic drained connections: requests that finished during the drain are logged too."""
        await _steps([
            ("proxy", self.proxy.stop),  # flushes the request log before the store closes
            ("final flush", self.flush_registry),
        ])
        if self.store is not None:
            self.store.close()
        if self.broker is not None:
            await self.broker.close()

    async def _stop_local_agent(self) -> None:
        if self.local_agent is not None:
            self.local_agent.stop()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._tasks[-1]), 5)

    async def flush_registry(self) -> None:
        """Write what the registry changed; on a transient failure (database locked or away) the rows go
        back to be written next time. Bad rows never come back: the store drops them and writes the rest.
        Also a read barrier: after it, reads see every earlier write."""
        if self.store is None:
            return
        batch = self.registry.drain()
        try:
            await self.store.flush(batch)
        except Exception as exc:
            if transient(exc):
                self.registry.requeue(batch)
            else:  # not the database's state but the batch itself: requeued, it would fail forever
                self.store.stats.dropped += batch.size()
            raise

    async def _cancel_tasks(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _flusher(self) -> None:
        assert self.store is not None
        while True:
            await asyncio.sleep(float(self.cfg.flush_interval))
            try:
                await self.flush_registry()
            except Exception:
                log.exception("registry flush failed; its rows are kept for the next interval")

    async def _stale_checker(self) -> None:
        while True:
            await asyncio.sleep(STALE_CHECK_EVERY)
            try:
                self.registry.check_stale()
            except Exception:  # one bad listener must not end liveness checking
                log.exception("stale check failed")

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


def check_security(cfg: Config) -> None:
    """Refuse settings that would quietly be less safe than they look; warn about open ones."""
    if cfg.viewer_token and not cfg.admin_token:
        raise ConfigError("viewer_token needs admin_token: without it the fleet has no read protection to relax")
    if cfg.viewer_token and cfg.viewer_token == cfg.admin_token:
        raise ConfigError("viewer_token must differ from admin_token")
    try:
        peer.check_config(cfg.trusted_proxies or ())
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not cfg.admin_token and not origin.is_loopback_bind(str(cfg.host)):
        log.warning("no admin_token: the dashboard and management API answer loopback clients only; set "
                    "admin_token to manage the fleet from %s (docs/security.md)", cfg.host)


def create_app(cfg: Config, with_local_agent: bool = False, name: str = "fleet") -> Sanic:
    app = Sanic(name, configure_logging=False)
    app.config.MOTD = False
    app.config.ACCESS_LOG = False
    app.config.RESPONSE_TIMEOUT = 3600  # proxied generations and model loads are slow to first byte
    app.config.GRACEFUL_SHUTDOWN_TIMEOUT = 8.0  # open streams get this long to finish before we close
    # Non-streaming routes (management, dashboard) take small JSON; the proxy routes stream their bodies,
    # bounded by max_body_bytes (controller/body.py).
    app.config.REQUEST_MAX_SIZE = 1 << 20
    # Slow clients: total deadlines for headers and body (controller/timeouts.py); Sanic's own
    # REQUEST_TIMEOUT is only an idle timer over the headers.
    app.config.update({"REQUEST_TIMEOUT": float(cfg.header_timeout),
                       "FLEET_HEADER_TIMEOUT": float(cfg.header_timeout),
                       "FLEET_BODY_TIMEOUT": float(cfg.body_timeout)})
    app.config.FALLBACK_ERROR_FORMAT = "json"
    app.config.OAS_UI_DEFAULT = "swagger"
    app.config.API_TITLE = "ollama-fleet controller"
    app.config.API_VERSION = __version__
    app.config.CORS = False  # controller/origin.py answers CORS itself, from allowed_origins
    Extend(app)
    check_security(cfg)
    fleet = Fleet(cfg)
    app.ctx.fleet = fleet
    app.ctx.throttle = Throttle()
    app.ctx.sessions = Sessions()
    app.on_request(origin.check)  # first: a foreign page or host name is refused before anything else
    app.on_request(access.guard)
    app.on_response(origin.decorate)
    app.error_handler.add(SanicException, sanic_error)
    app.error_handler.add(Exception, unexpected_error)

    from ollama_fleet.controller.api import agents as api_agents
    from ollama_fleet.controller.proxy import routes as api_proxy
    from ollama_fleet.controller.api import requests as api_requests
    from ollama_fleet.controller.proxy import unsupported as api_unsupported

    app.blueprint(api_agents.bp)
    app.blueprint(api_proxy.bp)
    app.blueprint(api_requests.bp)
    app.blueprint(api_unsupported.bp)  # /api/blobs only

    @app.before_server_start
    async def _start(app: Sanic) -> None:
        await fleet.start(with_local_agent)
        assert fleet.store is not None
        app.ctx.sessions.load(await fleet.store.read(load_sessions))

    @app.before_server_stop
    async def _stop(app: Sanic) -> None:
        await fleet.stop()

    @app.after_server_stop
    async def _close(app: Sanic) -> None:
        await fleet.close()

    from ollama_fleet.controller.jobs import distribution

    distribution.install(app)  # jobs, distribution, /api/models, /api/tasks, Ollama /api/pull etc.; after _start
    from ollama_fleet.controller.dashboard import pages as dashboard

    dashboard.install(app)  # /dashboard: pages, SSE stream, login; its stop hook ends open streams first
    return app
