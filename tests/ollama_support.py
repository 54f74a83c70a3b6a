"""Helpers shared by the Ollama-management tests: settings, an in-process agent, an MQTT collector,
a hand-made "own install", and polling with a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiomqtt

from ollama_fleet.agent.install import MARKER, default_asset
from ollama_fleet.broker.local import free_loopback_port
from ollama_fleet import settings
from ollama_fleet.settings import AGENT, Config
from tests.release_server import ReleaseServer, fake_ollama_script

T = TypeVar("T")
VERSION = "0.13.5"  # a .tgz-era release: the test archive is a tar.gz
ASSET = default_asset(VERSION)
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy",
              "no_proxy", "SSL_CERT_FILE", "SSL_CERT_DIR")


SCHEMAS = Path(__file__).resolve().parent.parent / "specs" / "schemas"
KIND_SCHEMA = {"info": "info.json", "heartbeat": "heartbeat.json", "events": "event.json", "jobs": "job-status.json"}


def schema_errors(kind: str, doc: dict[str, Any]) -> list[str]:
    """What specs/schemas says is wrong with one of our payloads (these schemas have no $ref)."""
    from jsonschema import Draft202012Validator

    schema = json.loads((SCHEMAS / KIND_SCHEMA[kind]).read_text())
    return [f"{kind} {'/'.join(map(str, e.path))}: {e.message}" for e in Draft202012Validator(schema).iter_errors(doc)]


def path_without_ollama() -> str:
    """PATH minus folders holding an `ollama`: tests decide what is 'on PATH'."""
    keep = [d for d in os.environ.get("PATH", "").split(os.pathsep)
            if d and not os.access(os.path.join(d, "ollama"), os.X_OK)]
    return os.pathsep.join(keep)


def agent_cfg(tmp: Path, rs: ReleaseServer | None = None, **over: Any) -> Config:
    values: dict[str, Any] = dict(
        node_id=f"t-{uuid.uuid4().hex[:8]}",
        ollama_url=f"http://127.0.0.1:{free_loopback_port()}",
        data_dir=str(tmp / "data"),
        ollama_install_dir=str(tmp / "ollama"),
        ollama_version=VERSION,
        ollama_retry_backoff=0.01,
        heartbeat_interval=0.5,
        mqtt_keepalive=5,
        ollama_timeout=0.5,
        models_dir=str(tmp),
    )
    if rs is not None:
        values.update(ollama_download_url=rs.url_template(), ollama_checksum_url=rs.checksum_template())
    values.update(over)
    return settings.load([AGENT], values, env={})


def make_own_install(root: Path, version: str = VERSION, script: str | None = None) -> Path:
    """What a finished install leaves behind, without downloading: `<root>/<version>/bin/ollama` + marker."""
    binary = root / version / "bin" / "ollama"
    binary.parent.mkdir(parents=True, exist_ok=True)
    binary.write_text(script if script is not None else fake_ollama_script())
    binary.chmod(0o755)
    (root / version / MARKER).write_text(json.dumps({"version": version}))
    return binary


def make_path_ollama(folder: Path, script: str | None = None) -> Path:
    """A system-style `ollama` in a folder to put on PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    binary = folder / "ollama"
    binary.write_text(script if script is not None else fake_ollama_script(name="system"))
    binary.chmod(0o755)
    return binary


async def until(predicate: Callable[[], T], timeout: float = 15.0, what: str = "", interval: float = 0.02) -> T:
    """Poll `predicate` in the running loop until truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        await asyncio.sleep(interval)


def pid_alive(pid: int) -> bool:
    try:
        import psutil

        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except Exception:
        return False


@dataclass
class Msg:
    topic: str
    doc: dict[str, Any] | None
    retain: bool
    at: float


class Collector:
    """Everything published under one node, as the controller would see it."""

    def __init__(self, url_host: str, port: int, username: str, password: str, node: str) -> None:
        self.host, self.port, self.username, self.password, self.node = url_host, port, username, password, node
        self.messages: list[Msg] = []
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def _run(self) -> None:
        async with aiomqtt.Client(self.host, self.port, username=self.username, password=self.password,
                                  identifier=f"test-collector-{uuid.uuid4().hex[:8]}") as client:
            await client.subscribe(f"fleet/v1/nodes/{self.node}/#", qos=1)
            self._ready.set()
            async for m in client.messages:
                raw = bytes(m.payload) if isinstance(m.payload, (bytes, bytearray)) else b""
                doc = json.loads(raw) if raw else None
                self.messages.append(Msg(str(m.topic), doc, bool(m.retain), time.monotonic()))

    async def __aenter__(self) -> Collector:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._ready.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await self._task

    def kind(self, kind: str) -> list[dict[str, Any]]:
        topic = f"fleet/v1/nodes/{self.node}/{kind}"
        return [m.doc for m in self.messages if m.doc is not None and m.topic == topic]

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        return [d for d in self.kind("events") if name is None or d.get("event") == name]

    def jobs(self) -> list[dict[str, Any]]:
        prefix = f"fleet/v1/nodes/{self.node}/jobs/"
        return [m.doc for m in self.messages if m.doc is not None and m.topic.startswith(prefix)]

    def contract_errors(self) -> list[str]:
        """Every info, heartbeat, event and job message checked against its JSON Schema."""
        errors: list[str] = []
        for m in self.messages:
            rest = m.topic.split(f"/nodes/{self.node}/", 1)[-1]
            kind = rest.split("/", 1)[0]
            if m.doc is not None and kind in KIND_SCHEMA:
                errors += schema_errors(kind, m.doc)
        return errors

    def job_topics(self) -> set[str]:
        prefix = f"fleet/v1/nodes/{self.node}/jobs/"
        return {m.topic for m in self.messages if m.topic.startswith(prefix)}


@contextlib.asynccontextmanager
async def running_agent(cfg: Config) -> AsyncIterator[Any]:
    from ollama_fleet.agent.service import Agent

    agent = Agent(cfg)
    task = asyncio.create_task(agent.run())
    try:
        yield agent
    finally:
        agent.stop()
        await asyncio.wait_for(task, 20)


def which(name: str) -> str | None:
    return shutil.which(name)
