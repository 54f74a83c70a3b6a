"""What the long-running commands start: `fleet controller`, `fleet up` and `fleet agent`.

`fleet up` is composed here: a controller whose event loop also runs an agent for this host's Ollama
(the controller starts it once its registry is up and stops it before its own parts). The controller
never imports agent code; this module is where the two meet. Imports are per command, so `fleet agent`
never loads the web framework and `fleet controller` never loads the agent.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time

from ollama_fleet.settings import Config, ConfigError

log = logging.getLogger("fleet")

WORKER_ENV = "FLEET_WORKER_INDEX"  # set by the supervisor for its workers: 2..N (1 is the first)
RESTART_BACKOFF = (1.0, 30.0)  # seconds before restarting a worker that died: first, most (doubling)
STABLE_AFTER = 60.0  # a worker that ran this long restarts after the first backoff again


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


def _die_with_parent() -> None:
    """In a worker before it runs (Linux): SIGTERM when the supervisor dies, even by SIGKILL, so no
    worker is left holding the port and its MQTT account."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def supervise(workers: int) -> int:
    """Start `workers` controller processes with this command's arguments and environment; restart one
    that dies (with backoff); on SIGTERM/SIGINT stop them all and wait for their graceful shutdown."""
    stopping = False
    procs: dict[int, subprocess.Popen[bytes]] = {}
    started: dict[int, float] = {}
    backoff = dict.fromkeys(range(1, workers + 1), RESTART_BACKOFF[0])
    due: dict[int, float] = {}

    def start(index: int) -> None:
        env = {**os.environ, WORKER_ENV: str(index)}
        procs[index] = subprocess.Popen([sys.executable, "-m", "ollama_fleet.cli", *sys.argv[1:]], env=env,
                                        preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        started[index] = time.monotonic()
        log.info("controller worker %d started (pid %d)", index, procs[index].pid)

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for i in range(1, workers + 1):
        start(i)
    while not stopping or any(p.poll() is None for p in procs.values()):
        time.sleep(0.2)
        if stopping:
            continue
        now = time.monotonic()
        for i, p in list(procs.items()):
            if p.poll() is not None and i not in due:
                if now - started[i] >= STABLE_AFTER:
                    backoff[i] = RESTART_BACKOFF[0]
                log.error("controller worker %d exited with %s; restarting in %.0f s", i, p.returncode, backoff[i])
                due[i] = now + backoff[i]
                backoff[i] = min(backoff[i] * 2, RESTART_BACKOFF[1])
        for i, when in list(due.items()):
            if now >= when:
                del due[i]
                start(i)
    return 0


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
