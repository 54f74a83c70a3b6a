"""`GET /metrics` against a real controller process over a real Mosquitto: a real agent with a fake Ollama,
an agent spoken over MQTT for the GPUs this machine lacks, one request through the proxy and one model
pull. The text is read with prometheus_client's own parser and checked against the table in
controller/metrics/names.py; access follows the read policy (controller/edge/access.py)."""

from __future__ import annotations

import httpx
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from ollama_fleet.contract.jobs import STATUSES as JOB_STATUSES
from ollama_fleet.contract.protocol import NODE_TOPICS
from ollama_fleet.contract.status import ALL as AGENT_STATUSES
from ollama_fleet.controller.metrics import names
from tests.browser import SimAgent
from tests.jobs_support import wait_task
from tests.proxy_support import chat_body
from tests.support import wait_until

ADMIN, VIEWER = "adm-tok-0123456789", "view-tok-0123456789"
Families = dict[str, Metric]  # by family name (a counter's without `_total`)


def scrape(http: httpx.Client, **headers: str) -> Families:
    r = http.get("/metrics", headers=headers)
    assert r.status_code == 200, r.text[:300]
    assert r.headers["content-type"] == CONTENT_TYPE_LATEST
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def samples(fams: Families, family: str, agent: str) -> list[Sample]:
    return [s for s in fams[family].samples if s.labels.get("agent") == agent]


def value(fams: Families, family: str, sample: str | None = None, **labels: str) -> float | None:
    """The one sample of `family` named `sample` (default: the family's name) whose labels are `labels`."""
    found = [s.value for s in fams[family].samples if s.name == (sample or family) and s.labels == labels]
    assert len(found) <= 1, (family, labels, found)
    return found[0] if found else None


def test_the_exposition_is_the_metric_table_with_the_fleet_in_it(fleet):
    c = fleet.controller()
    fake = fleet.fake_ollama("mx-real")
    fleet.agent("mx-real", fake.url)
    sim = SimAgent(fleet, "mx-gpu", gpus=2, models=["qwen2.5:7b"])  # not the model the request asks for
    try:
        c.wait_agent("mx-real", status="online", routable=True)
        c.wait_agent("mx-gpu", status="online")
        sim.heartbeat(cpu=35.0, util=62.0, vram_gb=14.0)
        wait_until(lambda: c.agent("mx-gpu")["metrics"]["seq"] == 1, what="the simulated agent's heartbeat")
        wait_until(lambda: c.agent("mx-real")["metrics"]["cpu"] is not None, what="the real agent's heartbeat")

        r = c.http.post("/api/chat", json=chat_body("llama3.2"))
        assert r.status_code == 200 and r.json()["message"]["content"]
        tid = c.http.post("/api/agents/mx-real/models/pull", json={"model_name": "llama3.1:8b"}).json()["task_id"]
        wait_task(c, tid, status="completed")

        fams = wait_until(lambda: (f := scrape(c.http)) and value(
            f, "fleet_requests", "fleet_requests_total", endpoint="/api/chat", model="llama3.2:latest",
            agent="mx-real", code="200") == 1 and f, what="the proxied request counted")

        # exactly the table: every family, its type, help and label names, nothing else
        assert set(fams) == {spec.name for spec in names.ALL}
        for spec in names.ALL:
            family = fams[spec.name]
            assert family.type == spec.kind and family.documentation == spec.help, spec.name
            for s in family.samples:
                assert s.name in names.exposed_names(spec), (spec.name, s.name)
                extra = {"le"} if s.name.endswith("_bucket") else set()
                assert set(s.labels) == set(spec.labels) | extra, (spec.name, s.labels)

        # agents by status: every status, 0 too
        assert {s.labels["status"]: s.value for s in fams["fleet_agents"].samples} == {
            **dict.fromkeys(AGENT_STATUSES, 0.0), "online": 2.0}
        # the real agent: CPU as a ratio, memory in bytes, no GPU on this machine
        cpu = value(fams, "fleet_agent_cpu_ratio", agent="mx-real")
        assert cpu is not None and 0.0 <= cpu <= 1.0
        assert (value(fams, "fleet_agent_memory_used_bytes", agent="mx-real") or 0) > 2**20
        assert value(fams, "fleet_agent_models_loaded", agent="mx-real") is not None
        assert value(fams, "fleet_inflight_requests", agent="mx-real") == 0
        assert not samples(fams, "fleet_agent_gpu_utilization_ratio", "mx-real")
        # the simulated GPU agent: percent -> ratio; bytes, celsius and watts as reported
        gb = 10**9
        assert value(fams, "fleet_agent_cpu_ratio", agent="mx-gpu") == 0.35
        assert value(fams, "fleet_agent_memory_used_bytes", agent="mx-gpu") == 53 * gb
        assert value(fams, "fleet_agent_models_loaded", agent="mx-gpu") == 1
        for gpu, util, mem, temp, power in (("0", 0.62, 14 * gb, 61, 280.0), ("1", 0.42, 8 * gb, 62, 190.0)):
            assert abs((value(fams, "fleet_agent_gpu_utilization_ratio", agent="mx-gpu", gpu=gpu) or 0) - util) < 1e-9
            assert value(fams, "fleet_agent_gpu_memory_used_bytes", agent="mx-gpu", gpu=gpu) == mem
            assert value(fams, "fleet_agent_gpu_temperature_celsius", agent="mx-gpu", gpu=gpu) == temp
            assert value(fams, "fleet_agent_gpu_power_watts", agent="mx-gpu", gpu=gpu) == power
        # the proxied request, from the proxy's RequestStats
        assert value(fams, "fleet_request_duration_seconds", "fleet_request_duration_seconds_count",
                     model="llama3.2:latest") == 1
        assert (value(fams, "fleet_tokens", "fleet_tokens_total", model="llama3.2:latest", kind="completion")
                or 0) > 0
        assert (value(fams, "fleet_request_overhead_seconds", "fleet_request_overhead_seconds_count") or 0) >= 1
        # jobs by status: every status, the finished pull counted
        jobs = {s.labels["status"]: s.value for s in fams["fleet_jobs"].samples}
        assert set(jobs) == set(JOB_STATUSES) and jobs["completed"] == 1

        # MQTT counters move: every node topic kind is listed; heartbeats keep coming; a bad payload is a drop
        assert {s.labels["kind"] for s in fams["fleet_mqtt_messages"].samples} == set(NODE_TOPICS)
        beats = value(fams, "fleet_mqtt_messages", "fleet_mqtt_messages_total", kind="heartbeat") or 0
        assert beats >= 2
        sim.client.publish(sim.topics.node("mx-gpu", "heartbeat"), b"{not json", qos=1).wait_for_publish(5)
        wait_until(lambda: value(scrape(c.http), "fleet_mqtt_dropped", "fleet_mqtt_dropped_total",
                                 reason="bad_json") == 1, what="the dropped message counted")
        wait_until(lambda: (value(scrape(c.http), "fleet_mqtt_messages", "fleet_mqtt_messages_total",
                                  kind="heartbeat") or 0) > beats, what="more heartbeats counted")

        # an agent that leaves keeps its in-flight gauge and loses its telemetry series
        sim.state("offline")
        gone = wait_until(lambda: (f := scrape(c.http)) and value(f, "fleet_agents", status="offline") == 1 and f,
                          what="the simulated agent offline")
        assert value(gone, "fleet_agents", status="online") == 1
        assert value(gone, "fleet_inflight_requests", agent="mx-gpu") == 0
        for family in ("fleet_agent_cpu_ratio", "fleet_agent_gpu_utilization_ratio", "fleet_agent_gpu_power_watts"):
            assert not samples(gone, family, "mx-gpu"), family
    finally:
        sim.close()


def test_metrics_is_a_read_behind_the_tokens(fleet):
    """Prometheus' `authorization` scrape option sends `Bearer <token>`; a dashboard login works too."""
    c = fleet.controller(fleet_admin_token=ADMIN, fleet_viewer_token=VIEWER)
    r = c.http.get("/metrics")
    assert r.status_code == 401 and "Bearer" in r.json()["error"]
    assert c.http.get("/metrics", headers={"authorization": "Bearer wrong-token-000"}).status_code == 401
    for token in (VIEWER, ADMIN):
        fams = scrape(c.http, authorization=f"Bearer {token}")
        assert set(fams) == {spec.name for spec in names.ALL}
    with httpx.Client(base_url=c.url, timeout=10, trust_env=False) as browser:
        assert browser.post("/dashboard/login", data={"token": VIEWER, "next": "/dashboard"}).status_code == 303
        assert "fleet_agents" in scrape(browser)


def test_without_tokens_only_direct_loopback_clients_scrape(fleet):
    c = fleet.controller()
    assert "fleet_agents" in scrape(c.http)
    for forwarded in ({"x-forwarded-for": "203.0.113.9"}, {"forwarded": "for=203.0.113.9"}):
        r = c.http.get("/metrics", headers=forwarded)
        assert r.status_code == 403 and "admin_token" in r.json()["error"], forwarded
