"""A real HTTP(S) server on loopback that serves Ollama-style release assets, with injectable faults.

Layout follows GitHub releases: `/v<version>/<asset>` and `/v<version>/sha256sum.txt` (`<hash>  ./<asset>`).
Faults (attributes, changeable while running) apply to archive paths, never to sha256sum.txt:
`fail_first` N initial 503s, `drop_after`/`drop_times` close the connection after K body bytes,
`stall_after`/`stall_times` stop sending after K bytes (client read timeout), `corrupt_times` bit-flipped
bodies, `status_for` fixed statuses per path (404), `chunk_delay` a slow link. Range and If-Range are
honoured. Every request is logged in `requests` for assertions.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shlex
import socket
import ssl
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FAKE_VERSION = "0.99.0"  # what the installed fake answers on /api/version
CHUNK = 16 * 1024


def fake_ollama_script(fake_version: str = FAKE_VERSION, name: str = "installed", watch_parent: bool = True) -> str:
    """`bin/ollama`: `ollama serve` execs the project's fake Ollama on $OLLAMA_HOST (host:port).

    watch_parent=False leaves out the fake's own orphan watchdog, like the real binary (tests of
    the agent's PR_SET_PDEATHSIG)."""
    config = shlex.quote(json.dumps({"version": fake_version}))
    watch = ' --parent-pid "$PPID"' if watch_parent else ""
    return f"""#!/bin/sh
# test stand-in for the real ollama binary
case "$1" in
  -v|--version) echo "ollama version is {fake_version}"; exit 0 ;;
  serve) ;;
  *) echo "fake ollama: unsupported command: $*" >&2; exit 2 ;;
esac
hostport="${{OLLAMA_HOST#http://}}"
host="${{hostport%:*}}"
port="${{hostport##*:}}"
export PYTHONPATH={shlex.quote(str(ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}
cd {shlex.quote(str(ROOT))}
exec {shlex.quote(sys.executable)} -m tests.fake_ollama --host "$host" --port "$port" --name {shlex.quote(name)} \\
  --config-json {config}{watch}
"""


def _add(tf: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, int(time.time())
    tf.addfile(info, io.BytesIO(data))


def make_archive(fake_version: str = FAKE_VERSION, padding: int = 256 * 1024, compression: str = "gz",
                 watch_parent: bool = True) -> bytes:
    """A release-shaped tarball: bin/ollama (the script) and lib/ollama/... (padding makes it big enough
    to be interrupted mid-body). compression: gz, or zst (needs the zstd tool)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        _add(tf, "bin/ollama", fake_ollama_script(fake_version, watch_parent=watch_parent).encode(), 0o755)
        _add(tf, "lib/ollama/libggml-base.so", os.urandom(padding))  # incompressible: keeps the size
    raw = buf.getvalue()
    if compression == "gz":
        import gzip

        return gzip.compress(raw, mtime=0)
    if compression == "zst":
        return subprocess.run(["zstd", "-q", "-c"], input=raw, stdout=subprocess.PIPE, check=True).stdout
    raise ValueError(compression)


def sha256sums(files: dict[str, bytes]) -> bytes:
    return "".join(f"{hashlib.sha256(d).hexdigest()}  ./{n}\n" for n, d in files.items()).encode()


@dataclass
class Logged:
    method: str
    path: str
    range: str | None
    status: int
    sent: int = 0


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _reply_status(self, status: int, entry: Logged, body: bytes = b"") -> None:
        entry.status = status
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _serve(self, head: bool) -> None:
        rs = self.server.owner
        path = self.path.split("?", 1)[0]
        entry = Logged(self.command, path, self.headers.get("Range"), 0)
        with rs.lock:
            rs.requests.append(entry)
        data = rs.files.get(path)
        faulty = data is not None and not path.endswith("sha256sum.txt")
        if path in rs.status_for:
            return self._reply_status(rs.status_for[path], entry, b"forced status\n")
        if data is None:
            return self._reply_status(404, entry, b"Not Found\n")
        if faulty and not head and rs.take("fail_first"):
            return self._reply_status(503, entry, b"Service Unavailable\n")
        etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
        start, status = 0, 200
        rng = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if rng and (if_range is None or if_range == etag):
            m = re.fullmatch(r"bytes=(\d+)-", rng.strip())
            if m:
                start = int(m.group(1))
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    entry.status = 416
                    return
                status = 206
        body = data[start:]
        if faulty and not head and status == 200 and rs.take("corrupt_times"):
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        entry.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", etag)
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if head:
            return
        cut = rs.drop_after if faulty and rs.drop_after is not None and rs.take("drop_times") else None
        stall = rs.stall_after if faulty and rs.stall_after is not None and rs.take("stall_times") else None
        limit = min(x for x in (cut, stall, len(body)) if x is not None)
        try:
            pos = 0
            while pos < limit:
                n = min(CHUNK, limit - pos)
                self.wfile.write(body[pos:pos + n])
                pos += n
                entry.sent = pos
                if rs.chunk_delay:
                    time.sleep(rs.chunk_delay)  # a slow link, on the server's own thread
            self.wfile.flush()
            if stall is not None and limit == stall:
                rs.release.wait(rs.stall_seconds)  # hold the connection open, silent
            if limit < len(body):
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: ReleaseServer


class ReleaseServer:
    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[Logged] = []
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.fail_first = 0
        self.drop_after: int | None = None
        self.drop_times = 0
        self.stall_after: int | None = None
        self.stall_times = 0
        self.stall_seconds = 30.0
        self.corrupt_times = 0
        self.chunk_delay = 0.0
        self.status_for: dict[str, int] = {}
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        self.scheme = "http"
        if tls is not None:
            self._httpd.socket = tls.wrap_socket(self._httpd.socket, server_side=True)
            self.scheme = "https"
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True, name="release-server")

    def take(self, counter: str) -> bool:
        """Consume one unit of a fault counter; True if the fault applies to this request."""
        with self.lock:
            n = getattr(self, counter)
            if n > 0:
                setattr(self, counter, n - 1)
                return True
            return False

    @property
    def base(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def publish(self, version: str, assets: dict[str, bytes], checksums: str = "good") -> None:
        """checksums: good, wrong (a different hash for every asset), or absent (no sha256sum.txt)."""
        for name, data in assets.items():
            self.files[f"/v{version}/{name}"] = data
        if checksums == "good":
            self.files[f"/v{version}/sha256sum.txt"] = sha256sums(assets)
        elif checksums == "wrong":
            self.files[f"/v{version}/sha256sum.txt"] = sha256sums({n: d + b"x" for n, d in assets.items()})

    def url_template(self) -> str:
        return self.base + "/v{version}/{asset}"

    def checksum_template(self) -> str:
        return self.base + "/v{version}/sha256sum.txt"

    def gets(self, suffix: str = "") -> list[Logged]:
        with self.lock:
            return [r for r in self.requests if r.method == "GET" and r.path.endswith(suffix)]

    def start(self) -> ReleaseServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    def __enter__(self) -> ReleaseServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def make_tls(tmp: Path) -> tuple[Path, ssl.SSLContext]:
    """A throwaway CA and a server certificate for 127.0.0.1 (openssl CLI). Returns (ca.pem, server ctx)."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=fleet test CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1")
    (tmp / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                 "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                                 "extendedKeyUsage=serverAuth\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp / "server.pem", tmp / "server.key")
    return tmp / "ca.pem", ctx
