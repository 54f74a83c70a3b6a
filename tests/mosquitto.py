"""Test support: run a real Mosquitto with the project's shipped broker/ config on a loopback port.

Only the environment-specific lines of ``broker/mosquitto.conf`` are rewritten (listener, user,
password_file, acl_file, persistence_location, and allow_anonymous + use_username_as_clientid for
``anonymous=True``, the benchmarks' mode); every other
directive is kept as shipped so tests exercise the production config and ``broker/fleet.acl``.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Self
from urllib.parse import quote

from ollama_fleet.broker.local import current_user, find_mosquitto, free_loopback_port
from ollama_fleet.broker.passwd import add_credentials, remove_credentials

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_CONF = ROOT / "broker" / "mosquitto.conf"
SHIPPED_ACL = ROOT / "broker" / "fleet.acl"
HOST = "127.0.0.1"
START_TIMEOUT_S = 10.0
DEFAULT_USERS = ("controller", "operator")
# Directives the harness must find in the shipped conf (a rename there should break tests loudly).
REWRITTEN = ("listener", "allow_anonymous", "password_file", "acl_file", "persistence_location", "user")
# Roles with an ACL block in the shipped fleet.acl that another account can copy (broker/README.md:
# "one account per connection").
ROLES = ("controller", "operator")
# With anonymous=True, anonymous clients (benchmarks) get the fleet tree; topic lines before the
# first "user" line apply to anonymous clients only, so the shipped rules stay untouched.
ANON_ACL_HEADER = (
    "# tests/mosquitto.py anonymous=True: anonymous clients get the fleet tree\n"
    "topic readwrite fleet/v1/#\ntopic read $SYS/#\n\n"
)

RELOAD_LINE = "Reloading config."  # needs log_type information (shipped)
# MQTT 3.1.1 CONNACK return codes
CONNACK_ACCEPTED = 0
CONNACK_BAD_CREDENTIALS = 4
CONNACK_NOT_AUTHORIZED = 5


class MosquittoMissing(RuntimeError):
    pass


def _encode_str(s: str) -> bytes:
    b = s.encode()
    return len(b).to_bytes(2, "big") + b


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def connect_packet(
    username: str | None = None, password: str | None = None, client_id: str | None = None
) -> bytes:
    """An MQTT 3.1.1 CONNECT packet (clean session, keepalive 30 s)."""
    flags = 0x02  # clean session
    payload = _encode_str(client_id or f"probe-{os.getpid()}-{time.monotonic_ns()}")
    if username is not None:
        flags |= 0x80
        payload += _encode_str(username)
        if password is not None:
            flags |= 0x40
            payload += _encode_str(password)
    body = _encode_str("MQTT") + bytes([4, flags]) + (30).to_bytes(2, "big") + payload
    return bytes([0x10]) + _remaining_length(len(body)) + body


def mqtt_connect_rc(
    host: str, port: int, username: str | None = None, password: str | None = None, timeout: float = 2.0
) -> int:
    """One raw MQTT 3.1.1 CONNECT; returns the CONNACK return code (raises OSError if no CONNACK).

    Deterministic and thread-free: used to wait for readiness and for reloaded credentials.
    """
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(connect_packet(username, password))
        connack = b""
        while len(connack) < 4:
            chunk = s.recv(4 - len(connack))
            if not chunk:
                raise ConnectionError("connection closed before CONNACK")
            connack += chunk
        if connack[0] != 0x20:
            raise ConnectionError(f"unexpected packet {connack!r}")
        if connack[3] == CONNACK_ACCEPTED:
            s.sendall(b"\xe0\x00")  # DISCONNECT, so no will / no "socket error" noise
        return connack[3]


def render_conf(shipped: str, port: int, tmp_dir: Path, anonymous: bool) -> str:
    """The shipped conf with only listener/user/paths (and allow_anonymous) rewritten."""
    replacements = {
        "listener": f"listener {port} {HOST}",
        "allow_anonymous": f"allow_anonymous {'true' if anonymous else 'false'}",
        "password_file": f"password_file {tmp_dir / 'fleet.passwd'}",
        "acl_file": f"acl_file {tmp_dir / 'fleet.acl'}",
        "persistence_location": f"persistence_location {tmp_dir / 'data'}/",
        # As root, mosquitto would switch to "mosquitto", which cannot read our tmp files.
        "user": f"user {current_user()}",
    }
    if anonymous:  # mosquitto refuses clients without a username while it binds client ids to usernames
        replacements["use_username_as_clientid"] = "use_username_as_clientid false"
    seen: set[str] = set()
    out = []
    for line in shipped.splitlines():
        words = line.split()
        key = words[0] if words and not line.lstrip().startswith("#") else ""
        if key in replacements:
            if key in seen:
                raise ValueError(f"shipped mosquitto.conf defines {key!r} twice")
            seen.add(key)
            line = replacements[key]
        out.append(line)
    missing = set(REWRITTEN) - seen
    if missing:
        raise ValueError(f"shipped mosquitto.conf lacks {sorted(missing)}")
    return "\n".join(out) + "\n"


def role_rules(acl: str, role: str) -> list[str]:
    """The `topic ...` lines of the shipped ACL's `user <role>` block."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; one of {ROLES}")
    lines = acl.splitlines()
    start = lines.index(f"user {role}")
    rules = []
    for line in lines[start + 1:]:
        if re.match(r"(user|pattern)\s|# ---", line):
            break
        if line.startswith("topic "):
            rules.append(line)
    return rules


class MosquittoProcess:
    """A mosquitto child process with the shipped config. Use as a context manager or call stop()."""

    def __init__(
        self,
        tmp_dir: Path,
        port: int,
        passwords: dict[str, str],
        proc: subprocess.Popen[bytes],
        log_file: IO[bytes],
    ) -> None:
        self.host = HOST
        self.port = port
        self.tmp_dir = tmp_dir
        self.conf_path = tmp_dir / "mosquitto.conf"
        self.password_file = tmp_dir / "fleet.passwd"
        self.acl_path = tmp_dir / "fleet.acl"
        self.log_path = tmp_dir / "mosquitto.log"
        self.passwords = passwords
        self.proc = proc
        self._log_file = log_file

    def url(self, user: str | None = None) -> str:
        if user is None:
            return f"mqtt://{self.host}:{self.port}"
        # Percent-encoded: a chosen password may contain ':', '@', spaces (generated ones never do).
        return f"mqtt://{quote(user, safe='')}:{quote(self.passwords[user], safe='')}@{self.host}:{self.port}"

    def connect_rc(self, user: str | None = None, password: str | None = None) -> int:
        if user is not None and password is None:
            password = self.passwords.get(user)
        return mqtt_connect_rc(self.host, self.port, user, password)

    def reload(self) -> None:
        """SIGHUP and wait until mosquitto has re-read the password and ACL files.

        mosquitto logs "Reloading config." and applies the new files in the same main-loop pass, so
        any packet sent after the line shows up is handled with the new rules.
        """
        self._check_alive()
        before = self.log_text().count(RELOAD_LINE)
        self.proc.send_signal(signal.SIGHUP)
        self._wait_for(lambda: self.log_text().count(RELOAD_LINE) > before, "config reload")

    def add_user(self, name: str, password: str | None = None) -> str:
        """Write ``name`` to the password file, SIGHUP, wait until it can connect; return its password."""
        password = add_credentials(self.password_file, name, password)
        self.passwords[name] = password
        self.reload()
        self._wait_for(lambda: self.connect_rc(name) == CONNACK_ACCEPTED, f"user {name!r} accepted")
        return password

    def remove_user(self, name: str) -> None:
        """Remove ``name``, SIGHUP, wait until its connects are refused."""
        password = self.passwords.pop(name)
        remove_credentials(self.password_file, name)
        self.reload()
        self._wait_for(lambda: self.connect_rc(name, password) != CONNACK_ACCEPTED, f"user {name!r} refused")

    def add_account(self, role: str, name: str | None = None, password: str | None = None) -> str:
        """A new account with the rights of `role` ("controller"/"operator"), made the documented way:
        the role's block of the shipped fleet.acl copied under the new name, password added, SIGHUP.

        The broker binds client ids to usernames, so every concurrently connected test tool needs its own
        account (two connections of one account take each other over). Returns the username."""
        name = name or f"{role}-{uuid.uuid4().hex[:8]}"
        rules = [r.replace(f"/{role}/", f"/{name}/") for r in role_rules(SHIPPED_ACL.read_text(), role)]
        with self.acl_path.open("a") as fh:
            fh.write(f"\nuser {name}\n" + "".join(f"{r}\n" for r in rules))
        self.add_user(name, password)
        return name

    def log_text(self) -> str:
        if not self._log_file.closed:
            self._log_file.flush()
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self._log_file.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log_file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_ready(self) -> None:
        """Ready = answers an MQTT CONNECT (anonymous: refused unless anonymous=True; either is fine)."""
        self._wait_for(
            lambda: self.connect_rc() in (CONNACK_ACCEPTED, CONNACK_NOT_AUTHORIZED),
            f"CONNACK on {self.host}:{self.port}",
        )

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited with {self.proc.returncode}:\n{self.log_text()}")

    def _wait_for(self, predicate: Callable[[], bool], what: str, timeout: float = START_TIMEOUT_S) -> None:
        wait_for_broker("mosquitto", predicate, what, self._check_alive, lambda: self.log_text()[-4000:], timeout)


def wait_for_broker(name: str, predicate: Callable[[], bool], what: str, check_alive: Callable[[], None],
                    log_text: Callable[[], str], timeout: float = START_TIMEOUT_S, interval: float = 0.02) -> None:
    """Poll `predicate` (an OSError counts as not yet) until true; `check_alive` raises when the broker died."""
    deadline = time.monotonic() + timeout
    while True:
        check_alive()
        try:
            if predicate():
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{name}: timed out waiting for {what}\n{log_text()}")
        time.sleep(interval)  # polling interval, bounded by the deadline above


def start_mosquitto(
    tmp_dir: Path, users: dict[str, str] | None = None, anonymous: bool = False, port: int | None = None,
    extra_conf: str = "",
) -> MosquittoProcess:
    """Start mosquitto with the shipped config on a free loopback port and wait until it serves MQTT.

    ``users`` maps username -> password; default: controller and operator with generated passwords.
    ``extra_conf`` is appended to the rendered conf (e.g. a second, TLS listener with its options).
    """
    binary = find_mosquitto()
    if binary is None:
        raise MosquittoMissing(
            "mosquitto binary not found (install the 'mosquitto' package or set FLEET_MOSQUITTO_BIN)"
        )
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    (tmp_dir / "data").mkdir(exist_ok=True)
    password_file = tmp_dir / "fleet.passwd"
    password_file.unlink(missing_ok=True)
    wanted = dict(users) if users is not None else {u: None for u in DEFAULT_USERS}
    passwords = {name: add_credentials(password_file, name, pw) for name, pw in wanted.items()}
    password_file.touch()  # mosquitto refuses a missing password_file even with no users
    acl = SHIPPED_ACL.read_text()
    (tmp_dir / "fleet.acl").write_text(ANON_ACL_HEADER + acl if anonymous else acl)

    last_error = ""
    fixed = port  # a fixed port: restarting "the same" broker
    for _ in range(3):  # a free port can be grabbed by someone else before mosquitto binds it
        port = fixed or free_loopback_port()
        (tmp_dir / "mosquitto.conf").write_text(
            render_conf(SHIPPED_CONF.read_text(), port, tmp_dir, anonymous) + extra_conf
        )
        log_file = open(tmp_dir / "mosquitto.log", "ab")  # noqa: SIM115 - owned by MosquittoProcess
        proc = subprocess.Popen(
            [binary, "-c", str(tmp_dir / "mosquitto.conf")],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        mp = MosquittoProcess(tmp_dir, port, passwords, proc, log_file)
        try:
            mp.wait_ready()
            return mp
        except (RuntimeError, TimeoutError) as exc:
            last_error = str(exc)
            mp.kill()
            if "Address already in use" not in last_error:
                break
    raise RuntimeError(f"mosquitto failed to start with the shipped config:\n{last_error}")
