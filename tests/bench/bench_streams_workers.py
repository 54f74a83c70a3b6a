"""Long streams through 1, 2 and 4 controller processes (`fleet controller --workers N`) vs direct (issue 13).

    uv run python tests/bench/bench_streams_workers.py [--streams 1000] [--rate 50] [--seconds 10]
        [--workers 1 2 4] [--fakes 4] [--rounds 1] [--profile]

One run, one configuration after the other: `--streams` concurrent streamed `/api/chat` requests, each
generating `--rate` tokens/s for longer than the measurement, first straight to the fake Ollamas (the
baseline), then through `fleet controller --workers N` for each N. Per configuration: the gap between
consecutive NDJSON lines as the client sees them (p50/p99/p99.9/max over `--seconds` of steady streaming,
after every stream has started), tokens/s delivered against `streams x rate`, errors, and the CPU each part
used. Goal (issue 13): p99 gap within +10 ms of direct with enough workers.

Parts: Mosquitto with the shipped config (accounts `controller`, `controller-2`..`controller-N` with one
password, as docs/scaling.md prescribes), `--fakes` fake Ollama processes each with its agent (capacity
`--streams`, so admission never queues), the controller (SQLite in its data dir, shared by the workers).
The fakes run on uvloop with TCP_NODELAY (bench_proxy.py's FAKE_NODELAY): Ollama is a Go server, and the
baseline must measure the client and the fake, not asyncio's default loop.

The client is one process on uvloop with a bare asyncio.Protocol per stream (no HTTP library): it counts
complete lines per read and timestamps the read. Its CPU share is printed; when it or the machine is
saturated (2 shared cores here), the direct baseline shows it first, and the added gap says nothing about
the controller: lower `--streams`. The controller's CPU per relayed token is the figure that does not
depend on the machine: cores needed = streams x rate x that figure. `--profile` adds one configuration with
a single controller process under cProfile (CPU clock) and prints its top functions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pstats
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.bench_proxy import FAKE_NODELAY
from tests.bench.bench_proxy import Fake as ProxyFake
from tests.mosquitto import MosquittoProcess, start_mosquitto
from tests.support import AgentProc, Controller, wait_until

RAMP_S = 3.0  # streams are opened evenly over this long (a thundering herd measures accept, not streaming)
START_S = 20.0  # after the ramp, every stream must have its status line within this (else it counts as not live)
SETTLE_S = 2.0  # after the last stream started, before measuring
MARGIN_S = 15.0  # tokens planned beyond the measurement: no stream ends inside it
IDLE_S = 3.0  # the controller's CPU with no request, before the streams: the fixed cost of each worker
DRAIN_S = 30.0  # after hanging up, the fakes must see every generation end within this
# The controller under cProfile with a CPU clock: where its CPU goes, not where it waits (pyinstrument
# samples wall time, which on a saturated machine is mostly waiting for a core).
# It profiles only between SIGUSR1 and SIGUSR2 (the measured window: not the start-up's imports).
PROFILE_BOOT = """
import cProfile, runpy, signal, sys, time
out = sys.argv.pop(1)
prof = cProfile.Profile(time.process_time)
signal.signal(signal.SIGUSR1, lambda *_: prof.enable())
signal.signal(signal.SIGUSR2, lambda *_: prof.disable())
try:
    runpy.run_module("ollama_fleet.cli", run_name="__main__", alter_sys=True)
except SystemExit:
    pass
finally:
    prof.disable()
    prof.dump_stats(out)
"""
PROFILE_TOP = 25  # functions printed, by own CPU time
FAKE_UVLOOP = "import uvloop\nuvloop.install()\n" + FAKE_NODELAY
BODY = json.dumps({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}).encode()


@dataclass
class Window:
    """What the client saw while measuring."""

    gaps: list[float] = field(default_factory=list)  # seconds between a read with lines and the stream's previous one
    together: int = 0  # further lines that came in the same read (a gap of 0)
    tokens: int = 0
    errors: int = 0
    live: int = 0  # streams with a 200 and not ended when measuring began

    def pct(self, q: float) -> float:
        """Percentile of the per-line gaps (the `together` zeros included)."""
        n = len(self.gaps) + self.together
        if not n:
            return float("nan")
        i = min(n - 1, int(q * n)) - self.together
        return 0.0 if i < 0 else sorted(self.gaps)[i]


class Stream(asyncio.Protocol):
    """One streamed /api/chat on its own connection; counts NDJSON lines (`}\\n`) per read."""

    def __init__(self, bench: Client, host: str) -> None:
        self.bench = bench
        self.request = (b"POST /api/chat HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(BODY), BODY))
        self.head: bytes | None = b""
        self.status = 0
        self.tail = b""
        self.last: float | None = None
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport subclasses
        self.ended = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if self.head is not None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            self.status = int(self.head[9:12])
            data, self.head = self.head[end + 4:], None
            if self.status != 200:
                self.bench.window.errors += 1
                self.ended = True
                self.transport.close()
                return
        n = (self.tail + data).count(b"}\n")
        self.tail = data[-1:]
        if not n:
            return
        w = self.bench.window
        if self.bench.measuring:
            if self.last is not None:
                w.gaps.append(now - self.last)
            w.together += n - 1
            w.tokens += n
        self.last = now

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.bench.closing and not self.ended:
            self.bench.window.errors += 1
        self.ended = True


class Client:
    """`streams` concurrent streams over `targets` (round robin), opened over RAMP_S."""

    def __init__(self) -> None:
        self.window = Window()
        self.measuring = False
        self.closing = False
        self.streams: list[Stream] = []

    async def run(self, targets: list[str], streams: int, seconds: float,
                  around: Meter) -> Window:
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i in range(streams):
            host, port = targets[i % len(targets)].removeprefix("http://").rsplit(":", 1)
            s = Stream(self, host)
            self.streams.append(s)
            try:
                transport, _ = await loop.create_connection(lambda s=s: s, host, int(port))
                transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                self.window.errors += 1
                s.ended = True
            await asyncio.sleep(max(0.0, start + RAMP_S * (i + 1) / streams - loop.time()))
        deadline = loop.time() + START_S
        while loop.time() < deadline and not all(s.status or s.ended for s in self.streams):
            await asyncio.sleep(0.1)  # polling the streams' own state, bounded by START_S
        await asyncio.sleep(SETTLE_S)
        self.window.live = sum(1 for s in self.streams if s.status == 200 and not s.ended)
        around.start()
        self.measuring = True
        await asyncio.sleep(seconds)
        self.measuring = False
        around.stop()
        self.closing = True
        for s in self.streams:
            if s.transport is not None:
                s.transport.abort()
        return self.window


class Meter:
    """CPU seconds of each part of the bench, and of the whole machine, over the measured window."""

    def __init__(self, parts: dict[str, list[psutil.Process]], profiled: int | None = None) -> None:
        self.parts = parts
        self.profiled = profiled  # a pid running PROFILE_BOOT: profiles while measuring
        self.cpu: dict[str, float] = {}
        self.wall = 0.0

    @staticmethod
    def _cpu(procs: list[psutil.Process]) -> float:
        total = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def _machine(self) -> float:
        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._m0 = self._machine()
        self._c0 = {k: self._cpu(v) for k, v in self.parts.items()}
        if self.profiled:
            os.kill(self.profiled, signal.SIGUSR1)

    def stop(self) -> None:
        if self.profiled:
            os.kill(self.profiled, signal.SIGUSR2)
        self.wall = time.perf_counter() - self._t0
        self.cpu = {k: self._cpu(v) - self._c0[k] for k, v in self.parts.items()}
        self.cpu["machine"] = self._machine() - self._m0


class Fake(ProxyFake):
    """A fake Ollama process on uvloop (see FAKE_UVLOOP)."""

    def __init__(self, name: str, config: dict[str, object]) -> None:
        super().__init__(config, name, FAKE_UVLOOP)

    def generating(self) -> int:
        return int(httpx.get(f"{self.url}/_fake/stats", timeout=5, trust_env=False).json()["inference_in_flight"])


class CProfiled(Controller):
    """A controller process, under PROFILE_BOOT when `report` is given: it profiles between SIGUSR1 and
    SIGUSR2 and writes `report` when it exits."""

    def __init__(self, tmp: Path, url: str, extra: dict[str, str], wait: bool = True,
                 report: Path | None = None) -> None:
        self.report = report  # before the process starts (in Controller.__init__)
        super().__init__(tmp, url, extra, wait)

    def start(self) -> None:
        if self.report is None:
            return super().start()
        root = Path(__file__).resolve().parents[2]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", PROFILE_BOOT, str(self.report), *self.args],
                env={**{k: v for k, v in os.environ.items() if not k.startswith("FLEET_")},
                     "PYTHONPATH": str(root), **self.env},
                cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


class Workers(CProfiled):
    """`fleet controller --workers N` (N = 1: one plain controller process); `profile`: one process
    under cProfile instead (PROFILE_BOOT)."""

    def __init__(self, tmp: Path, url: str, workers: int, profile: bool = False) -> None:
        self.workers = workers
        tmp.mkdir(parents=True, exist_ok=True)
        super().__init__(tmp, url, {"FLEET_WORKERS": str(workers), "FLEET_LOG_LEVEL": "WARNING",
                                    "FLEET_FLUSH_INTERVAL": "1", "FLEET_MQTT_KEEPALIVE": "15"}, wait=False,
                         report=tmp / "controller.prof" if profile else None)
        try:
            self.wait_ready(60)
            self.wait_workers()
        except BaseException:
            self.kill_all()
            raise

    def wait_workers(self) -> None:
        """Until each worker (told apart by its pid on fresh connections, which SO_REUSEPORT spreads)
        answers with every agent routable."""
        ready: set[int] = set()

        def all_ready() -> bool:
            with httpx.Client(base_url=self.url, timeout=10, trust_env=False) as c:  # a new connection
                pid = c.get("/healthz").json()["pid"]
                agents = c.get("/api/agents").json()["agents"]
            if agents and all(a["routable"] and "llama3.2:latest" in a["models"] for a in agents):
                ready.add(pid)
            return len(ready) >= self.workers

        wait_until(all_ready, 60, interval=0.1, what=f"{self.workers} workers routing")

    def processes(self) -> list[psutil.Process]:
        assert self.proc is not None
        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]

    def kill_all(self) -> None:
        """The supervisor and its workers (one process group: start_new_session)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(5)


@dataclass
class Row:
    name: str
    window: Window
    meter: Meter
    controller_cpu: float
    idle: float = 0.0  # controller cores with no request


def measure(name: str, targets: list[str], streams: int, seconds: float, meter: Meter,
            controller_cpu: list[str], fakes: list[Fake]) -> Row:
    window = uvloop.run(Client().run(targets, streams, seconds, meter))
    wait_until(lambda: sum(f.generating() for f in fakes) == 0, DRAIN_S, interval=0.2,
               what="every generation ended after the client hung up")
    return Row(name, window, meter, sum(meter.cpu.get(k, 0.0) for k in controller_cpu))


def show(row: Row, streams: int, rate: float, direct: Row | None) -> None:
    w, m = row.window, row.meter

    def ms(x: float) -> str:
        return f"{x * 1000:7.1f}"

    def cores(part: str) -> str:
        return f"{m.cpu.get(part, 0.0) / m.wall:4.2f}"

    delivered = w.tokens / m.wall
    added = f"{(w.pct(0.99) - direct.window.pct(0.99)) * 1000:+7.1f}" if direct else "      -"
    print(f"{row.name:<10} {w.live:>5} {ms(w.pct(0.5))} {ms(w.pct(0.99))} {ms(w.pct(0.999))} "
          f"{ms(max(w.gaps, default=float('nan')))} {added} {delivered:9.0f} {delivered / (streams * rate):6.2f} "
          f"{w.errors:>4} | {cores('client')} {cores('fakes')} {cores('controller')} {cores('mosquitto')} "
          f"{cores('agents')} {cores('machine')} "
          f"| {row.controller_cpu / max(w.tokens, 1) * 1e6:6.1f} {row.idle:4.2f}", flush=True)


def print_profile(path: str) -> None:
    """The functions with the most own CPU time in the profiled controller, with their share of it."""
    stats = pstats.Stats(path)
    entries = stats.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in entries.values()) or 1.0
    print(f"controller CPU profile (cProfile, process CPU clock; {path}): own time, cumulative, calls")
    for (file, line, func), (_, calls, own, cum, _) in sorted(entries.items(), key=lambda kv: -kv[1][2])[:PROFILE_TOP]:
        where = "/".join(Path(file).parts[-2:]) if file != "~" else "builtin"
        print(f"  {own / total:6.1%} {cum / total:6.1%} {calls:>9}  {func}  {where}:{line}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=1000, help="concurrent streams")
    p.add_argument("--rate", type=float, default=50.0, help="tokens/s each stream is generated at")
    p.add_argument("--seconds", type=float, default=10.0, help="measured streaming per configuration")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="controller process counts")
    p.add_argument("--fakes", type=int, default=4, help="fake Ollama processes (each with an agent)")
    p.add_argument("--rounds", type=int, default=1, help="repeat every configuration (direct again each round)")
    p.add_argument("--profile", action="store_true", help="one more configuration: 1 process under cProfile")
    args = p.parse_args()
    tokens = int(args.rate * (RAMP_S + START_S + SETTLE_S + args.seconds + MARGIN_S))
    tmp = Path(tempfile.mkdtemp(prefix="bench-streams-"))
    broker: MosquittoProcess = start_mosquitto(tmp / "mosquitto")
    fakes: list[Fake] = []
    agents: list[AgentProc] = []
    profiled = ""
    try:
        for n in range(2, max(args.workers) + 1):  # worker N connects as controller-N, same password
            broker.add_account("controller", f"controller-{n}", password=broker.passwords["controller"])
        for i in range(args.fakes):
            node = f"bench-{i}"
            broker.add_user(node)
            fakes.append(Fake(node, {"tokens": tokens, "token_delay": 1 / args.rate}))
            agents.append(AgentProc(tmp, node, broker.url(node), fakes[-1].url,
                                    {"FLEET_HEARTBEAT_INTERVAL": "2", "FLEET_MQTT_KEEPALIVE": "15",
                                     "FLEET_OLLAMA_NUM_PARALLEL": str(args.streams)}))
        parts = {"client": [psutil.Process()], "fakes": [psutil.Process(f.proc.pid) for f in fakes],
                 "agents": [psutil.Process(a.pid) for a in agents], "mosquitto": [psutil.Process(broker.proc.pid)]}
        print(f"cpus: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f} (the client, {args.fakes} fakes, "
              f"their agents, the controller and Mosquitto share them); {args.streams} streams x {args.rate:g} "
              f"tokens/s = {args.streams * args.rate:.0f} lines/s, {args.seconds:g} s measured per row")
        print(f"{'':<10} {'live':>5} {'gap p50':>7} {'p99':>7} {'p99.9':>7} {'max':>7} {'+p99':>7} "
              f"{'tokens/s':>9} {'share':>6} {'err':>4} | cores: client fakes ctl mqtt agents machine "
              f"| ctl us/token, idle cores")

        def through(name: str, workers: int, profile: bool) -> Row:
            where = tmp / ("ctl-profiled" if profile else f"ctl-{workers}-{time.monotonic_ns()}")
            ctl = Workers(where, broker.url("controller"), workers, profile)
            try:
                procs = ctl.processes()
                idle = Meter({"controller": procs})
                idle.start()
                time.sleep(IDLE_S)  # measuring the idle controller's CPU over a fixed period
                idle.stop()
                meter = Meter({**parts, "controller": procs}, ctl.pid if profile else None)
                row = measure(name, [ctl.url], args.streams, args.seconds, meter, ["controller"], fakes)
                row.idle = idle.cpu["controller"] / idle.wall
                return row
            finally:
                ctl.close()

        for _ in range(args.rounds):
            direct = measure("direct", [f.url for f in fakes], args.streams, args.seconds, Meter(parts), [], fakes)
            show(direct, args.streams, args.rate, None)
            for n in args.workers:
                show(through(f"workers={n}", n, False), args.streams, args.rate, direct)
        if args.profile:
            show(through("profiled", 1, True), args.streams, args.rate, direct)
            profiled = str(tmp / "ctl-profiled" / "controller.prof")
        print("gap: between an NDJSON line and the stream's previous one, as the client read them (lines read "
              "together count 0); +p99: over direct; share: tokens delivered / streams x rate; cores: CPU "
              "seconds per second while measuring (machine: every process on it); idle cores: the controller's "
              f"before the streams, over {IDLE_S:g} s")
    finally:
        for a in agents:
            a.stop()
        for f in fakes:
            f.stop()
        broker.stop()
    if profiled:
        print_profile(profiled)
    shutil.rmtree(tmp, ignore_errors=True)  # kept, with the controllers' logs, when the run failed
    return 0


if __name__ == "__main__":
    sys.exit(main())
