"""Dashboard in real headless Chromium against a real Mosquitto, controller, agents and fake Ollamas:
live updates (timed from the action to the DOM change), model distribution with progress, screenshots."""

from __future__ import annotations

import time

from playwright.sync_api import expect

from tests.browser import (  # noqa: F401 (fixtures)
    DOM_PROBE,
    PHONE,
    SimAgent,
    StateWatch,
    browser_fixture,
    open_live,
    page_fixture,
    screenshot,
)
from tests.support import wait_until

MB = 1_000_000
LIVE_DEADLINE = 1.0  # seconds from the MQTT event (or the kill) to the DOM change


def dom_time(page, key: str, timeout: float = 10.0) -> float:
    """Epoch seconds at which the page first showed `key` (`node` or `node:status`), waiting for it."""
    page.wait_for_function("k => window.__dom && window.__dom[k]", arg=key, timeout=timeout * 1000)
    return page.evaluate("k => window.__dom[k]", key) / 1000


def test_agents_appear_and_turn_lost_live_within_1s(fleet, page):
    c = fleet.controller()
    first = fleet.agent("live-a")
    c.wait_agent("live-a", status="online")
    watch = StateWatch(fleet.broker)
    try:
        page.add_init_script(DOM_PROBE)
        open_live(page, c.url + "/dashboard/agents")
        expect(page.locator("#agent-live-a")).to_have_attribute("data-status", "online")

        fleet.agent("live-b")  # started after the page loaded
        shown = dom_time(page, "live-b", timeout=15)
        born = wait_until(lambda: watch.at("live-b", "online"), 5, what="birth of live-b on the broker")
        assert shown - born < LIVE_DEADLINE, f"new agent shown {shown - born:.3f} s after its birth"
        expect(page.locator("#agent-live-b")).to_have_attribute("data-status", "online")

        t0 = time.time()
        first.kill()
        lost = dom_time(page, "live-a:lost", timeout=5)
        assert lost - t0 < LIVE_DEADLINE, f"kill -9 shown as lost after {lost - t0:.3f} s"
        expect(page.locator("#agent-live-a .badge")).to_have_text("Lost")
        # the header and the counts follow too
        expect(page.locator("#agent-counts [data-k=lost]")).to_have_text("1")
        expect(page.locator("#pulse")).to_contain_text("1/2 online")
        assert not page.js_errors, page.js_errors
    finally:
        watch.close()


def test_overview_cards_and_events_update_live(fleet, page):
    c = fleet.controller()
    fleet.agent("ov-a")
    c.wait_agent("ov-a", status="online")
    open_live(page, c.url + "/dashboard")
    expect(page.locator("#cards [data-k=online]")).to_have_text("1")
    b = fleet.agent("ov-b")
    expect(page.locator("#cards [data-k=agents-total]")).to_have_text("2")
    expect(page.locator("#cards [data-k=online]")).to_have_text("2")
    b.stop()  # a clean stop: offline, not lost
    expect(page.locator("#cards [data-k=offline]")).to_have_text("1")
    expect(page.locator("#recent-events tr[data-kind=offline]").first).to_contain_text("ov-b")
    # a request through the proxy shows in the request card within the card's 1 s refresh
    assert c.http.post("/api/generate", json={"model": "llama3.2", "prompt": "hi", "stream": False}).status_code == 200
    expect(page.locator("#cards [data-k=requests-total]")).to_have_text("1", timeout=5000)
    assert not page.js_errors, page.js_errors


def test_stream_reconnects_and_resyncs_after_a_controller_restart(fleet, page):
    c = fleet.controller()
    a = fleet.agent("rs-a")
    fleet.agent("rs-b")
    c.wait_agent("rs-a", status="online")
    c.wait_agent("rs-b", status="online")
    open_live(page, c.url + "/dashboard/agents")
    c.stop()
    expect(page.locator("#live-state")).not_to_have_attribute("data-state", "open")
    a.kill()  # happens while the dashboard is disconnected
    c.start()
    c.wait_ready()
    expect(page.locator("#live-state")).to_have_attribute("data-state", "open", timeout=15000)
    expect(page.locator("#agent-rs-a")).to_have_attribute("data-status", "lost")
    expect(page.locator("#agent-rs-b")).to_have_attribute("data-status", "online")


def test_agent_detail_shows_facts_and_actions_work(fleet, page):
    c = fleet.controller()
    fleet.agent("det-a")
    c.wait_agent("det-a", status="online")
    open_live(page, c.url + "/dashboard/agents/det-a")
    expect(page.locator("#agent-live h1")).to_have_text("det-a")
    expect(page.locator("#agent-models tr[data-model='llama3.2:latest']")).to_be_visible()

    page.get_by_label("Display name").fill("Detail Box")
    page.get_by_label("Tags").fill("lab, gpu")
    page.get_by_role("button", name="Save settings").click()
    expect(page.locator("#toast")).to_contain_text("Settings saved")
    expect(page.locator("#agent-live h1")).to_have_text("Detail Box")  # via the live stream
    expect(page.locator("#agent-live .tag")).to_have_text(["gpu", "lab"])

    page.get_by_role("button", name="Force disconnect").click()
    page.locator("#confirm-ok").click()
    expect(page.locator("#agent-live .badge")).to_have_text("Offline")
    expect(page.locator("#agent-events tr[data-kind=offline]")).to_be_visible()

    page.get_by_role("button", name="Delete agent").click()
    page.get_by_role("button", name="Cancel").click()  # a cancelled confirmation does nothing
    assert c.agent("det-a") is not None
    page.get_by_role("button", name="Delete agent").click()
    page.locator("#confirm-ok").click()
    page.wait_for_url("**/dashboard/agents")
    assert c.agent("det-a") is None
    expect(page.locator("#agent-det-a")).to_have_count(0)
    assert not page.js_errors, page.js_errors


def test_distribute_from_models_page_shows_progress_and_ends_installed(fleet, page):
    c = fleet.controller()
    fake = fleet.fake_ollama("dist-a", pull_total=60 * MB, pull_speed=15 * MB, pull_layers=1)
    fleet.agent("dist-a", fake.url)
    fleet.agent("dist-b")
    c.wait_agent("dist-a", status="online")
    c.wait_agent("dist-b", status="online")
    page.add_init_script(DOM_PROBE)
    open_live(page, c.url + "/dashboard/models")
    cell = page.locator("#mx-dist-a td[data-model='gemma3:1b']")
    expect(cell).to_have_count(0)  # not a column yet: nobody has it

    # three clicks: pick the model, tick the agent, distribute
    page.get_by_role("button", name="Distribute gemma3:1b").click()
    page.locator("#distribute input[name=agent_ids][value=dist-a]").check()
    page.get_by_role("button", name="Distribute", exact=True).click()
    expect(page.locator("#toast")).to_contain_text("Distribution of gemma3:1b started")

    job = page.locator("#model-jobs .job").first
    expect(job).to_contain_text("gemma3:1b")
    expect(job).to_have_attribute("data-status", "in_progress")
    expect(cell).to_have_attribute("data-state", "pulling")
    expect(job.locator(".job-figures")).to_contain_text("MB/s")  # speed while running
    expect(job.locator(".job-figures")).to_contain_text("ETA")
    screenshot(page, "models-pulling")
    expect(cell).to_have_attribute("data-state", "installed", timeout=20000)
    expect(job).to_have_attribute("data-status", "completed")
    expect(page.locator("#mx-dist-b td[data-model='gemma3:1b']")).to_have_attribute("data-state", "none")

    task = job.get_attribute("data-task")
    seen = page.evaluate("t => window.__progress[t]", task)
    running = [float(v.split(":")[1]) for v in seen if v.startswith("in_progress:")]
    assert len({p for p in running if 0 < p < 100}) >= 2, f"progress did not advance visibly: {seen}"
    assert running == sorted(running), seen
    assert seen[-1] == "completed:100.0", seen
    assert fake.stats()["requests"]["/api/pull"] == 1
    assert not page.js_errors, page.js_errors


def test_pull_and_delete_a_model_from_the_agent_page(fleet, page):
    c = fleet.controller()
    fake = fleet.fake_ollama("pd-a", pull_total=8 * MB, pull_speed=8 * MB, pull_layers=1)
    fleet.agent("pd-a", fake.url)
    c.wait_agent("pd-a", status="online")
    open_live(page, c.url + "/dashboard/agents/pd-a")
    page.get_by_label("Pull a model").fill("tinyllama")
    page.get_by_role("button", name="Pull", exact=True).click()
    expect(page.locator("#agent-jobs .job").first).to_have_attribute("data-status", "completed", timeout=20000)
    screenshot(page, "agent-after-pull")
    row = page.locator("#agent-models tr[data-model='tinyllama:latest']")
    expect(row).to_be_visible()
    row.get_by_role("button", name="Delete tinyllama:latest").click()
    page.locator("#confirm-ok").click()
    expect(row).to_have_count(0, timeout=15000)
    wait_until(lambda: "tinyllama:latest" not in c.agent("pd-a")["models"], 5, what="model gone in the API")


def test_every_page_renders_for_screenshots(fleet, page):
    """Each page with content (a simulated two-GPU agent, requests, a job), desktop and phone."""
    c = fleet.controller(fleet_metrics_sample_interval="0.5")
    fleet.agent("shot-a")
    sim = SimAgent(fleet, "gpu-box-1", gpus=2, models=["llama3.1:8b", "qwen2.5:7b"])
    try:
        sim.heartbeat()
        c.wait_agent("gpu-box-1", status="online")
        c.wait_serving("shot-a")
        c.http.put("/api/agents/gpu-box-1/settings", json={"display_name": "GPU Box 1", "tags": ["rtx4090", "lab"]})
        codes = [c.http.post("/api/generate", json={"model": "llama3.2", "prompt": f"hi {i}", "stream": False}
                             ).status_code for i in range(6)]
        codes.append(c.http.post("/api/generate", json={"model": "nope", "prompt": "x", "stream": False}).status_code)
        assert codes == [200] * 6 + [404], codes
        assert c.http.get("/api/requests").json()["total"] == 7

        def sampled() -> bool:  # heartbeats until a few metric samples are stored for the charts
            n = len(c.http.get("/api/agents/gpu-box-1/metrics").json()["samples"])
            sim.heartbeat(cpu=30 + 8 * n, util=40 + 9 * n)
            return n >= 5

        wait_until(sampled, 15, interval=0.1, what="metric samples")
        pages = [("overview", "/dashboard"), ("agents", "/dashboard/agents"),
                 ("agent", "/dashboard/agents/gpu-box-1"), ("models", "/dashboard/models"),
                 ("requests", "/dashboard/requests"), ("events", "/dashboard/events")]
        for name, path in pages:
            open_live(page, c.url + path)
            if name in ("overview", "agent"):
                expect(page.locator(".chart .uplot").first).to_be_visible()
            screenshot(page, name)
        page.goto(c.url + "/dashboard/requests")
        page.locator("#request-rows a").first.click()
        expect(page.locator("h1")).to_contain_text("Request")
        screenshot(page, "request-detail")
        page.set_viewport_size(PHONE)
        for name, path in pages[:3]:
            open_live(page, c.url + path)
            screenshot(page, f"phone-{name}")
            width = page.evaluate("document.documentElement.scrollWidth")
            wide = page.evaluate("""() => [...document.querySelectorAll('body *')]
                .filter(e => e.getBoundingClientRect().right > innerWidth + 1 && !e.closest('.table-wrap'))
                .slice(0, 5).map(e => e.tagName + '.' + e.className + '#' + e.id)""")
            assert width <= PHONE["width"] + 1, f"{name} scrolls sideways on a phone ({width}px): {wide}"
        assert not page.js_errors, page.js_errors
    finally:
        sim.close()
