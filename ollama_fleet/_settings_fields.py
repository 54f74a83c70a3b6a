"""GENERATED from SETTINGS in ollama_fleet/settings.py by `uv run python -m tests.update_readme`: do not edit.

Static, typed fields so that mypy knows every setting's type; settings.Config adds loading and sources.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True, kw_only=True)
class SettingsFields:
    """One field per setting, in table order, with its type and default."""

    # Broker URL `mqtt://[user:pass@]host[:port]` (`mqtts://` for TLS), or a comma-separated list of the
    # nodes of one clustered broker: the first is tried first, a failure or a lost connection moves on
    # to the next, a backoff follows only a whole round of failures (docs/scaling.md). Empty on the
    # controller: start a loopback trial broker.
    mqtt_url: str = field(default="", repr=False)
    # MQTT username (overrides the URL's; an agent's username is its node id).
    mqtt_username: str = ""
    # MQTT password (overrides the URL's).
    mqtt_password: str = field(default="", repr=False)
    # MQTT protocol version: `5` or `311`.
    mqtt_protocol: Literal["5", "311"] = "5"
    # MQTT keepalive in seconds; a half-open connection is declared dead after 1.5x this.
    mqtt_keepalive: int = 15
    # PEM file of the CA(s) that signed the broker's certificate, for `mqtts://` (empty: the system's
    # trusted CAs). The broker's host name is always verified.
    mqtt_ca_file: str = ""
    # Root of the topic tree.
    topic_prefix: str = "fleet/v1"
    # Log level.
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # Log format: `text` or `json` (one object per line).
    log_format: Literal["text", "json"] = "text"
    # Directory for the SQLite database and trial-broker data (default: `$XDG_DATA_HOME/ollama-fleet`).
    data_dir: str = ""
    # Address the controller's HTTP server binds (`0.0.0.0` for the LAN).
    host: str = "127.0.0.1"
    # Port of the controller's HTTP server (Ollama API, OpenAI API, dashboard).
    port: int = 8434
    # Controller processes on this host sharing `port` (docs/scaling.md). Worker 1 uses the MQTT account
    # `mqtt_username`, worker N the account `<mqtt_username>-N` (same password); they need a broker
    # (`mqtt_url`).
    workers: int = 1
    # Peewee database URL, e.g. `sqlite:///fleet.db` or `postgresql://user@host/db` (default: SQLite in
    # data_dir).
    database_url: str = field(default="", repr=False)
    # Heartbeat intervals without a heartbeat before an agent is `stale`.
    stale_after: float = 3.0
    # Seconds between batched registry writes.
    flush_interval: float = 1.0
    # Seconds between stored metric samples per agent.
    metrics_sample_interval: float = 30.0
    # Hours of metric history kept.
    metrics_retention_hours: float = 24.0
    # Days of event log kept.
    event_retention_days: float = 30.0
    # MQTT payloads larger than this are dropped and counted.
    max_payload_bytes: int = 65536
    # When set, the management API and its reads need `Authorization: Bearer <token>` and the dashboard
    # asks for it at login; when unset they answer direct loopback clients only (docs/security.md).
    admin_token: str = field(default="", repr=False)
    # Read-only token: with it (Bearer or dashboard login) the dashboard and the read endpoints work,
    # nothing changes (docs/security.md). Needs `admin_token`.
    viewer_token: str = field(default="", repr=False)
    # Browser origins (besides the controller's own) allowed to call the API, comma-separated; `*`
    # wildcards as in OLLAMA_ORIGINS, e.g. `http://localhost:*`. Any other `Origin` gets 403
    # (docs/security.md).
    allowed_origins: tuple[str, ...] = ()
    # Addresses or CIDRs of TLS-terminating reverse proxies whose `X-Forwarded-For`/`X-Forwarded-Proto`
    # are believed (client address, `Secure` cookies). Comma-separated.
    trusted_proxies: tuple[str, ...] = ()
    # Largest request body accepted, in bytes (413 above it).
    max_body_bytes: int = 67108864
    # Seconds a client may take to send a request's headers before the connection is closed.
    header_timeout: float = 10.0
    # Seconds a client may take to send a request's body before the connection is closed.
    body_timeout: float = 60.0
    # `fleet up` only: also run an agent for the local Ollama.
    local_agent: bool = True
    # How the proxy picks an agent among those with the model: `round_robin`, `least_busy` or `metrics`
    # (docs/proxy.md). Agent tag `weight=N` weighs an agent.
    routing_strategy: Literal["round_robin", "least_busy", "metrics"] = "least_busy"
    # Seconds to connect to an agent's Ollama before failing over.
    proxy_connect_timeout: float = 3.0
    # Seconds the proxy waits for the next byte from Ollama (model loads and long non-streamed
    # generations are slow to answer).
    proxy_read_timeout: float = 900.0
    # Agents tried per request before giving up (failover happens only before the first byte reaches the
    # client).
    proxy_max_attempts: int = 3
    # Seconds an agent that just failed is tried only as a last resort.
    proxy_cooldown: float = 5.0
    # Days of request log kept.
    request_log_retention_days: float = 7.0
    # Requests that may wait per model when every agent that serves it is at capacity (its
    # `ollama_num_parallel`); beyond it a 503 with Retry-After. 0: no queue.
    max_queue: int = 256
    # Seconds a request may wait in its model's queue before a 503 with Retry-After.
    max_queue_wait: float = 60.0
    # Seconds of waiting that lift a queued request by one priority tier (`X-Fleet-Priority`), so low
    # priority is never starved.
    queue_aging: float = 30.0
    # Count proxied requests for `GET /metrics` (Prometheus) and the dashboard's per-agent and per-model
    # figures. Off: the proxy does no metric work; /metrics keeps the fleet gauges.
    metrics: bool = True
    # One JSON line per proxied request (the request log's fields) on the `fleet.access` logger, written
    # to stdout (diagnostics stay on stderr).
    access_log: bool = False
    # OpenTelemetry traces: the OTLP/HTTP endpoint (e.g. http://127.0.0.1:4318) that receives one trace
    # per proxied request. Empty: tracing off, at no cost. Needs the `otel` extra.
    otel_endpoint: str = ""
    # The `service.name` of the controller's traces.
    otel_service_name: str = "ollama-fleet"
    # Pull the models of an agent's memory tier (`model_tiers_file`) onto it when it first registers. On
    # by default, as the seed describes: a new 24 GB GPU pulls gpt-oss:20b (~14 GB).
    auto_distribute: bool = True
    # Fleet-wide cap on model pulls running at once; more are held as `pending` and dispatched when a
    # slot frees.
    max_concurrent_pulls: int = 10
    # Seconds a dispatched job may go without a status update before it fails with `timed_out` (agents
    # report at least every 5 s while working).
    job_step_timeout: float = 120.0
    # JSON catalogue of models offered by `GET /api/models/available` (default: the shipped
    # `controller/jobs/catalogue.json`).
    models_catalogue_file: str = ""
    # Agent identity (default: hostname + Ollama port). One agent per Ollama.
    node_id: str = ""
    # The Ollama this agent reports on and manages.
    ollama_url: str = "http://127.0.0.1:11434"
    # Seconds between heartbeats.
    heartbeat_interval: float = 5.0
    # Seconds before an Ollama probe counts as down (hung).
    ollama_timeout: float = 2.0
    # URL the controller uses to reach this Ollama (default: ollama_url; a loopback host is replaced by
    # this machine's LAN address unless the controller runs on the same machine).
    advertise_url: str = ""
    # Where Ollama keeps models, for the disk-free figure (default: `$OLLAMA_MODELS` or
    # `~/.ollama/models`).
    models_dir: str = ""
    # Model pulls this agent runs at once; more wait as `pending`.
    pull_concurrency: int = 1
    # Generations this agent's Ollama runs at once, reported to the controller as the agent's capacity.
    # 0 = automatic: `OLLAMA_NUM_PARALLEL` of the `ollama serve` the agent starts (of the agent's own
    # environment for an Ollama it does not start), else 1. When set, the `ollama serve` the agent
    # starts gets it as `OLLAMA_NUM_PARALLEL` (overriding an inherited, different value with a warning);
    # for an Ollama the agent does not start, set it to match that Ollama.
    ollama_num_parallel: int = 0
    # GB of GPU memory the controller assumes for this node when it picks models automatically, instead
    # of what NVML reports (GPUs NVML cannot see, Apple unified memory; tests). 0 = off.
    gpu_mem_override: float = 0.0
    # Download, verify and install Ollama into `ollama_install_dir` when none is found, then run and
    # supervise it.
    install_ollama: bool = False
    # Start `ollama serve` (own install or the one on PATH) when Ollama is not answering, and restart it
    # when it exits.
    manage_ollama: bool = False
    # Ollama release to install.
    ollama_version: str = "0.20.0"
    # Release archive URL template (`{version}`, `{asset}`, `{os}`, `{arch}`).
    ollama_download_url: str = "https://github.com/ollama/ollama/releases/download/v{version}/{asset}"
    # URL template of the release's `sha256sum.txt`.
    ollama_checksum_url: str = "https://github.com/ollama/ollama/releases/download/v{version}/sha256sum.txt"
    # Archive name (default: `ollama-<os>-<arch>.tar.zst`, `.tgz` before 0.14.0).
    ollama_asset: str = ""
    # Expected SHA-256 of the archive (overrides the published checksum).
    ollama_sha256: str = ""
    # Install even when no checksum is available (warns loudly).
    ollama_allow_unverified: bool = False
    # Root of agent-managed Ollama installs, one folder per version (default: `<data_dir>/ollama`).
    ollama_install_dir: str = ""
    # Retries of a failed download (timeouts, connection errors, HTTP 5xx).
    ollama_download_retries: int = 5
    # First retry wait in seconds; doubles on each retry.
    ollama_retry_backoff: float = 1.0
    # Longest wait between download retries, in seconds.
    ollama_retry_backoff_max: float = 60.0
    # Pull a default model, chosen by GPU memory (or RAM), once Ollama is up.
    pull_default_model: bool = False
    # The default model to pull (default: chosen from the model tiers).
    default_model: str = ""
    # JSON file of memory tiers -> models (default: the shipped `ollama_fleet/model_tiers.json`).
    model_tiers_file: str = ""
