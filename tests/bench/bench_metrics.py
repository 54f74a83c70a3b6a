"""What request metrics cost the proxy: the same load through a controller with `metrics` on and one with
it off, in the same run, plus the cost of one RequestStats.observe() in-process.

    uv run python tests/bench/bench_metrics.py [--requests 3000] [--rounds 6] [--concurrency 1 16]

Two controllers (each with its own broker and agent, one shared fake Ollama) take the load in
alternating blocks, so background load on a shared machine hits both alike. Printed per concurrency and
mode (streamed /api/chat, and stream:false): requests/s on / off, the p50 total latency difference, and
the controllers' CPU time per request (steadier than latency on a busy machine). Goals (issue 11):
<= 3 % throughput cost, <= 20 us added p50.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ollama_fleet.controller.metrics.requests import Observation, RequestStats
from tests.bench.bench_proxy import AGENT_ENV, BODY_PLAIN, BODY_STREAM, PARALLEL, TOKENS, WARMUP, BenchController, \
    Fake, Result, merge, pct, run
from tests.mosquitto import start_mosquitto
from tests.support import AgentProc, wait_until


def micro(n: int = 200_000) -> float:
    """Microseconds per Observation built and observed (a known model; times spread over slices)."""
    stats = RequestStats(lambda m: True)
    t0 = time.perf_counter()
    for i in range(n):
        stats.observe(Observation("/api/chat", "llama3.2:latest", "n1", 200, None, 0.5, 0.05, 0.02, 0.0003,
                                  12, 40, 0, 1000.0 + i * 0.001))
    return (time.perf_counter() - t0) / n * 1e6


async def bench(urls: dict[str, str], pids: dict[str, int], concurrency: list[int], requests: int,
                rounds: int) -> list[tuple[str, float, float, float]]:
    procs = {k: psutil.Process(p) for k, p in pids.items()}
    for url in urls.values():
        await run(url, "/api/chat", BODY_STREAM, 4, WARMUP)
    rows = []
    for c in concurrency:
        n = max(requests, c * 10 * rounds) // rounds
        for mode, body in (("stream", BODY_STREAM), ("plain", BODY_PLAIN)):
            res = {k: Result() for k in urls}
            cpu = dict.fromkeys(urls, 0.0)
            for i in range(rounds):
                order = ["on", "off"] if i % 2 == 0 else ["off", "on"]
                for k in order:
                    before = sum(procs[k].cpu_times()[:2])
                    merge(res[k], await run(urls[k], "/api/chat", body, c, n))
                    cpu[k] += sum(procs[k].cpu_times()[:2]) - before
            on, off = res["on"], res["off"]
            ratio = on.rps() / off.rps() if off.rps() else 0.0
            added = pct(on.total, 0.5) - pct(off.total, 0.5)
            cpu_on, cpu_off = (cpu[k] / max(res[k].count, 1) * 1e6 for k in ("on", "off"))
            print(f"c={c:<3} {mode:<6} | on {on.rps():7.0f} rps p50 {pct(on.total, .5) * 1e3:6.3f} ms | "
                  f"off {off.rps():7.0f} rps p50 {pct(off.total, .5) * 1e3:6.3f} ms | rps on/off {ratio:.3f} | "
                  f"added p50 {added * 1e6:+6.0f} us | controller CPU/request on {cpu_on:.0f} us, off {cpu_off:.0f} us"
                  f" | errors {on.errors}+{off.errors}")
            rows.append((f"c={c} {mode}", ratio, added, cpu_on - cpu_off))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=3000, help="requests per measurement and controller")
    p.add_argument("--rounds", type=int, default=6, help="alternating on/off blocks per measurement")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--control", action="store_true", help="A/A run: metrics off in both controllers, to see "
                   "how far apart two identical setups measure on this machine")
    args = p.parse_args()

    print(f"observe(): {micro():.2f} us per request (Observation built + observed, in-process)")
    tmp = Path(tempfile.mkdtemp(prefix="bench-metrics-"))
    procs: list = []
    brokers = []
    try:
        fake = Fake({"tokens": TOKENS})
        procs.append(fake)
        ctls = {}
        for k in ("on", "off"):
            d = tmp / k
            d.mkdir()
            broker = start_mosquitto(d / "mosquitto")
            brokers.append(broker)
            node = f"bench-{k}"
            broker.add_user(node)
            ctl = BenchController(d, broker.url("controller"), {
                "FLEET_LOG_LEVEL": "WARNING", "FLEET_FLUSH_INTERVAL": "1", "FLEET_METRICS": "1" if k == "on" and not args.control else "0"})
            procs.append(ctl)
            procs.append(AgentProc(d, node, broker.url(node), fake.url, AGENT_ENV))
            ctls[k] = ctl
        for k, ctl in ctls.items():
            wait_until(lambda ctl=ctl, k=k: (a := ctl.agent(f"bench-{k}")) and a["routable"]
                       and "llama3.2:latest" in a["models"] and a["capacity"] == PARALLEL, 20,
                       what="agent routable, with its slots")
        print(f"cpus: {os.cpu_count()} (load generator, fake Ollama, two controllers, agents, brokers share them)")
        rows = asyncio.run(bench({k: c.url for k, c in ctls.items()}, {k: c.pid for k, c in ctls.items()},
                                 args.concurrency, args.requests, args.rounds))
        if args.control:
            print("CONTROL RUN: metrics off in both; the figures below are the noise floor")
        counted = ctls["on"].http.get("/metrics").text.count("fleet_requests_total{")
        print(f"series of fleet_requests_total on the metrics-on controller: {counted}")
        for what, ratio, added, cpu in rows:
            print(f"  {what:<12} throughput cost {(1 - ratio) * 100:+5.1f} % [{'ok' if ratio >= 0.97 else 'MISSED'}]"
                  f" | added p50 {added * 1e6:+5.0f} us [{'ok' if added <= 20e-6 else 'MISSED'}]"
                  f" | added controller CPU {cpu:+.0f} us/request")
    finally:
        for proc in reversed(procs):
            (proc.close if hasattr(proc, "close") else proc.stop)()
        for broker in brokers:
            broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
