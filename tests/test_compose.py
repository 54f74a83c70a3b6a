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


# --- profile ha: PostgreSQL, a second controller, nginx (docs/scaling.md) -----------------------------

HA = "ha"
DEFAULT_SERVICES = {name for name, s in SERVICES.items() if not s.get("profiles")}
HA_SERVICES = {name for name, s in SERVICES.items() if s.get("profiles")}
CONTROLLERS = sorted(name for name, s in SERVICES.items() if s.get("command", [None])[0] == "controller")


def _depends(service: str) -> dict[str, dict[str, object]]:
    deps = SERVICES[service].get("depends_on", {})
    return {d: {} for d in deps} if isinstance(deps, list) else deps


def _required_vars(services: set[str]) -> set[str]:
    import re

    return {v for s in services for v in re.findall(r"\$\{(\w+):\?", yaml.safe_dump(SERVICES[s]))}


def test_the_default_profile_is_untouched_by_ha():
    assert DEFAULT_SERVICES == {"mqtt-passwd-controller", "mqtt-passwd-agent", "mqtt", "controller", "ollama", "agent"}
    assert HA_SERVICES == {"postgres", "controller-2", "mqtt-passwd-controller-2", "nginx"}
    assert all(SERVICES[s]["profiles"] == [HA] for s in HA_SERVICES)
    for service in DEFAULT_SERVICES:  # a default service may wait for an ha one, never need it
        for dep, how in _depends(service).items():
            assert dep in DEFAULT_SERVICES or how.get("required") is False, f"{service} needs {dep}"
    # compose reads variables of every service, enabled or not: ha asks for none the default lacks
    assert _required_vars(HA_SERVICES) <= _required_vars(DEFAULT_SERVICES)
    # empty unless .env sets them: SQLite in /data and no trusted proxy, as before the profile
    env = SERVICES["controller"]["environment"]
    assert env["FLEET_DATABASE_URL"] == "${FLEET_DATABASE_URL:-}"
    assert env["FLEET_TRUSTED_PROXIES"] == "${FLEET_TRUSTED_PROXIES:-}"


def test_ha_runs_two_controllers_with_their_own_accounts_and_data():
    from urllib.parse import urlsplit

    assert CONTROLLERS == ["controller", "controller-2"]
    accounts = [urlsplit(SERVICES[c]["environment"]["FLEET_MQTT_URL"]).username for c in CONTROLLERS]
    assert accounts == ["controller", "controller-2"]  # one account per connection (broker/README.md)
    passwd = {SERVICES[s]["command"][3]: s for s in FLEET_SERVICES if SERVICES[s]["command"][0] == "broker"}
    acl_users = {line.split()[1] for line in (ROOT / "broker" / "fleet.acl").read_text().splitlines()
                 if line.startswith("user ")}
    for account in accounts:
        assert account in passwd, f"no password one-shot for {account}"
        assert account in acl_users, f"broker/fleet.acl has no block for {account}"
        # mosquitto reads its password file once, at start: every account is in it by then
        assert passwd[account] == "mqtt-passwd-controller" or passwd[account] in _depends("mqtt")
    data = [next(v.split(":")[0] for v in SERVICES[c]["volumes"] if v.endswith(":/data")) for c in CONTROLLERS]
    assert len(set(data)) == len(data), "each controller needs its own data_dir (request log journal)"
    shared = ("FLEET_DATABASE_URL", "PGPASSWORD", "FLEET_ADMIN_TOKEN", "FLEET_TRUSTED_PROXIES")
    assert len({tuple(SERVICES[c]["environment"][k] for k in shared) for c in CONTROLLERS}) == 1


def test_ha_controllers_share_the_postgres_service():
    from urllib.parse import urlsplit

    from ollama_fleet.controller.db import pooled

    pg = SERVICES["postgres"]
    assert pg["image"].startswith("postgres:") and pg["healthcheck"]["test"]
    assert _depends("controller-2")["postgres"]["condition"] == "service_healthy"
    assert _depends("controller")["postgres"] == {"condition": "service_healthy", "required": False}
    example = (ROOT / "compose.env.example").read_text()
    line = next(x for x in example.splitlines() if x.lstrip("#").startswith("FLEET_DATABASE_URL="))
    url = urlsplit(line.split("=", 1)[1])
    assert url.scheme.startswith("postgres") and url.hostname == "postgres" and url.password is None  # PGPASSWORD
    assert url.username == pg["environment"]["POSTGRES_USER"] and url.path == "/" + pg["environment"]["POSTGRES_DB"]
    assert pooled(line.split("=", 1)[1])[0].startswith("postgresql+pool://")  # the controllers pool it
    assert pg["environment"]["POSTGRES_PASSWORD"] == SERVICES["controller"]["environment"]["PGPASSWORD"]


def test_ha_nginx_fronts_exactly_the_controllers_with_the_shipped_config():
    import re

    nginx = SERVICES["nginx"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in nginx["volumes"]}
    target = mounts["./deploy/nginx/fleet.conf"]
    assert target.startswith("/etc/nginx/conf.d/") and target.endswith(".conf")
    conf = (ROOT / "deploy" / "nginx" / "fleet.conf").read_text()
    upstream = re.search(r"upstream \w+ \{(.*?)\n\}", conf, re.DOTALL)
    assert upstream is not None
    servers = re.findall(r"^\s*server\s+(\S+)", upstream.group(1), re.MULTILINE)
    ports = {c: _parser().parse_args(SERVICES[c]["command"]).port for c in CONTROLLERS}
    assert servers == [f"{c}:{ports[c]}" for c in CONTROLLERS]
    [listen] = re.findall(r"^\s*listen\s+(\d+);", conf, re.MULTILINE)
    [published] = nginx["ports"]
    assert published.split(":")[1] == listen
    assert set(nginx["depends_on"]) == set(CONTROLLERS)
    # a POST that reached a controller is never sent to another (the comment in the file says why)
    [next_upstream] = re.findall(r"^\s*proxy_next_upstream\s+([^;]*);", conf, re.MULTILINE)
    assert "non_idempotent" not in next_upstream.split()
