"""Run `ollama serve` as the agent's child: start it, wait until it answers, restart it with backoff
when it exits, stop it with the agent (R-O7).

The child gets the operator's environment (GPU variables untouched, proxy variables kept: Ollama
needs them to pull models) with `OLLAMA_HOST` set from the agent's `ollama_url`, and
`OLLAMA_NUM_PARALLEL` from `ollama_num_parallel` when that is set. It never outlives
the agent: a clean stop terminates it, and on Linux PR_SET_PDEATHSIG covers a SIGKILLed agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger("fleet.agent.supervisor")

# module level so tests can shrink them
READY_TIMEOUT = 60.0  # seconds for a fresh `ollama serve` to answer (GPU discovery can take a while)
READY_POLL = 0.1  # seconds between readiness probes
STOP_TIMEOUT = 10.0  # SIGTERM, then SIGKILL after this many seconds
RESTART_BASE = 1.0  # first restart delay; doubles per consecutive failure
RESTART_MAX = 60.0
STABLE_AFTER = 60.0  # a child that stayed up this long resets the restart backoff
WATCH_INTERVAL = 2.0  # seconds between probes of an Ollama that is not our child
WATCH_MISSES = 2  # consecutive failed probes before such an Ollama counts as down
LOG_MAX_BYTES = 10 * 1024 * 1024  # the child's output file is rotated (one .1) beyond this at start
NUM_PARALLEL_VAR = "OLLAMA_NUM_PARALLEL"

Probe = Callable[[], Awaitable["str | None"]]  # the version when Ollama answers, else None
OnState = Callable[[str, dict[str, Any]], None]


def ollama_host(url: str) -> str:
    """`http://host:port` (the agent's ollama_url) -> `host:port`, the form OLLAMA_HOST takes."""
    parts = urlsplit(url if "://" in url else "http://" + url)
    host = parts.hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{parts.port or 11434}"


def env_num_parallel(env: Mapping[str, str]) -> int | None:
    """Generations at once that Ollama derives from OLLAMA_NUM_PARALLEL in `env`, or None when unset.

    As Ollama's envconfig reads it: spaces, then quotes trimmed, then a uint64 in base 10; anything else
    leaves its default, 1; and 0 means 1 too (its scheduler takes max(NumParallel, 1))."""
    raw = env.get(NUM_PARALLEL_VAR, "").strip().strip("\"'")
    if not raw:
        return None
    n = int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 20 else 0
    return n if 1 <= n < 2**64 else 1


def num_parallel(setting: int, served: Mapping[str, str] | None, own: Mapping[str, str]) -> int:
    """How many generations the Ollama the agent reports on runs at once: the agent's `ollama_num_parallel`
    when set (> 0); else what Ollama makes of the environment of the `ollama serve` we started (`served`),
    or, for an Ollama we did not start, of our own environment (the best we know of it); else 1."""
    if setting > 0:
        return setting
    return env_num_parallel(own if served is None else served) or 1


def child_env(url: str, base: Mapping[str, str] | None = None, parallel: int = 0) -> dict[str, str]:
    """The environment of `ollama serve`; a `parallel` > 0 (the agent's setting) overrides an inherited
    OLLAMA_NUM_PARALLEL, so that the number the agent reports is the one Ollama uses."""
    env = dict(os.environ if base is None else base)
    for key in [k for k in env if k.startswith("FLEET_")]:
        del env[key]  # the agent's own settings (broker password) are none of Ollama's business
    env["OLLAMA_HOST"] = ollama_host(url)
    if parallel > 0:
        inherited = env_num_parallel(env)
        if inherited is not None and inherited != parallel:
            log.warning("ollama_num_parallel=%d overrides %s=%r inherited by ollama serve", parallel,
                        NUM_PARALLEL_VAR, env[NUM_PARALLEL_VAR])
        env[NUM_PARALLEL_VAR] = str(parallel)
    return env


def restart_delay(failures: int) -> float:
    return float(min(RESTART_MAX, RESTART_BASE * 2 ** max(0, failures - 1)))


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class OllamaProcess:
    """One `ollama serve` child process, output appended to `log_path`; `env` defaults to child_env(url)."""

    def __init__(self, binary: Path, url: str, log_path: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.binary, self.url, self.log_path = binary, url, log_path
        self.env = child_env(url) if env is None else env
        self.proc: asyncio.subprocess.Process | None = None
        self.started = 0.0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self) -> int:
        out: Any = asyncio.subprocess.DEVNULL
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                if self.log_path.stat().st_size > LOG_MAX_BYTES:
                    os.replace(self.log_path, self.log_path.with_name(self.log_path.name + ".1"))
            out = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            self.proc = await asyncio.create_subprocess_exec(
                str(self.binary), "serve", env=self.env, stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT if out is not asyncio.subprocess.DEVNULL else out,
                start_new_session=True,  # a Ctrl-C at the agent's terminal is the agent's to handle
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        finally:
            if out is not asyncio.subprocess.DEVNULL:
                out.close()
        self.started = time.monotonic()
        log.info("started %s serve (pid %d, OLLAMA_HOST=%s)", self.binary, self.proc.pid,
                 ollama_host(self.url))
        return self.proc.pid

    async def wait_ready(self, probe: Probe, timeout: float | None = None) -> str | None:
        """The version once it answers; None if it exited or stayed silent for `timeout`."""
        if self.proc is None:
            return None
        deadline = time.monotonic() + (READY_TIMEOUT if timeout is None else timeout)
        exited = asyncio.ensure_future(self.proc.wait())
        try:
            while not exited.done() and time.monotonic() < deadline:
                version = await probe()
                if version is not None:
                    return version
                await asyncio.wait([exited], timeout=READY_POLL)
        finally:
            exited.cancel()
        return None

    async def wait(self) -> int:
        assert self.proc is not None
        return await self.proc.wait()

    async def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM, then SIGKILL; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT if timeout is None else timeout)
            except TimeoutError:
                log.warning("ollama serve (pid %d) ignored SIGTERM: killing it", self.proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        return self.proc.returncode


class Supervisor:
    """Keeps an Ollama answering at `url`: ours (`binary serve`), or someone else's that already does.

    States passed to `on_state`: starting, up, down (with exit_code / restart_in when ours exited).
    `env` is the environment every `ollama serve` it starts gets (default: child_env(url)).
    """

    def __init__(self, url: str, binary: Path, probe: Probe, on_state: OnState,
                 log_path: Path | None = None, env: dict[str, str] | None = None) -> None:
        self.url, self.binary, self.probe, self.on_state = url, binary, probe, on_state
        self.log_path = log_path
        self.env = child_env(url) if env is None else env
        self.child: OllamaProcess | None = None
        self.state = "down"
        self.managed = False  # True while the Ollama answering is our child
        self.restarts = 0
        self.version: str | None = None
        self._stop = asyncio.Event()

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child and self.child.running else None

    def _set(self, state: str, **info: Any) -> None:
        self.state = state
        self.on_state(state, {"managed": self.managed, "pid": self.pid, "restarts": self.restarts, **info})

    async def _sleep(self, seconds: float) -> bool:
        """Wait, or return True early when asked to stop."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)
        return self._stop.is_set()

    async def run(self) -> None:
        failures = 0
        try:
            while not self._stop.is_set():
                version = await self.probe()
                if version is not None:  # systemd or a person runs one: watch, don't fight for the port
                    self.managed, self.version = False, version
                    self._set("up", version=version)
                    await watch_until_down(self.probe, self._stop)
                    if self._stop.is_set():
                        break
                    self._set("down", reason="stopped answering")
                    continue
                failures = await self._run_child(failures)
                if self._stop.is_set():
                    break
                delay = restart_delay(failures)
                self.restarts += 1
                exit_code = self.child.proc.returncode if self.child and self.child.proc else None
                self.managed = False
                self._set("down", exit_code=exit_code, restart_in=delay)
                if await self._sleep(delay):
                    break
        finally:
            if self.child is not None:
                await self.child.stop()

    async def _run_child(self, failures: int) -> int:
        self.child = OllamaProcess(self.binary, self.url, self.log_path, self.env)
        self._set("starting")
        try:
            await self.child.start()
        except OSError as e:  # not executable, wrong architecture...
            log.error("cannot start %s serve: %s", self.binary, e)
            self.child = None
            return failures + 1
        ready = asyncio.ensure_future(self.child.wait_ready(self.probe))
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait([ready, stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if self._stop.is_set():
            ready.cancel()
            return failures
        version = ready.result()
        if version is None:
            if self.child.running:
                log.warning("ollama serve (pid %s) did not answer within %.0f s: restarting it",
                            self.child.pid, READY_TIMEOUT)
            await self.child.stop()
            return failures + 1
        self.managed, self.version = True, version
        self._set("up", version=version)
        up_since = time.monotonic()
        exited = asyncio.ensure_future(self.child.wait())
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait([exited, stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not exited.done():
                exited.cancel()
        if self._stop.is_set():
            return failures
        log.warning("ollama serve (pid %s) exited with %s", self.child.pid, self.child.proc.returncode
                    if self.child.proc else "?")
        return 1 if time.monotonic() - up_since >= STABLE_AFTER else failures + 1

    async def stop(self) -> None:
        self._stop.set()
        if self.child is not None:
            await self.child.stop()


async def watch_until_down(probe: Probe, stop: asyncio.Event) -> None:
    """Probe every WATCH_INTERVAL; return after WATCH_MISSES misses in a row (or when stop is set)."""
    misses = 0
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), WATCH_INTERVAL)
        if stop.is_set():
            return
        if await probe() is None:
            misses += 1
            if misses >= WATCH_MISSES:
                return
        else:
            misses = 0
