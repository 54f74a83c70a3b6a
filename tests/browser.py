"""Headless Chromium for dashboard tests: Debian's /usr/bin/chromium driven by Playwright (no browser
download), plus a screenshot helper that writes artifacts under artifacts/screenshots/."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "artifacts" / "screenshots"
CHROMIUM = os.environ.get("FLEET_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
    "--no-first-run", "--disable-component-update", "--disable-sync",
]
DESKTOP = {"width": 1360, "height": 900}
PHONE = {"width": 390, "height": 844}


def chromium_path() -> str | None:
    return CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")


def launch(playwright: Any) -> Any:
    path = chromium_path()
    if path is None:
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    return playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, headless=True)


def screenshot(page: Any, name: str, full_page: bool = True) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path


@pytest.fixture(scope="module", name="browser")
def browser_fixture() -> Iterator[Any]:
    """One Chromium per test module. Test modules import `browser_fixture, page_fixture`; as session
    fixtures those copies would be several Playwright instances alive at once (one per thread allowed)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = launch(p)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(name="page")
def page_fixture(browser: Any) -> Iterator[Any]:
    """A fresh context (own cookies) per test; closed before the fleet fixture stops the controller."""
    ctx = browser.new_context(viewport=DESKTOP, accept_downloads=True, color_scheme="light")
    ctx.set_default_timeout(10_000)
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.js_errors = errors  # checked by tests: a dashboard page must not throw
    try:
        yield pg
    finally:
        ctx.close()


# ---- page instrumentation ------------------------------------------------------------------------
# Records, in the page, the epoch time (ms) at which each agent row / status first appeared, and every
# progress value a job showed: the tests read them back to measure latency and progress.
DOM_PROBE = """
(() => {
  window.__dom = {};
  window.__progress = {};
  const now = () => performance.timeOrigin + performance.now();
  const scan = () => {
    document.querySelectorAll('#agent-rows tr[data-id]').forEach(tr => {
      const id = tr.dataset.id;
      if (!(id in window.__dom)) window.__dom[id] = now();
      const k = id + ':' + tr.dataset.status;
      if (!(k in window.__dom)) window.__dom[k] = now();
    });
    document.querySelectorAll('.job[data-task]').forEach(j => {
      const seen = window.__progress[j.dataset.task] = window.__progress[j.dataset.task] || [];
      const v = j.dataset.status + ':' + j.dataset.progress;
      if (seen[seen.length - 1] !== v) seen.push(v);
    });
  };
  new MutationObserver(scan).observe(document, {subtree: true, childList: true, attributes: true});
  document.addEventListener('DOMContentLoaded', scan);
})();
"""


def open_live(page: Any, url: str) -> None:
    """Load a dashboard page and wait until its live stream is open (snapshot received)."""
    page.goto(url)
    page.wait_for_selector("#live-state[data-state=open]")


# ---- MQTT helpers ------------------------------------------------------------------------------
class StateWatch:
    """Wall-clock arrival time of every agent `state` message, as the operator sees it on the broker."""

    def __init__(self, broker: Any, prefix: str = "fleet/v1") -> None:
        import threading
        import uuid

        import paho.mqtt.client as mqtt

        self.seen: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-state-{uuid.uuid4().hex[:8]}")
        user = broker.add_account("operator")  # its own account: client ids are bound to accounts
        self.client.username_pw_set(user, broker.passwords[user])
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(f"{prefix}/nodes/+/state", qos=1)
        self.client.loop_start()
        assert subscribed.wait(5), "subscription not acknowledged"

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        import json
        import time

        if not msg.payload or msg.retain:
            return
        node = msg.topic.split("/")[-2]
        state = json.loads(msg.payload).get("state", "")
        with self._lock:
            self.seen.setdefault((node, state), time.time())

    def at(self, node: str, state: str) -> float | None:
        with self._lock:
            return self.seen.get((node, state))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class SimAgent:
    """An agent spoken by the test over MQTT (its own broker user), for what this machine lacks: GPUs,
    many heartbeats a second. Publishes the same documents as agent/service.py."""

    def __init__(self, fleet: Any, node: str, gpus: int = 2, hb_interval: float = 60.0,
                 models: list[str] | None = None) -> None:
        import time
        import uuid

        import paho.mqtt.client as mqtt

        from ollama_fleet.contract.protocol import Topics, encode, state_payload

        fleet.credentials(node)
        self.node, self.session, self.topics = node, uuid.uuid4().hex, Topics()
        self.seq = 0
        self._encode = encode
        self.n_gpus = gpus
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sim-{node}",
                                  protocol=mqtt.MQTTv5)
        self.client.username_pw_set(node, fleet.broker.passwords[node])
        self.client.will_set(self.topics.node(node, "state"), encode(state_payload("lost", self.session)),
                             qos=1, retain=True)
        self.client.connect(fleet.broker.host, fleet.broker.port)
        self.client.loop_start()
        gb = 10**9
        now = time.time()
        docs = {
            "state": state_payload("online", self.session, seq=0, hb_interval=hb_interval, started=now,
                                   agent={"version": "0.1.0", "proto": [1, 1]}),
            "info": {"hostname": f"{node}.lab", "ips": ["10.0.4.21"], "os": "Linux 6.8", "arch": "x86_64",
                     "cpu_count": 32, "mem_total": 128 * gb, "disk_total": 2000 * gb, "agent_version": "0.1.0",
                     "ollama": {"url": "http://10.0.4.21:11434", "version": "0.12.6", "up": True}},
            "gpus": {"gpus": [{"index": i, "uuid": f"GPU-{i}", "name": "NVIDIA RTX 4090", "mem_total": 24 * gb,
                               "driver": "550.54"} for i in range(gpus)]},
            "models": {"models": [{"name": m, "digest": f"sha256:{i:064x}", "size": 4 * gb,
                                   "modified_at": "2025-05-04T17:37:44Z"} for i, m in enumerate(models or [])]},
            "running": {"models": [{"name": (models or ["llama3.1:8b"])[0], "size": 5 * gb,
                                    "size_vram": 5 * gb}] if models else []},
        }
        for kind, body in docs.items():
            payload = body if kind == "state" else {"v": 1, "session": self.session, "ts": now, **body}
            self.client.publish(self.topics.node(node, kind), encode(payload), qos=1,
                                retain=True).wait_for_publish(5)

    def heartbeat(self, cpu: float = 35.0, util: float = 62.0, vram_gb: float = 14.0, wait: bool = True) -> None:
        import time

        self.seq += 1
        gb = 10**9
        hb = {"v": 1, "session": self.session, "seq": self.seq, "ts": time.time(), "uptime": 3600.0 + self.seq,
              "cpu": cpu, "mem": 41.5, "mem_used": 53 * gb, "load1": 3.2, "disk_free": 1200 * gb,
              "gpus": [{"index": i, "util": util - 20 * i, "mem_used": int((vram_gb - 6 * i) * gb), "mem_total": 24 * gb,
                        "temp": 61 + i, "power": 280.0 - 90 * i} for i in range(self.n_gpus)],
              "ollama": {"up": True}, "loaded": []}
        info = self.client.publish(self.topics.node(self.node, "heartbeat"), self._encode(hb), qos=0)
        if wait:
            info.wait_for_publish(5)

    def state(self, state: str) -> None:
        from ollama_fleet.contract.protocol import state_payload

        self.client.publish(self.topics.node(self.node, "state"), self._encode(state_payload(state, self.session)),
                            qos=1, retain=True).wait_for_publish(5)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
