"""Shared fixtures: a real Mosquitto (project config) per test run, and factories for controller,
agents and fake Ollamas as real processes on real sockets. Every process is stopped at teardown."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.mosquitto import MosquittoMissing, MosquittoProcess, start_mosquitto
from tests.support import AgentProc, Controller, clear_retained, docker_engine

REQUIRE_MOSQUITTO = os.environ.get("FLEET_TEST_REQUIRE_MOSQUITTO") == "1"


@pytest.fixture(scope="session", autouse=True)
def child_bytecode_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """With PYTHONDONTWRITEBYTECODE set (as on these machines) every controller, agent, fake Ollama and `fleet`
    process the tests start would compile all it imports from source, 1-2 s a start. The children share one
    bytecode cache for the run instead, outside the tree (nothing is written there)."""
    if not os.environ.get("PYTHONDONTWRITEBYTECODE") or os.environ.get("PYTHONPYCACHEPREFIX"):
        yield
        return
    saved = os.environ.pop("PYTHONDONTWRITEBYTECODE")
    os.environ["PYTHONPYCACHEPREFIX"] = str(tmp_path_factory.mktemp("pycache"))
    try:
        yield
    finally:
        os.environ.pop("PYTHONPYCACHEPREFIX", None)
        os.environ["PYTHONDONTWRITEBYTECODE"] = saved


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoProcess]:
    """Mosquitto started once per run with broker/mosquitto.conf + broker/fleet.acl on a free port."""
    try:
        broker = start_mosquitto(tmp_path_factory.mktemp("mosquitto"))
    except MosquittoMissing as e:
        if REQUIRE_MOSQUITTO:
            pytest.fail(f"FLEET_TEST_REQUIRE_MOSQUITTO=1 but {e}")
        pytest.skip(f"{e} (the testcontainers path needs a Docker engine: {docker_engine()})")
    try:
        yield broker
    finally:
        broker.stop()


class FleetFactory:
    """Starts controllers, agents and fake Ollamas for one test and tears them all down."""

    def __init__(self, tmp: Path, broker: MosquittoProcess) -> None:
        self.tmp, self.broker = tmp, broker
        self._procs: list[Any] = []
        self._n = 0

    def controller(self, *, account: str = "controller", **env: str) -> Controller:
        """A controller process; several at once each need their own MQTT `account` (made on first use)."""
        if account not in self.broker.passwords:
            self.broker.add_account("controller", account)
        c = Controller(self.tmp, self.broker.url(account), {k.upper(): v for k, v in env.items()}, wait=False)
        self._procs.append(c)  # tracked before waiting: a controller that fails to start is still stopped
        c.wait_ready()
        return c

    def credentials(self, node_id: str) -> str:
        if node_id not in self.broker.passwords:
            self.broker.add_user(node_id)
        return self.broker.url(node_id)

    def fake_ollama(self, name: str | None = None, **config: Any) -> Any:
        from tests.fake_ollama import start_fake_ollama

        self._n += 1
        fake = start_fake_ollama(name=name or f"fake{self._n}", config=config or None)
        self._procs.append(fake)
        return fake

    def agent(self, node_id: str, ollama_url: str | None = None, **env: str) -> AgentProc:
        if ollama_url is None:
            ollama_url = self.fake_ollama(node_id).url
        a = AgentProc(self.tmp, node_id, self.credentials(node_id), ollama_url,
                      {k.upper(): v for k, v in env.items()})
        self._procs.append(a)
        return a

    def close(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        def stop(p: Any) -> None:
            try:
                p.close() if hasattr(p, "close") else p.stop()
            except Exception:
                pass
        # several at once (a stop is mostly waiting for a process to exit); the controllers last, as before
        with ThreadPoolExecutor(max(len(self._procs), 1)) as pool:
            for last in (False, True):
                list(pool.map(stop, [p for p in reversed(self._procs) if isinstance(p, Controller) is last]))
        clear_retained(self.broker.host, self.broker.port, "controller", self.broker.passwords["controller"])


@pytest.fixture
def fleet(tmp_path: Path, mosquitto: MosquittoProcess) -> Iterator[FleetFactory]:
    factory = FleetFactory(tmp_path, mosquitto)
    try:
        yield factory
    finally:
        factory.close()
