"""Single-host trial broker for ``fleet up`` / ``fleet controller`` when no broker URL is given.

Loopback only and anonymous: good for trying the fleet on one machine, never for a real fleet.
Production uses the shipped Mosquitto config in ``broker/`` (mosquitto.conf + fleet.acl + passwords).

Prefers a ``mosquitto`` child process (MQTT 5, persistence); falls back to an embedded amqtt broker
(pure Python, MQTT 3.1.1 only, in-memory) running in the caller's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Literal, Self

log = logging.getLogger("fleet.broker")

LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
_SBIN_DIRS = "/usr/sbin:/usr/local/sbin:/opt/homebrew/sbin:/opt/homebrew/opt/mosquitto/sbin"
_WARNING = (
    "Trial MQTT broker (%s) on %s is for SINGLE-HOST TRIALS only (loopback, anonymous, no ACL). "
    "Remote agents cannot reach it. For a real fleet run Mosquitto with the shipped broker/ config "
    "(broker/mosquitto.conf, broker/fleet.acl) and pass its URL."
)

Prefer = Literal["auto", "mosquitto", "amqtt"]


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary: $FLEET_MOSQUITTO_BIN, then PATH, then the usual sbin dirs."""
    env = os.environ.get("FLEET_MOSQUITTO_BIN")
    if env:
        return env if os.access(env, os.X_OK) else None
    return shutil.which("mosquitto") or shutil.which("mosquitto", path=_SBIN_DIRS)


def current_user() -> str:
    """Name of the effective user (not $USER, which sudo may preserve)."""
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return getpass.getuser()


def free_loopback_port() -> int:
    """A currently free TCP port on 127.0.0.1 (the caller must tolerate a rare race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


class TrialBroker:
    """A running trial broker. Use ``await close()`` (or ``async with``) to stop it."""

    kind: str = ""
    mqtt_protocol: int = 0

    def __init__(self, port: int) -> None:
        self.host = LOOPBACK
        self.port = port

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    async def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.kind} {self.url} v{self.mqtt_protocol}>"


class MosquittoTrialBroker(TrialBroker):
    kind = "mosquitto"
    mqtt_protocol = 5

    def __init__(
        self,
        port: int,
        proc: subprocess.Popen[bytes],
        log_file: IO[bytes],
        work_dir: Path,
        tmp: tempfile.TemporaryDirectory[str] | None,
    ) -> None:
        super().__init__(port)
        self.proc = proc
        self.work_dir = work_dir
        self.log_path = work_dir / "mosquitto-trial.log"
        self._log_file = log_file
        self._tmp = tmp

    async def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.terminate()  # SIGTERM: mosquitto saves its persistence file, then exits
                if not await _wait_exit(self.proc, STOP_TIMEOUT_S):
                    log.warning("trial mosquitto (pid %s) ignored SIGTERM; killing it", self.proc.pid)
                    self.proc.kill()
                    await _wait_exit(self.proc, STOP_TIMEOUT_S)
        finally:
            if self.proc.poll() is None:  # close() was cancelled: never leave the child behind
                self.proc.kill()
                self.proc.wait(5)
            self._log_file.close()
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None


class AmqttTrialBroker(TrialBroker):
    kind = "amqtt"
    mqtt_protocol = 311  # amqtt speaks MQTT 3.1.1 only

    def __init__(self, port: int, broker: Any) -> None:
        super().__init__(port)
        self.broker = broker
        self._closed = False

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self.broker.shutdown()


async def start_trial_broker(
    port: int = 0, data_dir: Path | None = None, prefer: Prefer = "auto"
) -> TrialBroker:
    """Start a loopback-only trial broker; ``port=0`` picks a free port.

    ``prefer``: "auto" = mosquitto when its binary is found, else amqtt; "mosquitto" fails when the
    binary is missing; "amqtt" forces the embedded broker. ``data_dir`` holds the generated mosquitto
    config, log and persistence (None = a temp dir removed on close, no persistence); amqtt keeps
    everything in memory.
    """
    if prefer not in ("auto", "mosquitto", "amqtt"):
        raise ValueError(f"prefer must be 'auto', 'mosquitto' or 'amqtt', not {prefer!r}")
    binary = find_mosquitto() if prefer != "amqtt" else None
    if prefer == "mosquitto" and binary is None:
        raise FileNotFoundError("mosquitto binary not found (PATH, /usr/sbin, $FLEET_MOSQUITTO_BIN)")
    if binary is not None:
        return await _start_mosquitto(binary, port, data_dir)
    return await _start_amqtt(port)


# --- mosquitto ---------------------------------------------------------------------------------------


def _mosquitto_conf(port: int, work_dir: Path, persist: bool) -> str:
    lines = [
        "# Generated by ollama-fleet: single-host TRIAL broker. Production: use broker/mosquitto.conf.",
        "per_listener_settings false",
        f"listener {port} {LOOPBACK}",
        "# Loopback only, so anonymous access is acceptable for a trial.",
        "allow_anonymous true",
        "# Default 1000 silently drops retained snapshots (eclipse-mosquitto/mosquitto#2887).",
        "max_queued_messages 100000",
        "max_inflight_messages 100",
        "message_size_limit 262144",
        "set_tcp_nodelay true",
        f"persistence {'true' if persist else 'false'}",
        f"persistence_location {work_dir}/",
        "autosave_interval 60",
        "log_dest stderr",  # stdout is block-buffered by mosquitto 2.0.11 when not a TTY
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        # Stay the current user when run as root: mosquitto would otherwise switch to "mosquitto",
        # which cannot write our data dir.
        f"user {current_user()}",
    ]
    return "\n".join(lines) + "\n"


async def _start_mosquitto(binary: str, port: int, data_dir: Path | None) -> MosquittoTrialBroker:
    tmp = tempfile.TemporaryDirectory(prefix="fleet-trial-broker-") if data_dir is None else None
    work_dir = Path(tmp.name if tmp else data_dir).resolve()  # type: ignore[arg-type]
    work_dir.mkdir(parents=True, exist_ok=True)
    # A port we picked can be taken between probe and bind: retry a few times with a fresh one.
    attempts = 3 if port == 0 else 1
    try:
        for attempt in range(1, attempts + 1):
            chosen = port or free_loopback_port()
            log.warning(_WARNING, "mosquitto", f"{LOOPBACK}:{chosen}")
            conf = work_dir / "mosquitto-trial.conf"
            conf.write_text(_mosquitto_conf(chosen, work_dir, persist=data_dir is not None))
            proc, log_file = await asyncio.to_thread(_spawn, binary, conf, work_dir / "mosquitto-trial.log")
            broker = MosquittoTrialBroker(chosen, proc, log_file, work_dir, tmp)
            if await _wait_port(proc, chosen, START_TIMEOUT_S):
                log.info("trial mosquitto pid %s listening on %s", proc.pid, broker.url)
                return broker
            tail = _tail(work_dir / "mosquitto-trial.log")
            broker._tmp = None  # keep the dir for the next attempt / the error message
            await broker.close()
            if attempt == attempts:
                raise RuntimeError(f"trial mosquitto did not start on {LOOPBACK}:{chosen}:\n{tail}")
            log.info("trial mosquitto failed to start on port %s, retrying:\n%s", chosen, tail)
    except BaseException:
        if tmp is not None:
            tmp.cleanup()
        raise
    raise AssertionError("unreachable")


def _spawn(binary: str, conf: Path, log_path: Path) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    log_file = open(log_path, "ab")  # noqa: SIM115 - closed by MosquittoTrialBroker.close()
    try:
        proc = subprocess.Popen(
            [binary, "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT
        )
    except BaseException:
        log_file.close()
        raise
    return proc, log_file


async def _wait_port(proc: subprocess.Popen[bytes], port: int, timeout: float) -> bool:
    """Poll until the port accepts a connection; False as soon as the process exits or on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            _, writer = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, port), 1.0)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return proc.poll() is None
        await asyncio.sleep(0.05)
    return False


async def _wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- amqtt -------------------------------------------------------------------------------------------


async def _start_amqtt(port: int) -> AmqttTrialBroker:
    from amqtt.broker import Broker  # imported lazily: only the fallback needs it

    # amqtt binds 0.0.0.0 by default: always give an explicit loopback bind. Only the anonymous auth
    # plugin: no $SYS publisher, no packet/event loggers.
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{LOOPBACK}:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    log.warning(_WARNING, "embedded amqtt, MQTT 3.1.1 only, in-memory", f"{LOOPBACK}:{port or 'auto'}")
    # amqtt's state machine library logs every transition at INFO: quiet it unless configured.
    transitions_log = logging.getLogger("transitions")
    if transitions_log.level == logging.NOTSET:
        transitions_log.setLevel(logging.WARNING)
    broker = Broker(config)
    await broker.start()
    try:
        actual = _amqtt_bound_port(broker) if port == 0 else port
    except BaseException:
        await broker.shutdown()
        raise
    trial = AmqttTrialBroker(actual, broker)
    log.info("trial amqtt broker listening on %s", trial.url)
    return trial


def _amqtt_bound_port(broker: Any) -> int:
    # amqtt 0.12 exposes no public accessor for the listening socket: read the asyncio.Server.
    server = broker._servers["default"].instance
    for sock in server.sockets:
        host, port = sock.getsockname()[:2]
        if host != LOOPBACK:
            raise RuntimeError(f"amqtt bound {host}:{port}, expected {LOOPBACK} only")
        return int(port)
    raise RuntimeError("amqtt broker has no listening socket")
