"""What the long-running commands start: `fleet controller`, `fleet up` and `fleet agent`.

`fleet up` is composed here: a controller whose event loop also runs an agent for this host's Ollama
(the controller starts it once its registry is up and stops it before its own parts). The controller
never imports agent code; this module is where the two meet. Imports are per command, so `fleet agent`
never loads the web framework and `fleet controller` never loads the agent.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

from ollama_fleet.settings import Config, ConfigError

log = logging.getLogger("fleet")

WORKER_ENV = "FLEET_WORKER_INDEX"  # set by the supervisor for its workers: 2..N (1 is the first)
RESTART_BACKOFF = (1.0, 30.0)  # seconds before restarting a worker that died: first, most (doubling)
STABLE_AFTER = 60.0  # a worker that ran this long restarts after the first backoff again
START_FAILURES = 5  # exits in a row, each within STABLE_AFTER of its start: a configuration error, give up
STOP_DEADLINE = 20.0  # seconds workers get to stop after SIGTERM/SIGINT (their drain is 8 s), then SIGKILL
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies


def run_controller(cfg: Config, local_agent: bool = False) -> int:
    """The controller in this process until SIGINT/SIGTERM; with `local_agent`, `fleet up`'s agent too.
    With `workers` > 1: a supervisor of that many controller processes on one port."""
    from ollama_fleet.controller.app import create_app
    from ollama_fleet.controller.compose import CompanionFactory
    from ollama_fleet.controller.edge.timeouts import DeadlineProtocol  # header and body deadlines for slow clients

    worker = os.environ.get(WORKER_ENV)
    if cfg.workers > 1 and worker is None:
        if local_agent:
            raise ConfigError("workers: `fleet up` runs one controller; use `fleet controller --workers N`")
        if not cfg.mqtt_url:
            raise ConfigError("workers: several controllers need a broker (mqtt_url), not the trial broker")
        return supervise(cfg.workers)
    sock = None
    if worker is not None:  # one of the supervisor's workers: its own MQTT account, the shared port
        cfg = cfg.replace(mqtt_username=worker_account(cfg, int(worker)))
        sock = _shared_socket(cfg.host, cfg.port)
    companion: CompanionFactory | None = None
    if local_agent:
        from ollama_fleet.agent.service import Agent

        companion = Agent
    app = create_app(cfg, companion, name=f"fleet{worker or ''}")
    log.info("controller listening on http://%s:%s (dashboard /dashboard, API docs /docs)", cfg.host, cfg.port)
    if sock is not None:
        app.run(sock=sock, single_process=True, access_log=False, motd=False, protocol=DeadlineProtocol)
    else:
        app.run(host=cfg.host, port=cfg.port, single_process=True, access_log=False, motd=False,
                protocol=DeadlineProtocol)
    return 0


def worker_account(cfg: Config, index: int) -> str:
    """Worker 1 connects as the configured user; worker N as `<user>-N` (one account per connection:
    the broker binds the client id to the username, broker/fleet.acl)."""
    from ollama_fleet.mqtt import BrokerAddress

    user = BrokerAddress.from_config(cfg).username or "controller"
    return user if index == 1 else f"{user}-{index}"


def _shared_socket(host: str, port: int) -> socket.socket:
    """A listening socket the workers share through SO_REUSEPORT: the kernel spreads connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def _die_with_parent(parent: int, prctl: Callable[..., int] | None) -> None:
    """In a worker before it runs (Linux): SIGTERM when the supervisor dies, even by SIGKILL, so no
    worker is left holding the port and its MQTT account. `prctl` is resolved by the supervisor: this runs
    between fork and exec, where finding libc (ctypes.util runs ldconfig) has no place."""
    if prctl is None:
        return  # no libc found: a supervisor's death leaves its workers running, as on other systems
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the supervisor died before prctl: the signal will never come
        os._exit(1)


def _libc_prctl() -> Callable[..., int] | None:
    """libc's prctl, or None where there is none (not Linux, or no libc to be found)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c") if sys.platform == "linux" else None
    if name is None:
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(name, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


def supervise(workers: int) -> int:
    """Start `workers` controller processes with this command's arguments and environment; restart one
    that dies (with backoff); on SIGTERM/SIGINT stop them all and wait for their graceful shutdown (up to
    STOP_DEADLINE, then SIGKILL). A worker that exits START_FAILURES times in a row within STABLE_AFTER of
    its start is a configuration error: every worker is stopped and the status is 1.

    Workers run in sessions of their own, so a terminal's Ctrl-C reaches only this process, which forwards
    it once. The signal handler only records the signal; this loop does the rest, so a signal in the
    middle of starting a worker neither misses it nor lets the remaining workers start."""
    stop_signal: list[int] = []  # the first SIGTERM/SIGINT received (the handler appends, nothing else)
    status = 0
    procs: dict[int, subprocess.Popen[bytes]] = {}
    started: dict[int, float] = {}
    backoff = dict.fromkeys(range(1, workers + 1), RESTART_BACKOFF[0])
    failures = dict.fromkeys(range(1, workers + 1), 0)  # exits in a row within STABLE_AFTER of the start
    due: dict[int, float] = {}
    die_with_us = functools.partial(_die_with_parent, os.getpid(), _libc_prctl())

    def start(index: int) -> None:
        env = {**os.environ, WORKER_ENV: str(index)}
        procs[index] = subprocess.Popen([sys.executable, "-m", "ollama_fleet.cli", *sys.argv[1:]], env=env,
                                        start_new_session=True,
                                        preexec_fn=die_with_us if sys.platform == "linux" else None)
        started[index] = time.monotonic()
        log.info("controller worker %d started (pid %d)", index, procs[index].pid)

    def on_signal(signum: int, _frame: object) -> None:
        if not stop_signal:
            stop_signal.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for i in range(1, workers + 1):
        if stop_signal:
            break
        start(i)
    while not stop_signal:
        time.sleep(0.2)
        now = time.monotonic()
        for i, p in list(procs.items()):
            if p.poll() is None or i in due:
                continue
            if now - started[i] >= STABLE_AFTER:
                backoff[i], failures[i] = RESTART_BACKOFF[0], 0
            else:
                failures[i] += 1
            if failures[i] >= START_FAILURES:
                log.error("controller worker %d exited %d times in a row within %.0f s of its start (last "
                          "status %s): giving up, stopping every worker; its log above says why (a configuration "
                          "error?)",
                          i, failures[i], STABLE_AFTER, p.returncode)
                stop_signal.append(signal.SIGTERM)
                status = 1
                break
            log.error("controller worker %d exited with %s; restarting in %.0f s", i, p.returncode, backoff[i])
            due[i] = now + backoff[i]
            backoff[i] = min(backoff[i] * 2, RESTART_BACKOFF[1])
        for i, when in list(due.items()):
            if now >= when and not stop_signal:
                del due[i]
                start(i)
    _stop(procs, stop_signal[0])
    return status


def _stop(procs: dict[int, subprocess.Popen[bytes]], signum: int) -> None:
    """Forward `signum` to every running worker once; SIGKILL those still running after STOP_DEADLINE."""
    for p in procs.values():
        if p.poll() is None:
            p.send_signal(signum)
    deadline = time.monotonic() + STOP_DEADLINE
    while any(p.poll() is None for p in procs.values()):
        if time.monotonic() >= deadline:
            for i, p in procs.items():
                if p.poll() is None:
                    log.error("controller worker %d (pid %d) still running %.0f s after %s: killing it", i,
                              p.pid, STOP_DEADLINE, signal.Signals(signum).name)
                    p.kill()
                    p.wait()
            break
        time.sleep(0.1)


def run_agent(cfg: Config) -> int:
    """One agent in this process until SIGINT/SIGTERM."""
    from ollama_fleet.agent.service import Agent

    async def main() -> None:
        agent = Agent(cfg)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.stop)
        await agent.run()

    asyncio.run(main())
    return 0
