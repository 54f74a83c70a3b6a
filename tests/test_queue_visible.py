"""Admission control's queues, made visible: `fleet_queue_*` and the agents' slots on /metrics, the models
page's "Queued" column, the overview's queue card and the agent page's slots.

End to end: a real controller, one real agent whose Ollama (the fake, made slow) runs one generation at a
time, one request holding that slot and three more queued behind it, sent from threads; the figures show
while the queue is there and follow it down to 0 in an open Chromium page, without a reload. In process:
RequestStats' queue observations, and the queue figures under bounded model labels with a real Fleet."""

from __future__ import annotations

import re
import threading
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect
from prometheus_client.parser import text_string_to_metric_families

from ollama_fleet.controller.admission import priority
from ollama_fleet.controller.admission.gate import QueueEvent
from ollama_fleet.controller.admission.scheduler import Ticket
from ollama_fleet.controller.compose import Fleet
from ollama_fleet.controller.dashboard.ui import NONE, fmt_secs
from ollama_fleet.controller.metrics import names
from ollama_fleet.controller.metrics.requests import RequestStats, histogram_quantile
from ollama_fleet.settings import Config
from tests.browser import browser_fixture, open_live, page_fixture, screenshot  # noqa: F401 (fixtures)
from tests.proxy_support import chat_body
from tests.support import wait_until
from tests.test_metrics_requests import Clock, exposition, scrape

MODEL = "llama3.2:latest"  # the fake's model, as the proxy labels it
NODE = "qv-a"
HOLD = 8.0  # seconds the first request holds the agent's only slot: the queue stays while the test looks
Samples = dict[str, list[tuple[dict[str, str], float]]]


def sample(got: Samples, name: str, **labels: str) -> float | None:
    """The value of the one sample `name` with exactly these labels; None when there is none."""
    found = [v for ls, v in got.get(name, []) if ls == labels]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


def _traffic(c: Any) -> dict[str, Any]:
    """The dashboard's figures, unformatted (recomputed once a tick: poll it)."""
    r = c.http.get("/dashboard/data/traffic.json")
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


class Senders:
    """Streamed chats through the proxy, one thread each, answers kept."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.threads: list[threading.Thread] = []
        self.answers: list[tuple[str, int, str | None]] = []

    def send(self, tier: str = priority.NORMAL) -> None:
        t = threading.Thread(target=self._one, args=(tier,), daemon=True)
        t.start()
        self.threads.append(t)

    def _one(self, tier: str) -> None:
        with httpx.Client(base_url=self.url, timeout=60, trust_env=False) as http:
            r = http.post("/api/chat", json=chat_body(stream=True), headers={priority.HEADER: tier})
            self.answers.append((tier, r.status_code, r.headers.get("x-fleet-queue-wait")))

    def join(self, timeout: float) -> list[tuple[str, int, str | None]]:
        for t in self.threads:
            t.join(timeout)
            assert not t.is_alive(), "a request never finished"
        return self.answers


def test_a_full_queue_shows_on_metrics_and_live_on_the_pages(fleet, page):
    c = fleet.controller()
    fake = fleet.fake_ollama(NODE, initial_delay=HOLD, token_delay=0.05)
    fleet.agent(NODE, fake.url, fleet_ollama_num_parallel="1")
    c.wait_serving(NODE)
    assert c.agent(NODE)["capacity"] == 1
    wait_until(lambda: MODEL in c.http.get("/dashboard/models").text, 5, what="the fake's model listed")

    # both pages open before any request: only their streams can bring the queue
    open_live(page, c.url + "/dashboard/models")
    queued = page.locator(f'#model-traffic tr[data-model="{MODEL}"] [data-k=queued]')
    expect(queued).to_have_text("0")
    overview = page.context.new_page()
    overview_errors: list[str] = []
    overview.on("pageerror", lambda e: overview_errors.append(str(e)))
    open_live(overview, c.url + "/dashboard")
    card = overview.locator("#cards")
    expect(card.locator("[data-k=queued]")).to_have_text("0")
    expect(card.locator("[data-k=slots-capacity]")).to_have_text("1")

    senders = Senders(c.url)
    senders.send()
    wait_until(lambda: sample(scrape(c), "fleet_agent_slots_busy", agent=NODE) == 1, 10,
               what="the first request holding the slot")
    for tier in (priority.NORMAL, priority.HIGH, priority.NORMAL):
        senders.send(tier)
    got = wait_until(lambda: (m := scrape(c)) and sample(m, "fleet_queue_depth", model=MODEL) == 3 and m, 5,
                     what="three requests queued")

    # /metrics while they wait
    oldest = sample(got, "fleet_queue_oldest_wait_seconds", model=MODEL)
    assert oldest is not None and 0 < oldest < HOLD
    assert sample(got, "fleet_agent_slots_busy", agent=NODE) == 1
    assert sample(got, "fleet_agent_capacity", agent=NODE) == 1
    assert not got.get("fleet_queue_wait_seconds_count")  # nobody has left the queue yet
    doc = wait_until(lambda: (d := _traffic(c)) and MODEL in d["queues"] and d, 5, what="the queue's tick")
    assert doc["queues"][MODEL]["depth"] == 3
    assert doc["queues"][MODEL]["by_tier"] == {"high": 1, "normal": 2, "low": 0}

    # the pages, live: the tiers show because not all are normal
    expect(queued).to_have_attribute("data-depth", "3")
    expect(queued).to_have_text("3 (1 high · 2 normal)")
    expect(page.locator(f'#model-traffic tr[data-model="{MODEL}"] [data-k=oldest-wait]')).not_to_have_text(NONE)
    expect(card.locator("[data-k=queued]")).to_have_text("3")
    expect(card.locator("[data-k=slots-busy]")).to_have_text("1")
    screenshot(page, "queue-models", full_page=False)
    screenshot(overview, "queue-overview", full_page=False)
    agent_page = c.http.get(f"/dashboard/agents/{NODE}").text
    assert re.search(r'data-k="slots"[^>]*>1 / 1<', agent_page), "the agent page's slots"

    fake.set_config(initial_delay=0.0)  # the queued ones go quickly once the first lets go
    answers = senders.join(HOLD + 30)
    assert sorted(code for _, code, _ in answers) == [200] * 4, answers
    assert sum(wait is not None for _, _, wait in answers) == 3, answers  # three waited

    # down to 0, live; the last minute's waits of the three
    expect(queued).to_have_text("0", timeout=5000)
    row = page.locator(f'#model-traffic tr[data-model="{MODEL}"]')
    expect(row.locator("[data-k=oldest-wait]")).to_have_text(NONE)
    expect(row.locator("[data-k=wait]")).to_have_attribute("data-queued", "3", timeout=5000)
    expect(row.locator("[data-k=wait-p50]")).not_to_have_text(NONE)
    expect(card.locator("[data-k=queued]")).to_have_text("0", timeout=5000)
    expect(card.locator("[data-k=slots-busy]")).to_have_text("0")
    doc = wait_until(lambda: (d := _traffic(c)) and MODEL not in d["queues"] and d, 5, what="the queue's tick")
    assert doc["models"][MODEL]["queued"] == 3
    expect(row.locator("[data-k=wait-p95]")).to_have_text(fmt_secs(doc["models"][MODEL]["wait_p95"]))

    # /metrics after: no queue series left, the waits and outcomes counted
    got = scrape(c)
    assert sample(got, "fleet_queue_depth", model=MODEL) is None
    assert sample(got, "fleet_agent_slots_busy", agent=NODE) == 0
    assert sample(got, "fleet_queue_wait_seconds_count", tier="high") == 1
    assert sample(got, "fleet_queue_wait_seconds_count", tier="normal") == 2
    waited = (sample(got, "fleet_queue_wait_seconds_sum", tier="high") or 0) + \
        (sample(got, "fleet_queue_wait_seconds_sum", tier="normal") or 0)
    assert 0 < waited < 3 * (HOLD + 10)
    assert sample(got, "fleet_queue_outcomes_total", outcome="served") == 3
    assert not page.js_errors and not overview_errors, (page.js_errors, overview_errors)


# ---- in process: the observer, the labels, the metrics setting --------------------------------------

def test_queue_observations_count_outcomes_waits_by_tier_and_recent_waits_by_model() -> None:
    clock = Clock(1000.0)
    s = RequestStats(lambda m: m == MODEL, clock=clock)
    for waited in (0.02, 0.2, 0.2, 3.0):
        s.observe_queue(QueueEvent(MODEL, "normal", "served", waited))
    s.observe_queue(QueueEvent(MODEL, "high", "timeout", 60.0))
    s.observe_queue(QueueEvent("mystery:latest", "low", "gone", 1.0))
    s.observe_queue(QueueEvent(MODEL, "normal", "full", 0.0))  # refused without waiting: no wait observed
    s.observe_queue(QueueEvent(MODEL, "normal", "rpm", 0.0))
    got = exposition(s)
    assert {ls["outcome"]: v for ls, v in got["fleet_queue_outcomes_total"]} == {
        "served": 4, "timeout": 1, "gone": 1, "full": 1, "rpm": 1}
    assert sample(got, "fleet_queue_wait_seconds_count", tier="normal") == 4
    assert sample(got, "fleet_queue_wait_seconds_sum", tier="normal") == pytest.approx(3.42)
    assert sample(got, "fleet_queue_wait_seconds_bucket", tier="normal", le="0.025") == 1
    assert sample(got, "fleet_queue_wait_seconds_bucket", tier="normal", le="0.25") == 3
    assert sample(got, "fleet_queue_wait_seconds_bucket", tier="high", le="+Inf") == 1
    assert len([1 for ls, _ in got["fleet_queue_wait_seconds_bucket"] if ls["tier"] == "low"]) == \
        len(names.QUEUE_WAIT_BUCKETS) + 1

    clock.t = 1005.0
    recent = s.recent("model")
    m = recent[MODEL]
    assert m.queued == 5 and m.requests == 0  # waits, not finished requests
    counts = [0] * (len(names.QUEUE_WAIT_BUCKETS) + 1)
    for v in (0.02, 0.2, 0.2, 3.0, 60.0):
        counts[next(i for i, b in enumerate(names.QUEUE_WAIT_BUCKETS) if v <= b)] += 1
    assert m.wait_p50 == pytest.approx(histogram_quantile(0.5, names.QUEUE_WAIT_BUCKETS, counts))
    assert m.wait_p95 == pytest.approx(histogram_quantile(0.95, names.QUEUE_WAIT_BUCKETS, counts))
    assert recent[names.OTHER_MODEL].queued == 1  # an unknown model: the bounded label
    clock.t = 1000.0 + 120
    assert s.recent("model") == {}  # out of the last minute


def _ticket(fleet: Fleet, model: str, tier: str, age: float) -> Ticket:
    t = Ticket(model, tier, "client 127.0.0.1", fleet.proxy.admission.clock() - age)
    assert fleet.proxy.admission.sched.enqueue(t)
    return t


@pytest.mark.parametrize("metrics_on", [True, False])
def test_queue_gauges_use_bounded_labels_whatever_the_metrics_setting(tmp_path: Any, metrics_on: bool) -> None:
    """The queue gauges are read at scrape time (no request-path work): there with `metrics` off too; the
    observer of queue outcomes is request-path work: registered only with `metrics` on."""
    f = Fleet(Config(data_dir=str(tmp_path), auto_distribute=False, metrics=metrics_on))
    assert f.proxy.admission.observers == ([f.stats.observe_queue] if metrics_on else [])
    text = f.metrics.exposition().decode()
    assert "# TYPE fleet_queue_depth gauge" in text and "fleet_queue_depth{" not in text  # nobody waits
    # no agent has them and the catalogue does not list them: one `other` label for both
    _ticket(f, "mystery-a:latest", "high", 4.0)
    _ticket(f, "mystery-b:latest", "normal", 9.0)
    _ticket(f, "mystery-b:latest", "normal", 1.0)
    got: Samples = {}
    for fam in text_string_to_metric_families(f.metrics.exposition().decode()):
        for smp in fam.samples:
            got.setdefault(smp.name, []).append((smp.labels, smp.value))
    assert [ls for ls, _ in got["fleet_queue_depth"]] == [{"model": names.OTHER_MODEL}]
    assert sample(got, "fleet_queue_depth", model=names.OTHER_MODEL) == 3
    oldest = sample(got, "fleet_queue_oldest_wait_seconds", model=names.OTHER_MODEL)
    assert oldest is not None and 9.0 <= oldest < 60.0
