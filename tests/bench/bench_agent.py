"""Agent footprint with Ollama supervised and heartbeats running (R-O8: seed bound 100 MB, target 50 MB).

    uv run python tests/bench/bench_agent.py [--seconds 20] [--heartbeat 5]

Starts a real Mosquitto (anonymous, loopback), a local release server, and `fleet agent --install-ollama`
as a real process; once the installed (fake) `ollama serve` answers and heartbeats flow, samples the
agent process alone (not its Ollama child) with psutil: RSS, USS and CPU over the window.
Exit status 1 when RSS exceeds the seed bound.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import paho.mqtt.client as mqtt  # noqa: E402
import psutil  # noqa: E402

from ollama_fleet.broker.local import free_loopback_port    # noqa: E402
from tests.mosquitto import start_mosquitto  # noqa: E402
from tests.ollama_support import ASSET, VERSION  # noqa: E402
from tests.release_server import ReleaseServer, make_archive  # noqa: E402

SEED_BOUND_MB = 100
TARGET_MB = 50


def wait_until(pred, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = pred()
        except (httpx.HTTPError, OSError, KeyError, psutil.Error):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0, help="measurement window [20]")
    ap.add_argument("--heartbeat", type=float, default=5.0, help="agent heartbeat interval [5, the default]")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-agent-"))
    broker = start_mosquitto(tmp / "mosquitto", anonymous=True)
    rs = ReleaseServer().start()
    rs.publish(VERSION, {ASSET: make_archive()})
    node = "bench-agent"
    ollama_url = f"http://127.0.0.1:{free_loopback_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(PYTHONPATH=str(ROOT), NO_PROXY="*", FLEET_MQTT_URL=broker.url())  # secrets never in argv
    cmd = [sys.executable, "-m", "ollama_fleet.cli", "agent", "--install-ollama",
           "--node-id", node, "--ollama-url", ollama_url, "--ollama-version", VERSION,
           "--ollama-download-url", rs.url_template(), "--ollama-checksum-url", rs.checksum_template(),
           "--ollama-install-dir", str(tmp / "ollama"), "--data-dir", str(tmp / "data"),
           "--heartbeat-interval", str(args.heartbeat)]
    log = open(tmp / "agent.log", "wb")  # noqa: SIM115
    agent = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    beats: list[float] = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-watch")
    sub.on_message = lambda _c, _u, m: beats.append(time.monotonic())
    sub.connect("127.0.0.1", broker.port)
    sub.subscribe(f"fleet/v1/nodes/{node}/heartbeat", 0)
    sub.loop_start()
    try:
        t0 = time.monotonic()
        wait_until(lambda: httpx.get(ollama_url + "/api/version", timeout=1, trust_env=False).status_code == 200,
                   60, "installed Ollama answering")
        ready_s = time.monotonic() - t0
        proc = psutil.Process(agent.pid)
        wait_until(lambda: len(beats) >= 2, 3 * args.heartbeat + 10, "heartbeats")
        time.sleep(min(5.0, args.heartbeat))  # settle: the install's buffers and imports are done
        rss: list[float] = []
        beats_before = len(beats)
        cpu0, w0 = proc.cpu_times(), time.monotonic()
        end = w0 + args.seconds
        while time.monotonic() < end:
            rss.append(proc.memory_info().rss / 2**20)
            time.sleep(0.5)
        cpu1, w1 = proc.cpu_times(), time.monotonic()
        uss = proc.memory_full_info().uss / 2**20
        cpu_pct = ((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)) / (w1 - w0) * 100
        children = proc.children(recursive=True)
        child_rss = sum(c.memory_info().rss for c in children) / 2**20
        n_beats = len(beats) - beats_before
        print(f"agent pid {agent.pid}: install + start of supervised Ollama took {ready_s:.1f} s")
        print(f"window {w1 - w0:.1f} s, heartbeat every {args.heartbeat} s, {n_beats} heartbeats received")
        print(f"agent RSS  mean {statistics.mean(rss):.1f} MB, max {max(rss):.1f} MB "
              f"(target <= {TARGET_MB} MB, seed bound {SEED_BOUND_MB} MB)")
        print(f"agent USS  {uss:.1f} MB (memory only this process holds)")
        print(f"agent CPU  {cpu_pct:.2f} % of one core")
        print(f"supervised Ollama (fake, not counted): {len(children)} process(es), {child_rss:.1f} MB RSS")
        if n_beats == 0:
            print("FAIL: no heartbeats during the window")
            return 1
        if max(rss) > SEED_BOUND_MB:
            print("FAIL: RSS above the seed bound")
            return 1
        print("OK" if max(rss) <= TARGET_MB else "WARN: above the 50 MB target, within the seed bound")
        return 0
    finally:
        sub.loop_stop()
        sub.disconnect()
        agent.terminate()
        try:
            agent.wait(15)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait(5)
        log.close()
        rs.stop()
        broker.stop()


if __name__ == "__main__":
    sys.exit(main())
