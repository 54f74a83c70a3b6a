"""The shipped broker config in the official eclipse-mosquitto image, through testcontainers.

Only where a Docker engine runs (never on the project's CI machines, which have none): the native
Mosquitto fixture in conftest.py is the path every other test uses.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ollama_fleet.broker.passwd import add_credentials
from tests.support import ROOT, docker_engine


pytestmark = pytest.mark.skipif(not docker_engine(), reason="no Docker engine: testcontainers path skipped")


def test_shipped_config_enforces_acl_in_the_official_image(tmp_path: Path):
    import paho.mqtt.client as mqtt
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs

    config = tmp_path / "config"
    config.mkdir()
    shutil.copy(ROOT / "broker" / "mosquitto.conf", config / "mosquitto.conf")
    shutil.copy(ROOT / "broker" / "fleet.acl", config / "fleet.acl")
    pw = {u: add_credentials(config / "fleet.passwd", u) for u in ("controller", "node-a")}
    container = (DockerContainer("eclipse-mosquitto:2").with_exposed_ports(1883)
                 .with_volume_mapping(str(config), "/mosquitto/config", "rw"))
    with container:
        wait_for_logs(container, "running", timeout=30)
        host, port = container.get_container_host_ip(), int(container.get_exposed_port(1883))
        codes: dict[int, int] = {}
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="t-node-a", protocol=mqtt.MQTTv5)
        c.on_publish = lambda _c, _u, mid, rc, _p: codes.__setitem__(mid, rc.value)
        c.username_pw_set("node-a", pw["node-a"])
        c.connect(host, port)
        c.loop_start()
        try:
            own = c.publish("fleet/v1/nodes/node-a/events", json.dumps({"v": 1, "event": "x"}), qos=1)
            forged = c.publish("fleet/v1/nodes/node-b/state", b"{}", qos=1)
            own.wait_for_publish(10)
            forged.wait_for_publish(10)
        finally:
            c.loop_stop()
            c.disconnect()
        assert codes[own.mid] == 0 and codes[forged.mid] == 135
