"""The controller app: Sanic settings, the HTTP surface, and the one set of lifecycle hooks.

The parts themselves are built and ordered in controller/compose.py; this module only wires them to Sanic.
"""

from __future__ import annotations

import logging

from sanic import Sanic
from sanic.exceptions import SanicException
from sanic_ext import Extend

from ollama_fleet import __version__
from ollama_fleet.settings import Config, ConfigError

from ollama_fleet.controller.api import agents as api_agents
from ollama_fleet.controller.api import cluster as api_cluster
from ollama_fleet.controller.api import docs as api_docs
from ollama_fleet.controller.api import models as api_models
from ollama_fleet.controller.api import ollama_models as api_ollama_models
from ollama_fleet.controller.api import queue as api_queue
from ollama_fleet.controller.api import requests as api_requests
from ollama_fleet.controller.compose import CompanionFactory, Fleet
from ollama_fleet.controller.dashboard import pages as dashboard
from ollama_fleet.controller.edge import access
from ollama_fleet.controller.edge import origin
from ollama_fleet.controller.edge import peer
from ollama_fleet.controller.edge.context import EdgeView
from ollama_fleet.controller.edge.http import App, sanic_error, unexpected_error
from ollama_fleet.controller.edge.timeouts import BODY_TIMEOUT_KEY, HEADER_TIMEOUT_KEY
from ollama_fleet.controller.metrics import fleet as metrics
from ollama_fleet.controller.proxy import routes as api_proxy
from ollama_fleet.controller.proxy import unsupported as api_unsupported

log = logging.getLogger("fleet.controller")


def check_security(cfg: Config) -> None:
    """Refuse settings that would quietly be less safe than they look; warn about open ones."""
    if cfg.viewer_token and not cfg.admin_token:
        raise ConfigError("viewer_token needs admin_token: without it the fleet has no read protection to relax")
    if cfg.viewer_token and cfg.viewer_token == cfg.admin_token:
        raise ConfigError("viewer_token must differ from admin_token")
    try:
        peer.check_config(cfg.trusted_proxies)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not cfg.admin_token and not origin.is_loopback_bind(cfg.host):
        log.warning("no admin_token: the dashboard and management API answer loopback clients only; set "
                    "admin_token to manage the fleet from %s (docs/security.md)", cfg.host)


def create_app(cfg: Config, companion: CompanionFactory | None = None, name: str = "fleet") -> App:
    """The controller; `companion` (`fleet up`'s local agent, from ollama_fleet/launcher.py) runs in its loop."""
    app = Sanic(name, configure_logging=False)
    app.config.MOTD = False
    app.config.ACCESS_LOG = False
    app.config.RESPONSE_TIMEOUT = 3600  # proxied generations and model loads are slow to first byte
    app.config.GRACEFUL_SHUTDOWN_TIMEOUT = 8.0  # open streams get this long to finish before we close
    # Non-streaming routes (management, dashboard) take small JSON; the proxy routes stream their bodies,
    # bounded by max_body_bytes (controller/edge/body.py).
    app.config.REQUEST_MAX_SIZE = 1 << 20
    # Slow clients: total deadlines for headers and body (controller/edge/timeouts.py); Sanic's own
    # REQUEST_TIMEOUT is only an idle timer over the headers.
    app.config.update({"REQUEST_TIMEOUT": cfg.header_timeout,
                       HEADER_TIMEOUT_KEY: cfg.header_timeout,
                       BODY_TIMEOUT_KEY: cfg.body_timeout})
    app.config.FALLBACK_ERROR_FORMAT = "json"
    app.config.OAS_UI_DEFAULT = "swagger"
    app.config.API_TITLE = "ollama-fleet controller"
    app.config.API_VERSION = __version__
    app.config.CORS = False  # controller/edge/origin.py answers CORS itself, from allowed_origins
    Extend(app)
    check_security(cfg)
    fleet = Fleet(cfg, companion)
    edge: EdgeView = fleet  # what the HTTP edge reads (controller/edge/context.py); mypy checks the fit
    app.ctx.fleet = edge  # handlers: compose.fleet_of(request); the edge: context.edge_of(request)
    app.on_request(origin.check)  # first: a foreign page or host name is refused before anything else
    app.on_request(access.guard)
    app.on_response(origin.decorate)  # type: ignore[no-untyped-call]  # Sanic leaves it unannotated
    app.error_handler.add(SanicException, sanic_error)
    app.error_handler.add(Exception, unexpected_error)

    app.blueprint(api_agents.bp)
    app.blueprint(api_proxy.bp)
    app.blueprint(api_requests.bp)
    app.blueprint(api_queue.bp)  # /api/queue
    app.blueprint(api_cluster.bp)  # /api/cluster
    app.blueprint(api_unsupported.bp)  # /api/blobs only
    app.blueprint(api_models.bp)  # /api/models/..., /api/tasks
    app.blueprint(api_ollama_models.bp)  # Ollama's /api/pull, /api/delete, /api/copy, /api/create, /api/push
    app.blueprint(metrics.blueprint(fleet.metrics))  # /metrics (Prometheus)
    dashboard.install(app, fleet)  # /dashboard: pages, SSE stream, login

    # The only lifecycle hooks: Fleet.start/stop/close hold the order of every part.
    @app.before_server_start
    async def _start(app: App) -> None:
        api_docs.document(app)  # request bodies and parameters of every route, for /docs
        await fleet.start()

    @app.before_server_stop
    async def _stop(app: App) -> None:
        await fleet.stop()

    @app.after_server_stop
    async def _close(app: App) -> None:
        await fleet.close()

    return app
