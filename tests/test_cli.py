"""The `fleet` command: help and version everywhere, settings precedence, and `fleet up` end to end."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from ollama_fleet import __version__
from ollama_fleet import settings
from ollama_fleet.cli import EXTRA_COMMANDS, _parser
from ollama_fleet.settings import AGENT, CONTROLLER, ConfigError
from tests.support import ROOT, Proc, wait_until
from ollama_fleet.broker.local import free_loopback_port


def run_fleet(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ollama_fleet.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, timeout=60)


@pytest.mark.parametrize("command", ["up", "controller", "agent", "broker", "settings", *EXTRA_COMMANDS])
def test_every_command_has_help_and_version(command):
    helped = run_fleet(command, "--help")
    assert helped.returncode == 0 and "usage: fleet" in helped.stdout
    versioned = run_fleet(command, "--version")
    assert versioned.returncode == 0 and versioned.stdout.strip() == f"ollama-fleet {__version__}"


def test_help_lists_every_setting_of_its_scope_with_env_name():
    out = run_fleet("agent", "--help").stdout
    for s in settings.settings_for([AGENT]):
        assert s.flag in out and s.env in out.replace("\n", " ").replace("  ", " ") or s.env in out
    assert "--port" not in out  # a controller-only setting


def test_precedence_default_file_env_flag(tmp_path):
    conf = tmp_path / "fleet.toml"
    conf.write_text('heartbeat_interval = 7.5\nport = 9000\n[agent]\nnode_id = "from-file"\n[controller]\nport = 9100\n')
    cfg = settings.load([AGENT], {"config": str(conf)}, env={})
    assert (cfg.heartbeat_interval, cfg.node_id) == (7.5, "from-file")
    assert cfg.source("node_id") == "file" and cfg.source("mqtt_url") == "default"
    cfg = settings.load([CONTROLLER], {"config": str(conf)}, env={})
    assert cfg.port == 9100  # the [controller] table wins over the flat key for its command
    cfg = settings.load([AGENT], {"config": str(conf)}, env={"FLEET_NODE_ID": "from-env"})
    assert cfg.node_id == "from-env"
    ns = _parser().parse_args(["agent", "--config", str(conf), "--node-id", "from-flag", "--heartbeat-interval", "2"])
    cfg = settings.load([AGENT], ns, env={"FLEET_NODE_ID": "from-env"})
    assert (cfg.node_id, cfg.heartbeat_interval, cfg.source("node_id")) == ("from-flag", 2.0, "flag")


@pytest.mark.parametrize("env,message", [
    ({"FLEET_PORT": "eighty"}, "port"),
    ({"FLEET_MQTT_PROTOCOL": "4"}, "mqtt_protocol"),
    ({"FLEET_LOCAL_AGENT": "maybe"}, "local_agent"),
])
def test_bad_values_are_clear_errors(env, message):
    with pytest.raises(ConfigError, match=message):
        settings.load([CONTROLLER, AGENT], {}, env=env)
    out = run_fleet("controller", env=env)
    assert out.returncode == 2 and "configuration error" in out.stderr and message in out.stderr


def test_unknown_key_in_config_file_is_an_error(tmp_path):
    conf = tmp_path / "bad.toml"
    conf.write_text("hearbeat_interval = 3\n")
    with pytest.raises(ConfigError, match="hearbeat_interval"):
        settings.load([AGENT], {"config": str(conf)}, env={})


def test_secrets_are_redacted_in_settings_output():
    out = run_fleet("settings", env={"FLEET_MQTT_URL": "mqtt://ctl:hunter2@h:1883", "FLEET_ADMIN_TOKEN": "tok"})
    assert out.returncode == 0
    assert "hunter2" not in out.stdout and "tok'" not in out.stdout and "mqtt_url = '***'" in out.stdout


def test_readme_configuration_table_is_generated_from_the_settings_table():
    from tests.update_readme import render

    readme = (ROOT / "README.md").read_text()
    assert settings.markdown_table() in readme
    assert render(readme) == readme, "run `uv run python -m tests.update_readme`"


def _fleet_up(tmp_path: Path, ollama_url: str, env: dict[str, str]) -> tuple[Proc, str]:
    port = free_loopback_port()
    proc = Proc(["up"], {"FLEET_PORT": str(port), "FLEET_DATA_DIR": str(tmp_path), "FLEET_OLLAMA_URL": ollama_url,
                         "FLEET_NODE_ID": "local-1", "FLEET_HEARTBEAT_INTERVAL": "0.5", **env},
                tmp_path / "up.log")
    return proc, f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("broker_kind", ["mosquitto", "amqtt"])
def test_fleet_up_brings_up_broker_controller_and_local_agent(tmp_path, fleet, broker_kind):
    fake = fleet.fake_ollama("local")
    env = {"FLEET_MOSQUITTO_BIN": "/nonexistent/mosquitto"} if broker_kind == "amqtt" else {}
    proc, url = _fleet_up(tmp_path, fake.url, env)
    try:
        def listed() -> dict | None:
            agents = httpx.get(f"{url}/api/agents", timeout=5, trust_env=False).json()["agents"]
            return next((a for a in agents if a["id"] == "local-1" and a["routable"]), None)

        agent = wait_until(listed, 30, what=f"local agent via fleet up ({broker_kind})")
        assert agent["ollama"]["version"] == "0.12.6"
        assert re.search(rf"Trial MQTT broker \((embedded )?{broker_kind}", proc.log()), proc.log()[-2000:]
    finally:
        assert proc.stop() == 0, proc.log()[-3000:]
    assert "Traceback" not in proc.log(), proc.log()[-3000:]
