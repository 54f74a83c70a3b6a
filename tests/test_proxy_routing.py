"""Routing end to end: real agents report their models, loaded models and load; the proxy spreads,
picks agents with the model, prefers warm ones, and avoids a hot one under `metrics`."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from tests.fake_ollama import DEFAULT_MODELS
from tests.proxy_support import (
    SLOW_HEARTBEAT,
    chat_body,
    publish_heartbeat,
    served_by,
    start_fleet,
    wait_routable,
)
from tests.support import wait_until

LLAMA = "llama3.2:latest"
QWEN = "qwen2.5:0.5b"


def test_round_robin_spreads_evenly_over_idle_agents(fleet):
    c, _ = start_fleet(fleet, "rr-a", "rr-b", "rr-c", controller_env={"fleet_routing_strategy": "round_robin"})
    wait_routable(c, "rr-a", "rr-b", "rr-c")
    counts = Counter(served_by(c, 30))
    assert set(counts) == {"rr-a", "rr-b", "rr-c"} and all(8 <= n <= 12 for n in counts.values()), counts
    ten = Counter(served_by(c, 10))
    assert all(2 <= ten[n] <= 5 for n in ("rr-a", "rr-b", "rr-c")), ten
    agents = c.agents()
    for node, n in (counts + ten).items():
        req = agents[node]["requests"]
        assert req["total"] == n and req["errors"] == 0 and req["in_flight"] == 0 and req["mean_latency_ms"] > 0


def test_least_busy_spreads_concurrent_requests(fleet):
    c, _ = start_fleet(fleet, "lb-a", "lb-b", "lb-c", tokens=4, token_delay=0.1)
    wait_routable(c, "lb-a", "lb-b", "lb-c")
    with ThreadPoolExecutor(6) as pool:
        counts = Counter(pool.map(lambda _: served_by(c, 1)[0], range(30)))
    assert set(counts) == {"lb-a", "lb-b", "lb-c"} and min(counts.values()) >= 5, counts


def test_only_agents_with_the_model_serve_it(fleet):
    c = fleet.controller(fleet_routing_strategy="round_robin")  # warmth plays no part: both serve qwen
    only_qwen = fleet.fake_ollama("ma-a", models={QWEN: DEFAULT_MODELS[QWEN]})
    both = fleet.fake_ollama("ma-b", models={LLAMA: DEFAULT_MODELS[LLAMA], QWEN: DEFAULT_MODELS[QWEN]})
    fleet.agent("ma-a", only_qwen.url)
    fleet.agent("ma-b", both.url)
    wait_routable(c, "ma-a", models=(QWEN,))
    wait_routable(c, "ma-b", models=(LLAMA, QWEN))
    assert set(served_by(c, 8, body=chat_body("llama3.2"))) == {"ma-b"}  # `llama3.2` means `llama3.2:latest`
    assert only_qwen.stats()["requests"].get("/api/chat") is None
    assert set(served_by(c, 8, body=chat_body(QWEN))) == {"ma-a", "ma-b"}


def test_warm_agent_is_preferred(fleet):
    c = fleet.controller()
    cold = fleet.fake_ollama("w-a")
    warm = fleet.fake_ollama("w-b", ps=[LLAMA])  # reports llama3.2 loaded in /api/ps
    fleet.agent("w-a", cold.url)
    fleet.agent("w-b", warm.url)
    wait_routable(c, "w-a", "w-b")
    wait_until(lambda: c.agent("w-b")["loaded"] == [LLAMA], 10, what="w-b reports llama3.2 loaded")
    assert set(served_by(c, 10)) == {"w-b"}
    r = c.http.post("/api/chat", json=chat_body(), headers={"X-Fleet-Debug": "1"})
    assert r.headers["x-fleet-route-reason"].startswith("least_busy: w-b")
    assert "w-b(in_flight=0 warm" in r.headers["x-fleet-route-reason"]
    assert cold.stats()["requests"].get("/api/chat") is None


def test_metrics_strategy_avoids_an_agent_at_90_percent_cpu(fleet, mosquitto):
    # slow heartbeats: the load figures published below stay in the registry for the whole test
    c, _ = start_fleet(fleet, "m-cool", "m-hot", controller_env={"fleet_routing_strategy": "metrics"},
                       agent_env={"fleet_heartbeat_interval": SLOW_HEARTBEAT})
    wait_routable(c, "m-cool", "m-hot")
    publish_heartbeat(mosquitto, "m-hot", cpu=90.0, mem=30.0)
    publish_heartbeat(mosquitto, "m-cool", cpu=15.0, mem=30.0)
    wait_until(lambda: c.agent("m-hot")["metrics"]["cpu"] == 90.0 and c.agent("m-cool")["metrics"]["cpu"] == 15.0,
               10, what="doctored heartbeats in the registry")
    assert set(served_by(c, 10)) == {"m-cool"}
    publish_heartbeat(mosquitto, "m-cool", cpu=95.0, mem=30.0)  # both hot: round-robin
    wait_until(lambda: c.agent("m-cool")["metrics"]["cpu"] == 95.0, 10, what="m-cool hot")
    assert Counter(served_by(c, 10)) == {"m-cool": 5, "m-hot": 5}
