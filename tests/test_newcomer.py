"""Newcomer polish from a fresh-clone trial: no automatic pull while the agent's Ollama is down (then
exactly one when it answers), the `auto_distribute` event says "queued" for a pull that has not started,
`fleet settings` shows the data directory actually used, the empty GPU chart says why, and the README's
"Try it" names the Ollama prerequisite and the automatic pull with its off switch."""

from __future__ import annotations

import json
import os
import re

from ollama_fleet.controller.jobs.catalogue import load_catalogue
from ollama_fleet.cli import _parser
from ollama_fleet.model_tiers import load_tiers
from tests.jobs_support import wait_task
from tests.support import ROOT, wait_until
from tests.test_cli import run_fleet

MB = 1_000_000
HEARTBEATS_WATCHED = 3  # heartbeats the controller handles with Ollama down before we look for jobs


def _tiers(tmp_path, model: str = "tinyllama") -> str:
    path = tmp_path / "tiers.json"
    path.write_text(json.dumps({"ram_fraction": 0.5, "tiers": [{"min_gb": 0, "models": [model]}]}))
    return str(path)


def _tasks(c, node: str) -> list[dict]:
    return c.http.get("/api/tasks", params={"agent": node, "limit": 100}).json()["tasks"]


def _auto_events(c, node: str) -> list[dict]:
    return c.http.get("/api/events", params={"kind": "auto_distribute", "agent": node}).json()["events"]


def _beats(c, node: str, n: int) -> None:
    seq = c.agent(node)["metrics"].get("seq") or 0
    wait_until(lambda: (c.agent(node)["metrics"].get("seq") or 0) >= seq + n, 15, what=f"{n} heartbeats of {node}")


def test_no_auto_pull_while_ollama_is_down_and_exactly_one_once_it_answers(fleet, tmp_path):
    c = fleet.controller(fleet_auto_distribute="1", fleet_model_tiers_file=_tiers(tmp_path))
    fake = fleet.fake_ollama("nc-down", pull_total=20 * MB)
    fake.stop()
    fleet.agent("nc-down", fake.url)
    c.wait_agent("nc-down", status="ollama_down")
    _beats(c, "nc-down", HEARTBEATS_WATCHED)
    assert _tasks(c, "nc-down") == [] and _auto_events(c, "nc-down") == []

    fake.restart()
    t = wait_until(lambda: _tasks(c, "nc-down"), 15, what="auto pull once Ollama answers")[0]
    assert t["origin"] == "auto" and t["model"] == "tinyllama"
    wait_task(c, t["id"], status="completed")
    [ev] = _auto_events(c, "nc-down")
    assert "1 pull(s) started" in ev["message"] and "queued" not in ev["message"]

    # Ollama going down and up again is not a new first registration
    fake.stop()
    c.wait_agent("nc-down", status="ollama_down")
    fake.restart()
    c.wait_agent("nc-down", status="online", routable=True)
    _beats(c, "nc-down", HEARTBEATS_WATCHED)
    assert len(_tasks(c, "nc-down")) == 1 and len(_auto_events(c, "nc-down")) == 1


def test_auto_distribute_event_says_queued_for_a_pull_held_behind_the_fleet_cap(fleet, tmp_path):
    c = fleet.controller(fleet_auto_distribute="1", fleet_model_tiers_file=_tiers(tmp_path),
                         fleet_max_concurrent_pulls="1")
    slow = fleet.fake_ollama("nc-first", pull_total=5000 * MB, pull_speed=1 * MB)
    fleet.agent("nc-first", slow.url)
    first = wait_until(lambda: _tasks(c, "nc-first"), 15, what="first auto pull")[0]
    wait_task(c, first["id"], status="in_progress")  # holds the only fleet pull slot
    fleet.agent("nc-second")
    second = wait_until(lambda: _tasks(c, "nc-second"), 15, what="second auto pull")[0]
    assert second["status"] == "pending" and second["origin"] == "auto"

    [ev1] = wait_until(lambda: _auto_events(c, "nc-first"), 5)
    [ev2] = wait_until(lambda: _auto_events(c, "nc-second"), 5)
    assert "1 pull(s) started" in ev1["message"]
    assert "started" not in ev2["message"]
    assert "1 pull(s) queued" in ev2["message"] and "max_concurrent_pulls" in ev2["message"], ev2["message"]

    c.http.post(f"/api/tasks/{first['id']}/cancel")  # frees the slot: the queued pull runs
    wait_task(c, second["id"], status="completed")


def test_settings_shows_the_data_dir_actually_used(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "FLEET_DATA_DIR" and k != "FLEET_CONFIG"}
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg")
    out = run_fleet("settings", env=env)
    assert out.returncode == 0, out.stderr
    assert f"data_dir = '{tmp_path / 'xdg' / 'ollama-fleet'}'  (default)" in out.stdout.splitlines()
    out = run_fleet("settings", env={**env, "FLEET_DATA_DIR": str(tmp_path / "mine")})
    assert f"data_dir = '{tmp_path / 'mine'}'  (env)" in out.stdout.splitlines()


def test_empty_gpu_chart_says_why(fleet):
    c = fleet.controller()
    page = c.http.get("/dashboard")
    assert page.status_code == 200
    chart = re.search(r'<div class="chart" id="chart-gpu"[^>]*>', page.text)
    assert chart is not None
    assert 'data-empty="No GPU use reported in the last hour: agents without an NVIDIA GPU' in chart.group(0)
    js = c.http.get("/dashboard/static/charts.js").text
    assert "el.dataset.empty ||" in js  # the chart shows the page's reason instead of the generic text


def test_readme_try_it_names_ollama_the_tier_models_and_the_off_switch():
    readme = (ROOT / "README.md").read_text()
    try_it = readme.split("## Try it", 1)[1].split("\n## ", 1)[0]
    for words in ("--install-ollama", "--manage-ollama", "--no-auto-distribute", "FLEET_AUTO_DISTRIBUTE=0",
                  "ollama_fleet/model_tiers.json"):
        assert words in try_it, words
    flat, catalogue = " ".join(try_it.split()), load_catalogue()
    for tier in load_tiers().tiers:  # the shipped table and the download sizes it names stay true
        for model in tier.models:
            size = catalogue.size(model) / 1e9
            assert f"{model} (~{size:.1f} GB" in flat or f"{model} (~{size:.0f} GB" in flat, model
    args = _parser().parse_args(["up", "--no-auto-distribute", "--install-ollama", "--manage-ollama"])
    assert (args.auto_distribute, args.install_ollama, args.manage_ollama) == (False, True, True)
