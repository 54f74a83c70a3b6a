"""The controller's job ledger end to end: real Mosquitto, controller and agents as processes, fake Ollamas.

Scripts' jobs appear in /api/tasks; outcomes survive a controller restart; a restarted agent gets its job
again and the download resumes; a wedged agent's job times out; the fleet-wide cap holds extra pulls."""

from __future__ import annotations

import signal

from tests.jobs_support import JobWatcher, publish, task, wait_task
from tests.support import wait_until

MB = 1_000_000


def online(c, *nodes: str) -> None:
    for n in nodes:
        c.wait_agent(n, status="online", routable=True)
        wait_until(lambda n=n: c.agent(n)["metrics"].get("seq"), 10, what=f"{n} heartbeat")


def test_script_pull_with_mosquitto_pub_appears_in_tasks_and_topic_is_cleared(fleet):
    c = fleet.controller()
    fake = fleet.fake_ollama("scr-a", pull_total=20 * MB, pull_speed=40 * MB)
    fleet.agent("scr-a", fake.url)
    online(c, "scr-a")
    w = JobWatcher(fleet.broker, "fleet/v1/nodes/scr-a/jobs/+")
    try:
        # the real CLI, the operator account, no job id: the agent makes one up
        publish(fleet.broker, "scr-a", "model.pull", {"v": 1, "model": "gemma3:1b"})
        doc = w.wait(lambda d: d.get("job_id_generated") is True, 5)
        t = wait_task(c, doc["job_id"], status="completed", origin="mqtt", agent_id="scr-a", model="gemma3:1b")
        assert t["progress"] == 1.0 and t["total"] == 20 * MB and t["verb"] == "model.pull"
        listed = c.http.get("/api/tasks", params={"agent": "scr-a", "origin": "mqtt"}).json()
        assert [x["id"] for x in listed["tasks"]] == [doc["job_id"]] and listed["total"] == 1
        # the outcome is in the database, so the retained status is cleared from the broker
        wait_until(lambda: w.cleared == [f"fleet/v1/nodes/scr-a/jobs/{doc['job_id']}"], 5, what="cleared topic")
        assert "gemma3:1b" in c.agent("scr-a")["models"]
    finally:
        w.close()


def test_api_pull_cancel_and_task_queries(fleet):
    c = fleet.controller()
    fake = fleet.fake_ollama("api-a", pull_total=400 * MB, pull_speed=20 * MB)
    fleet.agent("api-a", fake.url)
    online(c, "api-a")
    r = c.http.post("/api/agents/api-a/models/pull", json={"model_name": "llama3.1:8b"})
    assert r.status_code == 202, r.text
    tid = r.json()["task_id"]
    running = wait_until(lambda: (t := task(c, tid)) and t["speed"] and t, 10)  # speed: after 0.5 s of data
    assert running["status"] == "in_progress" and running["speed"] > 0 and running["eta"] > 0
    assert running["origin"] == "api" and running["args"]["size"] == 4920753328  # catalogue size travels
    # the same pull again while it runs: the same job, not a second download
    again = c.http.post("/api/agents/api-a/models/pull", json={"model_name": "llama3.1:8b"}).json()
    assert again["task_id"] == tid and again["reused"] is True
    assert c.http.post(f"/api/tasks/{tid}/cancel").status_code == 202
    t = wait_task(c, tid, status="cancelled")
    assert t["error_code"] == "cancelled" and t["finished_at"]
    assert c.http.post(f"/api/tasks/{tid}/cancel").status_code == 409
    assert c.http.get("/api/tasks/nope").status_code == 404
    assert c.http.get("/api/tasks", params={"status": "bogus"}).status_code == 400
    page = c.http.get("/api/tasks", params={"status": "cancelled", "model": "llama3.1:8b", "limit": 1}).json()
    assert page["total"] == 1 and page["tasks"][0]["id"] == tid and page["next_offset"] is None


def test_controller_restart_mid_pull_still_records_the_outcome(fleet):
    c = fleet.controller()
    fake = fleet.fake_ollama("rst-a", pull_total=120 * MB, pull_speed=20 * MB)  # ~6 s
    fleet.agent("rst-a", fake.url)
    online(c, "rst-a")
    tid = c.http.post("/api/agents/rst-a/models/pull", json={"model_name": "llama3.1:8b"}).json()["task_id"]
    wait_until(lambda: (task(c, tid) or {}).get("status") == "in_progress", 10)
    c.stop()
    fake.wait_stats(lambda s: s["pulls"].get("llama3.1:8b", {}).get("status") == "success", 15)  # done meanwhile
    w = JobWatcher(fleet.broker, "fleet/v1/nodes/rst-a/jobs/+")
    try:
        # the outcome waited on the broker as the retained status...
        assert w.wait_status(tid, "completed", 5)["progress"] == 1.0
        c.start()
        c.wait_ready()
        t = wait_task(c, tid, status="completed")
        assert t["progress"] == 1.0 and t["error"] is None
        # ...and is cleared from there once the restarted controller has it in its database
        wait_until(lambda: w.cleared == [f"fleet/v1/nodes/rst-a/jobs/{tid}"], 5, what="cleared topic")
    finally:
        w.close()
    c.restart()  # the record survives another restart, read from the database
    assert wait_task(c, tid, status="completed")["attempts"] == 1


def test_agent_restart_mid_pull_resumes_the_download(fleet):
    c = fleet.controller()
    fake = fleet.fake_ollama("ar-a", pull_total=160 * MB, pull_speed=20 * MB, pull_layers=1)  # ~8 s
    agent = fleet.agent("ar-a", fake.url)
    online(c, "ar-a")
    tid = c.http.post("/api/agents/ar-a/models/pull", json={"model_name": "llama3.1:8b"}).json()["task_id"]
    wait_until(lambda: ((task(c, tid) or {}).get("progress") or 0) > 0.2, 10)
    agent.kill()  # kill -9: the agent forgets its job; Ollama keeps the partial blob
    c.wait_agent("ar-a", state="lost")
    done_before = fake.stats()["pulls"]["llama3.1:8b"]["completed"]
    assert 0 < done_before < 160 * MB
    agent.start()
    t = wait_task(c, tid, timeout=20, status="completed")
    assert t["attempts"] == 2 and t["progress"] == 1.0
    assert fake.stats()["requests"]["/api/pull"] == 2  # resumed, from the bytes already there
    assert "llama3.1:8b" in c.agent("ar-a")["models"]


def test_a_wedged_agent_job_times_out(fleet):
    c = fleet.controller(fleet_job_step_timeout="2")
    fake = fleet.fake_ollama("to-a", pull_total=400 * MB, pull_speed=20 * MB)
    agent = fleet.agent("to-a", fake.url)
    online(c, "to-a")
    tid = c.http.post("/api/agents/to-a/models/pull", json={"model_name": "llama3.1:8b"}).json()["task_id"]
    wait_until(lambda: (task(c, tid) or {}).get("status") == "in_progress", 10)
    agent.signal(signal.SIGSTOP)  # alive but silent
    try:
        t = wait_task(c, tid, timeout=6, status="failed")
        assert t["error_code"] == "timed_out" and "no status from agent to-a" in t["error"]
    finally:
        agent.signal(signal.SIGCONT)


def test_fleet_cap_holds_pulls_until_a_slot_frees_and_ten_run_at_once(fleet):
    c = fleet.controller()  # max_concurrent_pulls default 10
    nodes = [f"cap-{i}" for i in range(6)]
    for n in nodes:  # 6 agents x 2 slots = 12 possible; the fleet cap lets 10 run
        fake = fleet.fake_ollama(n, pull_total=60 * MB, pull_speed=10 * MB)  # ~6 s
        fleet.agent(n, fake.url, FLEET_PULL_CONCURRENCY="2")
    online(c, *nodes)
    ids = []
    for model in ("llama3.1:8b", "gemma3:1b"):
        r = c.http.post("/api/models/distribute", json={"model_name": model, "target": "all"})
        assert r.status_code == 202, r.text
        ids += r.json()["task_ids"]
    assert len(ids) == 12

    def snapshot():
        ts = [task(c, i) for i in ids]
        return [t["status"] for t in ts], ts

    _, ts = wait_until(lambda: (s := snapshot()) and s[0].count("in_progress") == 10 and s, 10,
                              what="10 pulls running")
    held = [t for t in ts if t["status"] == "pending"]
    assert len(held) == 2 and all("fleet pull slot" in t["phase"] for t in held)
    assert all(t["dispatched_at"] is None for t in held)
    wait_until(lambda: all(t["status"] == "completed" for t in snapshot()[1]), 30, what="all 12 completed")
    assert all(t["dispatched_at"] for t in snapshot()[1])


def test_broadcast_pull_with_one_job_id_is_one_task_per_agent(fleet):
    c = fleet.controller()
    for n in ("all-a", "all-b"):
        fleet.agent(n, fleet.fake_ollama(n, pull_total=10 * MB).url)
    online(c, "all-a", "all-b")
    publish(fleet.broker, "_all", "model.pull", {"v": 1, "job_id": "op-all-1", "model": "gemma3:1b"})
    got = wait_until(lambda: (ts := c.http.get("/api/tasks", params={"origin": "mqtt"}).json()["tasks"])
                     and len(ts) == 2 and all(t["status"] == "completed" for t in ts) and ts, 15)
    ids = sorted(t["id"] for t in got)
    first = next(t for t in got if t["id"] == "op-all-1")["agent_id"]
    other = ({"all-a", "all-b"} - {first}).pop()
    assert ids == sorted(["op-all-1", f"op-all-1@{other}"]) and {t["job_id"] for t in got} == {"op-all-1"}
