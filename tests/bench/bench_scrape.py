"""Scrape benchmark: the cost of `GET /metrics` with N simulated agents (issue 11: < 50 ms at 1,000).

    uv run python tests/bench/bench_scrape.py [--agents 1000] [--gpus 1 2 4] [--rounds 20]

The controller's parts are built in-process (compose.Fleet, no I/O) and filled through the real ingest
path: each agent's birth, info, GPU inventory, models and one heartbeat go through `Ingest.handle` as the
bytes an agent publishes; each agent then answered requests for one model, so the request families carry
one series per agent too.

Timed per scrape, as median and minimum of `--rounds` in wall time and the median in this thread's CPU
time (which waiting for a core on a shared machine does not inflate):
- scrape: building the families from memory (on the event loop in the controller) and formatting them
  (on a worker thread in the controller), each round with the formatter's texts of the last scrape
  forgotten, so no family is reused: the worst case, a fleet where every series moved since the last
  scrape. The target applies to this one, judged on the CPU median (what the scrape costs) and on the
  wall median (what it took on this machine, waits for a core included).
- build and format, the two parts of it; format also with prometheus_client's default escaping (what the
  controller used before VERBATIM, controller/metrics/fleet.py), and the texts are checked to be the same.
- idle fleet: the scrape after every agent sent a new heartbeat (new CPU, memory and GPU figures, not
  timed) and nothing else happened, as between two scrapes of an idle fleet: the families that did not
  move keep their text. The text is checked against one call of generate_latest on the same families.

The baseline, measured in the same run: the same samples (names, labels, values) held in prometheus_client's
own Gauge objects on a plain CollectorRegistry and exposed with generate_latest, i.e. what the library
costs for this many series anyway; the ratio says what collecting at scrape time costs against it.
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

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ollama_fleet.controller.compose import Fleet
from ollama_fleet.controller.metrics.fleet import VERBATIM
from ollama_fleet.controller.metrics.requests import Observation
from ollama_fleet.settings import Config

GB = 10**9
MODELS = ("llama3.2:latest", "qwen2.5:7b", "gpt-oss:20b", "mistral:7b")
TARGET_MS = 50.0


def node(i: int) -> tuple[str, str]:
    """Agent i's node id and session."""
    return f"sim-{i:05d}", f"s{i:031d}"


def send(fleet: Fleet, i: int, kind: str, doc: dict[str, object]) -> None:
    """One document of agent i through the ingest's message handler, as the agent publishes it."""
    nid, session = node(i)
    fleet.ingest.handle(f"fleet/v1/nodes/{nid}/{kind}",
                        json.dumps({"v": 1, "session": session, "ts": time.time(), **doc}))


def heartbeat(fleet: Fleet, i: int, gpus: int, seq: int) -> None:
    """Agent i's heartbeat number `seq`: its figures move a little with each one, as a working GPU's do."""
    d = (seq - 1) % 7  # the first heartbeat: round figures
    send(fleet, i, "heartbeat", {
        "seq": seq, "cpu": 35.0 + d, "mem": 41.5, "mem_used": 53 * GB + d * 2**20, "ollama": {"up": True},
        "gpus": [{"index": g, "util": 62.0 + d, "mem_used": 14 * GB + d * 2**20, "mem_total": 48 * GB,
                  "temp": 61 + d % 3, "power": 280.5 + d} for g in range(gpus)]})


def fill(fleet: Fleet, agents: int, gpus: int) -> None:
    """Every agent's documents, then one request per agent."""
    for i in range(agents):
        nid, _ = node(i)
        model = MODELS[i % len(MODELS)]
        send(fleet, i, "state", {"state": "online", "hb_interval": 5.0})
        send(fleet, i, "info", {"hostname": f"{nid}.lab", "ips": [f"10.1.{i // 250}.{i % 250}"], "cpu_count": 32,
                                "mem_total": 128 * GB, "ollama": {"url": "http://127.0.0.1:11434",
                                                                  "version": "0.12.6", "up": True}})
        send(fleet, i, "gpus", {"gpus": [{"index": g, "uuid": f"GPU-{i}-{g}", "name": "NVIDIA L40S",
                                          "mem_total": 48 * GB, "driver": "550.54"} for g in range(gpus)]})
        send(fleet, i, "models", {"models": [{"name": m, "digest": f"sha256:{n:064x}", "size": 4 * GB}
                                             for n, m in enumerate(MODELS)]})
        send(fleet, i, "running", {"models": [{"name": model, "size": 5 * GB, "size_vram": 5 * GB}]})
        heartbeat(fleet, i, gpus, 1)
        fleet.stats.observe(Observation("/api/chat", model, nid, 200, None, 1.2, 0.08, 0.02, 0.0003, 40, 60, 0,
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
    """Median and minimum of timed rounds in wall time, and the median in this thread's CPU time, in ms: the
    median is the typical scrape, the minimum what it costs when nothing else competes for the CPU, the CPU
    time what it costs whatever competes (a shared 2-core machine makes the wall median noisy). `before`
    runs ahead of each round, untimed."""

    def __init__(self, fn: Callable[[], object], rounds: int, before: Callable[[], object] = lambda: None) -> None:
        before()
        fn()  # warm
        times, cpu = [], []
        for _ in range(rounds):
            before()
            c, t = time.thread_time(), time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
            cpu.append(time.thread_time() - c)
        self.median, self.min = statistics.median(times) * 1000, min(times) * 1000
        self.cpu = statistics.median(cpu) * 1000

    def __str__(self) -> str:
        return f"{self.median:.1f} ms (min {self.min:.1f}, cpu {self.cpu:.1f})"


def phase(agents: int, gpus: int, rounds: int) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        fleet = Fleet(Config(data_dir=tmp, auto_distribute=False))
        metrics = fleet.metrics
        empty = Timing(metrics.exposition, rounds)
        fill(fleet, agents, gpus)
        text = metrics.exposition()
        samples = sum(1 for line in text.splitlines() if line and not line.startswith(b"#"))

        def forget() -> None:
            metrics.format.last = {}

        build = Timing(metrics.snapshot, rounds)
        snap = metrics.snapshot()
        fmt = Timing(lambda: metrics.format(snap), rounds, forget)
        plain = Timing(lambda: generate_latest(snap), rounds)  # the library's default escaping
        forget()
        assert metrics.format(snap) == generate_latest(snap), "VERBATIM changed the text"
        scrape = Timing(metrics.exposition, rounds, forget)

        seq = iter(range(2, 10**9))

        def beat() -> None:
            n = next(seq)
            for i in range(agents):
                heartbeat(fleet, i, gpus, n)

        idle = Timing(metrics.exposition, rounds, beat)
        beat()
        metrics.exposition()
        beat()
        assert metrics.exposition() == generate_latest(metrics.snapshot()), "a kept text is not the family's"
        base = baseline_registry(text)
        baseline = Timing(lambda: generate_latest(base), rounds)
    escaping = "verbatim" if metrics.format.escaping == VERBATIM else "default (VERBATIM refused)"
    return (f"{agents} agents x {gpus} GPU: {samples} samples, {len(text) / 1024:.0f} KiB | scrape {scrape} = "
            f"build {build} on the loop + format {fmt} (escaping {escaping}; with the default escaping "
            f"{plain}) | idle fleet, after every agent's new heartbeat: {idle} | baseline (prometheus_client "
            f"Gauges, same samples) {baseline} -> ratio {scrape.median / baseline.median:.2f} (min "
            f"{scrape.min / baseline.min:.2f}) | empty fleet {empty} | target < {TARGET_MS:.0f} ms, worst case: "
            f"{'ok' if scrape.cpu < TARGET_MS else 'MISSED'} in CPU time, "
            f"{'ok' if scrape.median < TARGET_MS else 'MISSED'} in wall time")


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
