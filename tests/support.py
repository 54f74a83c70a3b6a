"""Test support: the controller and agents as real processes, and polling with a deadline."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import httpx

from ollama_fleet.broker.local import free_loopback_port

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")

# Fast timings for tests: heartbeats every 0.5 s, stale after 3 missed (1.5 s).
TEST_HEARTBEAT = 0.5
TEST_KEEPALIVE = 2


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.05, what: str = "") -> T:
    """Poll until `predicate()` is truthy; return its value. Never a blind sleep."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = predicate()
        except (httpx.HTTPError, OSError, KeyError, IndexError) as e:
            last = e
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}: last={last!r}")
        time.sleep(interval)


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update({"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "NO_PROXY": "*"})
    env.update(extra)
    return env


class Proc:
    """A fleet process (`python -m ollama_fleet.cli ...`) with its log in a file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.args, self.env, self.log_path = args, env, log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "ollama_fleet.cli", *self.args], env=_env(self.env),
                                     cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 20.0) -> int | None:  # longer than the controller's graceful drain
        """SIGTERM and wait: the clean-stop path."""
        if self.proc is None:
            return None
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Controller(Proc):
    def __init__(self, tmp: Path, mqtt_url: str, extra: dict[str, str] | None = None, wait: bool = True) -> None:
        self.port = free_loopback_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            "FLEET_MQTT_URL": mqtt_url, "FLEET_PORT": str(self.port), "FLEET_DATA_DIR": str(tmp),
            "FLEET_MQTT_KEEPALIVE": str(TEST_KEEPALIVE), "FLEET_FLUSH_INTERVAL": "0.2",
            "FLEET_LOG_LEVEL": "DEBUG" if os.environ.get("FLEET_TEST_DEBUG") else "INFO",
            "FLEET_AUTO_DISTRIBUTE": "0",  # no surprise pulls onto other tests' fakes; distribution tests turn it on
            **(extra or {}),
        }
        super().__init__(["controller"], env, tmp / f"controller-{self.port}.log")
        self.http = httpx.Client(base_url=self.url, timeout=10, trust_env=False)
        # reads need the admin token once one is set: the helpers below use it, `http` stays anonymous
        token = (extra or {}).get("FLEET_ADMIN_TOKEN")
        self.api = httpx.Client(base_url=self.url, timeout=10, trust_env=False,
                                headers={"authorization": f"Bearer {token}"}) if token else self.http
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 20.0) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"controller exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            return self.http.get("/healthz").status_code == 200
        wait_until(ready, timeout, what="controller /healthz")

    def restart(self) -> None:
        self.stop()
        self.start()
        self.wait_ready()

    def agents(self, **params: str) -> dict[str, dict[str, Any]]:
        resp = self.api.get("/api/agents", params=params)
        resp.raise_for_status()
        return {a["id"]: a for a in resp.json()["agents"]}

    def agent(self, node: str) -> dict[str, Any] | None:
        resp = self.api.get(f"/api/agents/{node}")
        return resp.json() if resp.status_code == 200 else None

    def wait_agent(self, node: str, timeout: float = 10.0, **expect: Any) -> dict[str, Any]:
        """Wait until the agent exists and every `expect` key has that value."""
        def match() -> dict[str, Any] | None:
            a = self.agent(node)
            return a if a and all(a.get(k) == v for k, v in expect.items()) else None
        return wait_until(match, timeout, what=f"agent {node} with {expect}")

    def wait_serving(self, node: str, timeout: float = 10.0) -> dict[str, Any]:
        """Wait until the agent is online, routable and has reported its models (presence and the
        model list are separate messages: "online" alone can precede the models by a moment)."""
        def match() -> dict[str, Any] | None:
            a = self.agent(node)
            return a if a and a.get("status") == "online" and a.get("routable") and a.get("models") else None
        return wait_until(match, timeout, what=f"agent {node} serving its models")

    def close(self) -> None:
        self.stop()
        self.http.close()
        self.api.close()


class AgentProc(Proc):
    def __init__(self, tmp: Path, node_id: str, mqtt_url: str, ollama_url: str,
                 extra: dict[str, str] | None = None) -> None:
        self.node_id = node_id
        env = {
            "FLEET_MQTT_URL": mqtt_url, "FLEET_NODE_ID": node_id, "FLEET_OLLAMA_URL": ollama_url,
            "FLEET_HEARTBEAT_INTERVAL": str(TEST_HEARTBEAT), "FLEET_MQTT_KEEPALIVE": str(TEST_KEEPALIVE),
            "FLEET_OLLAMA_TIMEOUT": "0.4", "FLEET_MODELS_DIR": str(tmp), **(extra or {}),
        }
        super().__init__(["agent"], env, tmp / f"agent-{node_id}.log")


def clear_retained(host: str, port: int, username: str, password: str, prefix: str = "fleet/v1") -> int:
    """Empty every retained message under `prefix`, so tests sharing one broker start clean.

    A marker published after subscribing arrives after the retained burst: no guessing with sleeps.
    """
    import threading
    import uuid

    import paho.mqtt.client as mqtt

    marker = f"{prefix}/controller/test-marker-{uuid.uuid4().hex}"
    retained: list[str] = []
    done = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-cleaner-{uuid.uuid4().hex[:8]}")
    client.username_pw_set(username, password)

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        if msg.topic == marker:
            done.set()
        elif msg.retain and msg.payload:
            retained.append(msg.topic)

    def on_subscribe(c: Any, *_a: Any) -> None:
        c.publish(marker, b"x", qos=1)

    client.on_message = on_message
    client.on_subscribe = on_subscribe
    client.connect(host, port)
    client.subscribe([(f"{prefix}/#", 1)])
    client.loop_start()
    try:
        done.wait(10)
        for topic in retained:
            client.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
    finally:
        client.disconnect()  # first: loop_stop() alone waits out paho's 1 s network loop
        client.loop_stop()
    return len(retained)


def docker_engine() -> bool:
    """True when a Docker engine answers (the client alone, as on these machines, is not enough)."""
    import os

    if not (os.environ.get("DOCKER_HOST") or os.path.exists("/var/run/docker.sock")):
        return False
    try:
        import docker  # type: ignore[import-untyped]

        client = docker.from_env()
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


PG_DSN = os.environ.get("FLEET_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")


@contextmanager
def fresh_postgres_db(prefix: str = "fleet_test") -> Iterator[str]:
    """A new, empty database on the local PostgreSQL (skips the test when there is none), dropped after."""
    import pytest

    psycopg2 = pytest.importorskip("psycopg2")
    try:
        admin = psycopg2.connect(PG_DSN + "/postgres", connect_timeout=3)
    except psycopg2.OperationalError as e:
        pytest.skip(f"no PostgreSQL at {PG_DSN}: {e}")
    admin.autocommit = True
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_DSN}/{name}"
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def pg_rows(url: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    """The rows of one query on a PostgreSQL database (a fresh_postgres_db URL)."""
    import psycopg2

    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(query, args)
            return list(cur.fetchall())
    finally:
        conn.close()


def health(c: Controller) -> dict[str, Any]:
    """A controller's /healthz (which instance answered, whether it leads)."""
    body: dict[str, Any] = c.http.get("/healthz", timeout=2).json()
    return body

