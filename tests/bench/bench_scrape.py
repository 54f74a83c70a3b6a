"""Scrape benchmark: the cost of `GET /metrics` with N simulated agents (issue 11: < 50 ms at 1,000).

    uv run python tests/bench/bench_scrape.py [--agents 1000] [--gpus 2] [--rounds 20]

The controller's parts are built in-process (compose.Fleet, no I/O) and filled through the real ingest
path: each agent's birth, info, GPU inventory, models and one heartbeat go through `Ingest.handle` as the
bytes an agent publishes; each agent then answered requests for one model, so the request families carry
one series per agent too. Timed per scrape: building the families from memory (on the event loop in the
controller) and formatting them (generate_latest, on a worker thread in the controller): median and
minimum of `--rounds`.

The baseline, measured in the same run: the same samples (names, labels, values) held in prometheus_client's
own Gauge objects on a plain CollectorRegistry and exposed with generate_latest, i.e. what the library
costs for this many series anyway; the ratio says what collecting at scrape time adds on top.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from prometheus_client import CollectorRegistry, Gauge, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from ollama_fleet.controller.compose import Fleet  # noqa: E402
from ollama_fleet.controller.metrics.requests import Observation  # noqa: E402
from ollama_fleet.settings import Config  # noqa: E402

GB = 10**9
MODELS = ("llama3.2:latest", "qwen2.5:7b", "gpt-oss:20b", "mistral:7b")


def fill(fleet: Fleet, agents: int, gpus: int) -> None:
    """Every agent's documents through the ingest's message handler, then one request per agent."""
    handle = fleet.ingest.handle
    now = time.time()
    for i in range(agents):
        node, session = f"sim-{i:05d}", f"s{i:031d}"
        model = MODELS[i % len(MODELS)]

        def send(kind: str, doc: dict[str, object], node: str = node, session: str = session) -> None:
            handle(f"fleet/v1/nodes/{node}/{kind}", json.dumps({"v": 1, "session": session, "ts": now, **doc}))

        send("state", {"state": "online", "hb_interval": 5.0})
        send("info", {"hostname": f"{node}.lab", "ips": [f"10.1.{i // 250}.{i % 250}"], "cpu_count": 32,
                      "mem_total": 128 * GB, "ollama": {"url": "http://127.0.0.1:11434", "version": "0.12.6",
                                                        "up": True}})
        send("gpus", {"gpus": [{"index": g, "uuid": f"GPU-{i}-{g}", "name": "NVIDIA L40S", "mem_total": 48 * GB,
                                "driver": "550.54"} for g in range(gpus)]})
        send("models", {"models": [{"name": m, "digest": f"sha256:{n:064x}", "size": 4 * GB}
                                   for n, m in enumerate(MODELS)]})
        send("running", {"models": [{"name": model, "size": 5 * GB, "size_vram": 5 * GB}]})
        send("heartbeat", {"seq": 1, "cpu": 35.0, "mem": 41.5, "mem_used": 53 * GB, "ollama": {"up": True},
                           "gpus": [{"index": g, "util": 62.0, "mem_used": 14 * GB, "mem_total": 48 * GB,
                                     "temp": 61, "power": 280.5} for g in range(gpus)]})
        fleet.stats.observe(Observation("/api/chat", model, node, 200, None, 1.2, 0.08, 0.02, 0.0003, 40, 60, 0,
                                        time.monotonic()))


def baseline_registry(text: bytes) -> CollectorRegistry:
    """The same samples in prometheus_client's own metric objects (every sample a gauge child)."""
    reg = CollectorRegistry()
    gauges: dict[tuple[str, tuple[str, ...]], Gauge] = {}
    for fam in text_string_to_metric_families(text.decode()):
        for s in fam.samples:
            labels = tuple(sorted(s.labels))
            g = gauges.get((s.name, labels))
            if g is None:
                g = gauges[(s.name, labels)] = Gauge(s.name, fam.documentation, labels, registry=reg)
            (g.labels(**s.labels) if labels else g).set(s.value)
    return reg


class Timing:
    """Median and minimum of timed rounds, in ms: the median is the typical scrape, the minimum what it
    costs when nothing else competes for the CPU (a shared 2-core machine makes the median noisy)."""

    def __init__(self, fn: Callable[[], object], rounds: int) -> None:
        fn()  # warm
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        self.median, self.min = statistics.median(times) * 1000, min(times) * 1000

    def __str__(self) -> str:
        return f"{self.median:.1f} ms (min {self.min:.1f})"


def phase(agents: int, gpus: int, rounds: int) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        fleet = Fleet(Config(data_dir=tmp, auto_distribute=False))
        metrics = fleet.metrics
        empty = Timing(metrics.exposition, rounds)
        fill(fleet, agents, gpus)
        text = metrics.exposition()
        samples = sum(1 for line in text.splitlines() if line and not line.startswith(b"#"))
        build = Timing(metrics.snapshot, rounds)
        snap = metrics.snapshot()
        fmt = Timing(lambda: generate_latest(snap), rounds)
        scrape = Timing(metrics.exposition, rounds)
        base = baseline_registry(text)
        baseline = Timing(lambda: generate_latest(base), rounds)
    return (f"{agents} agents x {gpus} GPU: {samples} samples, {len(text) / 1024:.0f} KiB | scrape {scrape} = "
            f"build {build} on the loop + format {fmt} | baseline (prometheus_client Gauges, same samples) "
            f"{baseline} -> ratio {scrape.median / baseline.median:.2f} (min {scrape.min / baseline.min:.2f}) | "
            f"empty fleet {empty} | target < 50 ms: {'ok' if scrape.median < 50 else 'MISSED'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4], help="GPUs per agent, one phase each")
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    for gpus in args.gpus:
        print(phase(args.agents, gpus, args.rounds), flush=True)


if __name__ == "__main__":
    main()
