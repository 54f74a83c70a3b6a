"""The agent's Ollama management: detect, install when asked, run and supervise, pull a default model.

Runs beside the MQTT session and never needs it: an install proceeds while the broker is unreachable,
and what it has to say (events, job status) waits in the agent's outbox until the agent is connected.
States reported as `ollama.state` (info snapshot and heartbeat):
  unknown -> missing | installing -> install_failed | starting -> up <-> down/restarting
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil

from ollama_fleet.agent import supervisor as sup
from ollama_fleet.agent.default_model import ensure_default_model
from ollama_fleet.agent.install import (
    InstallError,
    Reporter,
    install,
    install_root,
    installed_binary,
    path_binary,
    release_from_config,
)
from ollama_fleet.agent.outbox import Publisher
from ollama_fleet.agent.progress import ConsoleProgress, JobReport, Meter
from ollama_fleet.contract.protocol import PROTO
from ollama_fleet.settings import Config, ConfigError

log = logging.getLogger("fleet.agent.ollama")

EVENT_HISTORY = 100  # recent events kept in memory for `events` (diagnostics, tests)


class OllamaManager:
    """Alone (tests, diagnostics) it keeps its events and job statuses in memory; in an agent it also posts
    them to the agent's `publisher`, reads the agent's own probe (`ollama_up`) and its GPUs (`gpus`)."""

    def __init__(self, cfg: Config, publisher: Publisher | None = None, *,
                 ollama_up: Callable[[], bool] | None = None,
                 gpus: Callable[[], list[dict[str, Any]]] | None = None) -> None:
        if cfg.ollama_num_parallel < 0:
            raise ConfigError(f"ollama_num_parallel: {cfg.ollama_num_parallel} is negative (0 = automatic)")
        self.cfg, self.publisher = cfg, publisher
        self._ollama_up, self._gpus = ollama_up, gpus
        self.url = cfg.ollama_url.rstrip("/")
        self.install_enabled = cfg.install_ollama
        self.manage = cfg.manage_ollama
        self.pull_default = cfg.pull_default_model
        self.root = install_root(cfg)
        self.state = "unknown"
        self.source: str | None = None  # url (someone else's Ollama) | installed (ours) | path (system)
        self.binary: Path | None = None
        self.version: str | None = None
        self.error: str | None = None
        self.supervisor: sup.Supervisor | None = None
        self.default_model: str | None = None
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=EVENT_HISTORY)
        self.jobs: dict[str, dict[str, Any]] = {}  # latest status per job id
        self._http = httpx.AsyncClient(base_url=self.url, trust_env=False,  # LAN: never through a proxy
                                       timeout=cfg.ollama_timeout)
        self._tasks: list[asyncio.Task[Any]] = []
        self._default_task: asyncio.Task[Any] | None = None
        self._missing_reported = False
        self._seen_up = False  # once Ollama answered, silence means down, never missing

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._main(), name="ollama-manager"))

    async def stop(self) -> None:
        """Stops the child `ollama serve` (it must not outlive the agent) and every task."""
        if self.supervisor is not None:
            await self.supervisor.stop()
        tasks = [*self._tasks, *([self._default_task] if self._default_task else [])]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        await self._http.aclose()

    async def wait(self) -> None:
        """Until the main task ends (tests; the agent just lets it run)."""
        if self._tasks:
            await asyncio.gather(self._tasks[0], return_exceptions=True)

    # ---- what the agent reports ------------------------------------------------------------
    def reported_state(self) -> str:
        """The agent's own probe (just before each heartbeat) is the freshest word on up/down."""
        if self._ollama_up is None:
            return self.state
        if self._ollama_up():
            return "up"
        return "down" if self.state == "up" else self.state

    @property
    def num_parallel(self) -> int:
        """Generations at once of the Ollama we report on (the controller's capacity for this agent)."""
        s = self.supervisor
        served = s.env if s is not None and s.managed else None  # ours: we know its environment
        return sup.num_parallel(self.cfg.ollama_num_parallel, served, os.environ)

    def info(self) -> dict[str, Any]:
        s = self.supervisor
        out: dict[str, Any] = {"state": self.reported_state(), "managed": bool(s and s.pid is not None),
                               "source": self.source,
                               "binary": str(self.binary) if self.binary else None,
                               "num_parallel": self.num_parallel}
        if s is not None:
            out.update(pid=s.pid, restarts=s.restarts)
        if self.error and out["state"] in ("missing", "install_failed", "down", "restarting"):
            out["problem"] = self.error
        return out

    def heartbeat(self) -> dict[str, Any]:
        return {"state": self.reported_state()}

    async def probe(self) -> str | None:
        try:
            resp = await self._http.get("/api/version")
            if resp.status_code == 200:
                return str(resp.json().get("version") or "")
        except (httpx.HTTPError, ValueError):
            pass
        return None

    # ---- events and jobs -------------------------------------------------------------------
    def event(self, name: str, level: str, message: str, **fields: Any) -> None:
        getattr(log, {"warning": "warning", "error": "error"}.get(level, "info"))("%s", message)
        doc = {"v": PROTO, "event": name, "level": level, "message": message, "ts": time.time(), **fields}
        self.events.append(doc)
        if self.publisher is not None:
            self.publisher.event(doc)

    def emit_job(self, doc: dict[str, Any]) -> None:
        self.jobs[doc["job_id"]] = doc
        if self.publisher is not None:
            self.publisher.job_status(doc["job_id"], doc)  # only the latest status of a job matters

    def _set_state(self, state: str, **attrs: Any) -> None:
        for k, v in attrs.items():
            setattr(self, k, v)
        if state == self.state:
            return
        log.info("ollama state: %s -> %s", self.state, state)
        self.state = state
        if self.publisher is not None:
            self.publisher.wake()  # the heartbeat and info snapshot carry it at once, not at the next tick

    # ---- the work --------------------------------------------------------------------------
    def _find_binary(self) -> tuple[Path | None, str | None]:
        own = installed_binary(self.root, self.cfg.ollama_version.lstrip("v"))
        system = path_binary()
        order = [(own, "installed"), (system, "path")]
        if not self.install_enabled:
            order.reverse()  # an operator who did not ask for our install gets their own Ollama first
        for binary, source in order:
            if binary is not None:
                return binary, source
        return None, None

    def _may_start(self, source: str | None) -> bool:
        if source == "installed":
            return self.install_enabled or self.manage
        return source == "path" and self.manage

    async def _main(self) -> None:
        try:
            version = await self.probe()
            binary, source = self._find_binary()
            if version is None and binary is None and self.install_enabled:
                binary, source = await self._install(), "installed"
            if binary is not None and self._may_start(source):
                self.binary = binary
                log_path = self.cfg.data_path / "logs" / f"ollama-serve-{_port(self.url)}.log"
                env = sup.child_env(self.url, parallel=self.cfg.ollama_num_parallel)
                self.supervisor = sup.Supervisor(self.url, binary, self.probe, self._on_supervisor, log_path, env)
                self._set_state("starting", source=source)
                await self.supervisor.run()
                return
            await self._watch()
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here must not take the agent (and its heartbeats) down
            log.exception("Ollama management stopped")
            self._set_state("unknown")

    async def _watch(self) -> None:
        """Nothing to run: follow whether Ollama answers, and say so when there is none at all."""
        while True:
            version = await self.probe()
            if version is not None:
                self._set_state("up", source="url", version=version, error=None)
                self._seen_up = True
                self._maybe_pull_default()
            else:
                binary, source = self._find_binary()
                if self._seen_up:  # it was here (maybe on another host): down, not missing
                    self._set_state("down", error="not answering")
                elif binary is not None:
                    hint = "" if self.manage else " (set manage_ollama to have the agent start it)"
                    self._set_state("down", binary=binary, source=source, error="not answering" + hint)
                elif self.state != "install_failed":
                    self._set_state("missing", binary=None, source=None,
                                    error=f"nothing answers at {self.url}, none on PATH or under {self.root}")
                    if not self._missing_reported:
                        self._missing_reported = True
                        self.event("ollama_missing", "warning",
                                   f"Ollama missing: nothing answers at {self.url}, no `ollama` on PATH and "
                                   f"no install under {self.root}; run the agent with --install-ollama to "
                                   "install it",
                                   url=self.url)
            await asyncio.sleep(sup.WATCH_INTERVAL)

    def _on_supervisor(self, state: str, info: dict[str, Any]) -> None:
        if state == "up":
            self._set_state("up", version=info.get("version"), error=None)
            who = f"pid {info.get('pid')}" if info.get("managed") else "not started by the agent"
            self.event("ollama_started", "info", f"Ollama {info.get('version')} is up at {self.url} ({who})",
                       managed=info.get("managed"), pid=info.get("pid"), version=info.get("version"),
                       restarts=info.get("restarts"))
            self._maybe_pull_default()
        elif state == "starting":
            self._set_state("starting")
        elif state == "down":
            restart_in = info.get("restart_in")
            reason = (f"exited with {info['exit_code']}" if info.get("exit_code") is not None
                      else info.get("reason") or "stopped")
            self._set_state("restarting" if restart_in is not None else "down", error=reason)
            self.event("ollama_stopped", "warning",
                       f"Ollama at {self.url} is down ({reason})"
                       + (f"; restarting in {restart_in:.1f} s" if restart_in is not None else ""),
                       exit_code=info.get("exit_code"), restart_in=restart_in, restarts=info.get("restarts"))

    async def _install(self) -> Path | None:
        try:
            release = release_from_config(self.cfg)
        except InstallError as e:
            self._install_failed(None, str(e))
            return None
        job_id = f"ollama-install-{release.version}-{int(time.time())}"
        job = JobReport(job_id, "ollama.install", self.emit_job,
                        args={"version": release.version, "asset": release.asset})
        console = ConsoleProgress(f"ollama {release.version}")
        reporter = _Reporter(self, job, console)
        self._set_state("installing", error=None)
        self.event("ollama_install_started", "info", f"installing Ollama {release.version} ({release.asset}) "
                   f"into {self.root / release.version}", version=release.version, job_id=job.job_id)
        job.start(phase="checksum")
        keepalive = asyncio.create_task(job.keepalive())
        try:
            binary = await install(release, self.root, reporter,
                                   retries=self.cfg.ollama_download_retries,
                                   backoff=self.cfg.ollama_retry_backoff,
                                   backoff_max=self.cfg.ollama_retry_backoff_max)
        except InstallError as e:
            console.close(reporter.meter, ok=False)
            self._install_failed(job, str(e))
            return None
        except Exception as e:  # a bug or an unexpected OS error: report it like any failure
            log.exception("install failed")
            console.close(reporter.meter, ok=False)
            self._install_failed(job, f"{e.__class__.__name__}: {e}")
            return None
        finally:
            keepalive.cancel()
        console.close(reporter.meter, ok=True)
        job.finish(True, meter=reporter.meter)
        self.event("ollama_installed", "info", f"Ollama {release.version} installed: {binary}",
                   version=release.version, binary=str(binary), job_id=job.job_id)
        return binary

    def _install_failed(self, job: JobReport | None, error: str) -> None:
        if job is not None:
            job.finish(False, error=error)
        self._set_state("install_failed", error=error)
        self.event("ollama_install_failed", "error", f"Ollama install failed: {error}", error=error,
                   job_id=job.job_id if job else None)

    def _maybe_pull_default(self) -> None:
        if not self.pull_default or self._default_task is not None:
            return

        async def run() -> None:
            try:
                gpus = self._gpus() if self._gpus is not None else []
                self.default_model = await ensure_default_model(
                    self.cfg, self.url, gpus, psutil.virtual_memory().total, self.emit_job, self.event)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.exception("default model")
                self.event("default_model_pull_failed", "error", f"default model: {e}")

        self._default_task = asyncio.create_task(run(), name="default-model")


class _Reporter(Reporter):
    """An install's progress to the terminal (bar or log lines) and to the job status."""

    def __init__(self, manager: OllamaManager, job: JobReport, console: ConsoleProgress) -> None:
        self.manager, self.job, self.console = manager, job, console
        self.meter = Meter()

    def phase(self, name: str) -> None:
        self.job.progress(phase=name)

    def progress(self, meter: Meter) -> None:
        self.meter = meter
        self.console.update(meter)
        self.job.progress(meter)

    def event(self, name: str, level: str, message: str, **fields: Any) -> None:
        self.manager.event(name, level, message, job_id=self.job.job_id, **fields)


def _port(url: str) -> int:
    with contextlib.suppress(ValueError):
        return urlsplit(url).port or 11434
    return 11434
