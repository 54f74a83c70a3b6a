"""The request log: one row per proxied request, filters, pagination, export, durability, retention."""

from __future__ import annotations

import csv
import io
import json
import time

from tests.proxy_support import chat_body, db_rows, start_fleet, wait_routable
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
