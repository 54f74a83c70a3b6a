"""Two controllers behind nginx with the shipped deploy/nginx/fleet.conf (tests/nginx.py), sharing one
PostgreSQL database and the broker, one agent with the fake Ollama: streams pass unbuffered, both
controllers serve and log into the one database, the client's address survives the hop, and when a
controller is killed a POST it held is not sent again while new requests go to the other."""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fake_ollama import FakeOllamaProcess, start_fake_ollama
from tests.mosquitto import MosquittoProcess
from tests.nginx import SHIPPED_CONF, NginxMissing, NginxProcess, find_nginx, start_nginx
from tests.proxy_support import chat_body, stream_lines, wait_routable
from tests.support import AgentProc, Controller, clear_retained, fresh_postgres_db, wait_until

REQUIRE_TOOLS = os.environ.get("FLEET_TEST_REQUIRE_MOSQUITTO") == "1"  # CI: every tool it installs must be there
NODE = "gpu-front"
TOKEN = "front-admin-token"
CLIENT_ADDR = "127.0.0.2"  # the client's own loopback address, so that it differs from nginx's (127.0.0.1)
TOKENS = 8
TOKEN_DELAY = 0.25


@dataclass
class Front:
    nginx: NginxProcess
    controllers: list[Controller]
    fake: FakeOllamaProcess
    client: httpx.Client  # to nginx, from CLIENT_ADDR


def _nginx_or_skip() -> None:
    if find_nginx() is None:
        if REQUIRE_TOOLS:
            pytest.fail("FLEET_TEST_REQUIRE_MOSQUITTO=1 but nginx is missing (Debian's nginx-light)")
        pytest.skip("nginx is not installed (Debian's nginx-light)")


@pytest.fixture(scope="module")
def front(mosquitto: MosquittoProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    _nginx_or_skip()
    tmp = tmp_path_factory.mktemp("front")
    with fresh_postgres_db("fleet_front") as url, ExitStack() as stack:
        stack.callback(clear_retained, mosquitto.host, mosquitto.port, "controller", mosquitto.passwords["controller"])
        # every controller its own MQTT account (the broker binds client ids to accounts) and data_dir
        # (its request log journal); the database is the one they share
        if "controller-2" not in mosquitto.passwords:
            mosquitto.add_account("controller", "controller-2")
        if NODE not in mosquitto.passwords:
            mosquitto.add_user(NODE)
        fake = start_fake_ollama(NODE)
        stack.callback(fake.stop)
        (tmp / "agent").mkdir()
        stack.callback(AgentProc(tmp / "agent", NODE, mosquitto.url(NODE), fake.url).stop)
        env = {"FLEET_DATABASE_URL": url, "FLEET_ADMIN_TOKEN": TOKEN, "FLEET_TRUSTED_PROXIES": "127.0.0.1"}
        controllers = []
        for i, account in enumerate(("controller", "controller-2"), 1):
            (tmp / f"c{i}").mkdir()
            c = Controller(tmp / f"c{i}", mosquitto.url(account), env, wait=False)
            stack.callback(c.close)
            c.wait_ready()
            controllers.append(c)
        for c in controllers:
            wait_routable(c, NODE, models=())
        nginx = start_nginx(tmp / "nginx", [f"127.0.0.1:{c.port}" for c in controllers])
        stack.callback(nginx.stop)
        client = httpx.Client(base_url=nginx.url, timeout=30, trust_env=False,
                              transport=httpx.HTTPTransport(local_address=CLIENT_ADDR))
        stack.callback(client.close)
        yield Front(nginx, controllers, fake, client)


def _metric(c: Controller, name: str) -> float:
    """The sum of a metric's samples on this controller (its own figures, not the fleet's)."""
    text = c.api.get("/metrics").text
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE))


def test_the_rendered_shipped_config_passes_nginx_t(tmp_path: Path) -> None:
    _nginx_or_skip()
    binary = find_nginx()
    assert binary is not None
    nginx = NginxProcess(binary, tmp_path, ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"])
    assert "syntax is ok" in nginx.check()
    rendered = nginx.fleet_conf.read_text()
    assert [line.split()[1] for line in rendered.splitlines() if line.strip().startswith("server 127.")] == \
        ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
    # the rendering keeps every other line of the shipped file as it is
    kept = [line for line in SHIPPED_CONF.read_text().splitlines()
            if not re.match(r"\s*(server|listen)\s", line)]
    assert [line for line in rendered.splitlines() if not re.match(r"\s*(server|listen)\s", line)] == kept


def test_a_stream_through_nginx_arrives_chunk_by_chunk(front: Front) -> None:
    front.fake.set_config(tokens=TOKENS, token_delay=TOKEN_DELAY)
    try:
        r, lines = stream_lines(front.client, "/api/chat", chat_body(stream=True))
    finally:
        front.fake.set_config(tokens=5, token_delay=0.0)
    assert r.status_code == 200 and r.headers["x-fleet-agent"] == NODE
    assert len(lines) == TOKENS + 1 and b'"done":true' in lines[-1][1]
    # the first chunk arrived long before the fake produced the last one: nginx buffered nothing
    assert lines[-1][0] - lines[0][0] >= (TOKENS - 1) * TOKEN_DELAY * 0.8, [t - lines[0][0] for t, _ in lines]


def test_a_client_hanging_up_through_nginx_stops_the_generation(front: Front) -> None:
    front.fake.reset_stats()
    front.fake.set_config(tokens=200, token_delay=0.1)
    try:
        with front.client.stream("POST", "/api/chat", json=chat_body(stream=True)) as r:
            assert b'"done":false' in next(r.iter_lines()).encode()
        # nginx closes its side towards the controller, which cancels the agent's request
        stats = front.fake.wait_stats(lambda s: s["cancelled_paths"].get("/api/chat") == 1, timeout=10)
    finally:
        front.fake.set_config(tokens=5, token_delay=0.0)
    assert stats["finished"].get("/api/chat") is None


def test_the_dashboard_stream_flows_through_nginx(front: Front) -> None:
    """SSE: the snapshot, then a live update (proxied requests change the overview's figures) on the same
    open response. Requests are sent until one lands on the controller that holds the stream."""
    events: list[float] = []
    stop = threading.Event()

    def poke() -> None:
        with httpx.Client(base_url=front.nginx.url, timeout=10, trust_env=False) as client:
            while not stop.wait(0.3):  # a request every 0.3 s while the stream is read
                client.post("/api/chat", json=chat_body())

    poker = threading.Thread(target=poke)
    headers = {"authorization": f"Bearer {TOKEN}", "accept": "text/event-stream"}
    deadline = time.monotonic() + 20  # past the 15 s ping: a line always comes to check it
    try:
        with front.client.stream("GET", "/dashboard/stream", headers=headers) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("event: "):
                    events.append(time.monotonic())
                    if len(events) == 1:
                        poker.start()  # after the snapshot: what follows is live
                    else:
                        break
                if time.monotonic() > deadline:
                    break
    finally:
        stop.set()
        if poker.is_alive():
            poker.join(15)
    assert len(events) == 2, "no live update through nginx after the snapshot"


def test_both_controllers_serve_and_log_into_the_one_database(front: Front) -> None:
    before = [_metric(c, "fleet_requests_total") for c in front.controllers]
    rids = []
    for _ in range(12):
        r = front.client.post("/api/chat", json=chat_body())
        assert r.status_code == 200, r.text
        rids.append(r.headers["x-fleet-request-id"])
    served = [_metric(c, "fleet_requests_total") - b for c, b in zip(front.controllers, before)]
    assert sum(served) == 12 and all(n > 0 for n in served), served

    for c in front.controllers:  # each sees the rows of both: one request log
        def rows() -> dict[str, dict[str, Any]] | None:
            page = c.api.get("/api/requests", params={"per_page": 100}).json()["requests"]
            found = {row["rid"]: row for row in page if row["rid"] in rids}
            return found if len(found) == len(rids) else None
        found = wait_until(rows, 10, what="both controllers' request log rows in the one database")
        assert found is not None
        # trusted_proxies = nginx's address: the controllers log the client, not nginx
        assert {row["client"] for row in found.values()} == {CLIENT_ADDR}


def test_a_killed_controller_loses_only_what_it_held_and_the_other_serves_the_rest(front: Front) -> None:
    """A POST held by the controller that dies fails with 502 and is not sent again (no `non_idempotent`
    in the shipped config); new POSTs reach the other controller, also while nginx still tries the dead one."""
    front.fake.reset_stats()
    front.fake.set_config(initial_delay=30)  # the request waits in the fake, held by one controller
    held: dict[str, Any] = {}

    def send() -> None:
        try:
            held["r"] = front.client.post("/api/chat", json=chat_body(), timeout=25)
        except httpx.HTTPError as e:  # reported by the assertion below
            held["r"] = e

    sender = threading.Thread(target=send)
    sender.start()
    try:
        front.fake.wait_stats(lambda s: s["in_flight_paths"].get("/api/chat") == 1)
        victim = wait_until(lambda: next((c for c in front.controllers
                                          if _metric(c, "fleet_inflight_requests") > 0), None),
                            what="the controller holding the request")
        assert victim is not None
        survivor = next(c for c in front.controllers if c is not victim)
        victim.kill()  # SIGKILL
        sender.join(20)
        assert not sender.is_alive()
    finally:
        front.fake.set_config(initial_delay=0.0)
    # sent again to the survivor, the request would be waiting 30 s in the fake instead
    assert isinstance(held["r"], httpx.Response) and held["r"].status_code == 502, held["r"]
    assert front.fake.stats()["requests"].get("/api/chat") == 1

    before = _metric(survivor, "fleet_requests_total")
    statuses: list[int] = []
    refused = "connect() failed (111: Connection refused) while connecting to upstream"
    dead = f"127.0.0.1:{victim.port}"

    def served_while_nginx_retries_the_dead_one() -> bool:
        r = front.client.post("/api/chat", json=chat_body())
        statuses.append(r.status_code)
        # once its fail_timeout is over nginx tries the dead controller again: the POST, refused there,
        # moves on to the survivor
        return len(statuses) >= 12 and any(refused in line and dead in line
                                           for line in front.nginx.log_text().splitlines())

    wait_until(served_while_nginx_retries_the_dead_one, 20, interval=0.2,
               what="nginx retrying the killed controller")
    assert set(statuses) == {200}, statuses
    wait_until(lambda: _metric(survivor, "fleet_requests_total") - before == len(statuses),
               what="every request counted by the survivor")
