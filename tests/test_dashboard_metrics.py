"""The dashboard's traffic figures (requests/s, TTFT p50/p95, tokens/s per agent and per model, last minute)
against a real controller, agent and fake Ollama: requests through the proxy show on the pages, over the
live stream, and in Chromium, with the numbers /metrics exports (one source: RequestStats)."""

from __future__ import annotations

import html
import math
import re
from typing import Any

from playwright.sync_api import expect
from prometheus_client.parser import text_string_to_metric_families

from ollama_fleet.controller.dashboard.ui import NONE, fmt_rate, fmt_secs
from tests.browser import browser_fixture, open_live, page_fixture, screenshot  # noqa: F401 (fixtures)
from tests.support import wait_until
from tests.test_dashboard_stream import StreamReader

MODEL = "llama3.2:latest"  # the fake's model, as the proxy labels it (normalized)
FIRST_BYTE = 0.03  # seconds the fake waits before answering: a TTFT well inside a bucket


def _traffic(c: Any) -> dict[str, Any]:
    r = c.http.get("/dashboard/data/traffic.json")
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def _send(c: Any, n: int) -> None:
    """Half generate (one JSON answer), half streamed chat."""
    for i in range(n):
        if i % 2:
            r = c.http.post("/api/chat", json={"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]})
        else:
            r = c.http.post("/api/generate", json={"model": "llama3.2", "prompt": f"q{i}", "stream": False})
        assert r.status_code == 200, r.text


def _settled(c: Any, node: str, n: int) -> dict[str, Any]:
    """The traffic document once the dashboard's figures count all `n` requests (its tick: 1 s)."""
    return wait_until(lambda: (t := _traffic(c))["agents"].get(node, {}).get("requests") == n
                      and t["models"].get(MODEL, {}).get("requests") == n and t, 5, what=f"{n} requests shown")


def _cells(fragment: str) -> dict[str, str]:
    """The traffic figures (data-k -> text) of one row or block, and the request count it names."""
    out = {k: html.unescape(v).strip() for k, v in re.findall(r'data-k="(rps|ttft-p50|ttft-p95|tps)"[^>]*>([^<]*)<',
                                                                fragment)}
    out["requests"] = re.search(r'data-k="rps" data-requests="(\d+)"', fragment).group(1)
    return out


def _element(page: str, open_tag: str, close_tag: str) -> str:
    start = page.index(open_tag)
    return page[start:page.index(close_tag, start)]


def _agent_row(c: Any, node: str) -> dict[str, str]:
    return _cells(_element(c.http.get("/dashboard/agents").text, f'<tr id="agent-{node}"', "</tr>"))


def _model_row(c: Any, model: str) -> dict[str, str]:
    page = _element(c.http.get("/dashboard/models").text, '<div id="model-traffic"', "</table>")
    return _cells(_element(page, f'<tr data-model="{model}"', "</tr>"))


def _agent_block(c: Any, node: str) -> dict[str, str]:
    return _cells(_element(c.http.get(f"/dashboard/agents/{node}").text, '<section id="agent-traffic"', "</section>"))


def _scrape(c: Any) -> dict[str, Any]:
    """GET /metrics: requests per agent and per model, and each model's TTFT buckets (le -> cumulative)."""
    r = c.http.get("/metrics")
    assert r.status_code == 200, r.text
    by_agent: dict[str, float] = {}
    by_model: dict[str, float] = {}
    buckets: dict[str, dict[float, float]] = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            if s.name == "fleet_requests_total":
                by_agent[s.labels["agent"]] = by_agent.get(s.labels["agent"], 0) + s.value
                by_model[s.labels["model"]] = by_model.get(s.labels["model"], 0) + s.value
            elif s.name == "fleet_request_ttft_seconds_bucket":
                buckets.setdefault(s.labels["model"], {})[float(s.labels["le"])] = s.value
    return {"agents": by_agent, "models": by_model, "ttft": buckets}


def _promql_quantile(q: float, cumulative: dict[float, float]) -> float:
    """histogram_quantile as PromQL computes it from cumulative buckets (written out here, not ours)."""
    les = sorted(cumulative)
    rank = q * cumulative[math.inf]
    prev_le, prev_n = 0.0, 0.0
    for le in les:
        n = cumulative[le]
        if n >= rank:
            if le == math.inf:
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_n) / (n - prev_n)
        prev_le, prev_n = le, n
    raise AssertionError("no bucket holds the rank")


def _agree(shown: dict[str, str], doc: dict[str, Any], n: int) -> None:
    """A page's figures are the traffic document's, formatted; all n requests counted."""
    assert shown["requests"] == str(n) == str(doc["requests"])
    assert shown["ttft-p50"] == fmt_secs(doc["ttft_p50"]) != NONE
    assert shown["ttft-p95"] == fmt_secs(doc["ttft_p95"]) != NONE
    assert shown["tps"] != NONE and doc["tokens_per_s"] > 0
    # requests/s moves as the window fills: at least n per minute, and the same figure as the document's
    # give or take the tick between the two reads
    rps = float(shown["rps"])
    assert rps >= round(n / 60, 2) and fmt_rate(doc["rps"]) != NONE


def _fleet_with_traffic(fleet: Any, node: str, **agent_env: str) -> Any:
    c = fleet.controller()
    fake = fleet.fake_ollama(node, initial_delay=FIRST_BYTE)
    fleet.agent(node, ollama_url=fake.url, **agent_env)
    c.wait_agent(node, status="online")
    return c


def test_pages_show_the_figures_request_stats_export(fleet):
    node = "tr-a"
    c = _fleet_with_traffic(fleet, node)
    wait_until(lambda: MODEL in c.http.get("/dashboard/models").text, 5, what="the fake's model listed")
    # no request yet: a dash everywhere, not a zero
    for shown in (_agent_row(c, node), _model_row(c, MODEL), _agent_block(c, node)):
        assert shown == {"rps": NONE, "ttft-p50": NONE, "ttft-p95": NONE, "tps": NONE, "requests": "0"}, shown

    n = 6
    _send(c, n)
    doc = _settled(c, node, n)
    _agree(_agent_row(c, node), doc["agents"][node], n)
    _agree(_agent_block(c, node), doc["agents"][node], n)
    _agree(_model_row(c, MODEL), doc["models"][MODEL], n)

    # one source: the counters and TTFT histogram of /metrics hold the same requests and quantiles
    m = _scrape(c)
    assert m["agents"][node] == n and m["models"][MODEL] == n
    for q, key in ((0.5, "ttft_p50"), (0.95, "ttft_p95")):
        exported = _promql_quantile(q, m["ttft"][MODEL])
        assert math.isclose(exported, doc["models"][MODEL][key], rel_tol=1e-9), (q, exported, doc)
        assert math.isclose(exported, doc["agents"][node][key], rel_tol=1e-9), (q, exported, doc)  # its only agent
    assert FIRST_BYTE <= doc["models"][MODEL]["ttft_p50"] <= 1.0


def test_figures_arrive_over_the_live_stream_without_agent_events(fleet):
    node = "tr-b"
    # heartbeats a minute apart: the rows and blocks change only on the stream's own tick
    c = _fleet_with_traffic(fleet, node, fleet_heartbeat_interval="60")
    readers = {v: StreamReader(f"{c.url}/dashboard/stream?view={v}") for v in ("agents", f"agent&id={node}", "models")}
    try:
        for v, r in readers.items():
            wait_until(lambda r=r: r.messages, 5, what=f"{v} snapshot")
        assert 'id="agent-traffic"' in readers[f"agent&id={node}"].messages[0][1]
        assert 'id="model-traffic"' in readers["models"].messages[0][1]
        n = 4
        _send(c, n)
        doc = _settled(c, node, n)

        def shown(view: str, marker: str) -> dict[str, str] | None:
            for _, msg in reversed(readers[view].messages[1:]):
                if marker in msg:
                    frag = _element(msg, marker, "</tr>" if "<tr" in marker else "</section>")
                    if f'data-requests="{n}"' in frag:
                        return _cells(frag)
            return None

        _agree(wait_until(lambda: shown("agents", f'<tr id="agent-{node}"'), 5, what="agent row update"),
               doc["agents"][node], n)
        _agree(wait_until(lambda: shown(f"agent&id={node}", '<section id="agent-traffic"'), 5,
                          what="agent traffic update"), doc["agents"][node], n)
        _agree(wait_until(lambda: shown("models", f'<tr data-model="{MODEL}"'), 5, what="model traffic update"),
               doc["models"][MODEL], n)
    finally:
        for r in readers.values():
            r.close()


def test_figures_update_live_in_the_browser(fleet, page):
    node = "tr-c"
    c = _fleet_with_traffic(fleet, node)
    open_live(page, c.url + "/dashboard/models")
    model_row = page.locator(f'#model-traffic tr[data-model="{MODEL}"]')
    expect(model_row.locator("[data-k=rps]")).to_have_text(NONE)
    n = 4
    _send(c, n)  # after the page loaded: only the stream can bring the figures
    expect(model_row.locator("[data-k=rps]")).to_have_attribute("data-requests", str(n), timeout=5000)
    doc = _settled(c, node, n)["models"][MODEL]
    expect(model_row.locator("[data-k=ttft-p50]")).to_have_text(fmt_secs(doc["ttft_p50"]))
    expect(model_row.locator("[data-k=ttft-p95]")).to_have_text(fmt_secs(doc["ttft_p95"]))
    expect(model_row.locator("[data-k=tps]")).not_to_have_text(NONE)
    screenshot(page, "traffic-models")

    open_live(page, c.url + "/dashboard/agents")
    row = page.locator(f"#agent-{node}")
    expect(row.locator("[data-k=rps]")).to_have_attribute("data-requests", str(n))
    expect(row.locator("[data-k=rps]")).not_to_have_text(NONE)
    doc = _traffic(c)["agents"][node]
    expect(row.locator("[data-k=ttft-p50]")).to_have_text(fmt_secs(doc["ttft_p50"]))
    screenshot(page, "traffic-agents")

    open_live(page, c.url + f"/dashboard/agents/{node}")
    block = page.locator("#agent-traffic")
    expect(block.locator("[data-k=ttft-p95]")).to_have_text(fmt_secs(doc["ttft_p95"]))
    _send(c, 2)  # the agent page follows too
    expect(block.locator("[data-k=rps]")).to_have_attribute("data-requests", str(n + 2), timeout=5000)
    expect(block.locator("[data-k=tps]")).not_to_have_text(NONE)
    screenshot(page, "traffic-agent", full_page=False)
    assert not page.js_errors, page.js_errors
