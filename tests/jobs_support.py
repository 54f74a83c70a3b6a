"""Test helpers for model jobs: watch job topics as the operator, send commands with the real CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

from tests.support import wait_until

PREFIX = "fleet/v1"


class JobWatcher:
    """Every job status document the broker delivers (as `operator`), with the time it arrived."""

    def __init__(self, broker: Any, topic: str = f"{PREFIX}/nodes/+/jobs/+", user: str | None = None) -> None:
        # its own operator-role account: client ids are bound to accounts, and publish() below connects as
        # "operator" while this watcher stays connected
        user = user or broker.add_account("operator")
        self.docs: list[tuple[float, str, dict[str, Any]]] = []
        self.cleared: list[str] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-jobs-{uuid.uuid4().hex[:8]}")
        self.client.username_pw_set(user, broker.passwords[user])
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_a: self._subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(topic, qos=1)
        self.client.loop_start()
        assert self._subscribed.wait(5), "subscription not acknowledged"

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        now = time.monotonic()
        with self._lock:
            if not msg.payload:
                self.cleared.append(msg.topic)
            else:
                self.docs.append((now, msg.topic, json.loads(msg.payload)))

    def on(self, suffix: str) -> list[tuple[float, dict[str, Any]]]:
        """Documents on topics ending with `suffix` (e.g. `/models`), with their arrival times."""
        with self._lock:
            return [(t, d) for t, topic, d in self.docs if topic.endswith(suffix)]

    def of(self, job_id: str | None = None, node: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [d for _, t, d in self.docs
                    if (job_id is None or d.get("job_id") == job_id) and (node is None or f"/nodes/{node}/" in t)]

    def timed(self, job_id: str) -> list[tuple[float, dict[str, Any]]]:
        with self._lock:
            return [(t, d) for t, _, d in self.docs if d.get("job_id") == job_id]

    def wait(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 10.0, what: str = "") -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            with self._lock:
                return next((d for _, _, d in self.docs if pred(d)), None)
        return wait_until(found, timeout, what=what or "job status")

    def wait_status(self, job_id: str, status: str, timeout: float = 10.0) -> dict[str, Any]:
        return self.wait(lambda d: d.get("job_id") == job_id and d.get("status") == status, timeout,
                         what=f"job {job_id} {status}")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def publish(broker: Any, node: str, verb: str, payload: dict[str, Any], user: str = "operator") -> None:
    """One command with the real `mosquitto_pub` binary, QoS 1, as a script would send it."""
    exe = shutil.which("mosquitto_pub")
    assert exe, "mosquitto_pub (mosquitto-clients) is required"
    subprocess.run([exe, "-h", broker.host, "-p", str(broker.port), "-u", user, "-P", broker.passwords[user],
                    "-q", "1", "-t", f"{PREFIX}/cmd/{node}/{verb}", "-m", json.dumps(payload)],
                   check=True, timeout=10, capture_output=True)


def task(c: Any, task_id: str) -> dict[str, Any] | None:
    r = c.http.get(f"/api/tasks/{task_id}")
    return r.json() if r.status_code == 200 else None


def wait_task(c: Any, task_id: str, timeout: float = 15.0, **expect: Any) -> dict[str, Any]:
    def match() -> dict[str, Any] | None:
        t = task(c, task_id)
        return t if t and all(t.get(k) == v for k, v in expect.items()) else None
    return wait_until(match, timeout, what=f"task {task_id} with {expect}")


def schema_errors(doc: dict[str, Any], name: str = "job-status.json") -> list[str]:
    """Where `doc` breaks the contract's JSON Schema (specs/schemas/)."""
    from jsonschema import Draft202012Validator

    from tests.support import ROOT

    schema = json.loads((ROOT / "specs" / "schemas" / name).read_text())
    return [f"{'/'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in Draft202012Validator(schema).iter_errors(doc)]
