"""One declarative settings table: CLI flags, `FLEET_*` variables, config files and docs come from it.

Precedence, lowest first: default < config file (TOML) < environment < command-line flag.
"""

from __future__ import annotations

import argparse
import math
import os
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ollama_fleet._settings_fields import SettingsFields

CONTROLLER = "controller"
AGENT = "agent"
BOTH = frozenset({CONTROLLER, AGENT})


@dataclass(frozen=True)
class Setting:
    name: str
    type: type
    default: Any
    help: str
    scopes: frozenset[str] = BOTH
    secret: bool = False  # redacted in `fleet settings`; a plain secret has no flag (argv is readable by others)
    choices: tuple[str, ...] | None = None
    minimum: float | None = None  # numbers: the least value accepted (and they must be finite)

    @property
    def has_flag(self) -> bool:
        """Secrets never travel in argv: only URL settings keep a flag, and refuse a password in it."""
        return not self.secret or self.type is str and self.name.endswith("_url")

    @property
    def kind(self) -> str:
        """The type as users write it: a tuple setting is a list (comma-separated, or a TOML array)."""
        return "list" if self.type is tuple else self.type.__name__

    @property
    def env(self) -> str:
        return "FLEET_" + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _s(name: str, type_: type, default: Any, help_: str, scopes: Iterable[str] = BOTH, **kw: Any) -> Setting:
    return Setting(name, type_, default, help_, frozenset(scopes), **kw)


C, A = (CONTROLLER,), (AGENT,)

SETTINGS: tuple[Setting, ...] = (
    # --- shared ---
    _s("mqtt_url", str, "", "Broker URL `mqtt://[user:pass@]host[:port]` (`mqtts://` for TLS), or a "
       "comma-separated list of the nodes of one clustered broker: the first is tried first, a failure or a "
       "lost connection moves on to the next, a backoff follows only a whole round of failures "
       "(docs/scaling.md). Empty on the controller: start a loopback trial broker.", secret=True),
    _s("mqtt_username", str, "", "MQTT username (overrides the URL's; an agent's username is its node id)."),
    _s("mqtt_password", str, "", "MQTT password (overrides the URL's).", secret=True),
    _s("mqtt_protocol", str, "5", "MQTT protocol version: `5` or `311`.", choices=("5", "311")),
    _s("mqtt_keepalive", int, 15, "MQTT keepalive in seconds; a half-open connection is declared dead "
       "after 1.5x this."),
    _s("mqtt_ca_file", str, "", "PEM file of the CA(s) that signed the broker's certificate, for `mqtts://` "
       "(empty: the system's trusted CAs). The broker's host name is always verified."),
    _s("topic_prefix", str, "fleet/v1", "Root of the topic tree."),
    _s("log_level", str, "INFO", "Log level.", choices=("DEBUG", "INFO", "WARNING", "ERROR")),
    _s("log_format", str, "text", "Log format: `text` or `json` (one object per line).", choices=("text", "json")),
    _s("data_dir", str, "", "Directory for the SQLite database and trial-broker data "
       "(default: `$XDG_DATA_HOME/ollama-fleet`)."),
    # --- controller ---
    _s("host", str, "127.0.0.1", "Address the controller's HTTP server binds (`0.0.0.0` for the LAN).", C),
    _s("port", int, 8434, "Port of the controller's HTTP server (Ollama API, OpenAI API, dashboard).", C),
    _s("workers", int, 1, "Controller processes on this host sharing `port` (docs/scaling.md). Worker 1 uses "
       "the MQTT account `mqtt_username`, worker N the account `<mqtt_username>-N` (same password); they "
       "need a broker (`mqtt_url`).", C, minimum=1),
    _s("database_url", str, "", "Peewee database URL, e.g. `sqlite:///fleet.db` or "
       "`postgresql://user@host/db` (default: SQLite in data_dir).", C, secret=True),
    _s("stale_after", float, 3.0, "Heartbeat intervals without a heartbeat before an agent is `stale`.", C),
    _s("flush_interval", float, 1.0, "Seconds between batched registry writes.", C),
    _s("metrics_sample_interval", float, 30.0, "Seconds between stored metric samples per agent.", C),
    _s("metrics_retention_hours", float, 24.0, "Hours of metric history kept.", C),
    _s("event_retention_days", float, 30.0, "Days of event log kept.", C),
    _s("max_payload_bytes", int, 65536, "MQTT payloads larger than this are dropped and counted.", C),
    _s("admin_token", str, "", "When set, the management API and its reads need `Authorization: Bearer "
       "<token>` and the dashboard asks for it at login; when unset they answer direct loopback clients only "
       "(docs/security.md).",
       C, secret=True),
    _s("viewer_token", str, "", "Read-only token: with it (Bearer or dashboard login) the dashboard and the "
       "read endpoints work, nothing changes (docs/security.md). Needs `admin_token`.", C, secret=True),
    _s("allowed_origins", tuple, (), "Browser origins (besides the controller's own) allowed to call the API, "
       "comma-separated; `*` wildcards as in OLLAMA_ORIGINS, e.g. `http://localhost:*`. Any other "
       "`Origin` gets 403 (docs/security.md).", C),
    _s("trusted_proxies", tuple, (), "Addresses or CIDRs of TLS-terminating reverse proxies whose "
       "`X-Forwarded-For`/`X-Forwarded-Proto` are believed (client address, `Secure` cookies). "
       "Comma-separated.", C),
    _s("max_body_bytes", int, 64 * 1024 * 1024, "Largest request body accepted, in bytes (413 above it).", C),
    _s("header_timeout", float, 10.0, "Seconds a client may take to send a request's headers before the "
       "connection is closed.", C),
    _s("body_timeout", float, 60.0, "Seconds a client may take to send a request's body before the "
       "connection is closed.", C),
    _s("local_agent", bool, True, "`fleet up` only: also run an agent for the local Ollama.", C),
    # --- controller: proxy ---
    _s("routing_strategy", str, "least_busy", "How the proxy picks an agent among those with the model: "
       "`round_robin`, `least_busy` or `metrics` (docs/proxy.md). Agent tag `weight=N` weighs an agent.", C,
       choices=("round_robin", "least_busy", "metrics")),
    _s("proxy_connect_timeout", float, 3.0, "Seconds to connect to an agent's Ollama before failing over.", C),
    _s("proxy_read_timeout", float, 900.0, "Seconds the proxy waits for the next byte from Ollama (model "
       "loads and long non-streamed generations are slow to answer).", C),
    _s("proxy_max_attempts", int, 3, "Agents tried per request before giving up (failover happens only "
       "before the first byte reaches the client).", C),
    _s("proxy_cooldown", float, 5.0, "Seconds an agent that just failed is tried only as a last resort.", C),
    _s("request_log_retention_days", float, 7.0, "Days of request log kept.", C),
    # --- controller: admission control (docs/admission.md) ---
    _s("max_queue", int, 256, "Requests that may wait per model when every agent that serves it is at capacity "
       "(its `ollama_num_parallel`); beyond it a 503 with Retry-After. 0: no queue.", C, minimum=0),
    _s("max_queue_wait", float, 60.0, "Seconds a request may wait in its model's queue before a 503 with "
       "Retry-After.", C, minimum=0),
    _s("queue_aging", float, 30.0, "Seconds of waiting that lift a queued request by one priority tier "
       "(`X-Fleet-Priority`), so low priority is never starved.", C, minimum=0.1),
    # --- controller: observability (docs/metrics.md) ---
    _s("metrics", bool, True, "Count proxied requests for `GET /metrics` (Prometheus) and the dashboard's "
       "per-agent and per-model figures. Off: the proxy does no metric work; /metrics keeps the fleet gauges.", C),
    _s("access_log", bool, False, "One JSON line per proxied request (the request log's fields) on the "
       "`fleet.access` logger, written to stdout (diagnostics stay on stderr).", C),
    _s("otel_endpoint", str, "", "OpenTelemetry traces: the OTLP/HTTP endpoint (e.g. http://127.0.0.1:4318) "
       "that receives one trace per proxied request. Empty: tracing off, at no cost. Needs the `otel` extra.", C),
    _s("otel_service_name", str, "ollama-fleet", "The `service.name` of the controller's traces.", C),
    # --- controller: model distribution (docs/distribution.md) ---
    _s("auto_distribute", bool, True, "Pull the models of an agent's memory tier (`model_tiers_file`) onto it "
       "when it first registers. On by default, as the seed describes: a new 24 GB GPU pulls gpt-oss:20b (~14 GB).",
       C),
    _s("max_concurrent_pulls", int, 10, "Fleet-wide cap on model pulls running at once; more are held as "
       "`pending` and dispatched when a slot frees.", C),
    _s("job_step_timeout", float, 120.0, "Seconds a dispatched job may go without a status update before it "
       "fails with `timed_out` (agents report at least every 5 s while working).", C),
    _s("models_catalogue_file", str, "", "JSON catalogue of models offered by `GET /api/models/available` "
       "(default: the shipped `controller/jobs/catalogue.json`).", C),
    # --- agent ---
    _s("node_id", str, "", "Agent identity (default: hostname + Ollama port). One agent per Ollama.", A),
    _s("ollama_url", str, "http://127.0.0.1:11434", "The Ollama this agent reports on and manages.", A),
    _s("heartbeat_interval", float, 5.0, "Seconds between heartbeats.", A),
    _s("ollama_timeout", float, 2.0, "Seconds before an Ollama probe counts as down (hung).", A),
    _s("advertise_url", str, "", "URL the controller uses to reach this Ollama (default: ollama_url; a loopback "
       "host is replaced by this machine's LAN address unless the controller runs on the same machine).", A),
    _s("models_dir", str, "", "Where Ollama keeps models, for the disk-free figure "
       "(default: `$OLLAMA_MODELS` or `~/.ollama/models`).", A),
    _s("pull_concurrency", int, 1, "Model pulls this agent runs at once; more wait as `pending`.", A),
    _s("ollama_num_parallel", int, 0, "Generations this agent's Ollama runs at once, reported to the controller "
       "as the agent's capacity. 0 = automatic: `OLLAMA_NUM_PARALLEL` of the `ollama serve` the agent starts (of "
       "the agent's own environment for an Ollama it does not start), else 1. When set, the `ollama serve` the "
       "agent starts gets it as `OLLAMA_NUM_PARALLEL` (overriding an inherited, different value with a "
       "warning); for an Ollama the agent does not start, set it to match that Ollama.", A),
    _s("gpu_mem_override", float, 0.0, "GB of GPU memory the controller assumes for this node when it picks "
       "models automatically, instead of what NVML reports (GPUs NVML cannot see, Apple unified memory; tests). "
       "0 = off.", A),
    # --- agent: Ollama management ---
    _s("install_ollama", bool, False, "Download, verify and install Ollama into `ollama_install_dir` when none "
       "is found, then run and supervise it.", A),
    _s("manage_ollama", bool, False, "Start `ollama serve` (own install or the one on PATH) when Ollama is not "
       "answering, and restart it when it exits.", A),
    _s("ollama_version", str, "0.20.0", "Ollama release to install.", A),
    _s("ollama_download_url", str, "https://github.com/ollama/ollama/releases/download/v{version}/{asset}",
       "Release archive URL template (`{version}`, `{asset}`, `{os}`, `{arch}`).", A),
    _s("ollama_checksum_url", str, "https://github.com/ollama/ollama/releases/download/v{version}/sha256sum.txt",
       "URL template of the release's `sha256sum.txt`.", A),
    _s("ollama_asset", str, "", "Archive name (default: `ollama-<os>-<arch>.tar.zst`, `.tgz` before 0.14.0).", A),
    _s("ollama_sha256", str, "", "Expected SHA-256 of the archive (overrides the published checksum).", A),
    _s("ollama_allow_unverified", bool, False, "Install even when no checksum is available (warns loudly).", A),
    _s("ollama_install_dir", str, "", "Root of agent-managed Ollama installs, one folder per version "
       "(default: `<data_dir>/ollama`).", A),
    _s("ollama_download_retries", int, 5, "Retries of a failed download (timeouts, connection errors, HTTP 5xx).", A),
    _s("ollama_retry_backoff", float, 1.0, "First retry wait in seconds; doubles on each retry.", A),
    _s("ollama_retry_backoff_max", float, 60.0, "Longest wait between download retries, in seconds.", A),
    _s("pull_default_model", bool, False, "Pull a default model, chosen by GPU memory (or RAM), once Ollama is up.", A),
    _s("default_model", str, "", "The default model to pull (default: chosen from the model tiers).", A),
    _s("model_tiers_file", str, "", "JSON file of memory tiers -> models (default: the shipped "
       "`ollama_fleet/model_tiers.json`).", BOTH),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


class ConfigError(ValueError):
    """A setting has a value we cannot use."""


@dataclass(frozen=True, kw_only=True)
class Config(SettingsFields):
    """Resolved settings: one typed, read-only attribute per row of SETTINGS (the fields are generated from
    the table into _settings_fields.py), plus where each value came from (for `fleet settings`)."""

    sources: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    def replace(self, **changes: Any) -> Config:
        """A copy with some settings changed in code; values are checked and coerced as if read from a file."""
        for k in changes:
            if k not in BY_NAME:
                raise ConfigError(f"unknown setting {k!r}")
        values = {s.name: getattr(self, s.name) for s in SETTINGS}
        values.update({k: coerce(BY_NAME[k], v) for k, v in changes.items()})
        return Config(**values, sources={**self.sources, **{k: "code" for k in changes}})

    def as_dict(self, redact: bool = True) -> dict[str, Any]:
        out = {}
        for s in SETTINGS:
            value = getattr(self, s.name)
            out[s.name] = "***" if redact and s.secret and value else _plain(value)
        return out

    def source(self, name: str) -> str:
        return self.sources.get(name, "default")

    @property
    def data_path(self) -> Path:
        if self.data_dir:
            return Path(self.data_dir).expanduser()
        base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
        return Path(base) / "ollama-fleet"


def _plain(value: Any) -> Any:
    """How a value is shown to people (help, `fleet settings`): a list setting as a list, as in TOML."""
    return list(value) if isinstance(value, tuple) else value


def coerce(setting: Setting, raw: Any) -> Any:
    """Turn a string (env/flag) or TOML value into the setting's type, with a clear error."""
    try:
        if setting.type is bool:
            if isinstance(raw, bool):
                value: Any = raw
            elif str(raw).strip().lower() in ("1", "true", "yes", "on"):
                value = True
            elif str(raw).strip().lower() in ("0", "false", "no", "off", ""):
                value = False
            else:
                raise ValueError(raw)
        elif setting.type is tuple:  # a list of strings: comma-separated in env and flags, an array in TOML
            if isinstance(raw, (list, tuple)):
                value = tuple(str(x) for x in raw)
            else:
                value = tuple(x.strip() for x in str(raw).split(",") if x.strip())
        else:
            value = setting.type(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{setting.name}: cannot read {raw!r} as {setting.kind}") from None
    if setting.choices and str(value) not in setting.choices:
        raise ConfigError(f"{setting.name}: {value!r} is not one of {', '.join(setting.choices)}")
    if setting.minimum is not None and not (math.isfinite(value) and value >= setting.minimum):
        raise ConfigError(f"{setting.name}: {value!r} must be a number of at least {setting.minimum:g}")
    return value


def _has_password(url: str) -> bool:
    """`[scheme://]user:password@host`: userinfo with a colon, in any URL of a comma-separated list."""
    def userinfo(one: str) -> str:
        return (one.partition("://")[2] if "://" in one else one).split("/", 1)[0].rpartition("@")[0]
    return any(":" in userinfo(one) for one in url.split(","))


def settings_for(scopes: Iterable[str]) -> list[Setting]:
    wanted = set(scopes)
    return [s for s in SETTINGS if s.scopes & wanted]


def add_arguments(parser: argparse.ArgumentParser, scopes: Iterable[str]) -> None:
    """Every setting of these scopes as a flag; defaults stay None so we can tell 'not given'."""
    parser.add_argument("--config", metavar="FILE", help="TOML config file (flat keys, or [controller]/[agent] tables).")
    hidden = [s for s in settings_for(scopes) if not s.has_flag]
    if hidden:
        parser.epilog = ((parser.epilog or "") + " Secrets, set in the environment or the config file only (never in "
                         "argv): " + "; ".join(f"{s.env} ({s.name}): {s.help}" for s in hidden)).strip()
    for s in settings_for(scopes):
        if not s.has_flag:
            continue
        help_ = f"{s.help} [env {s.env}; default {_plain(s.default)!r}]"
        if s.type is bool:
            parser.add_argument(s.flag, dest=s.name, default=None, action=argparse.BooleanOptionalAction, help=help_)
        else:
            parser.add_argument(s.flag, dest=s.name, default=None, metavar=s.kind.upper(), help=help_)


def load(
    scopes: Iterable[str],
    args: argparse.Namespace | Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
) -> Config:
    scopes = list(scopes)
    env = os.environ if env is None else env
    from_argv = isinstance(args, argparse.Namespace)  # code may pass secrets in a mapping; argv may not
    given = vars(args) if from_argv else dict(args or {})
    config_file = config_file or given.get("config") or env.get("FLEET_CONFIG")
    file_values: dict[str, Any] = {}
    if config_file:
        try:
            data = tomllib.loads(Path(config_file).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"config file {config_file}: {e}") from None
        for key, value in data.items():
            if isinstance(value, dict):
                if key in scopes:  # a section for this command
                    file_values.update(value)
            else:
                file_values[key] = value
        for key in file_values:
            if key not in BY_NAME and key not in (CONTROLLER, AGENT):
                raise ConfigError(f"config file {config_file}: unknown setting {key!r}")
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for s in SETTINGS:
        value, source = s.default, "default"
        if s.name in file_values:
            value, source = coerce(s, file_values[s.name]), "file"
        if s.env in env:
            value, source = coerce(s, env[s.env]), "env"
        if given.get(s.name) is not None:
            if from_argv and s.secret and _has_password(str(given[s.name])):
                raise ConfigError(f"{s.flag}: a password in a command-line flag is visible to every local user; "
                                  f"set {s.env} or a config file instead")
            value, source = coerce(s, given[s.name]), "flag"
        values[s.name], sources[s.name] = value, source
    return Config(**values, sources=sources)


def markdown_table(scopes: Iterable[str] = BOTH) -> str:
    """The configuration table in the README is generated from here (a test keeps it in sync)."""
    rows = ["| setting | flag | environment | default | used by | meaning |", "|---|---|---|---|---|---|"]
    for s in settings_for(scopes):
        default = "" if s.default in ("", None, ()) else f"`{s.default}`"
        used = ", ".join(sorted(s.scopes))
        flag = f"`{s.flag}`" if s.has_flag else "(env or file only)"
        rows.append(f"| `{s.name}` | {flag} | `{s.env}` | {default} | {used} | {s.help} |")
    return "\n".join(rows)
