"""Dashboard latency benchmark: MQTT event -> DOM update in a real headless Chromium.

    uv run python tests/bench/bench_dashboard.py [--phases 0:0 200:1000 1000:2000] [--events 60]

Per phase (AGENTS:HEARTBEATS_PER_S of background load from simulated agents, all shown in the agents
table of the open page), a probe agent publishes, one at a time:
  - state changes (birth / clean stop): the path a new, lost or offline agent takes;
  - heartbeats with a new VRAM figure, 0.4 s apart (outside the 250 ms per-agent coalescing window).
The publish time is taken just before the MQTT PUBLISH leaves, the DOM time by a MutationObserver in
the page (performance.timeOrigin + now(): the same wall clock). Target (issue 6): p95 <= 300 ms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.bench_ingest import Simulator
from tests.browser import launch
from tests.mosquitto import start_mosquitto
from tests.support import Controller, wait_until

PROBE = "probe-0"
GB = 10**9
OBSERVER = """
(() => {
  window.__probe = [];
  window.__recv = [];  // when SSE messages about the probe reached the page (before htmx swaps them)
  const now = () => performance.timeOrigin + performance.now();
  document.addEventListener('htmx:sseBeforeMessage', e => {
    if (e.detail.data.includes('id="agent-PROBE_ID"')) window.__recv.push(now());
  });
  let last = '';
  new MutationObserver(() => {
    const row = document.getElementById('agent-PROBE_ID');
    if (!row) return;
    const key = row.dataset.status + '|' + row.children[7].textContent.trim();
    if (key !== last) { last = key; window.__probe.push([now(), key]); }
  }).observe(document, {subtree: true, childList: true, characterData: true, attributes: true});
})();
""".replace("PROBE_ID", PROBE)


class Probe:
    """The measured agent: a paho client publishing its own state and heartbeats."""

    def __init__(self, port: int) -> None:
        self.session = uuid.uuid4().hex
        self.seq = 0
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-probe", protocol=mqtt.MQTTv5)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _pub(self, kind: str, doc: dict[str, Any], qos: int = 1, retain: bool = False) -> float:
        payload = json.dumps({"v": 1, "session": self.session, "ts": time.time(), **doc}).encode()
        t = time.time()
        self.client.publish(f"fleet/v1/nodes/{PROBE}/{kind}", payload, qos=qos, retain=retain).wait_for_publish(5)
        return t

    def birth(self) -> float:
        t = self._pub("state", {"state": "online", "hb_interval": 1000.0}, retain=True)
        self._pub("info", {"hostname": "probe", "ips": ["10.9.9.9"], "ollama": {"up": True, "version": "0.12.6"}},
                  retain=True)
        self._pub("gpus", {"gpus": [{"index": 0, "name": "Probe GPU", "mem_total": 24 * GB}]}, retain=True)
        return t

    def state(self, state: str) -> float:
        return self._pub("state", {"state": state}, retain=True)

    def heartbeat(self, vram_gb: int) -> float:
        self.seq += 1
        return self._pub("heartbeat", {"seq": self.seq, "cpu": 10.0, "mem": 20.0, "ollama": {"up": True},
                                       "gpus": [{"index": 0, "util": 50, "mem_used": vram_gb * GB,
                                                 "mem_total": 24 * GB}]}, qos=0)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def wait_dom(page: Any, key: str, after: float, timeout: float = 10.0) -> tuple[float, float]:
    """Epoch seconds at which the probe row first showed `key` after `after`, and at which the SSE
    message that did it reached the page (the last one received before that)."""
    page.wait_for_function("([k, t]) => window.__probe.some(([at, key]) => key === k && at >= t)",
                           arg=[key, after * 1000], timeout=timeout * 1000)
    shown, received = page.evaluate("""([k, t]) => {
        const shown = window.__probe.find(([at, key]) => key === k && at >= t)[0];
        const recv = window.__recv.filter(at => at >= t && at <= shown);
        return [shown, recv.length ? recv[recv.length - 1] : shown];
    }""", [key, after * 1000])
    return shown / 1000, received / 1000


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def measure(page: Any, probe: Probe, events: int) -> dict[str, list[float]]:
    """Latencies in ms: `<kind>` end to end, `<kind>_sse` until the message reached the page."""
    out: dict[str, list[float]] = {"state": [], "state_sse": [], "heartbeat": [], "heartbeat_sse": []}

    def record(kind: str, t: float, key: str) -> None:
        shown, received = wait_dom(page, key, t)
        if i >= 0:
            out[kind].append((shown - t) * 1000)
            out[kind + "_sse"].append((received - t) * 1000)

    vram = 1
    for i in range(-2, events):  # two warm-up state changes: the page may still be swapping its snapshot in
        state = "offline" if i % 2 == 0 else "online"  # i = -2 is offline, -1 online: toggles from the start
        t = probe.state(state) if state == "offline" else probe.birth()
        record("state", t, f"{state}|{vram}.0 GB / 24.0 GB")
        if state == "online":
            vram = vram % 20 + 1
            time.sleep(0.4)  # pacing: outside the per-agent coalescing window
            record("heartbeat", probe.heartbeat(vram), f"online|{vram}.0 GB / 24.0 GB")
            time.sleep(0.4)
    return out


def run_phase(broker: Any, tmp: Path, agents: int, rate: float, events: int, browser: Any) -> dict[str, Any]:
    c = Controller(tmp, broker.url(), {"FLEET_STALE_AFTER": "1000", "FLEET_LOG_LEVEL": "WARNING",
                                       "FLEET_FLUSH_INTERVAL": "1.0", "FLEET_AUTO_DISTRIBUTE": "0"})
    sim = Simulator(broker.port, agents) if agents else None
    probe = Probe(broker.port)
    ctx = browser.new_context(viewport={"width": 1360, "height": 900})
    page = ctx.new_page()
    try:
        probe.birth()
        probe.heartbeat(1)
        if sim:
            sim.births()
        wait_until(lambda: len(c.agents()) >= agents + 1, 60, what="all agents registered")
        page.add_init_script(OBSERVER)
        page.goto(c.url + "/dashboard/agents")
        page.wait_for_selector("#live-state[data-state=open]", timeout=30000)
        page.wait_for_selector(f"#agent-{PROBE}")
        if sim:  # background heartbeats for the whole measurement, from a thread
            import threading

            stop = threading.Event()

            def load() -> None:
                while not stop.is_set():
                    sim.run(rate, 1.0)

            t = threading.Thread(target=load, daemon=True)
            t.start()
        try:
            res = measure(page, probe, events)
        finally:
            if sim:
                stop.set()
                t.join()
        stats = c.http.get("/api/ingest").json()
        res["hub_dropped"] = stats.get("hub_dropped", 0)
        return res
    finally:
        ctx.close()
        probe.close()
        if sim:
            sim.close()
        c.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phases", nargs="+", default=["0:0", "200:1000", "1000:2000"],
                    help="AGENTS:HEARTBEATS_PER_S of background load shown in the same table")
    ap.add_argument("--events", type=int, default=60, help="state changes measured per phase (half as many heartbeats)")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as d, sync_playwright() as p:
        broker = start_mosquitto(Path(d) / "mqtt", anonymous=True)
        browser = launch(p)
        try:
            print(f"{'phase':24} {'event':10} {'n':>4} {'p50 ms':>7} {'p95 ms':>7} {'max ms':>7}   "
                  f"{'of which MQTT -> page (SSE received) p50 / p95':>40}")
            for phase in args.phases:
                n, rate = (int(x) for x in phase.split(":"))
                tmp = Path(d) / f"c-{n}-{rate}"
                tmp.mkdir()
                r = run_phase(broker, tmp, n, rate, args.events, browser)
                for kind in ("state", "heartbeat"):
                    v, sse = r[kind], r[kind + "_sse"]
                    print(f"{f'{n} agents, {rate} hb/s':24} {kind:10} {len(v):4d} {statistics.median(v):7.1f} "
                          f"{pct(v, 0.95):7.1f} {max(v):7.1f}   {statistics.median(sse):33.1f} / {pct(sse, 0.95):.1f}",
                          flush=True)
                if r["hub_dropped"]:
                    print(f"  (hub dropped {r['hub_dropped']} events: streams re-synced)")
        finally:
            browser.close()
            broker.stop()


if __name__ == "__main__":
    main()
