"""Admission-control benchmark (issue 12): a burst on a small fleet, and the scheduler's cost per request.

    uv run python tests/bench/bench_admission.py [--requests 1000] [--delay 0.02] [--cost-requests 20000]

Part 1, end to end (real Mosquitto, controller, 3 agents with `ollama_num_parallel` 2, fake Ollama that takes
`--delay` seconds per token, 4 tokens): a burst of `--requests` non-streamed /api/chat requests sent at once
from two API keys (70 % and 30 % of the burst, interleaved; every key's requests 20 % high, 50 % normal, 30 % low
priority, interleaved), each on its own keep-alive connection opened beforehand. Reports errors, the most generations any agent's Ollama ran at once (its own count), whether
every `high` request finished before the median `low` one, and fairness: among the `normal` requests, what
each key got served until the smaller key's last one finished (equal shares: 1.00).

Part 2, in-process: the real Admission (controller/admission/gate.py) over a real Registry with 3 agents of
capacity 2, on one event loop; per request the time spent in admission itself (open + place - the time
queued + done + close). Idle fleet (a slot is always free) against a burst (a queue of `--requests` at all
times, every release dispatching the next); prints p50/p99 of both and the difference (target: p99 added
<= 200 us).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ollama_fleet.settings import Config
from ollama_fleet.controller.admission.gate import Admission
from ollama_fleet.controller.hub import Hub
from ollama_fleet.controller.registry.live import AgentRecord, Registry
from tests.fake_ollama import start_fake_ollama
from tests.mosquitto import start_mosquitto
from tests.support import ROOT, AgentProc, Controller, wait_until

NODES = ("adm-a", "adm-b", "adm-c")
CAPACITY = 2
TIERS = ["high"] * 2 + ["normal"] * 5 + ["low"] * 3  # per ten requests of a key


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def add_key(data_dir: Path, name: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    out = subprocess.run([sys.executable, "-m", "ollama_fleet.cli", "keys", "add", name, "--data-dir", str(data_dir)],
                         env={**env, "PYTHONPATH": str(ROOT)}, cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.strip()


async def _connect(host: str, port: int, n: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """n keep-alive connections, opened in small batches before the burst (a burst of SYNs would overflow
    the listen backlog and measure TCP retransmits instead of the scheduler)."""
    conns = []
    for i in range(0, n, 50):
        conns += await asyncio.gather(*(asyncio.open_connection(host, port) for _ in range(min(50, n - i))))
    return conns


async def _post(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], host: str, body: bytes,
                headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    reader, writer = conn
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    writer.write(f"POST /api/chat HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n{head}\r\n".encode() + body)
    status = int((await reader.readline()).split()[1])
    got: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        k, _, v = line.decode().partition(":")
        got[k.strip().lower()] = v.strip()
    await reader.readexactly(int(got.get("content-length", "0")))
    return status, got


async def burst(url: str, keys: dict[str, str], n: int) -> list[dict[str, Any]]:
    """Every request sent at once, the two keys' requests interleaved (70/30), tiers interleaved per key."""
    shares = {"A": int(n * 0.7), "B": n - int(n * 0.7)}
    plan = []
    seen = {"A": 0, "B": 0}
    for i in range(n):
        key = "B" if (i * shares["B"]) // n != ((i + 1) * shares["B"]) // n else "A"
        plan.append({"key": key, "tier": TIERS[seen[key] % len(TIERS)]})
        seen[key] += 1
    body = json.dumps({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}).encode()
    host, port = url.split("//")[1].rsplit(":", 1)
    conns = await _connect(host, int(port), n)
    t0 = time.monotonic()

    async def one(r: dict[str, Any], conn: Any) -> dict[str, Any]:
        status, headers = await _post(conn, f"{host}:{port}", body, {"Authorization": f"Bearer {keys[r['key']]}",
                                                   "X-Fleet-Priority": r["tier"]})
        return {**r, "status": status, "done": time.monotonic() - t0,
                "wait_ms": int(headers.get("x-fleet-queue-wait", "0"))}
    try:
        return list(await asyncio.gather(*(one(r, c) for r, c in zip(plan, conns))))
    finally:
        for _, w in conns:
            w.close()


def end_to_end(n: int, delay: float) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-admission-"))
    broker = start_mosquitto(tmp / "mosquitto")
    procs: list[Any] = []
    try:
        ctl = Controller(tmp, broker.url("controller"), {
            "FLEET_LOG_LEVEL": "WARNING", "FLEET_MAX_QUEUE": str(2 * n), "FLEET_MAX_QUEUE_WAIT": "600",
            "FLEET_ADMIN_TOKEN": "bench-admin-token"})
        procs.append(ctl)
        fakes = {}
        for node in NODES:
            broker.add_user(node)
            fakes[node] = start_fake_ollama(node, config={"tokens": 4, "token_delay": delay})
            procs.append(fakes[node])
            procs.append(AgentProc(tmp, node, broker.url(node), fakes[node].url,
                                   {"FLEET_OLLAMA_NUM_PARALLEL": str(CAPACITY), "FLEET_HEARTBEAT_INTERVAL": "2"}))
        keys = {name: add_key(tmp, name) for name in ("A", "B")}
        wait_until(lambda: all((a := ctl.agent(node)) and a["routable"] and a["models"] and
                               a.get("capacity") == CAPACITY for node in NODES), 30, what="agents routable")
        wait_until(lambda: ctl.http.post("/api/chat", json={"model": "llama3.2"}).status_code == 401, 10,
                   what="keys in force")
        for f in fakes.values():
            f.reset_stats()
        started = time.monotonic()
        rows = asyncio.run(burst(ctl.url, keys, n))
        took = time.monotonic() - started
        errors = sum(r["status"] != 200 for r in rows)
        if errors:
            print("  statuses:", dict(Counter(r["status"] for r in rows)))
        most = max(f.stats()["max_inference_in_flight"] for f in fakes.values())
        done = {t: sorted(r["done"] for r in rows if r["tier"] == t) for t in ("high", "normal", "low")}
        high_last, low_median = done["high"][-1], statistics.median(done["low"])
        normal = sorted((r for r in rows if r["tier"] == "normal"), key=lambda r: r["done"])
        b_last = max(i for i, r in enumerate(normal) if r["key"] == "B")
        served = {k: sum(r["key"] == k for r in normal[:b_last + 1]) for k in ("A", "B")}
        ratio = served["B"] / served["A"] if served["A"] else 0.0
        waits = [r["wait_ms"] for r in rows]
        gen = 3 * delay  # the fake waits between its 4 tokens
        print(f"burst: {n} requests on {len(NODES)} agents of capacity {CAPACITY}, {gen * 1000:.0f} ms "
              f"of generation each: {took:.1f} s ({n / took:.0f} req/s; the slots allow {len(NODES) * CAPACITY / gen:.0f})")
        print(f"  errors: {errors}; most generations at once on one agent: {most} (capacity {CAPACITY})")
        print(f"  last high finished at {high_last:.2f} s; median low at {low_median:.2f} s")
        print(f"  fairness (normal tier, until key B's last): A {served['A']}, B {served['B']} -> B/A {ratio:.2f}")
        print(f"  queue wait: p50 {pct(waits, 0.5)} ms, p99 {pct(waits, 0.99)} ms, max {max(waits)} ms")
        for what, ok in (("zero errors", errors == 0), ("no agent above capacity", most <= CAPACITY),
                         ("every high before the median low", high_last < low_median),
                         ("fairness between keys within +-10 %", abs(ratio - 1.0) <= 0.10)):
            print(f"  [{'ok' if ok else 'MISSED'}] {what}")
    finally:
        for p in reversed(procs):
            (p.close if hasattr(p, "close") else p.stop)()
        broker.stop()


async def cost(requests: int, queued: int) -> list[float]:
    """Per-request seconds spent in admission, with `queued` requests waiting at all times (0: idle)."""
    registry = Registry(Hub())
    for node in NODES:
        registry.agents[node] = AgentRecord(node_id=node, first_seen=0.0, last_seen=time.time(), state="online",
                                            ollama_url="http://x", ollama_up=True, capacity=CAPACITY,
                                            models=[{"name": "m:latest"}])
    cfg = Config().replace(max_queue=queued + 100, max_queue_wait=600.0)
    admission = Admission(cfg, registry, lambda a, m: True, lambda a, m: True)
    order = list(registry.agents.values())
    out: list[float] = []
    sem = asyncio.Semaphore(len(NODES) * CAPACITY + queued)

    async def one(i: int) -> None:
        async with sem:
            assert all(a.routable for a in order)
            t = time.perf_counter()
            p = admission.open("m:latest", TIERS[i % len(TIERS)], "AB"[i % 2], None, None, None)
            assert not isinstance(p, Exception) and hasattr(p, "ticket")
            spent = time.perf_counter() - t
            t = time.perf_counter()
            before = p.waited  # type: ignore[union-attr]
            node = await admission.place(p, order)  # type: ignore[arg-type]
            spent += time.perf_counter() - t - (p.waited - before)  # type: ignore[union-attr]
            await asyncio.sleep(0)  # the generation
            t = time.perf_counter()
            admission.done(p, node, True)  # type: ignore[arg-type]
            admission.close(p, 10)  # type: ignore[arg-type]
            out.append(spent + time.perf_counter() - t)

    await asyncio.gather(*(one(i) for i in range(requests)))
    return out


def in_process(requests: int, queued: int) -> None:
    idle = asyncio.run(cost(requests, 0))
    busy = asyncio.run(cost(requests, queued))
    us = 1e6
    print(f"admission cost per request, in process ({requests} requests):")
    print(f"  idle fleet: p50 {pct(idle, 0.5) * us:.1f} us, p99 {pct(idle, 0.99) * us:.1f} us")
    print(f"  {queued} queued: p50 {pct(busy, 0.5) * us:.1f} us, p99 {pct(busy, 0.99) * us:.1f} us")
    added = (pct(busy, 0.99) - pct(idle, 0.99)) * us
    print(f"  added p99: {added:.1f} us  [{'ok' if added <= 200 else 'MISSED'}] <= 200 us")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--delay", type=float, default=0.02, help="seconds per generated token (4 tokens)")
    p.add_argument("--cost-requests", type=int, default=20000)
    p.add_argument("--skip-e2e", action="store_true")
    args = p.parse_args()
    print(f"cpus: {os.cpu_count()}")
    if not args.skip_e2e:
        end_to_end(args.requests, args.delay)
    in_process(args.cost_requests, args.requests)
    return 0


if __name__ == "__main__":
    sys.exit(main())
