"""Raw HTTP through the proxy: streaming without buffering, disconnects, failover before the first byte,
in-band errors after it, and the error shapes of both APIs."""

from __future__ import annotations

import itertools
import json
import time

import httpx
import ollama
import openai
import pytest

from ollama_fleet.broker.local import free_loopback_port
from tests.proxy_support import chat_body, served_by, start_fleet, stream_lines, wait_routable
from tests.support import wait_until

TOKEN_DELAY = 0.25  # seconds between fake tokens where timing matters
TOKENS = 8


@pytest.mark.parametrize("path,body,marker", [
    ("/api/chat", chat_body(stream=True), b'"done":false'),
    ("/v1/chat/completions", chat_body(stream=True), b"data: {"),
])
def test_first_chunk_arrives_before_upstream_finishes(fleet, path, body, marker):
    c, _ = start_fleet(fleet, "st-a", tokens=TOKENS, token_delay=TOKEN_DELAY)
    t0 = time.monotonic()
    r, lines = stream_lines(c.http, path, body)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/x-ndjson" if path.startswith("/api")
                                                else "text/event-stream")
    assert r.headers["x-fleet-agent"] == "st-a" and len(r.headers["x-fleet-request-id"]) == 16
    assert marker in lines[0][1]
    upstream_duration = (TOKENS - 1) * TOKEN_DELAY
    assert lines[0][0] - t0 < upstream_duration / 2, "first chunk was held back"
    assert lines[-1][0] - lines[0][0] >= upstream_duration * 0.8
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(lines[:TOKENS])]
    # a buffering proxy delivers in one burst; a loaded machine may merge an odd pair, not most of them
    assert sum(g > TOKEN_DELAY / 2 for g in gaps) >= len(gaps) - 2, f"chunks arrived in bursts: {gaps}"


def test_client_disconnect_cancels_the_upstream_stream(fleet):
    c, fakes = start_fleet(fleet, "dc-a", tokens=200, token_delay=0.1)
    with c.http.stream("POST", "/api/chat", json=chat_body(stream=True)) as r:
        first = next(r.iter_lines())
        assert b'"done":false' in first.encode()
    stats = fakes["dc-a"].wait_stats(lambda s: s["cancelled_paths"].get("/api/chat") == 1)
    assert stats["finished"].get("/api/chat") is None
    wait_until(lambda: c.agent("dc-a")["requests"]["in_flight"] == 0, 5, what="in_flight back to 0")


def test_client_disconnect_before_the_first_byte_cancels_upstream(fleet):
    c, fakes = start_fleet(fleet, "dc-b", initial_delay=60)
    with (httpx.Client(base_url=c.url, timeout=httpx.Timeout(10, read=1.0), trust_env=False) as client,
          pytest.raises(httpx.ReadTimeout)):
        client.post("/api/chat", json=chat_body(stream=False))
    fakes["dc-b"].wait_stats(lambda s: s["cancelled_paths"].get("/api/chat") == 1)


@pytest.mark.parametrize("fault", [{"busy": True}, {"force_status": 500, "fault_paths": ["/api/chat"]}],
                         ids=["busy-503", "forced-500"])
def test_failover_before_the_first_byte(fleet, fault):
    # round_robin tries fo-a first (sorted ids); its failure moves the request to fo-b, then cools fo-a down
    c, fakes = start_fleet(fleet, "fo-a", "fo-b", controller_env={"fleet_routing_strategy": "round_robin",
                                                                  "fleet_proxy_cooldown": "60"})
    fakes["fo-a"].set_config(**fault)
    r = c.http.post("/api/chat", json=chat_body(), headers={"X-Fleet-Debug": "1"})
    assert r.status_code == 200 and r.json()["message"]["content"].startswith("fake-fo-b")
    assert r.headers["x-fleet-agent"] == "fo-b"
    assert "failed over: fo-a: HTTP" in r.headers["x-fleet-route-reason"]
    assert fakes["fo-a"].stats()["requests"]["/api/chat"] == 1
    assert set(served_by(c, 4)) == {"fo-b"}  # fo-a is cooling down: not even tried
    assert fakes["fo-a"].stats()["requests"]["/api/chat"] == 1
    log = c.http.get("/api/requests", params={"per_page": 25}).json()["requests"]
    first = log[-1]
    assert first["attempts"] == 2 and first["agent"] == "fo-b" and first["status"] == 200
    assert first["failover"].startswith("fo-a: HTTP ") and first["error"] is None
    counters = c.agent("fo-a")["requests"]
    assert counters["errors"] == 1 and counters["in_flight"] == 0


def test_failover_when_an_ollama_is_gone(fleet):
    # gone-a's agent sees its Ollama up (and says so), but the address the controller must use is
    # closed: only the connection tells, and the request must move on to gone-b before the first byte
    c = fleet.controller(fleet_routing_strategy="round_robin")
    fakes = {n: fleet.fake_ollama(n) for n in ("gone-a", "gone-b")}
    fleet.agent("gone-a", fakes["gone-a"].url, fleet_advertise_url=f"http://127.0.0.1:{free_loopback_port()}")
    fleet.agent("gone-b", fakes["gone-b"].url)
    for n in fakes:
        wait_until(lambda n=n: (c.agent(n) or {}).get("routable"), what=f"{n} routable")
    r = c.http.post("/api/generate", json={"model": "llama3.2", "prompt": "x", "stream": True})
    assert r.status_code == 200 and r.headers["x-fleet-agent"] == "gone-b"
    assert json.loads(r.text.splitlines()[-1])["done"] is True


def test_all_agents_failing_gives_502_in_the_api_shape(fleet):
    # the agent sees its Ollama up; the address the controller must use is closed (see the test above)
    c = fleet.controller()
    fake = fleet.fake_ollama("dead-a")
    fleet.agent("dead-a", fake.url, fleet_advertise_url=f"http://127.0.0.1:{free_loopback_port()}")
    wait_until(lambda: (c.agent("dead-a") or {}).get("routable"), what="dead-a routable")
    r = c.http.post("/api/chat", json=chat_body())
    assert r.status_code == 502 and r.json()["error"].startswith("all 1 agent failed: dead-a: ConnectError")
    r = c.http.post("/v1/chat/completions", json=chat_body())
    assert r.status_code == 502 and r.json()["error"]["type"] == "api_error"


def test_busy_everywhere_returns_ollamas_own_503(fleet):
    c, _ = start_fleet(fleet, "busy-a", busy=True)
    r = c.http.post("/api/generate", json={"model": "llama3.2", "prompt": "x"})
    assert r.status_code == 503 and r.json()["error"].startswith("server busy")
    assert r.headers["x-fleet-agent"] == "busy-a"


def test_a_4xx_from_ollama_is_returned_as_is_without_failover(fleet):
    c, fakes = start_fleet(fleet, "bad-a", "bad-b", controller_env={"fleet_routing_strategy": "round_robin"})
    for f in fakes.values():
        f.set_config(force_status=400, force_error="invalid options", fault_paths=["/api/chat"])
    r = c.http.post("/api/chat", json=chat_body())
    assert r.status_code == 400 and r.json() == {"error": "invalid options"}
    assert sum(f.stats()["requests"].get("/api/chat", 0) for f in fakes.values()) == 1


def test_mid_stream_stall_ends_with_an_inband_error(fleet):
    c, fakes = start_fleet(fleet, "stall-a", stall_after=2, controller_env={"fleet_proxy_read_timeout": "1"})
    got = []
    with ollama.Client(host=c.url, trust_env=False) as client, pytest.raises(ollama.ResponseError) as e:
        for part in client.chat(model="llama3.2", messages=[{"role": "user", "content": "x"}], stream=True):
            got.append(part.message.content)
    assert len(got) == 2
    assert "stall-a failed mid-stream: ReadTimeout" in e.value.error
    fakes["stall-a"].wait_stats(lambda s: s["cancelled_paths"].get("/api/chat") == 1)


def test_upstream_dying_mid_stream_ends_sse_with_an_inband_error(fleet):
    c, fakes = start_fleet(fleet, "die-a", tokens=200, token_delay=0.05)
    with openai.OpenAI(base_url=c.url + "/v1", api_key="x", max_retries=0,
                       http_client=httpx.Client(trust_env=False)) as oai:
        stream = oai.chat.completions.create(model="llama3.2", messages=[{"role": "user", "content": "x"}],
                                             stream=True)
        first = next(iter(stream))
        assert first.choices[0].delta.content.startswith("fake-die-a")
        fakes["die-a"].kill()
        with pytest.raises(openai.APIError) as e:
            for _ in stream:
                pass
    assert "die-a failed mid-stream" in e.value.message


def test_ollamas_own_inband_error_passes_through(fleet):
    c, _ = start_fleet(fleet, "err-a", error_after=2)
    r = c.http.post("/api/chat", json=chat_body(stream=True))
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert r.status_code == 200 and len(lines) == 3
    assert lines[-1] == {"error": "an error was encountered while running the model"}
    log = c.http.get("/api/requests", params={"status": "error"}).json()["requests"]
    assert len(log) == 1 and log[0]["error"] == "an error was encountered while running the model"


def test_no_agents_is_503_in_both_shapes(fleet):
    c = fleet.controller()
    r = c.http.post("/api/chat", json=chat_body())
    assert r.status_code == 503 and r.json() == {"error": "no available agents"}
    r = c.http.post("/v1/chat/completions", json=chat_body())
    assert r.status_code == 503
    assert r.json() == {"error": {"message": "no available agents", "type": "api_error", "param": None,
                                  "code": None}}


def test_bad_requests_are_400_in_both_shapes(fleet):
    c, _ = start_fleet(fleet, "shape-a")
    cases = [("/api/chat", b"{not json"), ("/api/generate", b'{"prompt": "x"}'), ("/api/embed", b"[1]"),
             ("/api/chat", b"")]
    for path, body in cases:
        r = c.http.post(path, content=body)
        assert r.status_code == 400 and isinstance(r.json()["error"], str), (path, body, r.text)
    assert c.http.post("/api/generate", json={"prompt": "x"}).json() == {"error": "model is required"}
    r = c.http.post("/v1/chat/completions", content=b"{nope")
    err = r.json()["error"]
    assert r.status_code == 400 and err["type"] == "invalid_request_error" and err["param"] is None
    r = c.http.post("/v1/embeddings", json={"input": "x"})
    assert r.status_code == 400 and r.json()["error"]["message"] == "model is required"
    r = c.http.post("/api/chat", json=chat_body("nope"))
    assert r.status_code == 404 and r.json() == {"error": "model 'nope' not found, try pulling it first"}


def test_headers_pass_through_and_hop_by_hop_ones_do_not(fleet):
    c, fakes = start_fleet(fleet, "hdr-a")
    r = c.http.post("/api/chat", json=chat_body(), headers={"User-Agent": "probe/1", "X-Custom": "v",
                                                            "Authorization": "Bearer secret"})
    assert r.status_code == 200 and r.headers["x-fake-name"] == "hdr-a"  # an end-to-end upstream header
    assert r.headers["content-type"].startswith("application/json")
    assert int(r.headers["content-length"]) == len(r.content)
    assert r.headers.get_list("connection") == ["keep-alive"]  # ours only, not the upstream's as well
    sent = fakes["hdr-a"].stats()["last_headers"]["/api/chat"]
    assert sent["user-agent"] == "probe/1" and sent["x-custom"] == "v"
    assert "authorization" not in sent  # the fleet's credentials stay at the fleet
    with c.http.stream("POST", "/api/chat", json=chat_body(stream=True)) as s:
        # ours only: chunked, or a length when the whole stream arrived at once (the fake's is `chunked`)
        framing = s.headers.get_list("transfer-encoding") + s.headers.get_list("content-length")
        assert len(framing) == 1, s.headers
        assert s.headers.get_list("connection") == ["keep-alive"]
        assert json.loads(s.read().splitlines()[-1])["done"] is True


def test_blob_uploads_answer_501(fleet):
    # /api/pull, /api/delete, /api/copy, /api/create, /api/push are fleet-wide (tests/test_distribution_ollama_api.py)
    c = fleet.controller()
    r = c.http.post("/api/blobs/sha256:abc", json={"model": "llama3.2"})
    assert r.status_code == 501, r.text
    assert "not supported yet by ollama-fleet" in r.json()["error"]
    assert c.http.head("/api/blobs/sha256:abc").status_code == 501


def test_pinned_request_goes_to_the_named_agent(fleet):
    c, _ = start_fleet(fleet, "pin-a", "pin-b")
    wait_routable(c, "pin-a", "pin-b")
    for _ in range(3):
        r = c.http.post("/api/chat", json=chat_body(), headers={"X-Fleet-Agent": "pin-b"})
        assert r.headers["x-fleet-agent"] == "pin-b"
    r = c.http.post("/api/chat", json=chat_body(), headers={"X-Fleet-Agent": "nobody"})
    assert r.status_code == 503 and "nobody" in r.json()["error"]
