"""A real Prometheus (Debian's `prometheus` package) scrapes a live controller through the shipped scrape
config (deploy/prometheus/prometheus.yml, viewer token as a Bearer credential file), and PromQL over its
HTTP API sees the request series (traffic through a real agent and a fake Ollama), the GPU series (an
agent with GPUs spoken over MQTT: this machine has none) and TTFT quantiles; every query of the shipped
Grafana dashboard evaluates there."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from ollama_fleet.broker.local import free_loopback_port
from tests.browser import SimAgent
from tests.proxy_support import chat_body, start_fleet
from tests.support import wait_until
from tests.test_deploy_files import PROMETHEUS_YML, dashboard_targets

PROMETHEUS = os.environ.get("FLEET_TEST_PROMETHEUS", "/usr/bin/prometheus")
REQUIRE_TOOLS = os.environ.get("FLEET_TEST_REQUIRE_MOSQUITTO") == "1"  # CI installs it (.ci/run): it must run
ADMIN = "prom-admin-token-0123456789abcdef"
VIEWER = "prom-viewer-token-0123456789abcdef"
MODEL = "llama3.2:latest"


def prometheus_path() -> str:
    path = PROMETHEUS if Path(PROMETHEUS).exists() else shutil.which("prometheus")
    if path is None:
        if REQUIRE_TOOLS:
            pytest.fail("FLEET_TEST_REQUIRE_MOSQUITTO=1 but prometheus is missing (Debian's prometheus package)")
        pytest.skip("prometheus is not installed (Debian's prometheus package; .ci/run installs it)")
    return path


class Prometheus:
    """`prometheus` on a free loopback port, scraping `target` with the shipped job every second."""

    def __init__(self, binary: str, tmp: Path, target: str, token: str) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        token_file = tmp / "viewer-token"
        token_file.write_text(token)
        cfg = yaml.safe_load(PROMETHEUS_YML.read_text())
        cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
        [job] = cfg["scrape_configs"]
        job.update(scrape_interval="1s", scrape_timeout="1s")
        job["authorization"]["credentials_file"] = str(token_file)
        job["static_configs"][0]["targets"] = [target]
        config = tmp / "prometheus.yml"
        config.write_text(yaml.safe_dump(cfg))
        self.job = job["job_name"]
        self.port = free_loopback_port()
        self.log_path = tmp / "prometheus.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=5, trust_env=False)
        wait_until(self._ready, 30, what="prometheus /-/ready")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        return self.http.get("/-/ready").status_code == 200

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector (each: {"metric": labels, "value": [ts, "number"]})."""
        r = self.http.get("/api/v1/query", params={"query": expr})
        doc = r.json()
        assert r.status_code == 200 and doc["status"] == "success", f"{expr}: {r.text}"
        assert doc["data"]["resultType"] == "vector", doc
        result: list[dict[str, Any]] = doc["data"]["result"]
        return result

    def close(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def prometheus_bin() -> str:
    return prometheus_path()


@pytest.fixture
def sim_agents() -> Iterator[list[SimAgent]]:
    agents: list[SimAgent] = []
    try:
        yield agents
    finally:
        for a in agents:
            a.close()


def value(sample: dict[str, Any]) -> float:
    return float(sample["value"][1])


def test_prometheus_scrapes_requests_and_gpus_from_a_live_fleet(fleet: Any, tmp_path: Path, prometheus_bin: str,
                                                                sim_agents: list[SimAgent]) -> None:
    c, _ = start_fleet(fleet, "prom-a", controller_env={"fleet_admin_token": ADMIN, "fleet_viewer_token": VIEWER},
                       tokens=6)
    gpu = SimAgent(fleet, "prom-gpu", gpus=2, hb_interval=60)  # 60 s: online for the whole test on one beat
    sim_agents.append(gpu)
    gpu.heartbeat(util=62.0, vram_gb=14.0)
    c.wait_agent("prom-gpu", status="online")

    # /metrics is a read: the viewer token opens it, nothing else does
    assert c.http.get("/metrics").status_code in (401, 403)
    direct = c.http.get("/metrics", headers={"authorization": f"Bearer {VIEWER}"})
    assert direct.status_code == 200 and "fleet_agent_gpu_utilization_ratio" in direct.text

    def chat() -> None:
        r = c.http.post("/api/chat", json=chat_body(stream=True))
        assert r.status_code == 200 and r.headers["x-fleet-agent"] == "prom-a", r.text

    chat()  # the series exists before Prometheus' first scrape: later traffic shows as a rate
    prom = Prometheus(prometheus_bin, tmp_path / "prometheus", f"127.0.0.1:{c.port}", VIEWER)
    try:
        selector = 'fleet_requests_total{agent="prom-a", endpoint="/api/chat", code="200"}'
        wait_until(lambda: prom.query(selector), 30, interval=0.5, what=f"{selector} scraped")
        [up] = prom.query(f'up{{job="{prom.job}"}}')
        assert value(up) == 1.0  # the Bearer credential file got through the controller's access rule

        sent = 1
        for _ in range(5):
            chat()
            sent += 1
        assert c.http.post("/api/chat", json=chat_body("no-such-model")).status_code == 404

        [requests] = wait_until(lambda: [s for s in prom.query(selector) if value(s) == sent], 30, interval=0.5,
                                what=f"{sent} chats counted in Prometheus")
        assert requests["metric"] == {"__name__": "fleet_requests_total", "job": prom.job,
                                      "instance": f"127.0.0.1:{c.port}", "fleet": "default", "endpoint": "/api/chat",
                                      "model": MODEL, "agent": "prom-a", "code": "200"}

        gpus = prom.query('fleet_agent_gpu_utilization_ratio{agent="prom-gpu"}')
        assert {s["metric"]["gpu"]: round(value(s), 6) for s in gpus} == {"0": 0.62, "1": 0.42}
        memory = prom.query('fleet_agent_gpu_memory_used_bytes{agent="prom-gpu"}')
        assert {s["metric"]["gpu"]: value(s) for s in memory} == {"0": 14e9, "1": 8e9}
        [status] = prom.query('fleet_agents{status="online"}')
        assert value(status) == 2
        # admission control's slots: the idle agent's capacity in force, none of it busy
        [capacity] = prom.query('fleet_agent_capacity{agent="prom-a"}')
        assert value(capacity) >= 1
        [busy] = prom.query('fleet_agent_slots_busy{agent="prom-a"}')
        assert value(busy) == 0

        # TTFT quantile over the buckets' rate: the chats after the first scrape make it finite
        p50 = "histogram_quantile(0.5, sum by (le, model) (rate(fleet_request_ttft_seconds_bucket[1m])))"
        [ttft] = wait_until(lambda: [s for s in prom.query(p50) if math.isfinite(value(s))], 30, interval=0.5,
                            what="a finite TTFT p50")
        assert ttft["metric"] == {"model": MODEL} and 0 < value(ttft) <= 30
        tokens = prom.query(f'fleet_tokens_total{{model="{MODEL}", kind="completion"}}')
        assert [value(s) for s in tokens] == [6.0 * sent]

        # every query of the shipped dashboard is valid PromQL over these series, and its core panels show data
        for panel, target in dashboard_targets():
            result = prom.query(target["expr"].replace("$__rate_interval", "1m"))
            if panel["title"].startswith(("Requests/s", "Tokens/s", "Time to first token", "GPU", "Agents by",
                                                 "Slots busy")):
                assert result, f"panel {panel['title']!r} shows nothing: {target['expr']}"
    finally:
        prom.close()
