"""The agent's side of the job protocol over a real Mosquitto: commands from the operator account, status
on the retained job topic, pulls through the fake Ollama's streaming /api/pull. No controller needed."""

from __future__ import annotations

import time
from itertools import pairwise

import pytest

from tests.jobs_support import JobWatcher, publish, schema_errors
from tests.support import wait_until

MB = 1_000_000


@pytest.fixture
def watch(fleet):
    watchers: list[JobWatcher] = []

    def make(node: str) -> JobWatcher:
        w = JobWatcher(fleet.broker, f"fleet/v1/nodes/{node}/#")
        watchers.append(w)
        return w

    yield make
    for w in watchers:
        w.close()


def start(fleet, node: str, fake_config: dict | None = None, **env: str):
    fake = fleet.fake_ollama(node, **(fake_config or {}))
    agent = fleet.agent(node, fake.url, **env)
    return fake, agent


def wait_online(w: JobWatcher) -> None:
    wait_until(lambda: any(d.get("state") == "online" for _, d in w.on("/state")), 10, what="agent birth")


def test_script_pull_reports_pending_throttled_progress_and_completion(fleet, watch):
    fake, _ = start(fleet, "job-a", {"pull_total": 80 * MB, "pull_speed": 20 * MB, "pull_layers": 1})
    w = watch("job-a")
    wait_online(w)
    t0 = time.monotonic()
    publish(fleet.broker, "job-a", "model.pull", {"v": 1, "job_id": "op-1", "model": "llama3.1:8b"})
    first = w.wait(lambda d: d.get("job_id") == "op-1", 5)
    assert first["status"] == "pending" and first["seq"] == 1 and first["origin"] == "mqtt"
    assert w.timed("op-1")[0][0] - t0 < 1.0, "first status within 1 s of the command"
    done = w.wait_status("op-1", "completed", 20)
    assert done["progress"] == 1.0 and done["total"] == 80 * MB and done["completed"] == 80 * MB
    assert done["error"] is None and done["finished_at"] >= done["started_at"] >= done["created_at"]
    assert len(done["layers"]) == 1 and all(c == t for c, t in done["layers"].values())
    docs = w.of("op-1")
    assert all(not schema_errors(d) for d in docs), [schema_errors(d) for d in docs]
    versions = [d["seq"] for d in docs]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    running = [d for d in docs if d["status"] == "in_progress"]
    fractions = [d["progress"] for d in running]
    assert fractions == sorted(fractions) and 0 < max(fractions) < 1, fractions
    assert any(d["speed"] and d["eta"] is not None for d in running), "speed and ETA while running"
    # throttled: status changes and the first bytes go out at once, then progress at most once a second
    # and at least every 5 s
    first_bytes = next(i for i, d in enumerate(running) if d["completed"])
    assert running[first_bytes]["ts"] - running[0]["ts"] < 0.5, "first bytes reported at once"
    ticks = [d["ts"] for d in running[first_bytes:]]
    gaps = [b - a for a, b in pairwise(ticks)]
    assert ticks and all(g >= 0.9 for g in gaps), gaps
    all_ts = [d["ts"] for d in docs]
    assert max(b - a for a, b in pairwise(all_ts)) <= 5.5
    # the installed-models snapshot went out before the final status
    done_at = next(t for t, d in w.timed("op-1") if d["status"] == "completed")
    models_at = [t for t, d in w.on("/models") if any(m["name"] == "llama3.1:8b" for m in d["models"])]
    assert models_at and models_at[0] <= done_at
    assert fake.stats()["requests"]["/api/pull"] == 1


def test_duplicate_command_is_the_same_job_and_missing_id_is_generated(fleet, watch):
    fake, _ = start(fleet, "job-dup", {"pull_total": 20 * MB, "pull_speed": 20 * MB})
    w = watch("job-dup")
    wait_online(w)
    cmd = {"v": 1, "job_id": "op-dup", "model": "gemma3:1b"}
    publish(fleet.broker, "job-dup", "model.pull", cmd)
    publish(fleet.broker, "job-dup", "model.pull", cmd)  # a QoS 1 redelivery or a retry
    w.wait_status("op-dup", "completed", 15)
    n = len(w.of("op-dup"))
    publish(fleet.broker, "job-dup", "model.pull", cmd)  # after the end: the final status again, no new pull
    wait_until(lambda: len(w.of("op-dup")) > n, 5)
    assert w.of("op-dup")[-1]["status"] == "completed"
    assert fake.stats()["requests"]["/api/pull"] == 1
    publish(fleet.broker, "job-dup", "model.pull", {"v": 1, "model": "tinyllama"})
    gen = w.wait(lambda d: d.get("job_id_generated") is True and d["status"] == "completed", 15)
    assert len(gen["job_id"]) == 32 and gen["args"] == {"model": "tinyllama"}


@pytest.mark.parametrize(("payload", "code"), [
    ({"v": 1, "job_id": "bad-1", "model": "no such model"}, "bad_request"),
    ({"v": 2, "job_id": "bad-2", "model": "tinyllama"}, "unsupported_version"),
    ({"v": 1, "job_id": "bad-3", "model": "tinyllama", "expires_at": 1000.0}, "expired"),
    ({"v": 1, "job_id": "bad-4", "model": "tinyllama", "force": "yes"}, "bad_request"),
])
def test_bad_commands_are_rejected(fleet, watch, payload, code):
    fake, _ = start(fleet, "job-bad")
    w = watch("job-bad")
    wait_online(w)
    publish(fleet.broker, "job-bad", "model.pull", payload)
    doc = w.wait_status(payload["job_id"], "rejected", 5)
    assert schema_errors(doc) == []
    assert doc["error_code"] == code and doc["error"].startswith(f"{code}: ")
    assert fake.stats()["requests"].get("/api/pull", 0) == 0


def test_unknown_model_and_mid_pull_failure_are_failed_with_ollamas_reason(fleet, watch):
    start(fleet, "job-fail", {"pull_total": 40 * MB, "pull_speed": 40 * MB, "pull_fail_after": 0.5})
    w = watch("job-fail")
    wait_online(w)
    publish(fleet.broker, "job-fail", "model.pull", {"v": 1, "job_id": "nf", "model": "nosuchmodel:7b"})
    doc = w.wait_status("nf", "failed", 10)
    assert doc["error_code"] == "not_found" and "file does not exist" in doc["error"]
    publish(fleet.broker, "job-fail", "model.pull", {"v": 1, "job_id": "half", "model": "llama3.1:8b"})
    doc = w.wait_status("half", "failed", 10)
    assert schema_errors(doc) == []
    assert doc["error_code"] == "pull_failed" and doc["error"] == "max retries exceeded: unexpected EOF"
    assert 0 < doc["progress"] < 1


def test_installed_model_is_skipped_unless_forced(fleet, watch):
    fake, _ = start(fleet, "job-inst")
    w = watch("job-inst")
    wait_online(w)
    publish(fleet.broker, "job-inst", "model.pull", {"v": 1, "job_id": "have", "model": "llama3.2"})
    doc = w.wait_status("have", "completed", 5)
    assert doc["phase"] == "already installed" and doc["progress"] == 1.0
    assert fake.stats()["requests"].get("/api/pull", 0) == 0
    publish(fleet.broker, "job-inst", "model.pull", {"v": 1, "job_id": "again", "model": "llama3.2", "force": True})
    w.wait_status("again", "completed", 10)
    assert fake.stats()["requests"]["/api/pull"] == 1


def test_insufficient_storage_fails_clearly(fleet, watch):
    fake, _ = start(fleet, "job-disk", {"pull_total": 10 ** 16})  # 10 PB: more than any test disk
    w = watch("job-disk")
    wait_online(w)
    # size known up front (the controller passes its catalogue size): checked before Ollama is asked
    publish(fleet.broker, "job-disk", "model.pull", {"v": 1, "job_id": "big-1", "model": "tinyllama", "size": 10 ** 16})
    doc = w.wait_status("big-1", "failed", 5)
    assert doc["error_code"] == "disk_full" and "insufficient storage" in doc["error"]
    assert fake.stats()["requests"].get("/api/pull", 0) == 0
    # size unknown: the first layer Ollama announces is checked against the free space
    publish(fleet.broker, "job-disk", "model.pull", {"v": 1, "job_id": "big-2", "model": "tinyllama"})
    doc = w.wait_status("big-2", "failed", 5)
    assert doc["error_code"] == "disk_full" and "free in" in doc["error"]
    wait_until(lambda: fake.stats()["pulls"]["tinyllama:latest"]["status"] == "cancelled", 5,
               what="the pull stopped at Ollama")


def test_cancel_stops_the_download(fleet, watch):
    fake, _ = start(fleet, "job-cancel", {"pull_total": 400 * MB, "pull_speed": 20 * MB})
    w = watch("job-cancel")
    wait_online(w)
    publish(fleet.broker, "job-cancel", "model.pull", {"v": 1, "job_id": "long", "model": "llama3.1:8b"})
    w.wait(lambda d: d.get("job_id") == "long" and (d.get("progress") or 0) > 0, 10)
    publish(fleet.broker, "job-cancel", "job.cancel", {"v": 1, "job_id": "long"})
    doc = w.wait_status("long", "cancelled", 5)
    assert doc["error_code"] == "cancelled" and doc["progress"] < 1
    wait_until(lambda: fake.stats()["pulls"]["llama3.1:8b"]["status"] == "cancelled", 5)
    # cancelling a finished or unknown job changes nothing
    publish(fleet.broker, "job-cancel", "job.cancel", {"v": 1, "job_id": "nope"})
    publish(fleet.broker, "job-cancel", "model.delete", {"v": 1, "job_id": "del", "model": "qwen2.5:0.5b"})
    w.wait_status("del", "completed", 5)
    assert "qwen2.5:0.5b" not in fake.stats()["models"]
    publish(fleet.broker, "job-cancel", "model.delete", {"v": 1, "job_id": "del2", "model": "qwen2.5:0.5b"})
    assert w.wait_status("del2", "failed", 5)["error_code"] == "not_found"


def test_extra_pulls_queue_and_stay_visible(fleet, watch):
    fake, _ = start(fleet, "job-q", {"pull_total": 120 * MB, "pull_speed": 20 * MB})  # 6 s each
    w = watch("job-q")
    wait_online(w)
    publish(fleet.broker, "job-q", "model.pull", {"v": 1, "job_id": "q1", "model": "llama3.1:8b"})
    publish(fleet.broker, "job-q", "model.pull", {"v": 1, "job_id": "q2", "model": "gemma3:1b"})
    w.wait_status("q1", "in_progress", 5)
    w.wait_status("q2", "pending", 5)
    w.wait_status("q2", "in_progress", 15)  # only once q1 has finished (pull_concurrency 1)
    q1_done = next(d["ts"] for d in w.of("q1") if d["status"] == "completed")
    q2_start = next(d["ts"] for d in w.of("q2") if d["status"] == "in_progress")
    assert q2_start >= q1_done
    pending = [d["ts"] for d in w.of("q2") if d["status"] == "pending"]
    assert len(pending) >= 2, "a queued job is re-announced while it waits"
    assert max(b - a for a, b in pairwise(pending)) <= 5.5
    assert fake.stats()["max_in_flight"] >= 1


def test_pull_concurrency_setting_runs_pulls_side_by_side(fleet, watch):
    start(fleet, "job-par", {"pull_total": 60 * MB, "pull_speed": 20 * MB}, FLEET_PULL_CONCURRENCY="2")
    w = watch("job-par")
    wait_online(w)
    publish(fleet.broker, "job-par", "model.pull", {"v": 1, "job_id": "p1", "model": "llama3.1:8b"})
    publish(fleet.broker, "job-par", "model.pull", {"v": 1, "job_id": "p2", "model": "gemma3:1b"})
    w.wait_status("p1", "in_progress", 5)
    w.wait_status("p2", "in_progress", 5)
    p1_done = w.wait_status("p1", "completed", 15)["ts"]
    w.wait_status("p2", "completed", 15)
    p2_start = next(d["ts"] for d in w.of("p2") if d["status"] == "in_progress")
    assert p2_start < p1_done, "both ran at once"
