"""compose.yaml cannot be run here (no Docker engine): check what can be checked without one."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ollama_fleet.cli import _parser
from tests.support import ROOT

COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
FLEET_SERVICES = [name for name, s in SERVICES.items() if s.get("entrypoint") == ["fleet"]]


def test_compose_has_broker_controller_agent_and_ollama():
    assert {"mqtt", "controller", "agent", "ollama"} <= set(SERVICES)
    assert SERVICES["ollama"]["image"].startswith("ollama/ollama")
    assert SERVICES["mqtt"]["image"].startswith("eclipse-mosquitto:2")
    assert (ROOT / SERVICES["controller"]["build"]).joinpath("Dockerfile").is_file()


@pytest.mark.parametrize("service", FLEET_SERVICES)
def test_fleet_commands_parse_with_the_real_cli(service):
    command = SERVICES[service]["command"]
    args = _parser().parse_args(command)  # SystemExit (a failure) on any unknown flag
    assert args.command == command[0]
    if args.command == "broker":
        assert args.broker_args[:2] == ["passwd", "add"]


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_every_bind_mounted_file_exists(service):
    for volume in SERVICES[service].get("volumes", []):
        source = volume.split(":")[0]
        if source.startswith((".", "/")):
            assert (ROOT / source).exists(), f"{service} mounts missing {source}"
        else:
            assert source in COMPOSE["volumes"], f"{service} uses undeclared volume {source}"


def test_broker_paths_in_compose_match_the_shipped_config():
    conf = (ROOT / "broker" / "mosquitto.conf").read_text()
    mounted = {v.split(":")[1] for v in SERVICES["mqtt"]["volumes"]}
    for directive in ("password_file", "acl_file", "persistence_location"):
        path = next(line.split()[1] for line in conf.splitlines() if line.startswith(directive + " "))
        assert any(path.startswith(m) for m in mounted), f"{directive} {path} is not inside a mounted path"


def test_agent_and_controller_credentials_match_their_passwd_entries():
    users = {SERVICES[s]["command"][3] for s in FLEET_SERVICES if SERVICES[s]["command"][0] == "broker"}
    agent_args = _parser().parse_args(SERVICES["agent"]["command"])
    assert {"controller", agent_args.node_id} <= users
    assert "controller:" in SERVICES["controller"]["environment"]["FLEET_MQTT_URL"]
    assert f"{agent_args.node_id}:" in SERVICES["agent"]["environment"]["FLEET_MQTT_URL"]


def test_env_example_names_every_variable_compose_needs():
    import re

    needed = set(re.findall(r"\$\{(\w+)", (ROOT / "compose.yaml").read_text()))
    example = (ROOT / "compose.env.example").read_text()
    assert all(f"{name}=" in example for name in needed), needed
    assert Path(ROOT / "Dockerfile").read_text().count("ENTRYPOINT") == 1
