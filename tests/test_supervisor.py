"""Running and supervising `ollama serve` (R-O7), the default model (R-O6) and the service unit.

The `ollama` binaries here are the release-shaped script that execs the project's fake Ollama, so every
start, kill and restart is a real process on a real port. Restart backoff is shrunk through the
supervisor's module-level constants."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from ollama_fleet.agent import progress as prog
from ollama_fleet.agent import supervisor as sup
from ollama_fleet.agent.default_model import choose_default_model
from ollama_fleet.agent.manager import OllamaManager
from ollama_fleet.agent.service_install import main as service_install_main
from ollama_fleet.agent.service_install import render_unit
from ollama_fleet import model_tiers
from ollama_fleet.model_tiers import GB, TiersError, load_tiers
from tests.fake_ollama import start_fake_ollama
from tests.mosquitto import MosquittoProcess
from tests.ollama_support import (
    PROXY_VARS,
    VERSION,
    Collector,
    agent_cfg,
    make_own_install,
    make_path_ollama,
    path_without_ollama,
    pid_alive,
    running_agent,
    until,
)
from tests.release_server import FAKE_VERSION, ROOT, ReleaseServer, make_archive
from tests.support import clear_retained, wait_until


@pytest.fixture(autouse=True)
def fast_and_clean(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", path_without_ollama())
    monkeypatch.setattr(sup, "RESTART_BASE", 0.2)
    monkeypatch.setattr(sup, "RESTART_MAX", 1.0)
    monkeypatch.setattr(sup, "WATCH_INTERVAL", 0.2)
    monkeypatch.setattr(sup, "READY_TIMEOUT", 20.0)


@pytest.fixture(autouse=True)
def no_leftover_children() -> Iterator[None]:
    """Every `ollama serve` a test started is gone when it ends."""
    yield

    def ours() -> list[psutil.Process]:
        found = []
        for p in psutil.Process().children(recursive=True):
            try:
                cmd = " ".join(p.cmdline())
                if ("fake_ollama" in cmd or "sleep 60" in cmd) and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
            except psutil.Error:
                pass
        return found

    try:
        wait_until(lambda: not ours(), 10, what="no leftover ollama serve")
    finally:
        for p in ours():
            p.kill()


def events(manager: OllamaManager, name: str) -> list[dict[str, Any]]:
    return [e for e in manager.events if e["event"] == name]


async def test_killed_ollama_is_restarted_and_reported(tmp_path: Path) -> None:
    make_own_install(tmp_path / "ollama")
    manager = OllamaManager(agent_cfg(tmp_path, install_ollama=True))
    manager.start()
    try:
        await until(lambda: manager.state == "up", what="own install started")
        s = manager.supervisor
        assert s is not None and s.managed and manager.source == "installed"
        first = s.pid
        assert first and pid_alive(first) and manager.version == FAKE_VERSION
        os.kill(first, signal.SIGKILL)
        await until(lambda: events(manager, "ollama_stopped"), what="ollama_stopped event")
        down = events(manager, "ollama_stopped")[0]
        assert down["exit_code"] == -signal.SIGKILL and down["restart_in"] == sup.RESTART_BASE
        assert down["level"] == "warning"
        await until(lambda: manager.state == "up" and s.pid not in (None, first), what="restarted")
        assert s.restarts == 1 and manager.info()["restarts"] == 1
        assert len(events(manager, "ollama_started")) == 2 and events(manager, "ollama_started")[1]["pid"] == s.pid
        second = s.pid
    finally:
        await manager.stop()
    assert not pid_alive(second)


async def test_restart_backoff_grows_while_ollama_keeps_crashing(tmp_path: Path) -> None:
    crash = "#!/bin/sh\necho 'Error: listen tcp: bind: address already in use' >&2\nexit 1\n"
    make_own_install(tmp_path / "ollama", script=crash)
    manager = OllamaManager(agent_cfg(tmp_path, install_ollama=True))
    manager.start()
    try:
        await until(lambda: len(events(manager, "ollama_stopped")) >= 4, what="four crashes")
        delays = [e["restart_in"] for e in events(manager, "ollama_stopped")[:4]]
        assert delays == [0.2, 0.4, 0.8, 1.0]  # doubling, capped at RESTART_MAX
        assert all(e["exit_code"] == 1 for e in events(manager, "ollama_stopped"))
        assert manager.info()["state"] in ("restarting", "starting")
    finally:
        await manager.stop()
    log = (tmp_path / "data" / "logs").glob("ollama-serve-*.log")
    assert "address already in use" in next(log).read_text()  # the child's output is kept for the operator


async def test_silent_start_is_killed_and_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sup, "READY_TIMEOUT", 0.5)
    make_own_install(tmp_path / "ollama", script="#!/bin/sh\nexec sleep 60\n")
    manager = OllamaManager(agent_cfg(tmp_path, install_ollama=True))
    manager.start()
    pids: list[int] = []
    try:
        await until(lambda: manager.supervisor and manager.supervisor.pid, what="child started")
        pids.append(manager.supervisor.pid)  # type: ignore[union-attr]
        await until(lambda: events(manager, "ollama_stopped"), what="hung child given up")
        assert not pid_alive(pids[0])
        await until(lambda: manager.supervisor.pid not in (None, pids[0]), what="second try")  # type: ignore[union-attr]
        pids.append(manager.supervisor.pid)  # type: ignore[union-attr]
    finally:
        await manager.stop()
    assert not any(pid_alive(p) for p in pids)


async def test_system_ollama_on_path_is_started_only_when_managed(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    system = make_path_ollama(tmp_path / "usr-bin")
    monkeypatch.setenv("PATH", f"{system.parent}{os.pathsep}{os.environ['PATH']}")
    watcher = OllamaManager(agent_cfg(tmp_path))  # detect only
    watcher.start()
    try:
        await until(lambda: watcher.state == "down", what="binary found, not running")
        assert watcher.source == "path" and watcher.supervisor is None
        assert "manage_ollama" in watcher.info()["problem"]
        assert events(watcher, "ollama_missing") == []
    finally:
        await watcher.stop()

    manager = OllamaManager(agent_cfg(tmp_path, manage_ollama=True))
    manager.start()
    try:
        await until(lambda: manager.state == "up", what="system ollama started")
        assert manager.source == "path" and manager.binary == system
        pid = manager.supervisor.pid  # type: ignore[union-attr]
        assert pid and psutil.Process(pid).cmdline()[-1] == str(os.getpid())  # its --parent-pid: us
        os.kill(pid, signal.SIGTERM)
        await until(lambda: manager.supervisor.pid not in (None, pid) and manager.state == "up",  # type: ignore[union-attr]
                    what="restarted after it stopped")
    finally:
        await manager.stop()


async def test_an_ollama_someone_else_runs_is_watched_then_replaced_when_it_stops(tmp_path: Path) -> None:
    make_own_install(tmp_path / "ollama")
    external = start_fake_ollama("external", config={"version": "0.12.6"})
    try:
        manager = OllamaManager(agent_cfg(tmp_path, install_ollama=True, ollama_url=external.url))
        manager.start()
        try:
            await until(lambda: manager.state == "up", what="external seen")
            s = manager.supervisor
            assert s is not None and not s.managed and s.pid is None and manager.version == "0.12.6"
            external.stop()
            await until(lambda: manager.state == "up" and s.managed, what="own Ollama took over")
            assert manager.version == FAKE_VERSION
            assert [e["event"] for e in manager.events] == ["ollama_started", "ollama_stopped", "ollama_started"]
        finally:
            await manager.stop()
    finally:
        external.stop()


async def test_ollama_killed_is_reported_over_mqtt_at_once(tmp_path: Path, mosquitto: MosquittoProcess) -> None:
    make_own_install(tmp_path / "ollama")
    cfg = agent_cfg(tmp_path, install_ollama=True, heartbeat_interval=5.0)  # slow beats: "at once" is visible
    node = cfg.node_id
    cfg = cfg.replace(mqtt_url=f"mqtt://{node}:{mosquitto.add_user(node)}@127.0.0.1:{mosquitto.port}")
    try:
        async with Collector("127.0.0.1", mosquitto.port, "controller", mosquitto.passwords["controller"], node) as c:
            async with running_agent(cfg) as agent:
                await until(lambda: any(h["ollama"]["state"] == "up" for h in c.kind("heartbeat")), 20,
                            "heartbeat with Ollama up")
                pid = agent.manager.supervisor.pid
                killed_at = time.monotonic()
                os.kill(pid, signal.SIGKILL)
                await until(lambda: c.events("ollama_stopped"), 10, "ollama_stopped event")
                await until(lambda: [m for m in c.messages if m.topic.endswith("/heartbeat") and m.at > killed_at
                                     and m.doc and not m.doc["ollama"]["up"]], 10, "heartbeat showing it down")
                down_beat = [m for m in c.messages if m.topic.endswith("/heartbeat") and m.at > killed_at
                             and m.doc and not m.doc["ollama"]["up"]][0]
                assert down_beat.at - killed_at < 2.0  # not at the next 5 s tick
                assert down_beat.doc["ollama"]["state"] in ("restarting", "starting", "down")
                await until(lambda: any(m.topic.endswith("/heartbeat") and m.at > killed_at and m.doc["ollama"]["up"]
                                        for m in c.messages if m.doc), 20, "heartbeat with Ollama back up")
                await until(lambda: any(i["ollama"].get("restarts") == 1 and i["ollama"]["state"] == "up"
                                        for i in c.kind("info")), 10, "info snapshot with one restart")
                new_pid = agent.manager.supervisor.pid
                assert new_pid != pid
                assert c.contract_errors() == []
            assert not pid_alive(new_pid)
    finally:
        clear_retained("127.0.0.1", mosquitto.port, "controller", mosquitto.passwords["controller"],
                       prefix=f"fleet/v1/nodes/{node}")


def test_ollama_dies_with_a_sigkilled_agent_process(tmp_path: Path, mosquitto: MosquittoProcess) -> None:
    """The real CLI: `fleet agent --install-ollama`, then kill -9 the agent: its `ollama serve` goes too."""
    archive = make_archive(watch_parent=False)  # like the real binary: only PR_SET_PDEATHSIG can end it
    with ReleaseServer() as rs:
        from tests.ollama_support import ASSET

        rs.publish(VERSION, {ASSET: archive})
        cfg = agent_cfg(tmp_path, rs)
        node = cfg.node_id
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
        env.update(PYTHONPATH=str(ROOT), NO_PROXY="*",  # the password in the environment, never argv
                   FLEET_MQTT_URL=f"mqtt://{node}:{mosquitto.add_user(node)}@127.0.0.1:{mosquitto.port}")
        args = [sys.executable, "-m", "ollama_fleet.cli", "agent", "--install-ollama",
                "--node-id", node, "--ollama-url", cfg.ollama_url, "--ollama-version", VERSION,
                "--ollama-download-url", rs.url_template(), "--ollama-checksum-url", rs.checksum_template(),
                "--ollama-install-dir", str(tmp_path / "ollama"), "--data-dir", str(tmp_path / "data"),
                "--heartbeat-interval", "0.5"]
        log = open(tmp_path / "agent.log", "wb")
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        child: psutil.Process | None = None
        try:
            def serving() -> psutil.Process | None:
                assert proc.poll() is None, (tmp_path / "agent.log").read_text()
                kids = [k for k in psutil.Process(proc.pid).children() if "serve" in " ".join(k.cmdline())
                        or "tests.fake_ollama" in " ".join(k.cmdline())]
                return kids[0] if kids else None

            child = wait_until(serving, 30, what="the agent's ollama serve")
            import httpx

            wait_until(lambda: httpx.get(cfg.ollama_url + "/api/version", timeout=1, trust_env=False)
                       .json()["version"] == FAKE_VERSION, 20, what="installed Ollama answering")
            proc.kill()
            proc.wait(10)
            wait_until(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, 10,
                       what="ollama serve gone with its agent")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            if child is not None and child.is_running():
                child.kill()
            log.close()
            clear_retained("127.0.0.1", mosquitto.port, "controller", mosquitto.passwords["controller"],
                           prefix=f"fleet/v1/nodes/{node}")
    text = (tmp_path / "agent.log").read_text()
    assert "\x1b" not in text  # stderr is a file: log lines, no bar
    assert "Ollama 0.13.5 installed" in text


def test_child_environment_keeps_gpu_and_proxy_settings_but_not_agent_secrets() -> None:
    base = {"CUDA_VISIBLE_DEVICES": "0,1", "HTTPS_PROXY": "http://p:3128", "FLEET_MQTT_PASSWORD": "secret",
            "OLLAMA_HOST": "0.0.0.0:1"}
    env = sup.child_env("http://10.0.0.5:11500", base)
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1" and env["HTTPS_PROXY"] == "http://p:3128"
    assert "FLEET_MQTT_PASSWORD" not in env
    assert env["OLLAMA_HOST"] == "10.0.0.5:11500"
    assert sup.ollama_host("http://[::1]:11434") == "[::1]:11434"
    assert sup.ollama_host("http://localhost") == "localhost:11434"


# ---- default model ---------------------------------------------------------------------------------


def test_model_tiers_choose_by_largest_gpu_then_ram() -> None:
    tiers = load_tiers()
    assert tiers.choose(int(85.5 * GB)) == ["gpt-oss:120b"]  # H100 80 GB as NVML reports it
    assert tiers.choose(int(17.2 * GB)) == ["gpt-oss:20b"]  # a "16 GB" card
    assert tiers.choose(int(8.59 * GB)) == ["llama3.1:8b"]
    assert tiers.choose(int(6.4 * GB)) == ["llama3.2:3b"]
    assert tiers.choose(int(4.29 * GB)) == ["llama3.2:1b"]
    assert tiers.choose(None, 64 * GB) == ["gpt-oss:20b"]  # no GPU: half the RAM
    assert tiers.choose(None, 16 * GB) == ["llama3.1:8b"]
    assert tiers.choose(None, None) == ["llama3.2:1b"]
    assert model_tiers.choose(24 * GB, None) == ["gpt-oss:20b"]
    assert model_tiers.largest_gpu_memory([{"mem_total": 8 * GB}, {"mem_total": 24 * GB}]) == 24 * GB
    assert model_tiers.largest_gpu_memory([]) is None


def test_model_tiers_file_is_configurable(tmp_path: Path) -> None:
    f = tmp_path / "tiers.json"
    f.write_text(json.dumps({"tiers": [{"min_gb": 0, "models": ["qwen2.5:0.5b"]}, {"min_gb": 10, "models": ["x:1"]}]}))
    cfg = agent_cfg(tmp_path, model_tiers_file=str(f))
    assert choose_default_model(cfg, [{"mem_total": 12 * GB}], None) == "x:1"
    assert choose_default_model(cfg, [], 4 * GB) == "qwen2.5:0.5b"
    assert choose_default_model(cfg.replace(default_model="gemma3:1b"), [], None) == "gemma3:1b"
    f.write_text('{"tiers": []}')
    with pytest.raises(TiersError):
        load_tiers(f)


async def test_default_model_is_pulled_once_ollama_is_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prog, "JOB_MIN_INTERVAL", 0.1)
    fake = start_fake_ollama("dm", config={"pull_total": 3_000_000, "pull_speed": 6_000_000})
    try:
        manager = OllamaManager(agent_cfg(tmp_path, ollama_url=fake.url, pull_default_model=True,
                                          default_model="llama3.1:8b"))
        manager.start()
        try:
            await until(lambda: events(manager, "default_model_pulled") or events(manager, "default_model_pull_failed"),
                        20, "default model pulled")
            assert events(manager, "default_model_pulled"), list(manager.events)
            jobs = [j for j in manager.jobs.values() if j["verb"] == "model.pull"]
            assert len(jobs) == 1
            job = jobs[0]
            assert job["origin"] == "default" and job["args"] == {"model": "llama3.1:8b"}
            assert job["status"] == "completed" and job["progress"] == 1.0 and job["total"] > 0
            assert manager.default_model == "llama3.1:8b"
        finally:
            await manager.stop()
        # already there now: a second agent start does not pull again
        again = OllamaManager(agent_cfg(tmp_path, ollama_url=fake.url, pull_default_model=True,
                                        default_model="llama3.1:8b"))
        again.start()
        try:
            await until(lambda: again.default_model == "llama3.1:8b", 10, "default model checked")
            assert not any(j["verb"] == "model.pull" for j in again.jobs.values())
        finally:
            await again.stop()
    finally:
        fake.stop()


async def test_default_model_pull_failure_is_a_failed_job(tmp_path: Path) -> None:
    fake = start_fake_ollama("dm2")
    try:
        manager = OllamaManager(agent_cfg(tmp_path, ollama_url=fake.url, pull_default_model=True,
                                          default_model="no-such-model:1b"))
        manager.start()
        try:
            await until(lambda: events(manager, "default_model_pull_failed"), 20, "pull failure reported")
            job = next(j for j in manager.jobs.values() if j["verb"] == "model.pull")
            assert job["status"] == "failed" and "no-such-model" in job["error"]
        finally:
            await manager.stop()
    finally:
        fake.stop()


# ---- service unit ----------------------------------------------------------------------------------


def test_service_install_writes_the_unit_and_an_env_template(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    env_file = tmp_path / "etc" / "agent.env"
    rc = service_install_main(["install", "--unit-dir", str(tmp_path / "units"), "--env-file", str(env_file),
                               "--exec", "/opt/fleet/bin/fleet", "--user", "fleetsvc"])
    assert rc == 0
    unit = (tmp_path / "units" / "ollama-fleet-agent.service").read_text()
    for line in ("Restart=on-failure", "User=fleetsvc", "Group=fleetsvc", f"EnvironmentFile={env_file}",
                 "ExecStart=/opt/fleet/bin/fleet agent", "KillMode=mixed", "WantedBy=multi-user.target"):
        assert line in unit.splitlines(), line
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert "FLEET_MQTT_URL=" in env_file.read_text()
    out = capsys.readouterr().out
    assert "systemctl daemon-reload" in out and "systemctl enable --now ollama-fleet-agent.service" in out
    env_file.write_text("FLEET_MQTT_URL=mqtt://kept\n")  # an existing env file is never overwritten
    assert service_install_main(["install", "--unit-dir", str(tmp_path / "units"), "--env-file", str(env_file)]) == 0
    assert env_file.read_text() == "FLEET_MQTT_URL=mqtt://kept\n"
    shipped = (ROOT / "agent" / "systemd" / "ollama-fleet-agent.service").read_text()
    assert "EnvironmentFile=/etc/ollama-fleet/agent.env" in shipped and "Restart=on-failure" in shipped
    assert render_unit(exec_cmd="/usr/bin/fleet").count("ExecStart=/usr/bin/fleet agent") == 1




async def test_an_ollama_that_was_up_and_stops_is_down_not_missing(tmp_path: Path) -> None:
    fake = start_fake_ollama("gone")
    try:
        manager = OllamaManager(agent_cfg(tmp_path, ollama_url=fake.url))  # detect only, nothing on PATH
        manager.start()
        try:
            await until(lambda: manager.state == "up", what="seen up")
            fake.stop()
            await until(lambda: manager.state == "down", what="down after it stopped")
            assert events(manager, "ollama_missing") == [] and manager.supervisor is None
        finally:
            await manager.stop()
    finally:
        fake.stop()
