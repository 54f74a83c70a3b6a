"""The shipped monitoring files agree with the metric table (controller/metrics/names.py): the Grafana
dashboard queries only metrics and labels that exist, the Prometheus config is valid (`promtool`), and
docs/metrics.md lists exactly the metrics of the table."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from ollama_fleet.controller.metrics import names
from ollama_fleet.settings import SETTINGS
from tests.support import ROOT

DASHBOARD = ROOT / "deploy" / "grafana" / "ollama-fleet.json"
PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DOC = ROOT / "docs" / "metrics.md"
REQUIRE_TOOLS = os.environ.get("FLEET_TEST_REQUIRE_MOSQUITTO") == "1"  # CI: every tool it installs must be there

SPEC_OF = {sample: spec for spec in names.ALL for sample in names.exposed_names(spec)}
# PromQL words that are not metric names: functions (followed by "(") and operators/modifiers.
FUNCTIONS = frozenset({"sum", "avg", "min", "max", "count", "rate", "irate", "increase", "histogram_quantile",
                       "topk", "bottomk", "quantile", "abs", "clamp_min", "clamp_max", "sort", "sort_desc",
                       "avg_over_time", "max_over_time", "min_over_time", "delta", "deriv", "label_replace",
                       "vector", "scalar", "time"})
KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
                      "group_right"})
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_MATCHERS = re.compile(r"\{([^{}]*)\}")
_IDENT = re.compile(r"(?<![\w.])([a-zA-Z_:][\w:]*)(\s*\()?")


def promql_refs(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) an expression refers to. A small scanner, enough for dashboard
    queries: strings, ranges and Grafana variables out; grouping clauses and matchers give labels."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors, with their `$__rate_interval`
    labels: set[str] = set()
    for m in _GROUPING.finditer(text):
        labels |= {x.strip() for x in m.group(2).split(",") if x.strip()}
    text = _GROUPING.sub(" ", text)  # `sum by (x) (...)` reads as the call `sum (...)`
    for m in _MATCHERS.finditer(text):
        labels |= set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", m.group(1)))
    text = _MATCHERS.sub("", text)
    metrics: set[str] = set()
    for m in _IDENT.finditer(text):
        word, call = m.group(1), m.group(2)
        if word in KEYWORDS:
            continue
        if call:
            assert word in FUNCTIONS, f"unknown PromQL function {word!r} in {expr!r}"
        else:
            metrics.add(word)
    return metrics, labels


def allowed_labels(metrics: set[str]) -> set[str]:
    out = {label for m in metrics for label in SPEC_OF[m].labels}
    if any(m.endswith("_bucket") for m in metrics):
        out.add("le")
    return out


def dashboard_targets() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    doc = json.loads(DASHBOARD.read_text())
    return [(p, t) for p in doc["panels"] for t in p.get("targets", [])]


def test_the_scanner_sees_names_and_labels() -> None:
    m, labels = promql_refs('histogram_quantile(0.95, sum by (le, model) (rate(fleet_request_ttft_seconds_bucket'
                            '{model!="x", agent=~"a.*"}[$__rate_interval]))) / on (model) bool fleet_agents')
    assert m == {"fleet_request_ttft_seconds_bucket", "fleet_agents"}
    assert labels == {"le", "model", "agent"}
    with pytest.raises(AssertionError):
        promql_refs("nosuchfunction(fleet_agents)")


def test_grafana_dashboard_uses_only_metrics_that_exist() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["schemaVersion"] >= 39 and doc["uid"] and doc["title"]
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for p in doc["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert p["targets"], p["title"]

    used: set[str] = set()
    for panel, target in dashboard_targets():
        expr = target["expr"]
        metrics, labels = promql_refs(expr)
        unknown = metrics - SPEC_OF.keys()
        assert not unknown, f"panel {panel['title']!r}: {unknown} are not in controller/metrics/names.py"
        assert metrics, f"panel {panel['title']!r} queries no metric: {expr!r}"
        allowed = allowed_labels(metrics)
        assert labels <= allowed, f"panel {panel['title']!r}: labels {labels - allowed} not on {metrics}"
        legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
        assert legend <= allowed, f"panel {panel['title']!r}: legend labels {legend - allowed}"
        if "_bucket" in expr:
            assert "histogram_quantile" in expr and "le" in labels, expr  # buckets only make sense as quantiles
        used |= metrics

    # what the issue asks the dashboard to show: requests, errors, TTFT, tokens/s, overhead, GPU per node
    wanted = {"fleet_requests_total", "fleet_request_errors_total", "fleet_request_ttft_seconds_bucket",
              "fleet_tokens_total", "fleet_request_overhead_seconds_bucket", "fleet_inflight_requests",
              "fleet_agent_gpu_utilization_ratio", "fleet_agent_gpu_memory_used_bytes",
              "fleet_agent_gpu_temperature_celsius", "fleet_agent_gpu_power_watts", "fleet_agents", "fleet_jobs",
              # admission control's Queue row
              "fleet_queue_depth", "fleet_queue_wait_seconds_bucket", "fleet_queue_outcomes_total",
              "fleet_agent_slots_busy", "fleet_agent_capacity"}
    assert wanted <= used, wanted - used


def _tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path is None:
        if REQUIRE_TOOLS:
            pytest.fail(f"FLEET_TEST_REQUIRE_MOSQUITTO=1 but {name} is missing (Debian's prometheus package)")
        pytest.skip(f"{name} is not installed (Debian's prometheus package)")
    return path


def test_dashboard_queries_parse_with_promtool(tmp_path: Path) -> None:
    """Prometheus' own parser on every query: a recording-rule file holding them, `promtool check rules`."""
    promtool = _tool("promtool")
    rules = [{"record": f"fleet:dashboard:{i}", "expr": t["expr"].replace("$__rate_interval", "1m")}
             for i, (_, t) in enumerate(dashboard_targets())]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = subprocess.run([promtool, "check", "rules", str(path)], check=False, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules)} rules found" in out.stdout + out.stderr


def test_prometheus_config_scrapes_the_controller_with_a_bearer_token(tmp_path: Path) -> None:
    cfg = yaml.safe_load(PROMETHEUS_YML.read_text())
    [job] = cfg["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["authorization"]["type"] == "Bearer" and job["authorization"]["credentials_file"]
    [target] = job["static_configs"][0]["targets"]
    assert target.rsplit(":", 1)[1] == str(next(s.default for s in SETTINGS if s.name == "port"))  # the controller's default port

    promtool = _tool("promtool")
    # the real check, file references included: the token file where the config expects one
    token = tmp_path / "viewer-token"
    token.write_text("secret")
    job["authorization"]["credentials_file"] = str(token)
    checked = tmp_path / "prometheus.yml"
    checked.write_text(yaml.safe_dump(cfg))
    out = subprocess.run([promtool, "check", "config", str(checked)], check=False, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr


def _doc_table() -> dict[str, tuple[str, tuple[str, ...], tuple[float, ...]]]:
    rows: dict[str, tuple[str, tuple[str, ...], tuple[float, ...]]] = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"\|\s*`(fleet_\w+)`\s*\|([^|]*)\|([^|]*)\|([^|]*)\|", line)
        if m:
            assert m.group(1) not in rows, f"{m.group(1)} listed twice"
            labels = tuple(re.findall(r"`(\w+)`", m.group(3)))
            buckets = tuple(float(b) for b in m.group(4).replace("—", "").split(",") if b.strip())
            rows[m.group(1)] = (m.group(2).strip(), labels, buckets)
    return rows


def test_docs_list_exactly_the_metrics() -> None:
    expected = {(s.name + "_total" if s.kind == "counter" else s.name): (s.kind, s.labels, s.buckets)
                for s in names.ALL}
    assert _doc_table() == expected
