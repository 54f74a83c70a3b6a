"""Admission control end to end: real controller and agent processes, fake Ollama with slow generations.
Capacity per agent, the fleet queue (bounds, disconnects, priorities, fairness), per-key limits, Ollama's busy
answer, warm or cold. The scheduler's own decisions are unit-tested in tests/test_scheduler.py."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx

from tests.proxy_support import (
    ADMIN,
    add_key,
    bearer_auth,
    busy,
    chat_body,
    depth,
    post,
    queue,
    start_fleet,
    wait_keys,
    wait_routable,
)
from tests.support import Controller, wait_until

LLAMA = "llama3.2:latest"

BODIES: dict[str, dict[str, Any]] = {  # one generation per API family, streamed and not
    "/api/chat": chat_body(stream=True),
    "/api/generate": {"model": "llama3.2", "prompt": "hi", "stream": False},
    "/v1/chat/completions": chat_body(stream=True),
    "/v1/completions": {"model": "llama3.2", "prompt": "hi"},
    "/v1/responses": {"model": "llama3.2", "input": "hi"},
    "/v1/messages": {"model": "llama3.2", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}],
                     "stream": True},
}


def post_at_once(c: Controller, paths: list[str]) -> list[tuple[str, httpx.Response]]:
    """BODIES[path] to each path, all sent together: the clients are made first, as making one takes ~25 ms of
    the GIL; made in the threads, 24 of them would spread the sends over longer than a generation lasts."""
    clients = [httpx.Client(base_url=c.url, timeout=60, trust_env=False) for _ in paths]

    def send(client: httpx.Client, path: str) -> tuple[str, httpx.Response]:
        r = client.post(path, json=BODIES[path])
        r.read()
        return path, r
    try:
        with ThreadPoolExecutor(len(paths)) as pool:
            return list(pool.map(send, clients, paths))
    finally:
        for client in clients:
            client.close()


def test_no_agent_gets_more_generations_than_its_capacity_and_the_rest_wait(fleet):
    c, fakes = start_fleet(fleet, "cap-a", "cap-b", agent_env={"fleet_ollama_num_parallel": "2"},
                           tokens=4, token_delay=0.1)
    wait_until(lambda: all(a["capacity"] == 2 for a in queue(c)["agents"]), 10, what="capacities reported")
    paths = list(BODIES) * 4
    answers = post_at_once(c, paths)
    for path, r in answers:
        assert r.status_code == 200, (path, r.text)
        assert r.headers["x-fleet-agent"] in ("cap-a", "cap-b")
    waited = [r for _, r in answers if "x-fleet-queue-wait" in r.headers]
    assert len(waited) >= len(paths) - 4, "four slots in the fleet: the others must have waited"
    assert all(int(r.headers["x-fleet-queue-wait"]) >= 0 for r in waited)
    for f in fakes.values():
        stats = f.stats()
        assert 1 <= stats["max_inference_in_flight"] <= 2, stats["max_inference_in_flight"]
    assert queue(c)["waiting"] == 0 and all(a["busy"] == 0 for a in queue(c)["agents"])
    rows = c.api.get("/api/requests", params={"per_page": 50}).json()["requests"]
    assert sorted(r["endpoint"] for r in rows) == sorted(paths) and all(r["status"] == 200 for r in rows)


def test_queue_bounds_answer_503_with_retry_after_in_each_apis_shape(fleet):
    c, fakes = start_fleet(fleet, "qb-a", controller_env={"fleet_max_queue": "1", "fleet_max_queue_wait": "1.5"},
                           tokens=2, token_delay=2.0)
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(post, c, "/api/chat", chat_body())
        wait_until(lambda: busy(c, "qb-a") == 1, 10, what="the agent's slot taken")
        t0 = time.monotonic()
        queued = pool.submit(post, c, "/api/generate", {"model": "llama3.2", "prompt": "x", "stream": False})
        wait_until(lambda: depth(c) == 1, 10, what="one request queued")
        full = {path: post(c, path, BODIES[path]) for path in BODIES}
        timed_out = queued.result()
        assert time.monotonic() - t0 >= 1.5
        assert running.result().status_code == 200
    for path, r in full.items():
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, (path, r.status_code, r.text)
        assert "queue is full" in r.text
    assert isinstance(full["/api/chat"].json()["error"], str)
    assert full["/v1/chat/completions"].json()["error"]["message"].startswith("every agent")
    anthropic = full["/v1/messages"].json()
    assert anthropic["type"] == "error" and anthropic["error"]["type"] == "overloaded_error"
    assert timed_out.status_code == 503 and "max_queue_wait" in timed_out.json()["error"]
    assert int(timed_out.headers["x-fleet-queue-wait"]) >= 1400 and int(timed_out.headers["retry-after"]) >= 1
    seen = fakes["qb-a"].stats()["requests"]  # only the running request reached Ollama
    assert seen.get("/api/chat") == 1 and not any(k.startswith(("/api/generate", "/v1/")) for k in seen), seen
    rows = c.api.get("/api/requests", params={"status": "503"}).json()["requests"]
    assert len(rows) == len(BODIES) + 1


def test_a_client_that_disconnects_while_queued_leaves_the_queue_at_once(fleet):
    c, fakes = start_fleet(fleet, "dq-a", tokens=3, token_delay=1.0)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(post, c, "/api/chat", chat_body())
        wait_until(lambda: busy(c, "dq-a") == 1, 10, what="the agent's slot taken")
        try:
            post(c, "/api/chat", chat_body(), timeout=0.5)
        except httpx.TimeoutException:
            pass
        else:
            raise AssertionError("the queued request should still have been waiting")
        wait_until(lambda: depth(c) == 0, 5, what="the departed client out of the queue")
        assert running.result().status_code == 200
    wait_until(lambda: busy(c, "dq-a") == 0, 5, what="every slot free again")
    wait_until(lambda: any(r["status"] == 499 for r in c.api.get("/api/requests").json()["requests"]), 10,
               what="the departed request logged as 499")
    assert fakes["dq-a"].stats()["requests"].get("/api/chat") == 1  # it never reached Ollama


def _one_slot_blocked(fleet: Any, node: str, **controller_env: str) -> tuple[Controller, Any]:
    c, fakes = start_fleet(fleet, node, controller_env=controller_env, tokens=1, initial_delay=3.0)
    return c, fakes[node]


def _drain_in_order(c: Controller, fake: Any, node: str, requests: list[tuple[str, dict[str, str]]],
                    pool: ThreadPoolExecutor, headers: dict[str, str] | None = None) -> list[str]:
    """Block the agent's one slot, queue `requests` (label, headers) in this order, let them run; returns the
    labels in the order they finished."""
    done: list[str] = []
    blocker = pool.submit(post, c, "/api/chat", chat_body(), headers)
    wait_until(lambda: busy(c, node) == 1, 10, what="the agent's slot taken")
    futures: list[Future[httpx.Response]] = []
    for i, (label, h) in enumerate(requests):
        fut = pool.submit(post, c, "/api/chat", chat_body(), {**(headers or {}), **h})
        fut.add_done_callback(lambda f, label=label: done.append(label))
        futures.append(fut)
        wait_until(lambda: depth(c) == i + 1, 10, what=f"{i + 1} queued")
    fake.set_config(initial_delay=0.15)  # each a while: they finish in the order they were dispatched
    assert blocker.result().status_code == 200
    for fut in futures:
        r = fut.result()
        assert r.status_code == 200 and int(r.headers["x-fleet-queue-wait"]) > 0, r.text
    return done


def test_priorities_order_the_queue(fleet):
    c, fake = _one_slot_blocked(fleet, "pr-a")
    tiers = ["low", "normal", "high"] * 3
    with ThreadPoolExecutor(12) as pool:
        done = _drain_in_order(c, fake, "pr-a", [(t, {"X-Fleet-Priority": t}) for t in tiers], pool)
    assert done == ["high"] * 3 + ["normal"] * 3 + ["low"] * 3
    bad = post(c, "/v1/chat/completions", chat_body(), {"X-Fleet-Priority": "urgent"})
    assert bad.status_code == 400 and "x-fleet-priority" in bad.json()["error"]["message"]


def test_keys_take_turns_and_a_keys_priority_ceiling_holds(fleet):
    # the keys first: the controller loads them as it starts, no wait for its next reload
    noisy, calm = add_key(fleet, "noisy"), add_key(fleet, "calm")
    quiet = add_key(fleet, "quiet", "--max-priority", "low")
    c, fake = _one_slot_blocked(fleet, "fa-a", fleet_admin_token=ADMIN)
    wait_keys(c, noisy, calm, quiet)
    fake.set_config(initial_delay=3.0)
    requests = [("noisy", bearer_auth(noisy))] * 6 + [("calm", bearer_auth(calm))] * 2
    with ThreadPoolExecutor(12) as pool:
        done = _drain_in_order(c, fake, "fa-a", requests, pool, bearer_auth(noisy))
    assert done[:4] == ["noisy", "calm", "noisy", "calm"], done  # turns, not arrival order
    # the ceiling: "high" from a key capped at low waits as low (seen in the queue's tiers)
    fake.set_config(initial_delay=1.0)
    with ThreadPoolExecutor(2) as pool:
        blocker = pool.submit(post, c, "/api/chat", chat_body(), bearer_auth(noisy))
        wait_until(lambda: busy(c, "fa-a") == 1, 10, what="slot taken")
        capped = pool.submit(post, c, "/api/chat", chat_body(), {**bearer_auth(quiet), "X-Fleet-Priority": "high"})
        wait_until(lambda: depth(c) == 1, 10, what="queued")
        (m,) = queue(c)["models"]
        assert m["by_tier"] == {"high": 0, "normal": 0, "low": 1}
        assert blocker.result().status_code == 200 and capped.result().status_code == 200


def test_per_key_limits_answer_429_with_retry_after(fleet):
    rpm, one, tpm = add_key(fleet, "rpm", "--rpm", "2"), add_key(fleet, "one", "--max-concurrent", "1"), \
        add_key(fleet, "tpm", "--tpm", "3")  # before the controller starts: it loads them at once
    c, fakes = start_fleet(fleet, "kl-a", controller_env={"fleet_admin_token": ADMIN}, tokens=3, token_delay=0.5)
    wait_keys(c, rpm, one, tpm)
    fakes["kl-a"].set_config(token_delay=0.0)
    gen = BODIES["/api/generate"]
    assert [post(c, "/api/generate", gen, bearer_auth(rpm)).status_code for _ in range(2)] == [200] * 2
    over = post(c, "/v1/chat/completions", chat_body(), bearer_auth(rpm))
    assert over.status_code == 429 and 1 <= int(over.headers["retry-after"]) <= 60
    assert over.json()["error"]["message"] and "minute" in over.json()["error"]["message"]
    anthropic = post(c, "/v1/messages", BODIES["/v1/messages"], {"x-api-key": rpm})
    assert anthropic.status_code == 429 and anthropic.json()["error"]["type"] == "rate_limit_error"

    first = post(c, "/api/generate", BODIES["/api/generate"], bearer_auth(tpm))  # 3 tokens out + the prompt's
    assert first.status_code == 200 and first.json()["eval_count"] >= 3
    again = post(c, "/api/generate", BODIES["/api/generate"], bearer_auth(tpm))
    assert again.status_code == 429 and int(again.headers["retry-after"]) >= 1 and "token" in again.text

    fakes["kl-a"].set_config(token_delay=1.0)
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(post, c, "/api/chat", chat_body(), bearer_auth(one))
        wait_until(lambda: busy(c, "kl-a") == 1, 10, what="the key's request running")
        second = post(c, "/api/chat", chat_body(), bearer_auth(one))
        assert second.status_code == 429 and second.headers["retry-after"] == "1"
        assert held.result().status_code == 200
    assert post(c, "/api/chat", chat_body(), bearer_auth(one)).status_code == 200  # the key's count went back down
    assert post(c, "/api/show", {"model": "llama3.2"}, bearer_auth(one)).status_code == 200  # no slot, but metered
    embed = {"model": "llama3.2", "input": "hi"}
    assert post(c, "/api/embed", embed, bearer_auth(rpm)).status_code == 429  # every request of the key counts
    rows = c.api.get("/api/requests", params={"status": "429"}).json()["requests"]
    assert {r["key"] for r in rows} == {"rpm", "tpm", "one"}


def test_an_agent_that_says_busy_gets_less_and_the_busy_request_waits_for_a_slot(fleet):
    c, fakes = start_fleet(fleet, "bz-a", agent_env={"fleet_ollama_num_parallel": "3"}, tokens=2, token_delay=0.4,
                           max_pending=1)
    wait_until(lambda: queue(c)["agents"][0]["capacity"] == 3, 10, what="capacity 3 reported")
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: post(c, "/api/chat", chat_body()), range(2)))
    assert [r.status_code for r in answers] == [200, 200]  # the busy answer never reaches the client
    assert sum("x-fleet-queue-wait" in r.headers for r in answers) == 1
    (agent,) = queue(c)["agents"]
    assert agent["capacity"] == 1 and agent["reported"] == 3  # lowered to what Ollama took
    rows = c.api.get("/api/requests").json()["requests"]
    assert any("HTTP 503; waiting for a slot again" in (r["failover"] or "") and r["status"] == 200 for r in rows)
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: post(c, "/api/chat", chat_body()), range(3)))
    assert [r.status_code for r in answers] == [200] * 3
    assert sum("x-fleet-queue-wait" in r.headers for r in answers) >= 2


def test_warm_or_cold_is_decided_from_measured_times_and_said_in_the_route_reason(fleet):
    c = fleet.controller()
    warm = fleet.fake_ollama("wc-warm", tokens=2, token_delay=0.3, ps=[LLAMA])
    cold = fleet.fake_ollama("wc-cold", tokens=2, token_delay=0.3, load_delay=2.0, ps=[])
    fleet.agent("wc-warm", warm.url)
    fleet.agent("wc-cold", cold.url)
    wait_routable(c, "wc-warm", "wc-cold")
    wait_until(lambda: c.agent("wc-warm")["loaded"] and not c.agent("wc-cold")["loaded"], 15, what="warm and cold")
    debug = {"X-Fleet-Debug": "1"}
    assert post(c, "/api/chat", chat_body(), debug).headers["x-fleet-agent"] == "wc-warm"  # a generation time
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(post, c, "/api/chat", chat_body())
        wait_until(lambda: busy(c, "wc-warm") == 1, 10, what="the warm agent busy")
        first = post(c, "/api/chat", chat_body(), debug)  # no load time measured yet: the idle agent loads
        assert first.headers["x-fleet-agent"] == "wc-cold", first.headers
        assert "cold start on wc-cold: no measured load time" in first.headers["x-fleet-route-reason"]
        assert first.json()["load_duration"] >= 2e9
        assert held.result().status_code == 200
    cold.set_config(ps=[])  # the registry sees it cold again; its load time (2 s) is now known
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(post, c, "/api/chat", chat_body())
        wait_until(lambda: busy(c, "wc-warm") == 1, 10, what="the warm agent busy")
        second = post(c, "/api/chat", chat_body(), debug)
        assert second.headers["x-fleet-agent"] == "wc-warm", second.headers  # ~0.6 s wait beats a 2 s load
        assert "warm wait for wc-warm" in second.headers["x-fleet-route-reason"]
        assert int(second.headers["x-fleet-queue-wait"]) > 0
        assert held.result().status_code == 200
    assert queue(c)["waiting"] == 0


def test_aging_lets_a_long_waiting_low_request_pass_fresh_high_ones(fleet):
    c, fake = _one_slot_blocked(fleet, "ag-a", fleet_queue_aging="0.5")
    with ThreadPoolExecutor(8) as pool:
        blocker = pool.submit(post, c, "/api/chat", chat_body())
        wait_until(lambda: busy(c, "ag-a") == 1, 10, what="the agent's slot taken")
        done: list[str] = []
        low = pool.submit(post, c, "/api/chat", chat_body(), {"X-Fleet-Priority": "low"})
        low.add_done_callback(lambda f: done.append("low"))
        # two agings: the low request now ranks with high ones, and it is older
        wait_until(lambda: any(m["oldest_wait"] >= 1.1 for m in queue(c)["models"]), 10, what="the low one aged")
        highs = [pool.submit(post, c, "/api/chat", chat_body(), {"X-Fleet-Priority": "high"}) for _ in range(3)]
        for h in highs:
            h.add_done_callback(lambda f: done.append("high"))
        wait_until(lambda: depth(c) == 4, 10, what="all four queued")
        fake.set_config(initial_delay=0.15)
        assert blocker.result().status_code == 200
        assert all(f.result().status_code == 200 for f in [low, *highs])
    assert done[0] == "low", done
