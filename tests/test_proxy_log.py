"""The request log: one row per proxied request, filters, pagination, export, durability, retention."""

from __future__ import annotations

import csv
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

from tests.proxy_support import (
    ADMIN,
    add_key,
    bearer_auth,
    busy,
    chat_body,
    db_rows,
    depth,
    post,
    start_fleet,
    wait_keys,
    wait_routable,
)
from tests.support import wait_until


def _log(c, **params):
    r = c.http.get("/api/requests", params=params)
    assert r.status_code == 200, r.text
    return r.json()


def test_every_request_is_recorded_with_its_figures(fleet):
    c, _ = start_fleet(fleet, "log-a", tokens=5)
    wait_routable(c, "log-a")
    t_start = time.time()
    assert c.http.post("/api/chat", json=chat_body()).status_code == 200
    assert c.http.post("/api/generate", json={"model": "llama3.2", "prompt": "a b c"}).status_code == 200
    r = c.http.post("/v1/chat/completions", json=chat_body(stream=True, stream_options={"include_usage": True}))
    assert r.status_code == 200
    assert c.http.post("/api/embed", json={"model": "all-minilm", "input": ["x y", "z"]}).status_code == 200
    nope = c.http.post("/api/chat", json=chat_body("nope"))
    assert nope.status_code == 404
    broken = c.http.post("/v1/completions", content=b"{")
    assert broken.status_code == 400
    page = _log(c)
    assert page["total"] == 6 and page["page"] == 1 and page["per_page"] == 25 and page["pages"] == 1
    rows = page["requests"]
    assert [x["endpoint"] for x in rows] == ["/v1/completions", "/api/chat", "/api/embed",
                                            "/v1/chat/completions", "/api/generate", "/api/chat"]
    bad, missing, embed, oai, gen, chat = rows
    # refused requests name their log row too
    assert (bad["rid"], missing["rid"]) == (broken.headers["x-fleet-request-id"], nope.headers["x-fleet-request-id"])
    assert chat["model"] == "llama3.2:latest" and chat["agent"] == "log-a" and chat["status"] == 200
    assert chat["stream"] is False and chat["attempts"] == 1 and chat["client"] == "127.0.0.1"
    assert (chat["prompt_tokens"], chat["completion_tokens"]) == (1, 5)
    assert gen["stream"] is True and (gen["prompt_tokens"], gen["completion_tokens"]) == (3, 5)
    assert oai["stream"] is True and (oai["prompt_tokens"], oai["completion_tokens"]) == (1, 5)
    assert embed["prompt_tokens"] == 3 and embed["completion_tokens"] is None
    assert 0 < chat["ttfb_ms"] <= chat["duration_ms"] and t_start - 1 < chat["ts"] < time.time()
    assert len(chat["rid"]) == 16 and chat["error"] is None
    assert missing["status"] == 404 and missing["agent"] is None and missing["attempts"] == 0
    assert missing["error"].startswith("model 'nope' not found")
    assert bad["status"] == 400 and bad["model"] is None
    assert _log(c, agent="log-a")["total"] == 4


def test_filters_pagination_and_export(fleet):
    c, _ = start_fleet(fleet, "flt-a", "flt-b", controller_env={"fleet_routing_strategy": "round_robin"})
    wait_routable(c, "flt-a", "flt-b", models=("llama3.2:latest", "qwen2.5:0.5b"))
    for _ in range(20):
        assert c.http.post("/api/chat", json=chat_body()).status_code == 200
    middle = time.time()
    for _ in range(10):
        assert c.http.post("/api/generate", json={"model": "qwen2.5:0.5b", "prompt": "x"}).status_code == 200
    c.http.post("/api/chat", json=chat_body("missing"))

    assert _log(c)["total"] == 31
    assert _log(c, model="llama3.2")["total"] == 20  # the short name matches the normalised one
    assert _log(c, model="qwen2.5:0.5b", agent="flt-a")["total"] == 5
    assert _log(c, status="404")["total"] == 1 and _log(c, status="4xx,5xx")["total"] == 1
    assert _log(c, status="error")["total"] == 1 and _log(c, status="200")["total"] == 30
    assert _log(c, since=str(middle))["total"] == 11
    assert _log(c, until=str(middle), endpoint="/api/chat")["total"] == 20
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(middle + 3600))
    assert _log(c, since=iso)["total"] == 0

    p1, p2 = _log(c, per_page="25"), _log(c, per_page="25", page="2")
    assert len(p1["requests"]) == 25 and len(p2["requests"]) == 6 and p1["pages"] == 2
    ids = [x["rid"] for x in p1["requests"] + p2["requests"]]
    assert len(set(ids)) == 31
    ts = [x["ts"] for x in p1["requests"] + p2["requests"]]
    assert ts == sorted(ts, reverse=True)
    assert len(_log(c, per_page="100")["requests"]) == 31
    for bad in ({"per_page": "10"}, {"page": "0"}, {"page": "x"}, {"status": "abc"}, {"since": "yesterday"},
                {"export": "xml"}):
        r = c.http.get("/api/requests", params=bad)
        assert r.status_code == 400 and r.json()["error"], bad

    r = c.http.get("/api/requests", params={"export": "csv", "model": "qwen2.5:0.5b"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert 'filename="requests.csv"' in r.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert len(rows) == 10 and {x["agent"] for x in rows} == {"flt-a", "flt-b"}
    assert rows[0]["time"].endswith("Z") and rows[0]["endpoint"] == "/api/generate" and rows[0]["status"] == "200"
    r = c.http.get("/api/requests", params={"export": "json", "status": "404"})
    assert [x["model"] for x in json.loads(r.content)] == ["missing:latest"]


def test_records_survive_a_crash_after_the_flush_and_a_clean_restart(fleet):
    c, _ = start_fleet(fleet, "dur-a")
    wait_routable(c, "dur-a")
    for _ in range(3):
        assert c.http.post("/api/chat", json=chat_body()).status_code == 200
    # the periodic flusher (0.2 s in tests) writes them; nothing here asks for a flush
    wait_until(lambda: db_rows(fleet.tmp, "select count(*) from requestrecord")[0][0] == 3, 10,
               what="3 rows on disk")
    c.kill()
    c.start()
    c.wait_ready()
    assert _log(c)["total"] == 3
    assert c.http.post("/api/chat", json=chat_body("nope")).status_code == 404
    c.restart()  # SIGTERM: the shutdown flush writes what the flusher has not yet
    assert _log(c)["total"] == 4 and _log(c, status="404")["requests"][0]["model"] == "nope:latest"


def test_old_records_are_pruned_after_the_retention(fleet):
    c, _ = start_fleet(fleet, "ret-a")
    wait_routable(c, "ret-a")
    assert c.http.post("/api/chat", json=chat_body()).status_code == 200
    wait_until(lambda: _log(c)["total"] == 1, 5)
    c.env["FLEET_REQUEST_LOG_RETENTION_DAYS"] = str(0.5 / 86400)  # half a second
    wait_until(lambda: time.time() - _log(c)["requests"][0]["ts"] > 1, 5, what="the record to age")
    c.restart()  # pruning runs at start, then every 10 minutes
    wait_until(lambda: _log(c)["total"] == 0, 5, what="the old record pruned")


def test_queue_wait_and_priority_are_recorded_shown_and_filtered(fleet):
    """One slot (capacity 1): a high-priority chat holds it, a plain generate waits in the queue; a key capped
    at `low` is logged at its ceiling; an embedding (metered under its key, never queued) has no priority."""
    c, fakes = start_fleet(fleet, "qlog-a", controller_env={"fleet_admin_token": ADMIN}, tokens=1,
                           initial_delay=1.0)
    plain, low_key = add_key(fleet, "ql"), add_key(fleet, "ql-low", "--max-priority", "low")
    key, capped = bearer_auth(plain), bearer_auth(low_key)
    wait_routable(c, "qlog-a", models=("llama3.2:latest", "all-minilm:latest"))
    # probed with a request that is no generation: the probe's own rows have no priority
    wait_keys(c, plain, low_key)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, c, "/api/chat", chat_body(), {**key, "X-Fleet-Priority": "high"})
        wait_until(lambda: busy(c, "qlog-a") == 1, 10, what="the agent's one slot taken")
        second = pool.submit(post, c, "/api/generate", {"model": "llama3.2", "prompt": "x", "stream": False}, key)
        wait_until(lambda: depth(c) == 1, 10, what="the generate queued")
        fakes["qlog-a"].set_config(initial_delay=0.0)
        held, queued = first.result(), second.result()
    assert held.status_code == 200 and "x-fleet-queue-wait" not in held.headers
    assert queued.status_code == 200
    assert post(c, "/api/chat", chat_body(), {**capped, "X-Fleet-Priority": "high"}).status_code == 200
    assert post(c, "/api/embed", {"model": "all-minilm", "input": "x"}, key).status_code == 200

    def log(**params: str) -> dict:
        r = c.api.get("/api/requests", params=params)
        assert r.status_code == 200, r.text
        return r.json()

    rows = [x for x in log()["requests"] if x["key"]]
    embed, low, gen, chat = rows
    assert (chat["queue_ms"], chat["priority"]) == (None, "high")
    assert gen["priority"] == "normal" and gen["queue_ms"] > 0
    assert abs(gen["queue_ms"] - int(queued.headers["x-fleet-queue-wait"])) <= 1  # the same figure
    assert gen["queue_ms"] <= gen["duration_ms"]
    assert (low["key"], low["priority"], low["queue_ms"]) == ("ql-low", "low", None)  # the key's ceiling
    assert (embed["endpoint"], embed["queue_ms"], embed["priority"]) == ("/api/embed", None, None)

    assert [x["rid"] for x in log(priority="high")["requests"]] == [chat["rid"]]
    assert [x["rid"] for x in log(priority="normal")["requests"]] == [gen["rid"]]
    assert [x["rid"] for x in log(priority="low", endpoint="/api/chat")["requests"]] == [low["rid"]]
    for bad in ("urgent", "HIGH", "high,low"):
        r = c.api.get("/api/requests", params={"priority": bad})
        assert r.status_code == 400 and "priority" in r.json()["error"], bad

    r = c.api.get("/api/requests", params={"export": "csv"})
    by_rid = {x["rid"]: x for x in csv.DictReader(io.StringIO(r.text))}
    assert {"queue_ms", "priority"} <= set(by_rid[gen["rid"]])
    assert float(by_rid[gen["rid"]]["queue_ms"]) == gen["queue_ms"] and by_rid[gen["rid"]]["priority"] == "normal"
    assert (by_rid[embed["rid"]]["queue_ms"], by_rid[embed["rid"]]["priority"]) == ("", "")
    exported = {x["rid"]: x for x in c.api.get("/api/requests", params={"export": "json"}).json()}
    assert exported[chat["rid"]]["priority"] == "high" and exported[gen["rid"]]["queue_ms"] == gen["queue_ms"]

    page = c.api.get(f"/dashboard/requests/{gen['rid']}").text
    assert f"<dt>Queued</dt><dd>{gen['queue_ms']:.1f} ms</dd>" in page and "<dt>Priority</dt><dd>normal</dd>" in page
    assert f"queued {gen['queue_ms']:.0f} ms" in c.api.get("/dashboard/requests").text
