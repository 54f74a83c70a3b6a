"""Agent pieces that need no broker: identity, and collectors that fail soft per field."""

from __future__ import annotations

import psutil
import pytest

from ollama_fleet.agent import collect
from ollama_fleet.agent.service import Agent, default_node_id
from ollama_fleet.contract.protocol import check
from ollama_fleet.settings import ConfigError, load


def _agent(**values: str) -> Agent:
    return Agent(load(["agent"], {"mqtt_url": "mqtt://127.0.0.1:1", **values}, env={}))


def test_default_node_id_is_hostname_and_port():
    assert default_node_id("http://127.0.0.1:11434", "GPU_Box.lab.example") == "gpu-box-11434"
    assert default_node_id("http://127.0.0.1:11500", "x") == "x-11500"
    assert default_node_id("http://127.0.0.1", "___") == "node-11434"


def test_node_id_defaults_to_mqtt_username_and_is_validated():
    assert _agent(mqtt_url="mqtt://gpu-07:pw@127.0.0.1:1").node_id == "gpu-07"
    assert _agent(mqtt_url="mqtt://gpu-07:pw@127.0.0.1:1", node_id="gpu-08").node_id == "gpu-08"
    with pytest.raises(ConfigError, match="node_id"):
        _agent(node_id="Bad/Id")
    # role accounts have more than a node's rights in broker/fleet.acl: no agent may take one
    for role in ("controller", "controller-2", "operator"):
        with pytest.raises(ConfigError, match="role's account"):
            _agent(mqtt_url=f"mqtt://{role}:pw@127.0.0.1:1")
    assert _agent(node_id="controller-room-2").node_id == "controller-room-2"  # only the role names


async def test_heartbeat_survives_every_collector_failing(monkeypatch):
    agent = _agent(node_id="soft-1")

    def boom(*_a, **_k):
        raise OSError("collector broke")

    for name in ("cpu_percent", "virtual_memory", "disk_usage", "net_if_addrs", "cpu_count"):
        monkeypatch.setattr(psutil, name, boom)
    monkeypatch.setattr(agent.gpus, "metrics", boom)
    hb = agent.heartbeat()
    assert hb["cpu"] is None and hb["mem"] is None and hb["disk_free"] is None and hb["gpus"] == []
    check("heartbeat", hb)  # still a valid heartbeat for the controller
    facts = collect.host_facts(agent.disk_path)
    assert facts["ips"] == [] and facts["cpu_count"] is None and facts["hostname"]
    await agent.ollama.aclose()
