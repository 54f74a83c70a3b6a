"""An agent's capacity: how many generations its Ollama runs at once.

The agent resolves it (setting `ollama_num_parallel` > the environment of the `ollama serve` it started >
its own environment > 1, agent/supervisor.py), gives an explicit setting to the `ollama serve` it starts,
and reports it as `info.ollama.num_parallel`; the controller's registry keeps it as `AgentRecord.capacity`
(1..1024, anything else counts as 1) and shows it in /api/agents/<id>, the agent summary and the
dashboard's agent page."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from ollama_fleet.agent import supervisor as sup
from ollama_fleet.agent.manager import OllamaManager
from ollama_fleet.agent.service import Agent
from ollama_fleet.contract.protocol import check
from ollama_fleet.controller import readmodel
from ollama_fleet.controller.hub import Hub
from ollama_fleet.controller.registry.live import Registry
from ollama_fleet.settings import ConfigError, load
from tests.conftest import FleetFactory
from tests.ollama_support import agent_cfg, make_own_install, path_without_ollama, until
from tests.support import Controller, wait_until
from tests.test_registry_poison import NodePublisher

VAR = "OLLAMA_NUM_PARALLEL"
URL = "http://127.0.0.1:11434"

# ---- the agent: resolution -------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "n"), [
    ("4", 4), (" '8' ", 8), ('"2"', 2), ("0", 1),  # Ollama trims spaces and quotes; 0 runs one at a time
    ("-2", 1), ("2.5", 1), ("+3", 1), ("3_0", 1), ("abc", 1), ("\u0663", 1), ("9" * 30, 1),  # unreadable: its default
    ("", None), ("  ", None),  # unset
])
def test_ollama_num_parallel_is_read_as_ollama_reads_it(raw: str, n: int | None) -> None:
    assert sup.env_num_parallel({VAR: raw}) == n
    assert sup.env_num_parallel({}) is None


def test_setting_beats_the_supervised_environment_beats_our_own_beats_one() -> None:
    served, own = {VAR: "4"}, {VAR: "2"}
    assert sup.num_parallel(3, served, own) == 3
    assert sup.num_parallel(0, served, own) == 4
    assert sup.num_parallel(0, None, own) == 2  # someone else's Ollama: our environment is the best we know
    assert sup.num_parallel(0, None, {}) == 1
    # the `ollama serve` we started got no OLLAMA_NUM_PARALLEL: it runs Ollama's default, whatever ours says
    assert sup.num_parallel(0, {}, own) == 1


def test_an_explicit_setting_goes_into_the_child_environment_and_wins(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "fleet.agent.supervisor"):
        assert sup.child_env(URL, {VAR: "3"}, parallel=3)[VAR] == "3"
        assert sup.child_env(URL, {}, parallel=2)[VAR] == "2"
        assert not caplog.records  # nothing overridden: nothing to warn about
        assert sup.child_env(URL, {VAR: "5"}, parallel=3)[VAR] == "3"
    assert "ollama_num_parallel=3 overrides OLLAMA_NUM_PARALLEL='5'" in caplog.text
    assert sup.child_env(URL, {VAR: "5"})[VAR] == "5"  # automatic: the inherited value is left alone
    assert VAR not in sup.child_env(URL, {})


def _agent(**values: str) -> Agent:
    return Agent(load(["agent"], {"mqtt_url": "mqtt://127.0.0.1:1", "node_id": "cap-unit", **values}, env={}))


def _reported(agent: Agent) -> Any:
    info = agent.snapshots()["info"]
    check("info", info)
    return info["ollama"]["num_parallel"]


def test_the_agent_reports_num_parallel_in_its_info(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(VAR, raising=False)
    assert _reported(_agent()) == 1
    monkeypatch.setenv(VAR, "2")
    assert _reported(_agent()) == 2  # an Ollama the agent does not run: its own environment
    assert _reported(_agent(ollama_num_parallel="3")) == 3
    with pytest.raises(ConfigError, match="ollama_num_parallel"):
        _agent(ollama_num_parallel="-1")


@pytest.mark.parametrize(("setting", "inherited", "expected"), [(3, "5", "3"), (0, "4", "4"), (0, None, None)])
async def test_the_supervised_ollama_runs_with_the_number_the_agent_reports(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        setting: int, inherited: str | None, expected: str | None) -> None:
    monkeypatch.setenv("PATH", path_without_ollama())
    if inherited is None:
        monkeypatch.delenv(VAR, raising=False)
    else:
        monkeypatch.setenv(VAR, inherited)
    make_own_install(tmp_path / "ollama")
    manager = OllamaManager(agent_cfg(tmp_path, install_ollama=True, ollama_num_parallel=setting))
    manager.start()
    try:
        s = await until(lambda: manager.state == "up" and manager.supervisor, what="own install started")
        assert s.managed and s.pid
        child = psutil.Process(s.pid).environ()  # the real `ollama serve` process
        assert child.get(VAR) == expected
        assert manager.info()["num_parallel"] == int(expected or 1)
    finally:
        await manager.stop()
    assert ("overrides OLLAMA_NUM_PARALLEL='5'" in caplog.text) is (setting == 3)


# ---- the registry: ingestion, persistence, summary --------------------------------------------------

HOSTILE = [None, True, False, 2.5, 3.0, "4", -3, 0, 1025, 10**30, [4], {"n": 4}]


def _info(reg: Registry, node: str, **ollama: Any) -> None:
    reg.on_info(node, {"session": "s-" + node, "hostname": "h",
                       "ollama": {"url": URL, "version": "0.20.0", "up": True, **ollama}})


def test_registry_takes_1_to_1024_and_keeps_1_for_anything_else() -> None:
    reg = Registry(Hub())
    reg.on_state("n1", {"state": "online", "session": "s-n1", "hb_interval": 5})
    a = reg.agents["n1"]
    assert a.capacity == 1 and a.to_json()["capacity"] == 1
    for n in (1, 3, 1024):
        _info(reg, "n1", num_parallel=n)
        assert a.capacity == n and a.to_json()["capacity"] == n
        assert readmodel.agent_summary(a, time.time())["capacity"] == n
    for bad in HOSTILE:
        _info(reg, "n1", num_parallel=4)
        _info(reg, "n1", num_parallel=bad)
        assert a.capacity == 1, bad
    _info(reg, "n1", num_parallel=4)
    _info(reg, "n1")  # an older agent that does not report it
    assert a.capacity == 1


def test_capacity_comes_back_from_the_stored_info() -> None:
    reg = Registry(Hub())
    for node, n in (("good", 6), ("bad", 10**30)):
        reg.on_state(node, {"state": "online", "session": "s-" + node, "hb_interval": 5})
        _info(reg, node, num_parallel=n)
    rows = reg.drain().agents
    assert all("capacity" not in row for row in rows)  # not a column: it lives in the stored info
    back = Registry(Hub())
    back.load(rows, [], [])
    assert back.agents["good"].capacity == 6 and back.agents["bad"].capacity == 1


# ---- end to end: real controller, agents and Mosquitto ------------------------------------------


@pytest.fixture(scope="module")
def one_controller(tmp_path_factory: pytest.TempPathFactory, mosquitto: Any) -> Iterator[tuple[FleetFactory, Controller]]:
    """One controller for the tests below (a start saved): each looks only at agents of its own."""
    fleet = FleetFactory(tmp_path_factory.mktemp("capacity"), mosquitto)
    try:
        yield fleet, fleet.controller()
    finally:
        fleet.close()


def test_controller_shows_the_capacity_each_agent_reports(one_controller: tuple[FleetFactory, Controller]) -> None:
    fleet, c = one_controller
    agents = [fleet.agent("cap-set", FLEET_OLLAMA_NUM_PARALLEL="3", OLLAMA_NUM_PARALLEL=""),
              fleet.agent("cap-env", OLLAMA_NUM_PARALLEL="2"),  # Ollama not run by the agent: the agent's environment
              fleet.agent("cap-default", OLLAMA_NUM_PARALLEL="")]
    try:
        for node, n in (("cap-set", 3), ("cap-env", 2), ("cap-default", 1)):
            a = c.wait_agent(node, status="online", capacity=n)
            assert a["info"]["ollama"]["num_parallel"] == n
        page = c.http.get("/dashboard/agents/cap-set")
        assert page.status_code == 200 and "<dt>Parallel</dt><dd>3</dd>" in page.text
    finally:
        for agent in agents:  # not left beating through the next test
            agent.stop()


def test_hostile_num_parallel_keeps_capacity_1_and_the_controller_healthy(
        one_controller: tuple[FleetFactory, Controller]) -> None:
    fleet, c = one_controller
    pub = NodePublisher(fleet, "cap-hostile")
    try:
        pub.publish("state", json.dumps({"v": 1, "state": "online", "session": pub.session, "ts": time.time(),
                                         "hb_interval": 5}).encode(), retain=True)
        c.wait_agent("cap-hostile", state="online")

        def info(num_parallel: Any) -> None:
            pub.doc("info", {"hostname": "h", "ollama": {"url": URL, "up": True, "num_parallel": num_parallel}})

        for bad in HOSTILE:
            info(5)
            c.wait_agent("cap-hostile", capacity=5)
            info(bad)
            c.wait_agent("cap-hostile", capacity=1)
        info(5)
        c.wait_agent("cap-hostile", capacity=5)
        for raw in (b'1e400', b'9' * 5000, b'NaN'):  # not JSON, or a number no one can use
            pub.publish("info", b'{"v":1,"session":"' + pub.session.encode() + b'","hostname":"h","ollama":'
                        b'{"url":"' + URL.encode() + b'","up":true,"num_parallel":' + raw + b'}}')
        pub.doc("events", {"event": "marker", "message": "after the hostile info"})
        wait_until(lambda: any(e["kind"] == "marker" for e in c.http.get("/api/events").json()["events"]), 10,
                   what="marker event after the hostile info")
        a = c.agent("cap-hostile")
        assert a is not None and a["capacity"] in (1, 5), a  # dropped (kept 5) or read as unusable (1)
        assert c.http.get("/healthz").status_code == 200
        assert c.http.get("/dashboard/agents/cap-hostile").status_code == 200
        info(7)
        c.wait_agent("cap-hostile", capacity=7)
    finally:
        pub.close()
    c.restart()  # persisted with the info: a restarted controller knows it before the agent speaks again
    assert c.agent("cap-hostile")["capacity"] == 7  # type: ignore[index]
