"""Dashboard lists in real headless Chromium: agents filter/search/sort/export, requests filters,
pagination, detail and export, the event log (newest first, live)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from playwright.sync_api import expect

from tests.browser import browser_fixture, open_live, page_fixture  # noqa: F401 (fixtures)


def _download(page, click) -> str:
    with page.expect_download() as dl:
        click()
    return Path(dl.value.path()).read_text()


def test_agents_filter_search_sort_and_export(fleet, page):
    c = fleet.controller()
    agents = {node: fleet.agent(node) for node in ("flt-a", "flt-b", "flt-c")}
    for node in ("flt-a", "flt-b", "flt-c"):
        c.wait_agent(node, status="online")
    c.http.put("/api/agents/flt-b/settings", json={"display_name": "=Beta Box", "tags": ["lab"]})
    agents["flt-c"].kill()
    c.wait_agent("flt-c", state="lost")
    rows = page.locator("#agent-rows tr[data-id]")

    open_live(page, c.url + "/dashboard/agents")
    expect(rows).to_have_count(3)
    page.get_by_label("Status", exact=True).select_option("lost")  # submits on change
    page.wait_for_url("**status=lost**")
    expect(rows).to_have_count(1)
    expect(rows.first).to_have_attribute("data-id", "flt-c")
    expect(page.locator("#agent-counts a[aria-current]")).to_contain_text("Lost")

    page.goto(c.url + "/dashboard/agents")
    page.get_by_label("Search", exact=True).fill("lab")  # tags are searched too
    page.get_by_label("Search", exact=True).press("Enter")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("=Beta Box")

    page.goto(c.url + "/dashboard/agents?q=zzz")
    expect(page.locator("#agent-rows tr.empty")).to_contain_text("No agent matches")

    page.goto(c.url + "/dashboard/agents")
    page.get_by_role("link", name="Agent", exact=True).click()  # sorted by name already: the header flips the order
    page.wait_for_url("**dir=desc**")
    expect(rows).to_have_count(3)
    # by name as shown: "=Beta Box" (flt-b's display name) sorts before "flt-a"
    assert [rows.nth(i).get_attribute("data-id") for i in range(3)] == ["flt-c", "flt-a", "flt-b"]
    page.get_by_role("link", name="Status", exact=True).click()
    page.wait_for_url("**sort=status**")
    assert rows.first.get_attribute("data-id") == "flt-c"  # lost sorts first: needs attention

    page.goto(c.url + "/dashboard/agents?status=online")
    text = _download(page, lambda: page.get_by_role("link", name="Export CSV").click())
    exported = list(csv.DictReader(io.StringIO(text)))
    assert sorted(r["id"] for r in exported) == ["flt-a", "flt-b"]
    assert {r["status"] for r in exported} == {"online"} and exported[0]["ollama_version"] == "0.12.6"
    assert {r["name"] for r in exported} == {"flt-a", "'=Beta Box"}  # no formula for a spreadsheet
    docs = json.loads(_download(page, lambda: page.get_by_role("link", name="Export JSON").click()))
    assert sorted(d["id"] for d in docs) == ["flt-a", "flt-b"] and all(d["routable"] for d in docs)
    assert not page.js_errors, page.js_errors


def test_requests_filters_pagination_detail_and_export(fleet, page):
    c = fleet.controller()
    fleet.agent("req-a")
    c.wait_serving("req-a")
    for i in range(30):
        assert c.http.post("/api/generate", json={"model": "llama3.2", "prompt": f"q{i}", "stream": False}).is_success
    for _ in range(3):
        assert c.http.post("/api/chat", json={"model": "ghost-model", "messages": []}).status_code == 404
    rows = page.locator("#request-rows tr[data-rid]")

    open_live(page, c.url + "/dashboard/requests")
    expect(page.locator("#req-summary")).to_contain_text("33 requests · page 1 of 2")
    expect(rows).to_have_count(25)
    page.get_by_role("link", name="Older →").click()
    expect(rows).to_have_count(8)
    expect(page.locator("#req-summary")).to_contain_text("page 2 of 2")
    page.get_by_role("link", name="← Newer").click()
    expect(rows).to_have_count(25)

    page.get_by_label("Per page", exact=True).select_option("50")
    expect(rows).to_have_count(33)
    expect(page.locator(".pager")).to_have_count(0)
    page.get_by_label("Per page", exact=True).select_option("100")
    expect(rows).to_have_count(33)

    page.get_by_label("Status", exact=True).select_option("error")
    expect(rows).to_have_count(3)
    expect(rows.first).to_contain_text("ghost-model")
    data = json.loads(_download(page, lambda: page.get_by_role("link", name="Export JSON").click()))
    assert len(data) == 3 and {r["status"] for r in data} == {404}
    text = _download(page, lambda: page.get_by_role("link", name="Export CSV").click())
    assert len(list(csv.DictReader(io.StringIO(text)))) == 3

    page.goto(c.url + "/dashboard/requests")
    page.get_by_label("Endpoint", exact=True).fill("/api/generate")
    page.get_by_role("button", name="Apply").click()
    expect(page.locator("#req-summary")).to_contain_text("30 requests")
    page.get_by_label("Agent", exact=True).select_option("req-a")
    expect(page.locator("#req-summary")).to_contain_text("30 requests")

    rid = rows.first.get_attribute("data-rid")
    rows.first.get_by_role("link").first.click()
    page.wait_for_url(f"**/dashboard/requests/{rid}")
    expect(page.locator("h1")).to_contain_text(rid)
    expect(page.locator(".facts")).to_contain_text("llama3.2:latest")
    expect(page.locator(".facts")).to_contain_text("req-a")

    page.goto(c.url + "/dashboard/requests")
    page.get_by_label("Priority", exact=True).select_option("normal")  # the generations' tier; 404s had none
    expect(page.locator("#req-summary")).to_contain_text("30 requests")
    page.get_by_label("Priority", exact=True).select_option("high")
    expect(rows).to_have_count(0)

    page.goto(c.url + "/dashboard/requests/ffffffffffffffff")
    expect(page.locator("h1")).to_have_text("Request not found")
    assert not page.js_errors, page.js_errors


def test_event_log_newest_first_and_live(fleet, page):
    c = fleet.controller()
    fleet.agent("ev-a")
    c.wait_agent("ev-a", status="online")
    open_live(page, c.url + "/dashboard/events")
    times = page.locator("#event-rows time").evaluate_all("els => els.map(e => e.getAttribute('datetime'))")
    assert times and times == sorted(times, reverse=True)
    assert c.http.post("/api/agents/ev-a/disconnect").status_code == 200
    top = page.locator("#event-rows tr").first
    expect(top).to_have_attribute("data-kind", "offline")  # on top, without a reload
    page.get_by_label("Kind", exact=True).fill("registered")
    page.get_by_role("button", name="Apply").click()
    expect(page.locator("#event-rows tr[data-kind]")).to_have_count(1)
    expect(page.locator("#event-rows tr[data-kind=registered]")).to_contain_text("ev-a")
    page.goto(c.url + "/dashboard/events?kind=nothing-like-this")
    expect(page.locator("#event-rows tr.empty")).to_be_visible()


def test_unknown_agent_page_is_a_designed_404(fleet, page):
    c = fleet.controller()
    page.goto(c.url + "/dashboard/agents/ghost")
    expect(page.locator("h1")).to_have_text("Agent not found")
    expect(page.get_by_role("link", name="All agents")).to_be_visible()
    open_live(page, c.url + "/dashboard/agents")
    expect(page.locator("#agent-rows tr.empty")).to_contain_text("No agents yet")
    open_live(page, c.url + "/dashboard/models")
    expect(page.locator("#model-matrix")).to_contain_text("No agents registered yet")
