"""Anthropic's Messages API (`POST /v1/messages`) through the controller, driven by the official `anthropic`
SDK against fake-Ollama agents (real controller and agent processes). One fleet for the module; the tests
that need their own settings (keys, timeouts, routing) start their own."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest
from anthropic.types import Message, MessageParam, TextBlock, TextBlockParam

from ollama_fleet.broker.local import free_loopback_port
from ollama_fleet.controller.proxy.forward import KEYS_RELOAD_EVERY
from tests.conftest import FleetFactory
from tests.fake_ollama import FakeOllamaProcess
from tests.proxy_support import fleet_cli, sse_events, start_fleet, wait_routable
from tests.support import Controller, wait_until

# two words: the fake counts words as input tokens
HI: list[MessageParam] = [{"role": "user", "content": "hello there"}]
STREAM: dict[str, Any] = {"model": "llama3.2", "max_tokens": 50, "stream": True, "messages": HI}
NODES = ("an-a", "an-b")
ADMIN = "adm1n-token-for-anthropic"  # with API keys in use, the request log needs the admin token


AB = tuple[Controller, dict[str, FakeOllamaProcess]]  # the shared fleet: its controller and fakes


@pytest.fixture(scope="class")
def fleet_ab(tmp_path_factory: pytest.TempPathFactory, mosquitto: Any) -> Iterator[AB]:
    # class-scoped: gone before the tests with fleets of their own start (one broker: a controller sees
    # every agent on it)
    factory = FleetFactory(tmp_path_factory.mktemp("proxy-anthropic"), mosquitto)
    try:
        c = factory.controller()
        fakes = {n: factory.fake_ollama(n) for n in NODES}
        for n in NODES:
            factory.agent(n, fakes[n].url)
        wait_routable(c, *NODES)
        yield c, fakes
    finally:
        factory.close()


@pytest.fixture
def ab(fleet_ab: AB) -> Iterator[AB]:
    """The shared fleet; each fake back to its initial config afterwards (a test may inject faults)."""
    yield fleet_ab
    for fake in fleet_ab[1].values():
        assert httpx.post(fake.url + "/_fake/reset", json={"config": True}, trust_env=False).status_code == 200


def client(c: Controller, api_key: str = "unused", **kw: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=c.url, api_key=api_key, max_retries=0, timeout=30,
                               http_client=anthropic.DefaultHttpxClient(trust_env=False), **kw)


def keyed(c: Controller, key: str) -> anthropic.Anthropic:
    """A client that sends its key only as `x-api-key`, Anthropic's header (SDK versions differ in where
    `api_key` goes: this one sends a Bearer credential)."""
    return client(c, key, default_headers={"x-api-key": key, "Authorization": anthropic.Omit()})


def log_row(c: Controller, rid: str) -> dict[str, Any]:
    rows = c.api.get("/api/requests", params={"endpoint": "/v1/messages", "per_page": 100}).json()["requests"]
    return next(r for r in rows if r["rid"] == rid)


def text(m: Message) -> str:
    return "".join(b.text for b in m.content if isinstance(b, TextBlock))


def error_of(e: pytest.ExceptionInfo[anthropic.APIStatusError]) -> Any:
    """The error object of an Anthropic-shaped error body."""
    body = e.value.body
    assert isinstance(body, dict) and body["type"] == "error", body
    return body["error"]


class TestOneFleet:
    """Tests on the shared two-agent fleet."""

    # ---- answers --------------------------------------------------------------------------------
    def test_non_stream_with_agent_header_and_log_row(self, ab: AB) -> None:
        c, _ = ab
        with client(c) as ac:
            raw = ac.messages.with_raw_response.create(model="llama3.2", max_tokens=100, messages=HI,
                                                       system="be brief")
            msg = raw.parse()
        agent = raw.headers["x-fleet-agent"]
        assert agent in NODES
        assert msg.type == "message" and msg.role == "assistant" and msg.stop_reason == "end_turn"
        assert len(msg.content) == 1 and text(msg) == f"fake-{agent} tok1 tok2 tok3 tok4"
        assert (msg.usage.input_tokens, msg.usage.output_tokens) == (4, 5)
        row = log_row(c, raw.headers["x-fleet-request-id"])
        assert row["endpoint"] == "/v1/messages" and row["model"] == "llama3.2:latest" and row["agent"] == agent
        assert row["status"] == 200 and row["stream"] is False and row["error"] is None
        assert (row["prompt_tokens"], row["completion_tokens"]) == (4, 5)

    def test_stream_logs_the_final_output_tokens(self, ab: AB) -> None:
        c, _ = ab
        blocks: list[TextBlockParam] = [{"type": "text", "text": "count to"}, {"type": "text", "text": "three"}]
        with client(c) as ac, ac.messages.stream(model="llama3.2", max_tokens=3,
                                                 messages=[{"role": "user", "content": blocks}]) as s:
            text = "".join(s.text_stream)
            final = s.get_final_message()
            headers = s.response.headers
        agent = headers["x-fleet-agent"]
        assert text == f"fake-{agent} tok1 tok2" and final.stop_reason == "max_tokens"
        assert (final.usage.input_tokens, final.usage.output_tokens) == (3, 3)
        row = log_row(c, headers["x-fleet-request-id"])
        assert row["stream"] is True and row["status"] == 200 and row["agent"] == agent and row["error"] is None
        # message_start says output_tokens 0; message_delta's final count is the one logged
        assert (row["prompt_tokens"], row["completion_tokens"]) == (3, 3)
        assert row["ttfb_ms"] is not None

    def test_raw_stream_is_anthropics_event_sequence(self, ab: AB) -> None:
        c, _ = ab
        r = c.http.post("/v1/messages", json=STREAM)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        kinds = [k for k, _ in sse_events(r.text)]
        assert kinds == ["message_start", "content_block_start", *["content_block_delta"] * 5,
                         "content_block_stop", "message_delta", "message_stop"]
        # `stream` absent or not true: one JSON answer, like OpenAI's endpoints (not Ollama's native default)
        r = c.http.post("/v1/messages", json={"model": "llama3.2", "max_tokens": 50, "messages": HI})
        assert r.status_code == 200 and r.json()["type"] == "message"

    def test_api_key_header_never_goes_upstream(self, ab: AB) -> None:
        c, fakes = ab
        with keyed(c, "no-keys-here") as ac:
            raw = ac.messages.with_raw_response.create(model="llama3.2", max_tokens=5, messages=HI)
        sent = fakes[raw.headers["x-fleet-agent"]].stats()["last_headers"]["/v1/messages"]
        assert "x-api-key" not in sent and "authorization" not in sent
        assert sent["anthropic-version"]  # other headers pass through

    # ---- errors ---------------------------------------------------------------------------------
    def test_unknown_model_is_a_not_found_error(self, ab: AB) -> None:
        c, _ = ab
        with client(c) as ac, pytest.raises(anthropic.NotFoundError) as e:
            ac.messages.create(model="nope", max_tokens=5, messages=HI)
        assert e.value.status_code == 404
        assert e.value.body == {"type": "error", "error": {
            "type": "not_found_error", "message": "model 'nope' not found, try pulling it first"}}

    def test_the_controllers_own_errors_are_in_anthropics_shape(self, ab: AB) -> None:
        c, _ = ab
        cases = [(b"{nope", 400, "invalid_request_error"), (b"", 400, "invalid_request_error"),
                 (b'{"max_tokens": 5}', 400, "invalid_request_error")]
        for body, status, kind in cases:
            r = c.http.post("/v1/messages", content=body)
            assert r.status_code == status and r.json()["type"] == "error", (body, r.text)
            assert r.json()["error"]["type"] == kind and r.json()["error"]["message"]
        assert c.http.post("/v1/messages", content=b"").json()["error"]["message"] == "EOF"
        r = c.http.get("/v1/messages")  # Sanic's own refusal, in the path's API shape too
        assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"

    def test_ollamas_own_errors_pass_through(self, ab: AB) -> None:
        c, _ = ab
        with client(c) as ac, pytest.raises(anthropic.BadRequestError) as e:
            ac.messages.create(model="llama3.2", max_tokens=0, messages=HI)
        assert error_of(e) == {"type": "invalid_request_error",
                               "message": "max_tokens is required and must be positive"}

    def test_inband_error_from_ollama_ends_the_stream_and_is_logged(self, ab: AB) -> None:
        c, fakes = ab
        for fake in fakes.values():
            fake.set_config(error_after=2)
        got: list[str] = []
        with client(c) as ac, pytest.raises(anthropic.APIStatusError) as e, \
                ac.messages.stream(model="llama3.2", max_tokens=50, messages=HI) as s:
            got.extend(s.text_stream)
        assert len(got) == 2
        assert error_of(e) == {"type": "api_error", "message": "an error was encountered while running the model"}
        rows = c.api.get("/api/requests", params={"endpoint": "/v1/messages", "status": "error"}).json()
        assert rows["requests"][0]["error"] == "an error was encountered while running the model"


# ---- fleets of their own ------------------------------------------------------------------------
def test_mid_stream_failure_ends_with_an_inband_error_event(fleet: FleetFactory) -> None:
    c, fakes = start_fleet(fleet, "an-stall", stall_after=2, controller_env={"fleet_proxy_read_timeout": "1"})
    got: list[str] = []
    with client(c) as ac, pytest.raises(anthropic.APIStatusError) as e, \
            ac.messages.stream(model="llama3.2", max_tokens=50, messages=HI) as s:
        got.extend(s.text_stream)
    assert got == ["fake-an-stall", " tok1"]
    assert error_of(e)["type"] == "api_error"
    assert "an-stall failed mid-stream: ReadTimeout" in error_of(e)["message"]
    fakes["an-stall"].wait_stats(lambda st: st["cancelled_paths"].get("/v1/messages") == 1)
    raw = c.http.post("/v1/messages", json=STREAM)
    kind, data = sse_events(raw.text)[-1]
    assert kind == "error" and data["error"]["type"] == "api_error"
    row = c.http.get("/api/requests", params={"status": "error"}).json()["requests"][0]
    assert row["endpoint"] == "/v1/messages" and "failed mid-stream" in row["error"]


def test_failover_before_the_first_byte(fleet: FleetFactory) -> None:
    # round_robin tries the sorted ids in turn: an-1's address is closed (down), an-2 answers 503 (busy),
    # an-3 serves; all before the first byte reached the client
    c = fleet.controller(fleet_routing_strategy="round_robin", fleet_proxy_cooldown="60")
    fakes = {n: fleet.fake_ollama(n) for n in ("an-1", "an-2", "an-3")}
    fleet.agent("an-1", fakes["an-1"].url, fleet_advertise_url=f"http://127.0.0.1:{free_loopback_port()}")
    fleet.agent("an-2", fakes["an-2"].url)
    fleet.agent("an-3", fakes["an-3"].url)
    wait_routable(c, *fakes)
    fakes["an-2"].set_config(busy=True)
    with client(c) as ac:
        raw = ac.messages.with_raw_response.create(model="llama3.2", max_tokens=50, messages=HI)
    assert raw.headers["x-fleet-agent"] == "an-3" and text(raw.parse()).startswith("fake-an-3")
    row = log_row(c, raw.headers["x-fleet-request-id"])
    assert row["attempts"] == 3 and row["status"] == 200 and row["error"] is None
    # the busy answer sends the request on to a free agent (it would have waited for a slot otherwise)
    assert re.match(r"an-1: ConnectError.*; an-2: HTTP 503; waiting for a slot again$", row["failover"]), row["failover"]
    assert fakes["an-2"].stats()["requests"]["/v1/messages"] == 1
    # busy everywhere it can go: Ollama's own 503 in Anthropic's shape, which the SDK calls overloaded
    fakes["an-3"].set_config(busy=True)
    with client(c) as ac, pytest.raises(anthropic.APIStatusError) as e:
        ac.messages.create(model="llama3.2", max_tokens=50, messages=HI)
    assert e.value.status_code == 503 and error_of(e)["type"] == "overloaded_error"


# ---- API keys -----------------------------------------------------------------------------------
def test_api_key_in_x_api_key_or_bearer(fleet: FleetFactory) -> None:
    added = fleet_cli("keys", "add", "claude", "--data-dir", str(fleet.tmp))  # before the controller: loaded as it starts
    assert added.returncode == 0, added.stderr
    key = added.stdout.strip()
    c, fakes = start_fleet(fleet, "an-key", controller_env={"fleet_admin_token": ADMIN})
    body: dict[str, Any] = {"model": "llama3.2", "max_tokens": 5, "messages": HI}
    wait_until(lambda: c.http.post("/v1/messages", json=body).status_code == 401, 10 + KEYS_RELOAD_EVERY,
               interval=KEYS_RELOAD_EVERY, what="the controller to pick up the new key")

    r = c.http.post("/v1/messages", json=body)
    assert r.json() == {"type": "error", "error": {
        "type": "authentication_error",
        "message": "unauthorized: a valid API key is required (Authorization: Bearer <key>, or x-api-key: <key>)"}}
    with keyed(c, key) as ac:
        raw = ac.messages.with_raw_response.create(**body)
        assert text(raw.parse()).startswith("fake-an-key")
    with client(c, key) as ac:  # the SDK's choice of header, whichever it is
        assert ac.messages.create(**body).content
    sent = fakes["an-key"].stats()["last_headers"]["/v1/messages"]
    assert "x-api-key" not in sent and "authorization" not in sent
    with keyed(c, "fk-wrong") as ac, pytest.raises(anthropic.AuthenticationError) as e:
        ac.messages.create(**body)
    assert error_of(e)["type"] == "authentication_error"
    # non-ASCII fails like any wrong key (no 500); the Bearer credential is the one checked when both come
    assert c.http.post("/v1/messages", json=body, headers={b"x-api-key": "kéy".encode()}).status_code == 401
    both = {"x-api-key": key, "Authorization": "Bearer fk-wrong"}
    assert c.http.post("/v1/messages", json=body, headers=both).status_code == 401
    # the OpenAI and native endpoints take the key from x-api-key too
    assert c.http.post("/api/chat", json={**body, "stream": False}, headers={"x-api-key": key}).status_code == 200
    assert log_row(c, raw.headers["x-fleet-request-id"])["key"] == "claude"
