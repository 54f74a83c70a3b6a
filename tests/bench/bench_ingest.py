"""Ingest benchmark: N simulated agents heartbeating into one controller over a real Mosquitto.

    uv run python tests/bench/bench_ingest.py [--agents 1000 2000] [--seconds 10]

Prints, per phase: heartbeats/s ingested, publish->registry latency p50/p99 (measured by the
controller against the `ts` in each heartbeat; same host clock), controller CPU and RSS. The baseline,
measured in the same run, is a bare aiomqtt subscriber on the same broker and stream: the ratio says
what the registry costs on top of receiving. Targets (issue 2): >= 5,000 heartbeats/s sustained,
p99 < 50 ms at 1,000/s, controller RSS <= 150 MB at 1,000 agents.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import socket
import threading
import time
from pathlib import Path

import aiomqtt
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.mosquitto import connect_packet, start_mosquitto  # noqa: E402
from tests.support import Controller, wait_until  # noqa: E402

def _heartbeat(node: str, seq: int) -> bytes:
    return json.dumps({"v": 1, "session": f"s-{node}", "seq": seq, "ts": time.time(), "uptime": seq,
                       "cpu": 12.5, "mem": 40.1, "mem_used": 8_000_000_000, "disk_free": 10**11,
                       "gpus": [{"index": 0, "util": 50, "mem_used": 4 * 10**9, "mem_total": 24 * 10**9,
                                 "temp": 60, "power": 120.0}],
                       "ollama": {"up": True}, "loaded": ["llama3.2:latest"]}).encode()


def _publish_packet(topic: str, payload: bytes) -> bytes:
    """A QoS 0 MQTT PUBLISH, encoded by hand: the generator must cost far less CPU than what it measures."""
    t = topic.encode()
    body = len(t).to_bytes(2, "big") + t + payload
    n, rl = len(body), bytearray()
    while True:
        n, digit = divmod(n, 128)
        rl.append(digit | (0x80 if n else 0))
        if not n:
            break
    return b"\x30" + bytes(rl) + body


class Simulator:
    """N agents on one raw MQTT connection: births once, then heartbeats at a paced rate.

    Raw pre-encoded packets keep the load generator cheap on a 2-core machine, where a paho publisher
    would compete with the broker and the controller for the same CPU.
    """

    def __init__(self, port: int, agents: int) -> None:
        self.port = port
        self.nodes = [f"sim-{i:05d}" for i in range(agents)]
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.sendall(connect_packet(client_id=f"bench-sim-{agents}"))
        if self.sock.recv(4)[:1] != b"\x20":
            raise RuntimeError("no CONNACK from the broker")

    def births(self) -> None:
        self.sock.sendall(b"".join(_publish_packet(f"fleet/v1/nodes/{node}/state", json.dumps(
            {"v": 1, "state": "online", "session": f"s-{node}", "ts": time.time(), "hb_interval": 1.0}).encode())
            for node in self.nodes))

    def run(self, rate: float, seconds: float) -> int:
        """Publish at `rate`/s (0 = as fast as the socket takes them) for `seconds`; returns the count."""
        tick = 0.02
        per_tick = max(1, int(rate * tick)) if rate else 500
        sent, i = 0, 0
        start = time.monotonic()
        while time.monotonic() < start + seconds:
            batch = []
            for _ in range(per_tick):
                node = self.nodes[i % len(self.nodes)]
                batch.append(_publish_packet(f"fleet/v1/nodes/{node}/heartbeat", _heartbeat(node, i)))
                i += 1
            self.sock.sendall(b"".join(batch))
            sent += per_tick
            if rate:
                ahead = start + sent / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)  # pacing the load generator, not waiting on a condition
        return sent

    def close(self) -> None:
        self.sock.sendall(b"\xe0\x00")  # DISCONNECT
        self.sock.close()


async def _baseline(port: int, seconds: float, ready: threading.Event, result: dict[str, float]) -> None:
    received = 0
    async with aiomqtt.Client("127.0.0.1", port, identifier="bench-baseline",
                              protocol=aiomqtt.ProtocolVersion.V5, max_queued_incoming_messages=0) as client:
        await client.subscribe("fleet/v1/nodes/+/heartbeat", qos=0)
        ready.set()
        first = last = 0.0
        lats: list[float] = []

        async def consume() -> None:
            nonlocal received, first, last
            async for m in client.messages:
                received += 1
                last = time.monotonic()
                first = first or last
                if received % 10 == 0:
                    lats.append(time.time() - json.loads(m.payload)["ts"])

        try:
            await asyncio.wait_for(consume(), seconds + 2)
        except asyncio.TimeoutError:
            pass
        result["rate"] = received / max(1e-9, last - first)
        lats.sort()
        result["p99"] = lats[int(0.99 * (len(lats) - 1))] * 1000 if lats else float("nan")


def baseline(port: int, sim: Simulator, rate: float, seconds: float) -> dict[str, float]:
    result: dict[str, float] = {}
    ready = threading.Event()
    t = threading.Thread(target=lambda: asyncio.run(_baseline(port, seconds, ready, result)))
    t.start()
    ready.wait(10)
    sent = sim.run(rate, seconds)
    t.join()
    result["sent_rate"] = sent / seconds
    return result


def controller_phase(tmp: Path, url: str, sim: Simulator, rate: float, seconds: float) -> dict[str, float]:
    c = Controller(tmp, url, {"FLEET_STALE_AFTER": "1000", "FLEET_LOG_LEVEL": "WARNING",
                              "FLEET_FLUSH_INTERVAL": "1.0"})
    try:
        sim.births()
        wait_until(lambda: len(c.agents()) >= len(sim.nodes), 30, what="all simulated agents registered")
        proc = psutil.Process(c.pid)
        before = c.http.get("/api/ingest").json()["counters"].get("heartbeat", 0)
        cpu0 = proc.cpu_times()
        t0 = time.monotonic()
        sent = sim.run(rate, seconds)
        # what arrives after the generator stops still counts (a backlog would show as latency)
        def drained() -> bool:
            counters = c.http.get("/api/ingest").json()["counters"]
            return counters.get("heartbeat", 0) + counters.get("dropped", 0) - before >= sent * 0.99

        try:
            wait_until(drained, 15, what="backlog drained")
        except AssertionError:
            print(f"  (not all heartbeats arrived: sent {sent}, {c.http.get('/api/ingest').json()})")
        elapsed = time.monotonic() - t0
        cpu1 = proc.cpu_times()
        stats = c.http.get("/api/ingest").json()
        got = stats["counters"].get("heartbeat", 0) - before
        return {
            "sent_rate": sent / seconds, "ingested_rate": got / elapsed,
            "p50": stats["heartbeat_latency_ms"]["p50"], "p99": stats["heartbeat_latency_ms"]["p99"],
            "cpu": ((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)) / elapsed * 100,
            "rss_mb": proc.memory_info().rss / 2**20, "dropped": stats["counters"].get("dropped", 0),
        }
    finally:
        c.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phases", nargs="+", default=["1000:1000", "2000:2000", "2000:5000", "2000:8000"],
                    help="AGENTS:HEARTBEATS_PER_S pairs; above one per agent per second the clock is compressed")
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        broker = start_mosquitto(Path(d) / "mqtt", anonymous=True)
        try:
            print(f"{'phase':30} {'sent/s':>7} {'ingested/s':>10} {'p50 ms':>7} {'p99 ms':>7} "
                  f"{'CPU %':>6} {'RSS MB':>7} {'vs baseline':>11}")
            for phase in args.phases:
                n, rate = (int(x) for x in phase.split(":"))
                sim = Simulator(broker.port, n)
                try:
                    base = baseline(broker.port, sim, rate, args.seconds)
                    tmp = Path(d) / f"c-{n}-{rate}"
                    tmp.mkdir()
                    r = controller_phase(tmp, broker.url(), sim, rate, args.seconds)
                finally:
                    sim.close()
                print(f"{f'{n} agents, {rate} hb/s':30} {r['sent_rate']:7.0f} {r['ingested_rate']:10.0f} "
                      f"{r['p50']:7.2f} {r['p99']:7.2f} {r['cpu']:6.1f} {r['rss_mb']:7.1f} "
                      f"{r['ingested_rate'] / base['rate']:10.2f}x   (bare subscriber {base['rate']:.0f}/s, "
                      f"p99 {base['p99']:.1f} ms; dropped {r['dropped']})", flush=True)
        finally:
            broker.stop()


if __name__ == "__main__":
    main()
