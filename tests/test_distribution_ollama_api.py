"""Ollama's own model API at the controller, fleet-wide: `pull` (one merged progress stream in Ollama's
format, through the official `ollama` SDK), `delete`, `copy`, `create`, `push`."""

from __future__ import annotations

import json

import httpx
import ollama
import pytest

from tests.jobs_support import task, wait_task
from tests.support import wait_until

MB = 1_000_000


@pytest.fixture
def sdk():
    clients: list[ollama.Client] = []

    def make(host: str, **kw) -> ollama.Client:
        clients.append(ollama.Client(host=host, **kw))
        return clients[-1]

    yield make
    for client in clients:
        client.close()


def online(c, *nodes: str) -> None:
    for n in nodes:
        c.wait_agent(n, status="online", routable=True)
        wait_until(lambda n=n: c.agent(n)["metrics"].get("seq"), 10, what=f"{n} heartbeat")


def start(fleet, nodes, **fake_config):
    c = fleet.controller()
    fakes = {}
    for n in nodes:
        fakes[n] = fleet.fake_ollama(n, **fake_config)
        fleet.agent(n, fakes[n].url)
    online(c, *nodes)
    return c, fakes


def test_ollama_sdk_pull_streams_merged_fleet_progress(fleet, sdk):
    nodes = ["op-a", "op-b", "op-c"]
    c, _ = start(fleet, nodes, pull_total=60 * MB, pull_speed=30 * MB, pull_layers=2)
    client = sdk(c.url)
    lines = [p.model_dump(exclude_none=True) for p in client.pull("llama3.1:8b", stream=True)]
    assert lines[0] == {"status": "pulling manifest"}
    assert [x["status"] for x in lines[-3:]] == ["verifying sha256 digest", "writing manifest", "success"]
    layers = [x for x in lines if x.get("digest")]
    digests = list(dict.fromkeys(x["digest"] for x in layers))
    assert len(digests) == 2
    for d in digests:
        series = [x for x in layers if x["digest"] == d]
        assert all(x["status"] == f"pulling {d[7:19]}" for x in series)
        assert {x["total"] for x in series} == {3 * 30 * MB}, "a layer's total: its size times the agents"
        done = [x.get("completed", 0) for x in series]
        assert done == sorted(done) and done[-1] == 3 * 30 * MB
        assert "completed" not in series[0] or series[0]["completed"] > 0  # omitted while 0, like Ollama
    for n in nodes:
        assert "llama3.1:8b" in c.agent(n)["models"]
    ts = c.http.get("/api/tasks", params={"origin": "ollama_api"}).json()["tasks"]
    assert sorted(t["agent_id"] for t in ts) == nodes and {t["status"] for t in ts} == {"completed"}
    # pulling what everyone has: Ollama's short sequence, no job
    again = [p.status for p in client.pull("llama3.1:8b", stream=True)]
    assert again == ["pulling manifest", "verifying sha256 digest", "writing manifest", "success"]
    assert c.http.get("/api/tasks", params={"origin": "ollama_api"}).json()["total"] == 3


def test_pull_targets_stream_false_and_errors(fleet, sdk):
    c, _ = start(fleet, ["ot-a", "ot-b"], pull_total=10 * MB)
    client = sdk(c.url)
    assert client.pull("gemma3:1b", stream=False).status == "success"  # everyone lacked it
    assert all("gemma3:1b" in c.agent(n)["models"] for n in ("ot-a", "ot-b"))
    r = c.http.post("/api/pull", params={"agents": "ot-b"}, json={"model": "tinyllama", "stream": False})
    assert r.status_code == 200 and r.json() == {"status": "success"}
    assert "tinyllama:latest" in c.agent("ot-b")["models"] and "tinyllama:latest" not in c.agent("ot-a")["models"]
    client_hdr = sdk(c.url, headers={"X-Fleet-Agents": "ot-a"})
    assert client_hdr.pull("tinyllama", stream=False).status == "success"
    assert "tinyllama:latest" in c.agent("ot-a")["models"]
    with pytest.raises(ollama.ResponseError) as e:
        client.pull("bad name!", stream=False)
    assert e.value.status_code == 400
    r = c.http.post("/api/pull", params={"agents": "ghost"}, json={"model": "tinyllama"})
    assert r.status_code == 404
    with pytest.raises(ollama.ResponseError) as e:  # unknown upstream: the agents' error, in band
        list(client.pull("nosuchmodel:9b", stream=True))
    assert "failed on 2 of 2 agent(s)" in e.value.error and "file does not exist" in e.value.error


def test_one_failing_agent_ends_the_stream_with_an_in_band_error(fleet):
    c = fleet.controller()
    good = fleet.fake_ollama("of-good", pull_total=20 * MB, pull_speed=40 * MB)
    bad = fleet.fake_ollama("of-bad", pull_total=20 * MB, pull_speed=40 * MB, pull_fail_after=0.5)
    fleet.agent("of-good", good.url)
    fleet.agent("of-bad", bad.url)
    online(c, "of-good", "of-bad")
    with httpx.stream("POST", c.url + "/api/pull", json={"model": "gemma3:1b"}, timeout=30, trust_env=False) as s:
        assert s.status_code == 200 and s.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(x) for x in s.iter_lines() if x]
    assert "success" not in [x.get("status") for x in lines]
    assert lines[-1] == {"error": "pull of gemma3:1b failed on 1 of 2 agent(s): of-bad: max retries exceeded: "
                                  "unexpected EOF"}
    assert "gemma3:1b" in c.agent("of-good")["models"]


def test_client_disconnect_does_not_cancel_the_fleet_jobs(fleet):
    c, _ = start(fleet, ["od-a"], pull_total=80 * MB, pull_speed=20 * MB)
    with httpx.stream("POST", c.url + "/api/pull", json={"model": "llama3.1:8b"}, timeout=30, trust_env=False) as s:
        ids = s.headers["x-fleet-tasks"].split(",")
        first = next(s.iter_lines())
        assert json.loads(first) == {"status": "pulling manifest"}
    # the client is gone; the job is the fleet's and finishes
    t = wait_task(c, ids[0], timeout=20, status="completed")
    assert t["origin"] == "ollama_api"


def test_delete_copy_create_push_fleet_wide(fleet, sdk):
    c, fakes = start(fleet, ["om-a", "om-b"])
    client = sdk(c.url)
    # copy: on every agent that has the source, so routing stays consistent
    client.copy("qwen2.5:0.5b", "my-qwen:latest")
    for f in fakes.values():
        assert "my-qwen:latest" in f.stats()["models"]
    with pytest.raises(ollama.ResponseError) as e:
        client.copy("nosuch:1b", "x:1")
    assert e.value.status_code == 404
    # create from a model the agents have: on each of them
    events = [p.status for p in client.create("sys-qwen", from_="qwen2.5:0.5b", system="be brief", stream=True)]
    assert events[0].startswith("creating sys-qwen from qwen2.5:0.5b on 2") and events[-1] == "success"
    for f in fakes.values():
        assert "sys-qwen:latest" in f.stats()["models"]
    r = c.http.post("/api/create", json={"model": "up", "files": {"a.gguf": "sha256:" + "0" * 64}})
    assert r.status_code == 501 and "not supported through the fleet controller" in r.json()["error"]
    # push: one agent does it, the stream comes back unchanged
    push = [p.status for p in client.push("qwen2.5:0.5b", stream=True)]
    assert push[0] == "retrieving manifest" and push[-1] == "success"
    assert sum(f.stats()["requests"].get("/api/push", 0) for f in fakes.values()) == 1
    # delete: a job on every agent that has it (as the registry knows it: within one heartbeat of the copy),
    # answered like Ollama (200, empty body)
    wait_until(lambda: all("my-qwen:latest" in c.agent(n)["models"] for n in fakes), 5)
    r = c.http.request("DELETE", "/api/delete", json={"model": "my-qwen"})
    assert r.status_code == 200 and r.content == b"" and r.headers["x-fleet-agents"] == "om-a,om-b"
    for f in fakes.values():
        assert "my-qwen:latest" not in f.stats()["models"]
    wait_until(lambda: all("my-qwen:latest" not in c.agent(n)["models"] for n in fakes), 5)
    for tid in r.headers["x-fleet-tasks"].split(","):
        assert task(c, tid)["verb"] == "model.delete" and task(c, tid)["status"] == "completed"
    with pytest.raises(ollama.ResponseError) as e:
        client.delete("my-qwen")
    assert e.value.status_code == 404
    client.delete("sys-qwen")  # the SDK's own call
    assert all("sys-qwen:latest" not in f.stats()["models"] for f in fakes.values())


def test_admin_token_guards_fleet_wide_changes(fleet, sdk):
    c = fleet.controller(fleet_admin_token="s3cret")
    fleet.agent("oa-a")
    online(c, "oa-a")
    r = c.http.post("/api/pull", json={"model": "gemma3:1b"})
    assert r.status_code == 401
    assert c.http.post("/api/models/distribute", json={"model_name": "gemma3:1b"}).status_code == 401
    assert c.http.get("/api/tasks").status_code == 401  # reads need the token too (issue 9)
    assert c.api.get("/api/tasks").status_code == 200
    ok = sdk(c.url, headers={"Authorization": "Bearer s3cret"}).pull("gemma3:1b", stream=False)
    assert ok.status == "success"
