"""Body-limit benchmark: the controller's memory while six clients send maximum-size bodies at once.

    uv run python tests/bench/bench_body_limit.py [--max-body-bytes 67108864] [--clients 6] [--rounds 3] [--chunked]

Starts Mosquitto (shipped config), a controller (default `max_body_bytes` unless given), an agent and the
fake Ollama, then per round sends `--clients` concurrent /api/chat requests of exactly `max_body_bytes`
(a base64 "image"; `--chunked`: without Content-Length) and one of max+1 (must be 413). It samples the
controller's RSS every 10 ms and prints the baseline, the peak during each round, the RSS once the round
is over, and the deltas. Target (issue 9): peak delta <= 64 MB, and memory back near the baseline after.
Figures only: nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.fake_ollama import start_fake_ollama
from tests.mosquitto import start_mosquitto
from tests.support import AgentProc, Controller, wait_until

SAMPLE_EVERY = 0.01  # seconds between RSS samples
SETTLE = 2.0  # seconds of samples after a round: the RSS "after" is their minimum
MB = 1e6


def body_of(size: int, seed: int) -> bytes:
    doc = {"model": "llama3.2", "stream": False,
           "messages": [{"role": "user", "content": f"image {seed}", "images": [""]}]}
    room = size - len(json.dumps(doc).encode())
    doc["messages"][0]["images"][0] = base64.b64encode(os.urandom(room))[:room].decode()
    out = json.dumps(doc).encode()
    assert len(out) == size
    return out


def pieces(data: bytes, n: int = 1 << 20) -> Iterator[bytes]:
    for i in range(0, len(data), n):
        yield data[i:i + n]


class Sampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.peak = 0
        self.running = True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(SAMPLE_EVERY)


def settle(pid: int) -> int:
    proc = psutil.Process(pid)
    low = proc.memory_info().rss
    end = time.monotonic() + SETTLE
    while time.monotonic() < end:
        low = min(low, proc.memory_info().rss)
        time.sleep(SAMPLE_EVERY * 5)
    return low


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-body-bytes", type=int, default=0, help="0: the controller's default")
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--chunked", action="store_true", help="send without Content-Length")
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-body-"))
    broker = start_mosquitto(tmp / "mosquitto")
    procs: list = []
    try:
        broker.add_user("bench-a")
        fake = start_fake_ollama("bench", config={"tokens": 4})
        procs.append(fake)
        env = {"FLEET_LOG_LEVEL": "WARNING"}
        if args.max_body_bytes:
            env["FLEET_MAX_BODY_BYTES"] = str(args.max_body_bytes)
        ctl = Controller(tmp, broker.url("controller"), env)
        procs.append(ctl)
        procs.append(AgentProc(tmp, "bench-a", broker.url("bench-a"), fake.url, {"FLEET_HEARTBEAT_INTERVAL": "2"}))
        wait_until(lambda: (a := ctl.agent("bench-a")) and a["routable"] and "llama3.2:latest" in a["models"], 20,
                   what="agent routable")
        from ollama_fleet.settings import SETTINGS

        limit = args.max_body_bytes or int(next(s.default for s in SETTINGS if s.name == "max_body_bytes"))
        bodies = [body_of(limit, i) for i in range(args.clients)]
        digests = {hashlib.sha256(b).hexdigest() for b in bodies}
        over = body_of(limit + 1, 99)
        http = httpx.Client(base_url=ctl.url, timeout=300, trust_env=False)
        assert http.post("/api/chat", content=body_of(2000, 0)).status_code == 200  # warm code paths
        base = settle(ctl.pid)
        print(f"max_body_bytes: {limit} ({limit / MB:.1f} MB); {args.clients} concurrent clients; "
              f"{'chunked' if args.chunked else 'Content-Length'}; cpus: {os.cpu_count()}")
        print(f"controller RSS baseline: {base / MB:.1f} MB")

        def send(i: int) -> int:
            with httpx.Client(base_url=ctl.url, timeout=300, trust_env=False) as c:
                content = pieces(bodies[i]) if args.chunked else bodies[i]
                return c.post("/api/chat", content=content).status_code

        for rnd in range(1, args.rounds + 1):
            sampler = Sampler(ctl.pid)
            sampler.start()
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                statuses = list(pool.map(send, range(args.clients)))
            wall = time.perf_counter() - t0
            sampler.running = False
            sampler.join()
            after = settle(ctl.pid)
            seen = {d["sha256"] for d in fake.stats()["body_digests"] if d["bytes"] == limit}
            print(f"round {rnd}: statuses {sorted(set(statuses))}, bodies intact at Ollama: {digests <= seen}, "
                  f"{args.clients * limit / MB / wall:.0f} MB/s; RSS peak {sampler.peak / MB:.1f} MB "
                  f"(+{(sampler.peak - base) / MB:.1f}), after {after / MB:.1f} MB (+{(after - base) / MB:.1f})")
        r = http.post("/api/chat", content=over)
        print(f"max+1 bytes: HTTP {r.status_code} {r.text[:100]}")
        print(f"[{'ok' if sampler.peak - base <= 64 * MB else 'MISSED'}] peak delta <= 64 MB")
    finally:
        for proc in reversed(procs):
            (proc.close if hasattr(proc, "close") else proc.stop)()
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
