"""RequestStats (controller/metrics/requests.py): the proxy's request numbers, as /metrics and the dashboard
read them; and end to end, what a real controller counts for real requests through an agent."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from ollama_fleet.controller.metrics import names
from ollama_fleet.controller.metrics.requests import (
    MODEL_CACHE_TTL, SLICE_S, Observation, RequestStats, histogram_quantile,
)
from tests.proxy_support import chat_body, start_fleet


def obs(model: str = "llama3.2:latest", agent: str = "n1", code: int = 200, *, mono: float = 1000.0,
        ttft: float | None = 0.2, tpot: float | None = 0.02, duration: float = 1.0, overhead: float = 0.0003,
        prompt: int | None = 10, completion: int | None = 5, reason: str | None = None, failovers: int = 0,
        endpoint: str = "/api/chat") -> Observation:
    return Observation(endpoint, model, agent, code, reason, duration, ttft, tpot, overhead, prompt, completion,
                       failovers, mono)


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class _Tiny(Collector):
    def __init__(self, stats: RequestStats) -> None:
        self.stats = stats

    def collect(self) -> Iterable[Metric]:
        return self.stats.families()


def exposition(stats: RequestStats) -> dict[str, list[tuple[dict[str, str], float]]]:
    """The text format of the stats' families, parsed back: sample name -> [(labels, value)]."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Tiny(stats))
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    found = [v for ls, v in samples.get(name, []) if all(ls.get(k) == w for k, w in labels.items())]
    assert len(found) == 1, (name, labels, samples.get(name))
    return found[0]


def test_counts_errors_tokens_and_failovers() -> None:
    s = RequestStats()
    s.observe(obs())
    s.observe(obs(completion=7, failovers=2))
    s.observe(obs(code=502, agent="", reason="upstream", ttft=None, tpot=None, prompt=None, completion=None))
    s.observe(obs(model="", agent="", code=400, reason="rejected", ttft=None, tpot=None, prompt=None,
                  completion=None))
    assert s.requests == {("/api/chat", "llama3.2:latest", "n1", 200): 2,
                          ("/api/chat", "llama3.2:latest", "", 502): 1, ("/api/chat", "", "", 400): 1}
    assert s.errors == {"upstream": 1, "rejected": 1}
    assert s.failovers == 2
    m = s.models["llama3.2:latest"]
    assert (m.prompt, m.completion) == (20, 12)
    assert s.overhead.count == 4
    assert m.duration.count == 3 and set(s.models) == {"llama3.2:latest"}  # no model: no per-model numbers
    assert m.ttft.count == 2 and m.tpot.count == 2


def test_histogram_bucket_placement() -> None:
    s = RequestStats()
    for v in (0.01, 0.0100001, 0.0, 31.0):  # on a bound: that bucket (le); past the last: +Inf
        s.observe(obs(ttft=v))
    h = s.models["llama3.2:latest"].ttft
    assert h.bounds == names.TTFT_BUCKETS
    assert h.counts[0] == 2 and h.counts[1] == 1 and h.counts[-1] == 1 and sum(h.counts) == 4
    assert h.sum == pytest.approx(0.01 + 0.0100001 + 31.0)
    cum = dict(h.cumulative())
    assert cum["0.01"] == 2 and cum["0.025"] == 3 and cum["30.0"] == 3 and cum["+Inf"] == 4


def test_unknown_models_share_one_label_and_answers_are_cached() -> None:
    installed = {"llama3.2:latest"}
    asked: list[str] = []

    def known(name: str) -> bool:
        asked.append(name)
        return name in installed

    s = RequestStats(known)
    for i in range(50):  # a client inventing model names grows no series
        s.observe(obs(model=f"nonsense-{i}:latest", code=404, reason="no_route", agent=""))
    s.observe(obs(mono=1000.0))
    s.observe(obs(mono=1001.0))
    assert {k[1] for k in s.requests} == {names.OTHER_MODEL, "llama3.2:latest"}
    assert s.requests[("/api/chat", names.OTHER_MODEL, "", 404)] == 50
    assert set(s.models) == {names.OTHER_MODEL, "llama3.2:latest"}
    assert asked.count("llama3.2:latest") == 1  # cached
    installed.add("qwen3:latest")  # installed later: its own label once the cached answer expired
    s.observe(obs(model="qwen3:latest", mono=1002.0))
    assert ("/api/chat", "qwen3:latest", "n1", 200) in s.requests
    s.observe(obs(model="nonsense-1:latest", mono=1000.0 + MODEL_CACHE_TTL - 1))
    assert asked.count("nonsense-1:latest") == 1
    installed.add("nonsense-1:latest")
    s.observe(obs(model="nonsense-1:latest", mono=1000.0 + MODEL_CACHE_TTL + 1))
    assert asked.count("nonsense-1:latest") == 2
    assert s.requests[("/api/chat", "nonsense-1:latest", "n1", 200)] == 1


def test_histogram_quantile_matches_promql() -> None:
    bounds = (0.1, 0.2, 0.5, 1.0)
    # 10 in (0, 0.1], 10 in (0.1, 0.2], none after: p50 ends bucket 1 exactly, p75 halfway into bucket 2
    assert histogram_quantile(0.5, bounds, [10, 10, 0, 0, 0]) == pytest.approx(0.1)
    assert histogram_quantile(0.75, bounds, [10, 10, 0, 0, 0]) == pytest.approx(0.15)
    assert histogram_quantile(0.25, bounds, [10, 10, 0, 0, 0]) == pytest.approx(0.05)  # first bucket from 0
    assert histogram_quantile(0.95, bounds, [1, 0, 0, 0, 9]) == 1.0  # in +Inf: the highest finite bound
    assert histogram_quantile(0.5, bounds, [0, 0, 0, 0, 0]) is None


def test_recent_rates_quantiles_and_window() -> None:
    clock = Clock(995.0)
    s = RequestStats(clock=clock)
    base = 1000.0
    for i in range(20):  # 20 requests in [1000, 1020): ttft 0.04 (10 of them) and 0.2 (10)
        s.observe(obs(agent="a" if i % 2 else "b", ttft=0.04 if i < 10 else 0.2, completion=5, mono=base + i))
    s.observe(obs(agent="a", model="nomic:latest", ttft=None, completion=None, mono=base + 5))
    clock.t = 1030.0  # stats exist since 995: the window covers 35 s
    by_model = s.recent("model")
    m = by_model["llama3.2:latest"]
    assert m.requests == 20 and m.rps == pytest.approx(20 / 35)
    assert m.tokens_per_s == pytest.approx(100 / 35)
    counts = [0] * (len(names.TTFT_BUCKETS) + 1)
    counts[names.TTFT_BUCKETS.index(0.05)] = 10
    counts[names.TTFT_BUCKETS.index(0.25)] = 10
    assert m.ttft_p50 == pytest.approx(histogram_quantile(0.5, names.TTFT_BUCKETS, counts))
    assert m.ttft_p50 == pytest.approx(0.05)
    assert m.ttft_p95 == pytest.approx(0.1 + (0.25 - 0.1) * 0.9)
    n = by_model["nomic:latest"]
    assert n.requests == 1 and n.ttft_p50 is None and n.tokens_per_s is None
    by_agent = s.recent("agent")
    assert by_agent["a"].requests == 11 and by_agent["b"].requests == 10
    # an hour later nothing is in the last minute; the 10 s window covers only the current slice
    clock.t = 4600.0
    assert s.recent("model") == {}
    s.observe(obs(mono=4600.0 - SLICE_S))  # the previous slice: outside a 10 s window
    s.observe(obs(mono=4600.0))
    assert s.recent("model", window_s=10.0)["llama3.2:latest"].requests == 1
    assert s.recent("model", window_s=20.0)["llama3.2:latest"].requests == 2


def test_families_parse_back_as_prometheus_text() -> None:
    s = RequestStats(lambda m: m == "llama3.2:latest")
    s.observe(obs(ttft=0.2, tpot=0.02, duration=1.5, overhead=0.0003, prompt=10, completion=5, failovers=1))
    s.observe(obs(model="mystery:latest", code=404, agent="", reason="no_route", ttft=None, tpot=None,
                  duration=0.001, prompt=None, completion=None))
    got = exposition(s)
    chat = {"endpoint": "/api/chat", "model": "llama3.2:latest", "agent": "n1", "code": "200"}
    assert value(got, "fleet_requests_total", **chat) == 1
    assert value(got, "fleet_requests_total", model=names.OTHER_MODEL, code="404") == 1
    assert value(got, "fleet_request_errors_total", reason="no_route") == 1
    assert value(got, "fleet_failovers_total") == 1
    assert value(got, "fleet_tokens_total", model="llama3.2:latest", kind="prompt") == 10
    assert value(got, "fleet_tokens_total", model="llama3.2:latest", kind="completion") == 5
    assert value(got, "fleet_request_ttft_seconds_bucket", model="llama3.2:latest", le="0.1") == 0
    assert value(got, "fleet_request_ttft_seconds_bucket", model="llama3.2:latest", le="0.25") == 1
    assert value(got, "fleet_request_ttft_seconds_bucket", model="llama3.2:latest", le="+Inf") == 1
    assert value(got, "fleet_request_ttft_seconds_sum", model="llama3.2:latest") == pytest.approx(0.2)
    assert value(got, "fleet_request_tpot_seconds_count", model="llama3.2:latest") == 1
    assert value(got, "fleet_request_duration_seconds_count", model=names.OTHER_MODEL) == 1
    assert value(got, "fleet_request_overhead_seconds_count") == 2
    assert value(got, "fleet_request_overhead_seconds_bucket", le="0.0005") == 2
    # every sample name is one names.py declares
    declared = {n for spec in names.ALL for n in names.exposed_names(spec)}
    assert set(got) <= declared | {n.replace("_total", "_created") for n in declared}
    assert len([ls for ls, _ in got["fleet_request_duration_seconds_bucket"] if ls["model"] == "llama3.2:latest"]) \
        == len(names.DURATION_BUCKETS) + 1


# ---- end to end: a controller, an agent and a fake Ollama -------------------------------------------------

def scrape(c: Any) -> dict[str, list[tuple[dict[str, str], float]]]:
    r = c.http.get("/metrics")
    assert r.status_code == 200, r.text
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_proxied_requests_are_counted(fleet: Any) -> None:
    c, _ = start_fleet(fleet, "mr-a", tokens=6)
    prompt = completion = 0
    for _ in range(3):
        r = c.http.post("/api/chat", json=chat_body())
        assert r.status_code == 200
        prompt, completion = prompt + r.json()["prompt_eval_count"], completion + r.json()["eval_count"]
    for _ in range(2):
        r = c.http.post("/api/chat", json=chat_body(stream=True))
        assert r.status_code == 200
        final = json.loads(r.text.strip().splitlines()[-1])
        assert final["done"] is True
        prompt, completion = prompt + final["prompt_eval_count"], completion + final["eval_count"]
    assert c.http.post("/api/chat", json=chat_body(model="no-such-model")).status_code == 404
    assert c.http.post("/api/chat", content=b"{").status_code == 400
    assert c.http.post("/api/show", json={"model": "llama3.2:latest"}).status_code == 200  # no first token
    got = scrape(c)  # the request is counted before its last byte leaves: no waiting needed
    model = "llama3.2:latest"
    assert value(got, "fleet_requests_total", endpoint="/api/chat", model=model, agent="mr-a", code="200") == 5
    assert value(got, "fleet_requests_total", model=names.OTHER_MODEL, code="404") == 1
    assert value(got, "fleet_requests_total", model="", code="400") == 1
    assert value(got, "fleet_request_errors_total", reason="no_route") == 1
    assert value(got, "fleet_request_errors_total", reason="rejected") == 1
    assert value(got, "fleet_tokens_total", model=model, kind="prompt") == prompt > 0
    assert value(got, "fleet_tokens_total", model=model, kind="completion") == completion > 0
    assert value(got, "fleet_request_ttft_seconds_count", model=model) == 5
    assert value(got, "fleet_request_tpot_seconds_count", model=model) == 5
    assert 0 < value(got, "fleet_request_tpot_seconds_sum", model=model) < 5
    assert value(got, "fleet_request_duration_seconds_count", model=model) == 6  # the chats and the show
    assert value(got, "fleet_requests_total", endpoint="/api/show", model=model, agent="mr-a", code="200") == 1
    assert value(got, "fleet_request_overhead_seconds_count") == 8
    duration = value(got, "fleet_request_duration_seconds_sum", model=model)
    assert 0 < value(got, "fleet_request_overhead_seconds_sum") < duration + 0.1
    assert value(got, "fleet_failovers_total") == 0


def test_metrics_off_counts_nothing(fleet: Any) -> None:
    c, _ = start_fleet(fleet, "mr-off", controller_env={"fleet_metrics": "0"})
    for stream in (False, True):
        assert c.http.post("/api/chat", json=chat_body(stream=stream)).status_code == 200
    got = scrape(c)
    assert "fleet_requests_total" not in got and "fleet_request_overhead_seconds_count" in got
    assert value(got, "fleet_request_overhead_seconds_count") == 0
