"""Model distribution benchmark: command -> first progress, and a distribute starting on 50 agents.

    uv run python tests/bench/bench_distribution.py [--agents 50] [--samples 20] [--cap 50]

Real parts: Mosquitto with the shipped config and ACL, the controller as a process, and N real
`agent.service.Agent` instances (the reference agent, in this process, one MQTT connection and one user
each) against N in-process fake Ollamas whose pulls stream progress (tests/fake_ollama.py). Times are
taken by an operator subscriber on the job topics (arrival at the broker's client) and at the HTTP API.

Phase 1: `model.pull` sent by MQTT to one agent; time to its first status (`pending`) and to the first
status with bytes downloaded (target <= 1 s). Phase 2: `POST /api/models/distribute` target `all`;
time to the 202, to every agent's first status, to every job `in_progress` on the broker and in
`GET /api/tasks` (target <= 2 s). `--cap` sets max_concurrent_pulls (default: the agent count, so all
may start; with the product default of 10 only 10 start and the rest wait as `pending`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiomqtt

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ollama_fleet.agent.service import Agent
from ollama_fleet import settings
from tests.fake_ollama import FakeOllamaServer
from tests.mosquitto import start_mosquitto
from tests.support import Controller

MB = 1_000_000
FAKE = {"pull_total": 400 * MB, "pull_speed": 10 * MB, "pull_interval": 0.2, "pull_layers": 1}


class Watch:
    """Arrival time (wall clock) at a separate `mosquitto_sub` process of each job's first document, first
    `in_progress`, first bytes, and of each pull command: measured outside this busy process."""

    def __init__(self, broker: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.first: dict[str, float] = {}
        self.running: dict[str, float] = {}
        self.bytes: dict[str, float] = {}
        self.commands: dict[str, float] = {}  # job id -> when its command passed the broker
        self.changed = asyncio.Event()
        self.loop = loop
        exe = shutil.which("mosquitto_sub")
        assert exe, "mosquitto_sub (mosquitto-clients) is required"
        watch = broker.add_account("operator")  # its own account: client ids are bound to accounts
        self.proc = subprocess.Popen(
            [exe, "-h", "127.0.0.1", "-p", str(broker.port), "-u", watch, "-P", broker.passwords[watch],
             "-q", "1", "-F", "%U %t %p", "-t", "fleet/v1/nodes/+/jobs/+", "-t", "fleet/v1/cmd/+/model.pull"],
            stdout=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            ts, topic, payload = line.rstrip("\n").split(" ", 2)
            if payload:
                self.loop.call_soon_threadsafe(self._note, float(ts), topic, json.loads(payload))

    def _note(self, ts: float, topic: str, d: dict[str, Any]) -> None:
        j = d["job_id"]
        if "/cmd/" in topic:
            self.commands.setdefault(j, ts)
        else:
            self.first.setdefault(j, ts)
            if d["status"] == "in_progress":
                self.running.setdefault(j, ts)
            if d.get("completed"):
                self.bytes.setdefault(j, ts)
        self.changed.set()

    async def until(self, pred: Any, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while not pred():
                self.changed.clear()
                await self.changed.wait()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p * len(s)))]


def ms(x: float) -> str:
    return f"{x * 1000:7.1f} ms"


async def bench(args: argparse.Namespace, tmp: Path, broker: Any, controller: Controller) -> None:
    nodes = [f"bench-{i:02d}" for i in range(args.agents)]
    fakes = [await FakeOllamaServer(n, FAKE).start() for n in nodes]
    agents = []
    for node, fake in zip(nodes, fakes, strict=True):
        cfg = settings.load(["agent"], env={
            "FLEET_MQTT_URL": broker.url(node), "FLEET_NODE_ID": node, "FLEET_OLLAMA_URL": fake.url,
            "FLEET_HEARTBEAT_INTERVAL": "5", "FLEET_MODELS_DIR": str(tmp), "FLEET_OLLAMA_TIMEOUT": "2"})
        agents.append(Agent(cfg))
    tasks = [asyncio.create_task(a.run()) for a in agents]
    watch = Watch(broker, asyncio.get_running_loop())
    http = controller.http
    try:
        t0 = time.monotonic()
        while True:  # every agent registered, routable, with a first heartbeat
            listed = (await asyncio.to_thread(http.get, "/api/agents")).json()["agents"]
            if sum(a["routable"] and bool(a["metrics"].get("seq")) for a in listed) >= len(nodes):
                break
            await asyncio.sleep(0.2)
        print(f"{len(nodes)} agents joined and routable in {time.monotonic() - t0:.1f} s "
              f"(real agent.service.Agent x {len(nodes)} in one process, fake Ollamas in-process)")

        # ---- phase 1: MQTT command -> first status / first bytes ----------------------------------
        ack, first_bytes = [], []
        async with aiomqtt.Client("127.0.0.1", broker.port, username="operator",
                                  password=broker.passwords["operator"], identifier="bench-operator") as op:
            marker = "bench-marker"  # the watcher is subscribed once it sees this
            await op.publish("fleet/v1/cmd/nobody/model.pull", json.dumps({"v": 1, "job_id": marker}), qos=1)
            await watch.until(lambda: marker in watch.commands, 10)
            for i in range(args.samples):
                node, job = nodes[i % len(nodes)], f"bench-p1-{i}"
                sent = time.time()
                await op.publish(f"fleet/v1/cmd/{node}/model.pull",
                                 json.dumps({"v": 1, "job_id": job, "model": "tinyllama"}), qos=1)
                await watch.until(lambda job=job: job in watch.bytes)
                ack.append(watch.first[job] - sent)
                first_bytes.append(watch.bytes[job] - sent)
                await op.publish(f"fleet/v1/cmd/{node}/job.cancel", json.dumps({"v": 1, "job_id": job}), qos=1)
        print(f"\nphase 1: MQTT model.pull -> job status on the broker, {len(ack)} samples")
        print(f"  first status (pending)   p50 {ms(statistics.median(ack))}  p95 {ms(pct(ack, .95))}  "
              f"max {ms(max(ack))}")
        print(f"  first bytes (progress)   p50 {ms(statistics.median(first_bytes))}  p95 "
              f"{ms(pct(first_bytes, .95))}  max {ms(max(first_bytes))}   target <= 1 s")
        await asyncio.sleep(1.5)  # let the cancellations land before phase 2 (agents free their slot)

        # ---- phase 2: distribute to every agent ---------------------------------------------------
        t0 = time.time()
        r = await asyncio.to_thread(http.post, "/api/models/distribute",
                                    json={"model_name": "llama3.1:8b", "target": "all"})
        t_202 = time.time() - t0
        assert r.status_code == 202, r.text
        ids = r.json()["task_ids"]
        group = r.json()["group"]
        started = min(args.cap, len(ids))  # the rest wait at the controller (max_concurrent_pulls)
        await watch.until(lambda: sum(i in watch.first for i in ids) >= started)
        firsts = sorted(watch.first[i] - t0 for i in ids if i in watch.first)[:started]
        t_ack = firsts[-1]
        t_cmd = sorted(watch.commands[i] for i in ids if i in watch.commands)[started - 1] - t0
        await watch.until(lambda: sum(i in watch.running for i in ids) >= started)
        t_run = sorted(watch.running[i] for i in ids if i in watch.running)[started - 1] - t0
        while True:
            page = (await asyncio.to_thread(http.get, "/api/tasks", params={
                "group": group, "status": "in_progress", "limit": 1})).json()
            if page["total"] >= started:
                break
        t_api = time.time() - t0
        await watch.until(lambda: sum(i in watch.bytes for i in ids) >= started)
        t_bytes = sorted(watch.bytes[i] for i in ids if i in watch.bytes)[started - 1] - t0
        print(f"\nphase 2: POST /api/models/distribute target=all -> {len(ids)} jobs "
              f"(max_concurrent_pulls {args.cap}: {started} may start)")
        print(f"  202 answer                          {ms(t_202)}")
        print(f"  {started} commands through the broker     {ms(t_cmd)}")
        print(f"  {started} jobs' first status (broker)     {ms(t_ack)}   (median {ms(statistics.median(firsts))})")
        print(f"  {started} jobs in_progress (broker)        {ms(t_run)}   target <= 2 s")
        print(f"  {started} jobs in_progress (GET /api/tasks) {ms(t_api)}")
        print(f"  {started} jobs with bytes downloaded      {ms(t_bytes)}")
        if started < len(ids):
            held = (await asyncio.to_thread(http.get, "/api/tasks", params={
                "group": group, "status": "pending", "limit": 1})).json()["total"]
            print(f"  held as pending by the controller   {held} (dispatched as slots free)")
    finally:
        for a in agents:
            a.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        watch.close()
        for f in fakes:
            await f.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", type=int, default=50)
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--cap", type=int, default=None, help="max_concurrent_pulls (default: --agents)")
    args = ap.parse_args()
    args.cap = args.cap or args.agents
    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="bench-distribution-"))
    names = ["controller", "operator", *(f"bench-{i:02d}" for i in range(args.agents))]
    users = {name: secrets.token_hex(12) for name in names}
    broker = start_mosquitto(tmp / "broker", users=users)
    controller = None
    try:
        controller = Controller(tmp, broker.url("controller"), {
            "FLEET_MAX_CONCURRENT_PULLS": str(args.cap), "FLEET_LOG_LEVEL": "WARNING",
            "FLEET_FLUSH_INTERVAL": "1.0", "FLEET_MQTT_KEEPALIVE": "15"})
        asyncio.run(bench(args, tmp, broker, controller))
    finally:
        if controller is not None:
            controller.close()
        broker.stop()


if __name__ == "__main__":
    main()
