"""mqtt_url as a list of the nodes of one clustered broker: parsing, secrecy, and the reconnect rotation
(docs/scaling.md, "Clustered broker"). The cluster itself is tests/test_broker_cluster.py."""

from __future__ import annotations

import argparse
import socket
import threading
import time
from collections.abc import Iterator

import aiomqtt
import pytest

from ollama_fleet import mqtt as fmqtt
from ollama_fleet.mqtt import BrokerAddress, Brokers
from ollama_fleet.settings import AGENT, CONTROLLER, Config, ConfigError, add_arguments, load


def _cfg(url: str, **values: str) -> Config:
    return load([CONTROLLER], {"mqtt_url": url, **values}, env={})


def test_one_url_parses_as_it_always_did():
    cfg = _cfg("mqtt://ctl:p%40ss@broker.lan:1884")
    (only,) = BrokerAddress.all(cfg)
    assert only == BrokerAddress.from_config(cfg) == BrokerAddress("broker.lan", 1884, "ctl", "p@ss", False)
    assert BrokerAddress.all(_cfg("broker.lan")) == [BrokerAddress("broker.lan", 1883, None, None, False)]
    assert BrokerAddress.all(_cfg("mqtts://broker.lan")) == [BrokerAddress("broker.lan", 8883, None, None, True)]


def test_a_list_gives_every_node_in_order_with_its_own_scheme_and_port():
    cfg = _cfg(" mqtt://ctl:pw@n1:4001 , ssl://ctl:pw@n2, ,tcp://ctl:pw@n3:4003,")
    assert BrokerAddress.all(cfg) == [
        BrokerAddress("n1", 4001, "ctl", "pw", False),
        BrokerAddress("n2", 8883, "ctl", "pw", True),
        BrokerAddress("n3", 4003, "ctl", "pw", False),
    ]
    assert BrokerAddress.from_config(cfg) == BrokerAddress.all(cfg)[0]  # where every connection starts


def test_mqtt_username_and_password_override_every_url_and_commas_in_passwords_are_encoded():
    cfg = _cfg("mqtt://n1,mqtt://x:y@n2", mqtt_username="gpu-01", mqtt_password="a,b")
    assert [(a.username, a.password) for a in BrokerAddress.all(cfg)] == [("gpu-01", "a,b")] * 2
    encoded = BrokerAddress.all(_cfg("mqtt://gpu-01:a%2Cb@n1,mqtt://gpu-01:a%2Cb@n2"))
    assert [a.password for a in encoded] == ["a,b", "a,b"]


@pytest.mark.parametrize(("url", "error"), [
    ("", "mqtt_url is required"),
    (" , ", "mqtt_url is required"),
    ("mqtt://u:hunter2@n1,http://u:hunter2@n2", "unsupported scheme 'http'"),
    ("mqtt://u:hunter2@n1,mqtt://u:hunter2@n2:port", "bad port for host 'n2'"),
    ("mqtt://u:hunter2@n1:99999", "bad port for host 'n1'"),
    ("mqtt://gpu-01:hunter2@n1,mqtt://gpu-02:hunter2@n2", "must name the same user"),
])
def test_every_url_is_checked_and_errors_never_repeat_a_password(url: str, error: str):
    with pytest.raises(ConfigError, match=error) as e:
        BrokerAddress.all(_cfg(url))
    assert "hunter2" not in str(e.value)


def test_the_whole_list_is_a_secret_and_no_url_of_it_may_carry_a_password_in_argv():
    cfg = _cfg("mqtt://ctl:s3cret@n1,mqtt://ctl:s3cret@n2")
    assert cfg.as_dict()["mqtt_url"] == "***" and "s3cret" not in repr(cfg)
    assert "s3cret" not in repr(BrokerAddress.all(cfg)) and "s3cret" not in repr(Brokers(cfg).addresses)
    parser = argparse.ArgumentParser()
    add_arguments(parser, [AGENT])
    for url in ("mqtt://n1,mqtt://gpu-01:s3cret@n2", "mqtt://n1,gpu-01:s3cret@n2"):
        with pytest.raises(ConfigError, match="password in a command-line flag"):
            load([AGENT], parser.parse_args(["--mqtt-url", url]), env={})
    assert load([AGENT], parser.parse_args(["--mqtt-url", "mqtt://gpu-01@n1,mqtt://n2:1884"]), env={}).mqtt_url


def test_rotation_tries_every_node_before_it_backs_off():
    brokers = Brokers(_cfg("mqtt://n1,mqtt://n2,mqtt://n3"))
    assert brokers.current.host == "n1"
    # n1 fails, n2 fails: straight on to the next; n3 fails too: a whole round, back off
    assert [brokers.failed(), brokers.failed(), brokers.failed()] == [False, False, True]
    assert brokers.current.host == "n1"  # the next round starts over
    brokers.failed()
    brokers.connected()  # n2 took us, then the connection is lost
    assert brokers.current.host == "n2"
    assert [brokers.failed(), brokers.failed(), brokers.failed()] == [False, False, True]  # n3, n1, n2
    assert brokers.current.host == "n2"


def test_with_one_url_every_failure_backs_off_as_before():
    brokers = Brokers(_cfg("mqtt://n1"))
    assert [brokers.failed() for _ in range(3)] == [True, True, True]
    brokers.connected()
    assert brokers.failed() and brokers.current.host == "n1"


def test_a_bad_url_fails_the_attempt_in_the_loop_and_asks_for_a_backoff():
    brokers = Brokers(_cfg("mqtt://n1,ftp://n2"))
    with pytest.raises(ConfigError):
        brokers.client("probe")
    assert brokers.failed() is True  # nothing parsed: every attempt is a whole round


def test_client_kwargs_take_the_given_node():
    cfg = _cfg("mqtt://ctl:pw@n1:4001,mqtts://ctl:pw@n2:4002")
    second = BrokerAddress.all(cfg)[1]
    kw = fmqtt.client_kwargs(cfg, "probe", None, second)
    assert (kw["hostname"], kw["port"], kw["username"], kw["password"]) == ("n2", 4002, "ctl", "pw")
    assert "tls_context" in kw
    assert fmqtt.client_kwargs(cfg, "probe")["hostname"] == "n1"


@pytest.fixture
def hangs_up() -> Iterator[int]:
    """A port that accepts, reads the CONNECT and closes without a CONNACK: what a NATS node does while it
    cannot load the session, or a TCP proxy in front of a dead broker."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(1024)
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        server.close()


async def test_a_hang_up_before_the_connack_fails_the_attempt_at_once(hangs_up: int):
    brokers = Brokers(_cfg(f"mqtt://127.0.0.1:{hangs_up}", mqtt_protocol="311"))
    t0 = time.monotonic()
    with pytest.raises(aiomqtt.MqttError):
        async with brokers.client("probe"):
            pass
    assert time.monotonic() - t0 < 2  # not aiomqtt's 10 s timeout: the next node is tried now
