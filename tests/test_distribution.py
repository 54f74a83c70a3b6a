"""Model distribution: tier choice (unit), auto-distribution on first registration, one/some/all with live
progress through the API, offline targets and queue_if_offline, disk and name errors, the MQTT
`distribute` command, the catalogue and the agents x models matrix."""

from __future__ import annotations

import json
import time

import psutil
import pytest

from ollama_fleet.controller.jobs.catalogue import estimate_memory, load_catalogue
from ollama_fleet.controller.hub import Hub
from ollama_fleet.controller.registry.live import AgentRecord
from ollama_fleet.model_tiers import GB, largest_gpu_memory, load_tiers
from tests.jobs_support import JobWatcher, publish, task, wait_task
from tests.support import wait_until

MB = 1_000_000


# ---- the tier decision over the shipped table (unit) ----------------------------------------------
@pytest.mark.parametrize(("gpu_gb", "expected"), [
    (80, ["gpt-oss:120b"]), (96, ["gpt-oss:120b"]),
    (24, ["gpt-oss:20b"]), (16, ["gpt-oss:20b"]),
    (12, ["llama3.1:8b"]), (8, ["llama3.1:8b"]),
    (6, ["llama3.2:3b"]), (4.5, ["llama3.2:3b"]),
    (4, ["llama3.2:1b"]), (2, ["llama3.2:1b"]),
])
def test_each_gpu_tier_of_the_shipped_table(gpu_gb, expected):
    tiers = load_tiers()
    assert tiers.choose(int(gpu_gb * GB), 512 * GB) == expected  # RAM is ignored when there is a GPU


def test_without_a_gpu_a_share_of_ram_decides_and_every_tier_model_is_in_the_catalogue():
    tiers = load_tiers()
    assert tiers.choose(None, 64 * GB) == tiers.choose(int(64 * GB * tiers.ram_fraction), None)
    assert tiers.choose(None, 8 * GB) == ["llama3.2:1b"]  # 4 GB usable: below the 4.5 GB tier
    assert tiers.choose(None, 10 * GB) == ["llama3.2:3b"]
    assert tiers.choose(None, None) == ["llama3.2:1b"]  # nothing known: the smallest tier
    catalogue = load_catalogue()
    for tier in tiers.tiers:
        for model in tier.models:
            assert catalogue.get(model) is not None, f"{model} (tier {tier.min_bytes / GB:g} GB) not in the catalogue"
    assert largest_gpu_memory([{"mem_total": 8 * GB}, {"mem_total": 24 * GB}]) == 24 * GB
    assert largest_gpu_memory([{"mem_total": None}]) is None


def test_catalogue_is_realistic():
    c = load_catalogue()
    names = {m.name for m in c.models}
    for must in ("llama3.2:1b", "llama3.2:3b", "llama3.1:8b", "llama3.1:70b", "qwen2.5:7b", "gemma3:27b",
                 "mistral:7b", "phi4:14b", "deepseek-r1:7b", "gpt-oss:20b", "gpt-oss:120b", "nomic-embed-text:latest",
                 "all-minilm:latest"):
        assert must in names
    for m in c.models:
        assert m.size > 10 * MB and m.required_memory >= m.size and m.description and m.tags
    assert c.get("gpt-oss:20b").required_memory == 16 * GB
    assert c.get("llama3.1:8b").required_memory == estimate_memory(4920753328)
    assert c.get("LLAMA3.1:8B") is c.get("library/llama3.1:8b")


def test_distributor_reads_memory_from_override_then_nvml_then_ram(tmp_path):
    from ollama_fleet.controller.jobs.distribution import Distributor

    from ollama_fleet.controller.registry.live import Registry
    from ollama_fleet.settings import load

    d = Distributor(load(["controller"], env={}), Registry(Hub()), None, load_catalogue(), load_tiers())  # type: ignore[arg-type]
    a = AgentRecord("n", 0, 0, info={"mem_total": 32 * GB}, gpus=[{"index": 0, "mem_total": 12 * GB}])
    assert d.memory(a) == (12 * GB, 32 * GB) and d.tier_models(a) == ["llama3.1:8b"]
    a.info["gpu_mem_override"] = 24 * GB
    assert d.tier_models(a) == ["gpt-oss:20b"]
    b = AgentRecord("m", 0, 0, info={"mem_total": 16 * GB})
    assert d.memory(b) == (None, 16 * GB) and d.tier_models(b) == ["llama3.1:8b"]  # 8 GB usable
    assert d.fits(b, "gpt-oss:20b")[0] is False and d.fits(b, "llama3.2:3b")[0] is True
    assert d.fits(b, "somebody/custom:tag") == (True, "")  # unknown requirement: let the agent try


# ---- end to end ------------------------------------------------------------------------------------
def online(c, *nodes: str) -> None:
    for n in nodes:
        c.wait_agent(n, status="online", routable=True)
        wait_until(lambda n=n: c.agent(n)["metrics"].get("seq"), 10, what=f"{n} heartbeat")


def tasks(c, **params) -> list[dict]:
    return c.http.get("/api/tasks", params={"limit": 500, **params}).json()["tasks"]


def test_auto_distribution_on_first_registration_by_gpu_memory_and_by_ram(fleet, tmp_path):
    tiers = tmp_path / "tiers.json"
    tiers.write_text(json.dumps({"ram_fraction": 0.5, "tiers": [
        {"min_gb": 16, "models": ["gemma3:1b"]},
        {"min_gb": 0.001, "models": ["tinyllama"]},
        {"min_gb": 0, "models": ["nomic-embed-text"]},
    ]}))
    c = fleet.controller(fleet_auto_distribute="1", fleet_model_tiers_file=str(tiers))
    big = fleet.fake_ollama("auto-gpu", pull_total=20 * MB)
    small = fleet.fake_ollama("auto-ram", pull_total=20 * MB)
    fleet.agent("auto-gpu", big.url, FLEET_GPU_MEM_OVERRIDE="24")  # a 24 GB GPU NVML does not show here
    fleet.agent("auto-ram", small.url)  # no GPU: half the RAM decides
    expected_ram = load_tiers(tiers).choose(None, psutil.virtual_memory().total)
    assert expected_ram == ["tinyllama"]
    for node, model in (("auto-gpu", "gemma3:1b"), ("auto-ram", "tinyllama")):
        t = wait_until(lambda node=node: tasks(c, agent=node), 10, what=f"auto job for {node}")[0]
        assert t["origin"] == "auto" and t["model"] == model
        wait_task(c, t["id"], status="completed")
    assert "gemma3:1b" in c.agent("auto-gpu")["models"]
    assert "tinyllama:latest" in c.agent("auto-ram")["models"]
    ev = c.http.get("/api/events", params={"kind": "auto_distribute"}).json()["events"]
    assert {e["node_id"] for e in ev} == {"auto-gpu", "auto-ram"}
    assert any("GPU memory 24.0 GB" in e["message"] for e in ev)
    # asked again: nothing to do, the tier's models are there
    again = c.http.post("/api/agents/auto-gpu/models/auto").json()
    assert again["models"] == ["gemma3:1b"] and again["task_ids"] == []
    assert again["skipped"] == [{"agent_id": "auto-gpu", "reason": "gemma3:1b: already installed"}]
    # a controller restart is not a first registration: no new jobs
    before = len(tasks(c))
    c.restart()
    online(c, "auto-gpu", "auto-ram")
    assert len(tasks(c)) == before


def test_auto_distribution_off_pulls_nothing(fleet):
    c = fleet.controller(fleet_auto_distribute="0")
    fleet.agent("noauto")
    online(c, "noauto")
    assert tasks(c) == []


def test_one_some_all_with_per_agent_progress_through_the_api_within_1s(fleet):
    c = fleet.controller()
    nodes = ["d-a", "d-b", "d-c"]
    for n in nodes:
        fake = fleet.fake_ollama(n, pull_total=60 * MB, pull_speed=15 * MB, pull_layers=1)
        fleet.agent(n, fake.url)
    online(c, *nodes)
    w = JobWatcher(fleet.broker)
    try:
        one = c.http.post("/api/models/distribute", json={"model_name": "gemma3:1b", "target": "specific",
                                                           "agent_ids": ["d-a"]})
        assert one.status_code == 202 and list(one.json()["tasks"]) == ["d-a"]
        some = c.http.post("/api/models/distribute", json={"model_name": "tinyllama", "target": "specific",
                                                            "agent_ids": ["d-b", "d-c"]}).json()
        assert sorted(some["tasks"]) == ["d-b", "d-c"]
        everyone = c.http.post("/api/models/distribute", json={"model_name": "llama3.1:8b"}).json()
        assert sorted(everyone["tasks"]) == nodes  # target defaults to all
        ids = [one.json()["task_ids"][0], *some["task_ids"], *everyone["task_ids"]]
        # every progress document an agent publishes is visible at GET /api/tasks/<id> within 1 s
        lags: list[float] = []
        seen: set[tuple[str, int]] = set()

        def fresh() -> list[tuple[float, str, dict]]:
            return [(t, topic, d) for t, topic, d in list(w.docs) if d["job_id"] in ids
                    and d["status"] == "in_progress" and (d["job_id"], d["seq"]) not in seen]

        def finished() -> bool:
            return all(task(c, i)["status"] == "completed" for i in ids)

        while not finished():
            got_new = wait_until(lambda: fresh() or finished(), 20, what="progress")
            for t, topic, d in got_new if isinstance(got_new, list) else []:
                seen.add((d["job_id"], d["seq"]))
                got = wait_until(lambda d=d: (x := task(c, d["job_id"])) and (
                    (x["progress"] or 0) >= d["progress"] or x["status"] != "in_progress") and x, 2)
                lags.append(time.monotonic() - t)
                assert f"/nodes/{got['agent_id']}/" in topic  # the agent's own progress
        assert len(lags) >= 6 and max(lags) < 1.0, lags
        assert all(task(c, i)["status"] == "completed" for i in ids)
        # all again: nobody lacks it, so no job; force pulls anyway
        again = c.http.post("/api/models/distribute", json={"model_name": "llama3.1:8b", "target": "all"}).json()
        assert again["task_ids"] == [] and {s["reason"] for s in again["skipped"]} == {"already installed"}
        forced = c.http.post("/api/models/distribute", json={"model_name": "llama3.1:8b", "force": True}).json()
        assert len(forced["task_ids"]) == 3
    finally:
        w.close()


def test_offline_target_is_refused_or_queued_until_it_returns(fleet):
    c = fleet.controller()
    fake = fleet.fake_ollama("off-a", pull_total=10 * MB)
    agent = fleet.agent("off-a", fake.url)
    online(c, "off-a")
    agent.stop()
    c.wait_agent("off-a", state="offline")
    body = {"model_name": "gemma3:1b", "target": "specific", "agent_ids": ["off-a"]}
    r = c.http.post("/api/models/distribute", json=body)
    assert r.status_code == 503 and "offline" in r.json()["error"] and "queue_if_offline" in r.json()["error"]
    assert c.http.post("/api/agents/off-a/models/pull", json={"model_name": "gemma3:1b"}).status_code == 503
    r = c.http.post("/api/models/distribute", json={**body, "queue_if_offline": True})
    assert r.status_code == 202
    tid = r.json()["task_ids"][0]
    held = wait_task(c, tid, status="pending")
    assert "waiting for off-a to come online" in held["phase"] and held["dispatched_at"] is None
    agent.start()  # back: the held job goes out and completes
    t = wait_task(c, tid, timeout=20, status="completed")
    assert t["dispatched_at"] >= held["created_at"]
    assert "gemma3:1b" in c.agent("off-a")["models"]


def test_bad_names_unknown_agents_and_full_disks(fleet, tmp_path):
    catalogue = tmp_path / "catalogue.json"
    catalogue.write_text(json.dumps({"models": [
        {"name": "huge:1t", "size": 10 ** 16, "description": "bigger than any disk", "tags": ["test"]},
        {"name": "gemma3:1b", "size": 815319791, "description": "small", "tags": ["small"]},
    ]}))
    c = fleet.controller(fleet_models_catalogue_file=str(catalogue))
    fleet.agent("err-a")
    online(c, "err-a")
    wait_until(lambda: c.agent("err-a")["disk_free"], 5)
    for bad in ("no spaces allowed", "", None, "a/b/c/d", ":tag"):
        r = c.http.post("/api/models/distribute", json={"model_name": bad})
        assert r.status_code == 400 and "invalid model name" in r.json()["error"], bad
    assert c.http.post("/api/models/distribute", json={"model_name": "x", "target": "some"}).status_code == 400
    assert c.http.post("/api/models/distribute", json={"model_name": "x", "target": "specific"}).status_code == 400
    r = c.http.post("/api/models/distribute", json={"model_name": "x", "target": "specific", "agent_ids": ["ghost"]})
    assert r.status_code == 404 and "ghost" in r.json()["error"]
    assert c.http.post("/api/agents/ghost/models/pull", json={"model_name": "x"}).status_code == 404
    r = c.http.post("/api/agents/err-a/models/pull", json={"model_name": "huge:1t"})
    assert r.status_code == 507 and "insufficient storage" in r.json()["error"]
    r = c.http.post("/api/models/distribute", json={"model_name": "huge:1t", "target": "all"})
    assert r.status_code == 507
    assert c.http.post("/api/agents/err-a/models/pull", json={"model_name": "gemma3:1b",
                                                              "force": "yes"}).status_code == 400
    assert tasks(c) == []
    avail = c.http.get("/api/models/available").json()
    assert [m["name"] for m in avail["models"] if m["source"] == "catalogue"] == ["huge:1t", "gemma3:1b"]


def test_mqtt_distribute_command_from_a_script(fleet):
    c = fleet.controller()
    for n in ("mq-a", "mq-b"):
        fleet.agent(n, fleet.fake_ollama(n, pull_total=10 * MB).url)
    online(c, "mq-a", "mq-b")
    publish(fleet.broker, "_controller", "distribute", {"v": 1, "model_name": "gemma3:1b", "target": "specific",
                                                         "agent_ids": ["mq-a", "mq-b"]})
    got = wait_until(lambda: len(tasks(c, origin="mqtt")) == 2 and tasks(c, origin="mqtt"), 10)
    for t in got:
        wait_task(c, t["id"], status="completed")
    publish(fleet.broker, "_controller", "distribute", {"v": 1, "model_name": "bad name"})
    ev = wait_until(lambda: c.http.get("/api/events", params={"kind": "distribute_refused"}).json()["events"], 5)
    assert "invalid model name" in ev[0]["message"]


def test_available_models_and_matrix(fleet):
    c = fleet.controller()
    fake = fleet.fake_ollama("mx-a", pull_total=400 * MB, pull_speed=20 * MB)
    fleet.agent("mx-a", fake.url)
    fleet.agent("mx-b")
    online(c, "mx-a", "mx-b")
    avail = c.http.get("/api/models/available").json()
    by = {m["name"]: m for m in avail["models"]}
    assert avail["source"] == "catalogue+agents"
    assert by["llama3.1:8b"]["size"] == 4920753328 and by["llama3.1:8b"]["installed_on"] == []
    assert by["all-minilm:latest"]["installed_on"] == ["mx-a", "mx-b"] and by["all-minilm:latest"]["source"] == "catalogue"
    assert by["llama3.2:latest"]["source"] == "agents" and by["llama3.2:latest"]["installed_on"] == ["mx-a", "mx-b"]
    assert all({"name", "size", "description", "required_memory", "tags"} <= m.keys() for m in avail["models"])
    assert [m["name"] for m in c.http.get("/api/models/available", params={"tag": "embedding"}).json()["models"]] \
        == ["nomic-embed-text:latest", "mxbai-embed-large:latest", "all-minilm:latest"]
    tid = c.http.post("/api/agents/mx-a/models/pull", json={"model_name": "llama3.1:8b"}).json()["task_id"]
    wait_until(lambda: (task(c, tid)["progress"] or 0) > 0, 10)
    m = c.http.get("/api/models/matrix").json()
    assert [a["id"] for a in m["agents"]] == ["mx-a", "mx-b"] and "llama3.1:8b" in m["models"]
    cell = m["matrix"]["mx-a"]["llama3.1:8b"]
    assert cell["installed"] is False and cell["job"]["id"] == tid and cell["job"]["progress"] > 0
    assert m["matrix"]["mx-b"]["qwen2.5:0.5b"] == {**m["matrix"]["mx-b"]["qwen2.5:0.5b"], "installed": True,
                                                  "loaded": False, "job": None}
    assert "llama3.1:8b" not in m["matrix"]["mx-b"]
    # deleting from one agent is a job too
    r = c.http.delete("/api/agents/mx-b/models/qwen2.5:0.5b")
    assert r.status_code == 202
    wait_task(c, r.json()["task_id"], status="completed")
    wait_until(lambda: "qwen2.5:0.5b" not in c.agent("mx-b")["models"], 5)
    assert c.http.delete("/api/agents/mx-b/models/qwen2.5:0.5b").status_code == 404
    c.http.post(f"/api/tasks/{tid}/cancel")
