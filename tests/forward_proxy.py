"""A tiny real forward proxy on loopback: absolute-URI requests (plain HTTP) and CONNECT tunnels (HTTPS),
optional Basic proxy authentication (407 without it), and a log of every request for assertions."""

from __future__ import annotations

import base64
import http.client
import select
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote, urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authorization", "proxy-authenticate", "proxy-connection", "te",
              "trailer", "transfer-encoding", "upgrade"}


@dataclass
class ProxyRequest:
    method: str
    target: str
    authorized: bool


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _authorized(self) -> bool:
        proxy = self.server.owner
        ok = proxy.credentials is None or self.headers.get("Proxy-Authorization") == proxy.expected_auth
        with proxy.lock:
            proxy.requests.append(ProxyRequest(self.command, self.path, ok))
        if not ok:
            self.send_response(407)
            self.send_header("Proxy-Authenticate", 'Basic realm="fleet-test"')
            self.send_header("Content-Length", "0")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
        return ok

    def do_CONNECT(self) -> None:
        if not self._authorized():
            return
        host, _, port = self.path.rpartition(":")
        try:
            upstream = socket.create_connection((host.strip("[]"), int(port)), timeout=10)
        except OSError:
            self.send_response(502)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200, "Connection Established")
        self.end_headers()
        self.close_connection = True
        client = self.connection
        try:
            socks = [client, upstream]
            while True:
                readable, _, _ = select.select(socks, [], [], 30)
                if not readable:
                    return
                for s in readable:
                    data = s.recv(65536)
                    if not data:
                        return
                    (upstream if s is client else client).sendall(data)
        except OSError:
            return
        finally:
            upstream.close()

    def _forward(self) -> None:
        if not self._authorized():
            return
        url = urlsplit(self.path)
        if url.scheme != "http" or not url.hostname:
            self.send_response(400)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        path = url.path + (f"?{url.query}" if url.query else "")
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        self.close_connection = True
        conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=30)
        try:
            conn.request(self.command, path or "/", headers=headers)
            resp = conn.getresponse()
            self.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in HOP_BY_HOP:
                    self.send_header(k, v)
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command == "HEAD":
                return
            while chunk := resp.read1(65536):
                self.wfile.write(chunk)
        except (OSError, http.client.HTTPException):
            return  # upstream cut the body short: so do we (the client sees the short read)
        finally:
            conn.close()

    do_GET = _forward
    do_HEAD = _forward


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: ForwardProxy


class ForwardProxy:
    def __init__(self, username: str | None = None, password: str | None = None) -> None:
        self.credentials = (username, password or "") if username is not None else None
        token = base64.b64encode(f"{username}:{password or ''}".encode()).decode() if username is not None else ""
        self.expected_auth = f"Basic {token}"
        self.requests: list[ProxyRequest] = []
        self.lock = threading.Lock()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True, name="forward-proxy")

    def url(self, with_credentials: bool = True) -> str:
        if with_credentials and self.credentials is not None:
            user, pw = self.credentials
            return f"http://{quote(user, safe='')}:{quote(pw, safe='')}@127.0.0.1:{self.port}"
        return f"http://127.0.0.1:{self.port}"

    def seen(self) -> list[ProxyRequest]:
        with self.lock:
            return list(self.requests)

    def start(self) -> ForwardProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    def __enter__(self) -> ForwardProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
