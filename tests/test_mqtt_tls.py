"""MQTT over TLS end to end (issue 9): a CA and a server certificate made with `openssl` here, the
real Mosquitto with the shipped config plus a TLS listener, and the real controller and agent speaking
`mqtts://` with `mqtt_ca_file`. The agent showing up online (and its heartbeats going on) in the
controller's /api/agents proves the controller's fast ingest path (ollama_fleet.mqtt.direct_dispatch) reads
a TLS socket. A client that trusts another CA, or only the system's CAs, is refused.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import paho.mqtt.client as mqtt
import pytest

from ollama_fleet.broker.local import free_loopback_port
from ollama_fleet import mqtt as fmqtt
from ollama_fleet.settings import AGENT, load
from tests.mosquitto import MosquittoMissing, MosquittoProcess, start_mosquitto
from tests.support import AgentProc, Controller, wait_until

OPENSSL_TIMEOUT = 30  # seconds per openssl call


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=OPENSSL_TIMEOUT)


def make_ca(d: Path, name: str) -> tuple[Path, Path]:
    key, cert = d / f"{name}.key", d / f"{name}.pem"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
             "-days", "2", "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    return key, cert


def make_server_cert(d: Path, ca_key: Path, ca_cert: Path) -> tuple[Path, Path]:
    key, csr, cert, ext = d / "server.key", d / "server.csr", d / "server.pem", d / "server.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
             "-subj", "/CN=localhost", cwd=d)
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key), "-CAcreateserial",
             "-out", str(cert), "-days", "2", "-extfile", str(ext), cwd=d)
    return key, cert


class TlsBroker:
    def __init__(self, mq: MosquittoProcess, tls_port: int, ca: Path, wrong_ca: Path) -> None:
        self.mq, self.tls_port, self.ca, self.wrong_ca = mq, tls_port, ca, wrong_ca

    def url(self, user: str) -> str:
        return self.mq.url(user).replace("mqtt://", "mqtts://").replace(f":{self.mq.port}", f":{self.tls_port}")


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl binary not found")
    d = tmp_path_factory.mktemp("tls")
    ca_key, ca = make_ca(d, "fleet-test-ca")
    _, wrong_ca = make_ca(d, "some-other-ca")
    key, cert = make_server_cert(d, ca_key, ca)
    tls_port = free_loopback_port()
    # the TLS listener as broker/README.md describes it: its own options, the binding repeated
    extra = (f"\nlistener {tls_port} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\n"
             "use_username_as_clientid true\n")
    try:
        mq = start_mosquitto(d / "mosquitto", extra_conf=extra)
    except MosquittoMissing as e:
        pytest.skip(str(e))
    try:
        tls = TlsBroker(mq, tls_port, ca, wrong_ca)
        wait_until(lambda: _tls_connack(tls, ca) == 0, 10, what="TLS listener up")
        yield tls
    finally:
        mq.stop()


def _tls_connack(tls: TlsBroker, ca: Path) -> int | None:
    """CONNACK code of a paho v5 client as `controller` over TLS trusting `ca` (raises ssl errors)."""
    got: list[int] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="tls-probe", protocol=mqtt.MQTTv5)
    client.username_pw_set("operator", tls.mq.passwords["operator"])
    client.tls_set(ca_certs=str(ca))
    client.on_connect = lambda _c, _u, _f, rc, _p: got.append(rc.value)
    client.connect("127.0.0.1", tls.tls_port)
    try:
        client.loop_start()
        wait_until(lambda: got, 5, what="CONNACK over TLS")
    finally:
        client.loop_stop()
        client.disconnect()
    return got[0]


def test_controller_and_agent_over_mqtts(tls_broker: TlsBroker, tmp_path: Path) -> None:
    from tests.fake_ollama import start_fake_ollama

    mq = tls_broker.mq
    mq.add_user("tls-node")
    ca_env = {"FLEET_MQTT_CA_FILE": str(tls_broker.ca)}
    c = Controller(tmp_path, tls_broker.url("controller"), ca_env, wait=False)
    fake = start_fake_ollama(name="tls-node")
    agent = None
    try:
        c.wait_ready()
        agent = AgentProc(tmp_path, "tls-node", tls_broker.url("tls-node"), fake.url, ca_env)
        a = c.wait_agent("tls-node", timeout=15, state="online")
        seq = a["metrics"]["seq"] or 0
        wait_until(lambda: ((c.agent("tls-node") or {}).get("metrics", {}).get("seq") or 0) > seq + 1, 10,
                   what="heartbeats keep coming over TLS")
        assert c.wait_agent("tls-node", status="online")["routable"] is True
        assert c.http.get("/api/ingest").json()["connected"] is True
        # the controller knew only the mqtts:// URL: it connected to the TLS port, with TLS
        assert f"127.0.0.1:{tls_broker.tls_port}, user='controller', tls=True" in c.log()
        assert "tls=True" in agent.log()
    finally:
        if agent is not None:
            agent.stop()
        c.close()
        fake.stop()


def _cfg(tls: TlsBroker, ca: str):  # type: ignore[no-untyped-def]
    return load([AGENT], env={"FLEET_MQTT_URL": tls.url("operator"), "FLEET_MQTT_CA_FILE": ca,
                              "FLEET_NODE_ID": "tls-probe"})


async def _connect_with(cfg) -> None:  # type: ignore[no-untyped-def]
    async with aiomqtt.Client(**fmqtt.client_kwargs(cfg, "tls-probe")):
        pass


def _handshake(ctx: ssl.SSLContext, port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1"):
        pass


def test_a_client_trusting_another_ca_is_refused(tls_broker: TlsBroker) -> None:
    """The TLS context our clients get from ollama_fleet.mqtt.client_kwargs refuses the broker unless it
    trusts the broker's CA. (Checked on a bare socket: paho leaks its socket when a handshake fails,
    which pytest's warnings-as-errors would turn into a failure of its own.)"""
    for ca in (str(tls_broker.wrong_ca), ""):  # another CA; the system's CAs only
        ctx = fmqtt.client_kwargs(_cfg(tls_broker, ca), "tls-probe")["tls_context"]
        with pytest.raises(ssl.SSLCertVerificationError):
            _handshake(ctx, tls_broker.tls_port)
    good = fmqtt.client_kwargs(_cfg(tls_broker, str(tls_broker.ca)), "tls-probe")
    _handshake(good["tls_context"], tls_broker.tls_port)  # positive control: same code, right CA
    asyncio.run(_connect_with(_cfg(tls_broker, str(tls_broker.ca))))  # and a whole MQTT session over it
    with pytest.raises(ssl.SSLCertVerificationError):  # a plain client with another CA
        _handshake(ssl.create_default_context(cafile=str(tls_broker.wrong_ca)), tls_broker.tls_port)
    assert _tls_connack(tls_broker, tls_broker.ca) == 0


def test_a_missing_ca_file_is_a_config_error(tls_broker: TlsBroker, tmp_path: Path) -> None:
    from ollama_fleet.settings import ConfigError

    with pytest.raises(ConfigError, match="mqtt_ca_file"):
        fmqtt.client_kwargs(_cfg(tls_broker, str(tmp_path / "nope.pem")), "tls-probe")
