"""Helpers for the proxy tests: a controller with fake-Ollama agents, raw streaming, doctored heartbeats."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt

from tests.support import ROOT, Controller, wait_until

# Agents that must keep a doctored heartbeat (or a dead Ollama) in the registry beat this slowly.
SLOW_HEARTBEAT = "60"


def wait_routable(c: Controller, *nodes: str, models: tuple[str, ...] = ("llama3.2:latest",),
                  timeout: float = 15.0) -> None:
    """Every node online, Ollama up, with these models (with `()`: any model) known to the registry."""
    def ready() -> bool:
        for n in nodes:
            a = c.agent(n)
            if not a or not a["routable"] or not set(models) <= set(a["models"]) or not a["models"]:
                return False
        return True
    wait_until(ready, timeout, what=f"{nodes} routable with {models}")


def start_fleet(fleet: Any, *nodes: str, controller_env: dict[str, str] | None = None,
                agent_env: dict[str, str] | None = None, **fake_config: Any) -> tuple[Controller, dict[str, Any]]:
    """A controller and one agent + fake Ollama per node; returns (controller, {node: fake})."""
    c = fleet.controller(**(controller_env or {}))
    fakes = {n: fleet.fake_ollama(n, **fake_config) for n in nodes}
    for n in nodes:
        fleet.agent(n, fakes[n].url, **(agent_env or {}))
    wait_routable(c, *nodes, models=())
    return c, fakes


def chat_body(model: str = "llama3.2", stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream, **extra}


def served_by(c: Controller, n: int, path: str = "/api/chat", body: dict[str, Any] | None = None) -> list[str]:
    """Send n requests one after the other; the X-Fleet-Agent of each (all must succeed)."""
    out = []
    for _ in range(n):
        r = c.http.post(path, json=body or chat_body())
        assert r.status_code == 200, r.text
        out.append(r.headers["x-fleet-agent"])
    return out


def session_of(broker: Any, node: str, timeout: float = 5.0) -> str:
    """The agent's current session, from its retained state message."""
    got: dict[str, str] = {}
    done = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-session-{uuid.uuid4().hex[:6]}")
    user = broker.add_account("controller")  # not "controller": that would take the controller's connection over
    client.username_pw_set(user, broker.passwords[user])

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        if msg.payload:
            got["session"] = json.loads(msg.payload)["session"]
            done.set()

    client.on_message = on_message
    client.on_connect = lambda c_, *_a: c_.subscribe(f"fleet/v1/nodes/{node}/state", qos=1)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        assert done.wait(timeout), f"no retained state for {node}"
    finally:
        client.disconnect()  # first: it wakes the network loop, which loop_stop() would otherwise wait out (~1 s)
        client.loop_stop()
    return got["session"]


def publish_heartbeat(broker: Any, node: str, **figures: Any) -> None:
    """A heartbeat in the agent's session carrying these load figures (cpu, mem, gpus...). Sent with a
    controller-role account: the agent's own account would take the running agent's connection over."""
    doc = {"v": 1, "session": session_of(broker, node), "seq": 10_000, "ts": time.time(), **figures}
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-hb-{uuid.uuid4().hex[:6]}")
    user = broker.add_account("controller")
    client.username_pw_set(user, broker.passwords[user])
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.publish(f"fleet/v1/nodes/{node}/heartbeat", json.dumps(doc), qos=1).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()


def stream_lines(client: httpx.Client, path: str, body: dict[str, Any]) -> tuple[httpx.Response, list[tuple[float, bytes]]]:
    """POST and read a streamed answer; each line with the monotonic time it arrived."""
    lines: list[tuple[float, bytes]] = []
    with client.stream("POST", path, json=body) as r:
        for line in r.iter_lines():
            if line:
                lines.append((time.monotonic(), line.encode()))
    return r, lines


def fleet_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`fleet ...` as a separate process (as an operator would run it), with no FLEET_* from the outside."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "ollama_fleet.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False)


def db_rows(data_dir: Path, sql: str) -> list[tuple[Any, ...]]:
    """Read the controller's SQLite database directly: what is on disk, not what the API says."""
    con = sqlite3.connect(data_dir / "fleet.db", timeout=5)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def sse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event, data) per SSE event; every data's `type` names its event, as in Anthropic's stream."""
    out = []
    for block in text.strip().split("\n\n"):
        m = re.fullmatch(r"event: (\S+)\ndata: (.*)", block)
        assert m, block
        data = json.loads(m.group(2))
        assert data["type"] == m.group(1)
        out.append((m.group(1), data))
    return out


# ---- admission control: the queue seen through /api/queue, keys made with `fleet keys` ----
ADMIN = "adm1n-token-for-admission"


def queue(c: Controller) -> dict[str, Any]:
    r = c.api.get("/api/queue")
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def depth(c: Controller, model: str = "llama3.2:latest") -> int:
    return next((m["depth"] for m in queue(c)["models"] if m["model"] == model), 0)


def busy(c: Controller, node: str) -> int:
    return next(a["busy"] for a in queue(c)["agents"] if a["id"] == node)


def post(c: Controller, path: str, body: dict[str, Any], headers: dict[str, str] | None = None,
         timeout: float = 60.0) -> httpx.Response:
    with httpx.Client(base_url=c.url, timeout=timeout, trust_env=False) as client:
        r = client.post(path, json=body, headers=headers or {})
        r.read()
        return r


def add_key(fleet: Any, name: str, *flags: str) -> str:
    added = fleet_cli("keys", "add", name, *flags, "--data-dir", str(fleet.tmp))
    assert added.returncode == 0, added.stderr
    return added.stdout.strip()


def bearer_auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def wait_keys(c: Controller, *keys: str) -> None:
    """Keys in force and every one of these accepted: the controller reloads keys every KEYS_RELOAD_EVERY s, and a reload may come
    between two `fleet keys add`. Probed on /api/tags (authorized, not metered: no key's limits are used) no
    faster than the reload, so refused probes stay clear of the per-client throttle."""
    from ollama_fleet.controller.proxy.forward import KEYS_RELOAD_EVERY

    def accepted() -> bool:  # keys in force (none given: 401), and each of these keys let in
        return c.http.get("/api/tags").status_code == 401 and all(
            c.http.get("/api/tags", headers=bearer_auth(k)).status_code == 200 for k in keys)
    wait_until(accepted, 10 + KEYS_RELOAD_EVERY, interval=KEYS_RELOAD_EVERY, what="every key loaded")
