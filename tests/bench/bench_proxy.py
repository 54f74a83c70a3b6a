"""Proxy benchmark: the same fake Ollama called directly and through the controller.

    uv run python tests/bench/bench_proxy.py [--requests 2000] [--rounds 4] [--concurrency 1 16 64] [--profile]

One run measures, per concurrency (1, 16, 64) and mode (streaming /api/chat NDJSON, and stream:false),
direct and proxied in alternating blocks: time to first byte and total latency (p50/p99) and requests/s. It
prints the time the proxy adds (proxied minus direct, per percentile), throughput through the proxy
divided by direct, and the error rate of both. Targets (issue 3): added TTFB <= 1 ms p50 and <= 3 ms
p99 at c=1; added p99 <= 25 ms at c=64; proxied throughput >= 50 % of direct at c=64, zero errors.

The load generator is a minimal keep-alive HTTP/1.1 client on asyncio streams (one connection per
concurrent worker), so it costs far less CPU than what it measures. Still: on a 2-core machine the
generator, the fake Ollama, the controller, an agent and Mosquitto share two CPUs, so at c=64 the
figures say as much about CPU contention as about the proxy. `--profile` runs the controller under
pyinstrument and writes its report next to the temporary data (path printed at the end).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.fake_ollama import READY_PREFIX
from tests.mosquitto import start_mosquitto
from tests.support import AgentProc, Controller, wait_until

TOKENS = 8  # tokens per answer: 9 NDJSON lines streamed
# Generation slots the agent reports (its `ollama_num_parallel`; unset, it would report 1): as many as the highest
# default concurrency, so admission control never queues a request in the controller and the benches (this one
# and bench_metrics.py) measure the proxy, not a queue.
PARALLEL = 64
AGENT_ENV = {"FLEET_HEARTBEAT_INTERVAL": "2", "FLEET_OLLAMA_NUM_PARALLEL": str(PARALLEL)}
# The fake binds its listening socket with proto 0, so plain asyncio never sets TCP_NODELAY on its
# connections: after the first line of a streamed answer on a reused connection, Nagle holds the rest
# until the delayed ACK (~40 ms). That would swamp what is measured here, so the bench runs the same fake
# with the socket created as IPPROTO_TCP (the controller runs on uvloop, which sets TCP_NODELAY anyway).
FAKE_NODELAY = """
import socket, sys
import tests.fake_ollama as fake

def bind_socket(host="127.0.0.1", port=0):
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock

fake.bind_socket = bind_socket
sys.exit(fake.main(sys.argv[1:]))
"""
WARMUP = 50  # requests per target before measuring
BODY_STREAM = json.dumps({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}).encode()
BODY_PLAIN = json.dumps({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}],
                         "stream": False}).encode()


@dataclass
class Result:
    ttfb: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    errors: int = 0
    wall: float = 0.0

    @property
    def count(self) -> int:
        return len(self.total) + self.errors

    def rps(self) -> float:
        return len(self.total) / self.wall if self.wall else 0.0


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


class Conn:
    """One keep-alive HTTP/1.1 connection: POST, then read status, headers and a (chunked) body."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, float, float]:
        """(status, seconds to the first body byte, seconds to the end)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        t0 = time.perf_counter()
        self.writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (path.encode(), self.host.encode(), len(body), body))
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("closed")
        status = int(status_line.split()[1])
        length, chunked = None, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        first = None
        if chunked:
            while True:
                size = int((await self.reader.readline()).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readline()
                    break
                await self.reader.readexactly(size + 2)
                if first is None:
                    first = time.perf_counter()
        else:
            await self.reader.readexactly(length or 0)
            first = time.perf_counter()
        end = time.perf_counter()
        return status, (first or end) - t0, end - t0

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def run(url: str, path: str, body: bytes, concurrency: int, requests: int) -> Result:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    res = Result()
    left = requests

    async def worker() -> None:
        nonlocal left
        conn = Conn(host, int(port))
        try:
            while left > 0:
                left -= 1
                try:
                    status, ttfb, total = await conn.post(path, body)
                except (OSError, ValueError, asyncio.IncompleteReadError):
                    res.errors += 1
                    conn.close()
                    conn = Conn(host, int(port))
                    continue
                if status != 200:
                    res.errors += 1
                else:
                    res.ttfb.append(ttfb)
                    res.total.append(total)
        finally:
            conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    res.wall = time.perf_counter() - t0
    return res


def ms(x: float) -> str:
    return f"{x * 1000:7.2f}"


def report(c: int, mode: str, direct: Result, proxied: Result) -> dict[str, float]:
    row = {
        "ttfb_p50": pct(proxied.ttfb, 0.5) - pct(direct.ttfb, 0.5),
        "ttfb_p99": pct(proxied.ttfb, 0.99) - pct(direct.ttfb, 0.99),
        "total_p50": pct(proxied.total, 0.5) - pct(direct.total, 0.5),
        "total_p99": pct(proxied.total, 0.99) - pct(direct.total, 0.99),
        "ratio": proxied.rps() / direct.rps() if direct.rps() else 0.0,
        "errors": (direct.errors + proxied.errors) / max(direct.count + proxied.count, 1),
        "cpu_us": 0.0,
    }
    print(f"c={c:<3} {mode:<6} | direct ttfb p50/p99 {ms(pct(direct.ttfb, .5))}/{ms(pct(direct.ttfb, .99))} "
          f"total {ms(pct(direct.total, .5))}/{ms(pct(direct.total, .99))} {direct.rps():7.0f} rps | "
          f"proxy ttfb {ms(pct(proxied.ttfb, .5))}/{ms(pct(proxied.ttfb, .99))} "
          f"total {ms(pct(proxied.total, .5))}/{ms(pct(proxied.total, .99))} {proxied.rps():7.0f} rps | "
          f"added ttfb {ms(row['ttfb_p50'])}/{ms(row['ttfb_p99'])} total {ms(row['total_p50'])}/"
          f"{ms(row['total_p99'])} ms | rps ratio {row['ratio']:.2f} | errors {direct.errors}+{proxied.errors}")
    return row


def merge(into: Result, part: Result) -> None:
    into.ttfb += part.ttfb
    into.total += part.total
    into.errors += part.errors
    into.wall += part.wall


async def bench(fake_url: str, proxy_url: str, concurrency: list[int], requests: int,
                rounds: int, controller_pid: int) -> dict[tuple[int, str], dict[str, float]]:
    """Direct and proxied alternate in `rounds` blocks, so background load on a shared machine hits both.
    The controller's own CPU time per proxied request is measured too: unlike latency, it does not
    depend on what else the machine runs."""
    controller = psutil.Process(controller_pid)
    rows = {}
    for url in (fake_url, proxy_url):  # warm connections, code paths, the fake's loaded model
        await run(url, "/api/chat", BODY_STREAM, 4, WARMUP)
    for c in concurrency:
        n = max(requests, c * 10 * rounds) // rounds
        for mode, body in (("stream", BODY_STREAM), ("plain", BODY_PLAIN)):
            direct, proxied = Result(), Result()
            cpu = 0.0
            for i in range(rounds):
                pair = [(fake_url, direct), (proxy_url, proxied)]
                for url, res in pair if i % 2 == 0 else reversed(pair):
                    before = sum(controller.cpu_times()[:2])
                    merge(res, await run(url, "/api/chat", body, c, n))
                    if res is proxied:
                        cpu += sum(controller.cpu_times()[:2]) - before
            rows[(c, mode)] = report(c, mode, direct, proxied)
            rows[(c, mode)]["cpu_us"] = cpu / max(proxied.count, 1) * 1e6
            print(f"       controller CPU per proxied request: {rows[(c, mode)]['cpu_us']:.0f} us")
    return rows


class Fake:
    """The fake Ollama as a process (see FAKE_NODELAY)."""

    def __init__(self, config: dict[str, object], name: str = "bench", script: str = FAKE_NODELAY) -> None:
        root = Path(__file__).resolve().parents[2]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script, "--name", name, "--config-json", json.dumps(config),
             "--parent-pid", str(os.getpid())],
            cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(READY_PREFIX):
                self.url = line.split()[1]
                return
        raise RuntimeError("fake ollama did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class BenchController(Controller):
    def wait_ready(self, timeout: float = 60.0) -> None:
        try:
            super().wait_ready(timeout)
        except BaseException:
            self.kill()  # not yet in `procs`: nobody else would stop it
            raise


class ProfiledController(BenchController):
    """The controller under pyinstrument (text report written when it stops)."""

    def start(self) -> None:
        out = self.log_path.with_suffix(".profile.txt")
        root = Path(__file__).resolve().parents[2]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pyinstrument", "-r", "text", "-o", str(out), "-m", "ollama_fleet.cli", *self.args],
                env={**{k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}, "PYTHONPATH": str(root),
                     **self.env},
                cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=2000, help="requests per measurement (at least 10 x c x rounds)")
    p.add_argument("--rounds", type=int, default=4, help="alternating direct/proxied blocks per measurement")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--profile", action="store_true", help="profile the controller with pyinstrument")
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    broker = start_mosquitto(tmp / "mosquitto")
    procs: list = []
    try:
        broker.add_user("bench-a")
        fake = Fake({"tokens": TOKENS})
        procs.append(fake)
        cls = ProfiledController if args.profile else BenchController
        ctl = cls(tmp, broker.url("controller"), {"FLEET_LOG_LEVEL": "WARNING", "FLEET_FLUSH_INTERVAL": "1"})
        procs.append(ctl)
        procs.append(AgentProc(tmp, "bench-a", broker.url("bench-a"), fake.url, AGENT_ENV))
        wait_until(lambda: (a := ctl.agent("bench-a")) and a["routable"] and "llama3.2:latest" in a["models"]
                   and a["capacity"] == PARALLEL, 20, what="agent routable, with its slots")
        print(f"cpus: {os.cpu_count()} (load generator, fake Ollama, controller, agent and Mosquitto share them)")
        rows = asyncio.run(bench(fake.url, ctl.url, args.concurrency, args.requests, args.rounds, ctl.pid))
        recorded = ctl.http.get("/api/requests", params={"per_page": 25}).json()["total"]
        print(f"request log rows recorded: {recorded}")
        targets = []
        if (1, "stream") in rows:
            r = rows[(1, "stream")]
            targets += [("added TTFB p50 <= 1 ms at c=1 (stream)", r["ttfb_p50"] <= 0.001),
                        ("added TTFB p99 <= 3 ms at c=1 (stream)", r["ttfb_p99"] <= 0.003)]
        if (64, "stream") in rows:
            for mode in ("stream", "plain"):
                r = rows[(64, mode)]
                targets += [(f"added total p99 <= 25 ms at c=64 ({mode})", r["total_p99"] <= 0.025),
                            (f"throughput >= 50 % of direct at c=64 ({mode})", r["ratio"] >= 0.5)]
        targets.append(("zero errors", all(r["errors"] == 0 for r in rows.values())))
        for what, ok in targets:
            print(f"  [{'ok' if ok else 'MISSED'}] {what}")
    finally:
        for proc in reversed(procs):
            (proc.close if hasattr(proc, "close") else proc.stop)()
        broker.stop()
    if args.profile:
        print(f"controller profile: {tmp}/controller-{ctl.port}.profile.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
