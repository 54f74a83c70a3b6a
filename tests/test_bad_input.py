"""Bad input never earns a 5xx: hostile query parameters, deeply nested JSON and wrong JSON types on
every route of a live controller with a real agent, each answered 4xx with a message in the API's
error shape ({"error": "..."})."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from ollama_fleet.controller.edge.http import MAX_JSON_DEPTH, JSONError, parse_json
from tests.proxy_support import start_fleet

TOKEN = "bad-input-admin-token"
NODE = "node-bad"

# Query values a careless client or an attacker sends; none may end in a 5xx.
HOSTILE_VALUES = ["99999999999999999999999999", "-99999999999999999999999999", "-1", "0", "abc", "1.5", "1e400",
                  "-1e400", "nan", "inf", "", " ", "%00", "\x00", "x" * 5000, "1" * 5000,
                  "2024-13-45", "9999-12-31T23:59:59", "0x10", "1_000", "٣"]
RAW_VALUES = ["%FF", "%ED%A0%80", "%C0%80", "%00%00", "a&a=b", "x[]=1"]
PAGING = ["page", "per_page", "offset", "limit", "before", "since", "until"]
REQUEST_FILTERS = ["model", "agent", "endpoint", "client", "status", "since", "until", "export", "period",
                   "priority"]
# Every GET route (path parameters filled in) with the query parameters its handler reads, plus the paging
# names everywhere (an ignored parameter must stay ignored).
GET_ROUTES: dict[str, list[str]] = {
    "/api/agents": ["status", "q"], f"/api/agents/{NODE}": [], f"/api/agents/{NODE}/models": [],
    f"/api/agents/{NODE}/metrics": [], "/api/events": ["agent", "kind"], "/api/ingest": [],
    "/api/models/available": ["q", "tag"], "/api/models/matrix": [], "/api/requests": REQUEST_FILTERS,
    "/api/tasks": ["agent", "status", "model", "origin", "verb", "group"], "/api/tasks/nope": [], "/api/tags": [],
    "/api/ps": [], "/api/version": [], "/v1/models": [], "/v1/models/llama3.2": [], "/healthz": [], "/": [],
    "/dashboard": [], "/dashboard/agents": ["status", "q", "sort", "dir"],
    "/dashboard/agents.csv": ["status", "q", "sort", "dir"], "/dashboard/agents.json": ["status", "q", "sort"],
    f"/dashboard/agents/{NODE}": [], "/dashboard/models": [], "/dashboard/requests": REQUEST_FILTERS,
    "/dashboard/requests/nope": [], "/dashboard/events": ["agent", "kind"], "/dashboard/data/status.json": [],
    "/dashboard/data/series.json": [], "/dashboard/data/traffic.json": [], "/dashboard/login": ["next"],
    "/docs/openapi.json": [],
}
# Every route that takes a JSON body.
BODY_ROUTES = [("PUT", f"/api/agents/{NODE}/settings"), ("POST", f"/api/agents/{NODE}/disconnect"),
               ("POST", f"/api/agents/{NODE}/models/pull"), ("POST", f"/api/agents/{NODE}/models/auto"),
               ("POST", "/api/models/distribute"), ("POST", "/api/tasks/nope/cancel"), ("POST", "/api/pull"),
               ("POST", "/api/push"), ("POST", "/api/create"), ("POST", "/api/copy"), ("DELETE", "/api/delete"),
               ("POST", "/api/chat"), ("POST", "/api/generate"), ("POST", "/api/embed"), ("POST", "/api/embeddings"),
               ("POST", "/api/show"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
               ("POST", "/v1/embeddings"), ("POST", "/v1/responses"), ("POST", "/v1/messages")]
# Wrong JSON types for each field of the operator actions (and of the Ollama model API).
WRONG = [1, -1, 10**30, 1.5, True, None, "", "x" * 100_000, [], ["a", 1], {}, {"a": {"b": []}}, "\ud800"]
FIELDS = {
    f"/api/agents/{NODE}/settings": ["display_name", "tags", "notes"],
    f"/api/agents/{NODE}/disconnect": ["pause_s"],
    f"/api/agents/{NODE}/models/pull": ["model_name", "model", "force", "queue_if_offline"],
    "/api/models/distribute": ["model_name", "model", "target", "agent_ids", "force", "queue_if_offline"],
    "/api/pull": ["model", "name", "stream", "insecure"],
    "/api/create": ["model", "from", "stream", "files", "adapters", "quantize"],
    "/api/copy": ["source", "destination"],
    "/api/delete": ["model", "name"],
    "/api/push": ["model", "name", "stream"],
}
BASE_BODY = {"model_name": "llama3.2:latest", "model": "llama3.2:latest", "target": "specific",
             "agent_ids": [NODE], "source": "llama3.2:latest", "destination": "copy-of:latest",
             "from": "llama3.2:latest", "stream": False}


def _deep(n: int) -> bytes:
    return b'{"model": "llama3.2", "x": ' + b"[" * n + b"]" * n + b"}"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, mosquitto: Any) -> Any:
    from tests.conftest import FleetFactory

    factory = FleetFactory(tmp_path_factory.mktemp("bad-input"), mosquitto)
    try:
        c, _ = start_fleet(factory, NODE, controller_env={"fleet_admin_token": TOKEN})
        c.http.headers["authorization"] = f"Bearer {TOKEN}"
        yield c
    finally:
        factory.close()


def _check(resp: httpx.Response, what: str, problems: list[str]) -> None:
    if resp.status_code >= 500:
        problems.append(f"{what} -> {resp.status_code} {resp.text[:200]}")


def _error_shape(resp: httpx.Response) -> str:
    doc = resp.json()
    assert isinstance(doc, dict) and isinstance(doc.get("error"), str) and doc["error"], resp.text
    return doc["error"]


# ---- the parser, alone (unit) ---------------------------------------------------------------------
def test_parse_json_bounds_depth_and_rejects_what_json_loads_lets_through():
    assert parse_json(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH)  # the limit itself is fine
    assert parse_json('{"a": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}')  # text, not nesting
    for bad in (b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), b"[" * 100_000, _deep(5000),
                b"NaN", b'{"a": -Infinity}', b"1" * 5000, b"\xff\xfe{", b"{", b""):
        with pytest.raises(JSONError):
            parse_json(bad)
    assert issubclass(JSONError, ValueError)


# ---- the live controller ---------------------------------------------------------------------------
def test_events_paging_and_since_from_the_api_and_the_dashboard(live):
    c = live
    first = c.http.get("/api/events", params={"limit": 1})
    assert first.status_code == 200, first.text
    newest = first.json()["events"][0]["id"]
    older = c.http.get("/api/events", params={"limit": 1, "before": newest})
    assert older.status_code == 200, older.text
    assert all(e["id"] < newest for e in older.json()["events"])
    assert c.http.get("/api/events", params={"since": 0}).status_code == 200
    assert c.http.get("/api/events", params={"since": 1}).json()["events"]
    for value in ("99999999999999999999999999", "-5", "1e400", "nan", "abc"):
        r = c.http.get("/api/events", params={"before": value})
        assert r.status_code == 400, (value, r.text)
        assert "before" in _error_shape(r)
        r = c.http.get("/api/events", params={"since": value})
        assert r.status_code in (200, 400), (value, r.text)
    page = c.http.get("/dashboard/events", params={"before": newest})
    assert page.status_code == 200, page.text
    assert c.http.get("/dashboard/events", params={"before": "99999999999999999999999999"}).status_code < 500


def test_huge_negative_and_non_numeric_paging_values_are_4xx(live):
    c = live
    for path, params in (("/api/requests", ("page", "per_page")), ("/api/tasks", ("limit", "offset")),
                         ("/api/events", ("limit", "before"))):
        for name in params:
            for value in ("99999999999999999999999999", "-1", "abc", "1.5", "1" * 5000):
                r = c.http.get(path, params={name: value})
                assert r.status_code == 400, (path, name, value, r.status_code, r.text[:200])
                assert name in _error_shape(r), (path, name, r.text)
    assert c.http.get("/api/requests", params={"page": 2, "per_page": 25}).status_code == 200
    assert c.http.get("/api/tasks", params={"limit": 500, "offset": 1000}).status_code == 200


def test_no_query_parameter_on_any_get_route_earns_a_5xx(live):
    problems: list[str] = []
    for path, names in GET_ROUTES.items():
        for name in dict.fromkeys([*names, *PAGING]):
            for value in HOSTILE_VALUES:
                try:
                    r = live.http.get(path, params={name: value})
                except httpx.HTTPError as e:
                    problems.append(f"GET {path}?{name}={value[:20]!r} -> {e!r}")
                    continue
                _check(r, f"GET {path}?{name}={value[:20]!r}", problems)
            for raw in RAW_VALUES:  # bytes httpx would not send as given: invalid UTF-8, a lone surrogate
                r = live.http.get(f"{path}?{name}={raw}")
                _check(r, f"GET {path}?{name}={raw}", problems)
    assert not problems, "\n".join(problems[:40])


def test_deeply_nested_json_is_a_400_on_every_body_route(live):
    problems: list[str] = []
    for method, path in BODY_ROUTES:
        if path.endswith(("/models/auto", "/cancel")):
            continue  # these take no body (and read none)
        for depth in (MAX_JSON_DEPTH + 1, 5000, 100_000):
            r = live.http.request(method, path, content=_deep(depth), headers={"content-type": "application/json"})
            if r.status_code != 400:
                problems.append(f"{method} {path} depth {depth} -> {r.status_code} {r.text[:120]}")
    assert not problems, "\n".join(problems)


def test_malformed_bodies_are_4xx_on_every_body_route(live):
    problems: list[str] = []
    bodies = [b"", b"   ", b"{", b"[]", b"1", b'"s"', b"null", b"NaN", b'{"a": Infinity}', b"\xff\xfe",
              b'{"model": "' + b"1" * 5000 + b'"}', b'{"model": ' + b"1" * 5000 + b"}", b'{"model": "\\ud800"}']
    for method, path in BODY_ROUTES:
        for body in bodies:
            if path.endswith("/disconnect") and not body.strip():
                continue  # an optional body: without one it really disconnects the agent
            r = live.http.request(method, path, content=body, headers={"content-type": "application/json"})
            _check(r, f"{method} {path} {body[:30]!r}", problems)
    assert not problems, "\n".join(problems)


def test_wrong_json_types_in_operator_actions_are_4xx(live):
    problems: list[str] = []
    for path, fields in FIELDS.items():
        method = "PUT" if path.endswith("/settings") else "DELETE" if path == "/api/delete" else "POST"
        for field in fields:
            for value in WRONG:
                if path.endswith("/disconnect") and value in (1, 1.5, None) and value is not True:
                    continue  # valid: it would really disconnect the agent
                body = {field: value} if path.endswith(("/settings", "/disconnect")) else {**BASE_BODY, field: value}
                if path.endswith("/models/pull") or path == "/api/models/distribute":
                    body["queue_if_offline"] = body.get("queue_if_offline", False)
                r = live.http.request(method, path, content=json.dumps(body),
                                      headers={"content-type": "application/json"})
                _check(r, f"{method} {path} {field}={json.dumps(value)[:30]}", problems)
    assert not problems, "\n".join(problems)
    # the typical mistakes get a clear 400, not a silent success
    cases = [("PUT", f"/api/agents/{NODE}/settings", {"tags": 5}, "tags"),
             ("PUT", f"/api/agents/{NODE}/settings", {"notes": {"a": 1}}, "notes"),
             ("PUT", f"/api/agents/{NODE}/settings", {"display_name": ["x"]}, "display_name"),
             ("POST", f"/api/agents/{NODE}/disconnect", {"pause_s": "10"}, "pause_s"),
             ("POST", f"/api/agents/{NODE}/disconnect", [1, 2], "object"),
             ("POST", "/api/models/distribute", {"model_name": "llama3.2", "target": "specific",
                                                 "agent_ids": NODE}, "agent_ids"),
             ("POST", "/api/models/distribute", {"model_name": "llama3.2", "target": ["all"]}, "target"),
             ("POST", "/api/models/distribute", {"model_name": "llama3.2", "force": "yes"}, "force")]
    for method, path, body, word in cases:
        r = live.http.request(method, path, json=body)
        assert r.status_code == 400, (path, body, r.status_code, r.text)
        assert word in _error_shape(r), (path, body, r.text)
    assert live.wait_agent(NODE, status="online")  # and the agent was never disconnected by any of it


def test_sanics_own_refusals_use_the_api_error_shape(live):
    c = live[0] if isinstance(live, tuple) else live
    r = c.http.get("/api/no-such-thing")
    assert r.status_code == 404 and isinstance(r.json()["error"], str)
    r = c.http.delete("/api/version")
    assert r.status_code == 405 and isinstance(r.json()["error"], str) and r.headers.get("allow")
    r = c.http.post("/v1/no-such-thing", json={})
    assert r.status_code == 404 and isinstance(r.json()["error"]["message"], str)
    r = c.http.put("/api/agents/x/settings", content=b"{" + b" " * (2 * 1024 * 1024) + b"}",
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and isinstance(r.json()["error"], str)
