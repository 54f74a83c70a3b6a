"""Test support: run Debian's nginx (`nginx-light`) with the shipped deploy/nginx/fleet.conf on a loopback port.

Only the upstream's `server` lines (one per controller given) and the `listen` line of the shipped file are
rewritten; every other directive is kept as shipped, so tests exercise the production config. The file is
an http-context one: a small main config around it holds what a packaged nginx.conf would (pid, logs,
temp directories), all under the test's directory so nginx runs without root and without /var.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Self

from ollama_fleet.broker.local import current_user, free_loopback_port

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_CONF = ROOT / "deploy" / "nginx" / "fleet.conf"
HOST = "127.0.0.1"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
UPSTREAM = "fleet_controllers"
TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


class NginxMissing(RuntimeError):
    pass


def find_nginx() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


def render_conf(shipped: str, upstreams: list[str], port: int) -> str:
    """The shipped file with the upstream's servers replaced by `upstreams` (host:port, each keeping the
    parameters of the shipped lines) and its listen on HOST:port."""
    out: list[str] = []
    in_upstream = servers_written = listens = 0
    params = ""
    for line in shipped.splitlines():
        code = line.split("#", 1)[0].strip()
        if code.startswith(f"upstream {UPSTREAM}"):
            in_upstream = 1
        elif in_upstream and code == "}":
            in_upstream = 0
        if in_upstream and re.match(r"server\s", code):
            if not servers_written:
                params = " ".join(code.rstrip(";").split()[2:])
                indent = line[: len(line) - len(line.lstrip())]
                out += [f"{indent}server {u} {params};".replace(" ;", ";") for u in upstreams]
            servers_written += 1
            continue
        if re.match(r"listen\s", code):
            listens += 1
            line = line.replace(code, f"listen {HOST}:{port};")
        out.append(line)
    if not servers_written or listens != 1:
        raise ValueError(f"shipped {SHIPPED_CONF.name}: expected server lines in upstream {UPSTREAM} and one "
                         f"listen, found {servers_written} and {listens}")
    return "\n".join(out) + "\n"


def main_conf(tmp_dir: Path, fleet_conf: Path) -> str:
    """What the packaged nginx.conf provides around an http-context file, with every path in tmp_dir."""
    user = f"user {current_user()};\n" if os.geteuid() == 0 else ""  # as root, workers would become nobody
    temp = "".join(f"    {kind}_temp_path {tmp_dir / kind};\n" for kind in TEMP_DIRS)
    return (
        f"{user}worker_processes 1;\n"
        f"pid {tmp_dir / 'nginx.pid'};\n"
        f"lock_file {tmp_dir / 'nginx.lock'};\n"
        f"error_log {tmp_dir / 'error.log'} info;\n"
        "events { worker_connections 1024; }\n"
        "http {\n"
        f"    access_log {tmp_dir / 'access.log'};\n"
        f"{temp}"
        f"    include {fleet_conf};\n"
        "}\n"
    )


class NginxProcess:
    """nginx (master + one worker) in its own process group. Use as a context manager or call stop()."""

    def __init__(self, binary: str, tmp_dir: Path, upstreams: list[str], port: int | None = None) -> None:
        self.binary, self.tmp_dir, self.upstreams = binary, tmp_dir, upstreams
        self.host = HOST
        self.port = port or free_loopback_port()
        self.url = f"http://{HOST}:{self.port}"
        self.fleet_conf = tmp_dir / "fleet.conf"
        self.conf_path = tmp_dir / "nginx.conf"
        self.log_path = tmp_dir / "error.log"
        self.proc: subprocess.Popen[bytes] | None = None
        for kind in TEMP_DIRS:
            (tmp_dir / kind).mkdir(parents=True, exist_ok=True)
        self.fleet_conf.write_text(render_conf(SHIPPED_CONF.read_text(), upstreams, self.port))
        self.conf_path.write_text(main_conf(tmp_dir, self.fleet_conf))

    def _argv(self, *extra: str) -> list[str]:
        # -e: errors before the config is read go to our log, not to the package's /var/log/nginx
        return [self.binary, "-p", str(self.tmp_dir), "-e", str(self.log_path), "-c", str(self.conf_path), *extra]

    def check(self) -> str:
        """`nginx -t` on the rendered config; raises with nginx's words when it is refused."""
        out = subprocess.run(self._argv("-t"), capture_output=True, text=True, timeout=30, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"nginx -t refused the config:\n{out.stdout}{out.stderr}{self.log_text()[-3000:]}")
        return out.stdout + out.stderr

    def start(self) -> Self:
        self.check()
        self.proc = subprocess.Popen(self._argv("-g", "daemon off;"), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Ready = the master is alive and the listening socket accepts connections."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"nginx: not listening on {self.port} after {timeout} s\n{self.log_text()[-3000:]}")
            time.sleep(0.02)  # polling interval, bounded by the deadline above

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGQUIT: graceful shutdown (open connections finish); SIGKILL to the group if it takes too long."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGQUIT)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL to the master and its worker (one process group)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_nginx(tmp_dir: Path, upstreams: list[str]) -> NginxProcess:
    """nginx with the shipped config in front of `upstreams` (host:port each) on a free loopback port,
    once it listens. A port taken between choosing and binding is tried again with another."""
    binary = find_nginx()
    if binary is None:
        raise NginxMissing("nginx not found (install Debian's nginx-light)")
    tmp_dir.mkdir(parents=True, exist_ok=True)
    last = ""
    for _ in range(3):
        nginx = NginxProcess(binary, tmp_dir, upstreams).start()
        try:
            nginx.wait_ready()
            return nginx
        except (RuntimeError, TimeoutError) as exc:
            last = str(exc)
            nginx.kill()
            if "Address already in use" not in last:
                break
    raise RuntimeError(f"nginx failed to start with the shipped config:\n{last}")
