"""Several controllers on one PostgreSQL and one broker (docs/scaling.md): one leader, elected by the
database's lock; any controller takes jobs and operators' changes; a killed leader is replaced and its
jobs finish, recorded once. `fleet controller --workers N` on SQLite: one port, one leader, restarts."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.jobs_support import wait_task
from tests.support import Controller, fresh_postgres_db, health, pg_rows, wait_until

MB = 1 << 20
STATS = "/api/ingest"


@pytest.fixture
def pg_url() -> Iterator[str]:
    with fresh_postgres_db() as url:
        yield url






def leaders(*cs: Controller) -> list[Controller]:
    return [c for c in cs if health(c)["leader"]]


def one_leader(*cs: Controller, timeout: float = 10.0) -> Controller:
    def only() -> Controller | None:
        found = leaders(*cs)
        return found[0] if len(found) == 1 else None
    return wait_until(only, timeout, what="exactly one leader")


def distribute(c: Controller, model: str, node: str) -> str:
    r = c.http.post("/api/models/distribute", json={"model_name": model, "target": "specific", "agent_ids": [node]})
    assert r.status_code == 202, r.text
    task_id: str = r.json()["task_ids"][0]
    return task_id


def test_any_controller_takes_jobs_and_changes_and_the_leader_alone_writes(fleet, pg_url):
    if "controller-3" not in fleet.broker.passwords:
        fleet.broker.add_account("controller", "controller-3")  # the sender of a hostile peer message
    one_pull = {"fleet_database_url": pg_url, "fleet_max_concurrent_pulls": "1"}
    c1 = fleet.controller(**one_pull)
    c2 = fleet.controller(account="controller-2", **one_pull)
    leader = one_leader(c1, c2)
    follower = c2 if leader is c1 else c1
    assert health(follower)["instance"] != health(leader)["instance"]
    fleet.agent("ha-a", fleet.fake_ollama("ha-a", pull_total=16 * MB, pull_speed=8 * MB).url)
    for c in (c1, c2):
        c.wait_agent("ha-a", status="online", routable=True)

    # the dashboard says which controller served the page, and its role
    for c, role in ((leader, "leader"), (follower, "follower")):
        served = f"served by controller {health(c)['instance'][:12]} ({role}) of 2"
        wait_until(lambda c=c, served=served: served in c.http.get("/dashboard").text, what=f"the {role}'s footer")

    # a job asked of the follower: persisted there, dispatched by the leader, seen done by both
    task_id = distribute(follower, "tinyllama", "ha-a")
    for c in (follower, leader):
        wait_task(c, task_id, timeout=30, status="completed")
    wait_until(lambda: pg_rows(pg_url, "SELECT status FROM job WHERE task_id = %s", task_id) == [("completed",)],
               what="the job recorded once, completed")

    # jobs the follower cancels before anyone sent them, one it accepted and one the leader accepted (which
    # the follower has not seen): never sent, cancelled everywhere, one row each
    first = distribute(follower, "gemma3:1b", "ha-a")
    wait_task(leader, first, timeout=20, status="in_progress")
    held = [distribute(follower, "nomic-embed-text", "ha-a"), distribute(leader, "qwen2.5:0.5b", "ha-a")]
    for task_id in held:  # both wait for the one fleet pull slot
        wait_task(leader, task_id, timeout=10, status="pending")
        assert follower.http.post(f"/api/tasks/{task_id}/cancel").status_code == 202
    for c, task_id in ((c, t) for c in (follower, leader) for t in held):
        wait_task(c, task_id, timeout=10, status="cancelled")
    wait_task(leader, first, timeout=30, status="completed")
    for task_id in held:
        assert pg_rows(pg_url, "SELECT status, dispatched_at FROM job WHERE task_id = %s", task_id) == \
            [("cancelled", None)]

    # an operator's change on the follower reaches the leader, which writes it
    r = follower.http.put("/api/agents/ha-a/settings", json={"display_name": "Via follower", "tags": ["ha"]})
    assert r.status_code == 200
    wait_until(lambda: leader.agent("ha-a")["name"] == "Via follower", what="the change on the leader")
    wait_until(lambda: pg_rows(pg_url, "SELECT display_name FROM agent WHERE node_id = 'ha-a'") == [("Via follower",)],
               what="the change in the database")
    # every controller heard the agent register; the event is written once
    assert pg_rows(pg_url, "SELECT count(*) FROM event WHERE node_id = 'ha-a' AND kind = 'registered'") == [(1,)]

    # a hostile peer message is dropped and counted; nothing changes
    before = follower.agent("ha-a")["name"]
    exe = shutil.which("mosquitto_pub")
    assert exe, "mosquitto_pub (mosquitto-clients) is required"
    subprocess.run([exe, "-h", fleet.broker.host, "-p", str(fleet.broker.port), "-u", "controller-3",
                    "-P", fleet.broker.passwords["controller-3"], "-q", "1",
                    "-t", f"fleet/v1/controllers/{'0' * 32}/registry",
                    "-m", '{"v":1,"op":"settings","node":"ha-a","display_name":7}'],
                   check=True, timeout=10, capture_output=True)
    wait_until(lambda: all(c.http.get(STATS).json()["counters"].get("dropped.bad_payload", 0)
                           for c in (c1, c2)), what="the bad peer message dropped by both")
    assert follower.agent("ha-a")["name"] == before

    # a delete on the follower deletes on the leader too, and from the database
    assert follower.http.delete("/api/agents/ha-a").status_code == 200
    wait_until(lambda: leader.agent("ha-a") is None, what="deleted on the leader")
    wait_until(lambda: pg_rows(pg_url, "SELECT count(*) FROM agent WHERE node_id = 'ha-a'") == [(0,)],
               what="deleted from the database")


def test_a_killed_leader_is_replaced_and_its_pull_finishes_recorded_once(fleet, pg_url):
    cs = [fleet.controller(fleet_database_url=pg_url),
          fleet.controller(account="controller-2", fleet_database_url=pg_url),
          fleet.controller(account="controller-3", fleet_database_url=pg_url)]
    old = one_leader(*cs)
    fleet.agent("ha-b", fleet.fake_ollama("ha-b", pull_total=24 * MB, pull_speed=6 * MB).url)
    for c in cs:
        c.wait_agent("ha-b", status="online", routable=True)
    task_id = distribute(old, "tinyllama", "ha-b")
    wait_task(old, task_id, timeout=20, status="in_progress")

    old.kill()  # SIGKILL: no goodbye, no last flush; PostgreSQL frees its lock with the connection
    rest = [c for c in cs if c is not old]
    new = one_leader(*rest, timeout=15)
    wait_task(new, task_id, timeout=40, status="completed")
    wait_until(lambda: pg_rows(pg_url, "SELECT status FROM job WHERE task_id = %s", task_id) == [("completed",)],
               what="the pull's outcome written once by the new leader")
    # the new leader dispatches: a job asked of the remaining follower runs
    other = next(c for c in rest if c is not new)
    again = distribute(other, "gemma3:1b", "ha-b")
    wait_task(new, again, timeout=30, status="completed")
    assert pg_rows(pg_url, "SELECT count(*) FROM job") == [(2,)]  # each job one row


def workers(fleet: Any, tmp_path: Any, n: int) -> Controller:
    """`fleet controller --workers n` as account `ctlw` (worker N: `ctlw-N`, same password)."""
    if "ctlw" not in fleet.broker.passwords:
        password = fleet.broker.passwords[fleet.broker.add_account("controller", "ctlw")]
        for i in range(2, n + 1):
            fleet.broker.add_account("controller", f"ctlw-{i}", password=password)
    c = Controller(tmp_path, fleet.broker.url("ctlw"), {"FLEET_WORKERS": str(n)}, wait=False)
    fleet._procs.append(c)
    c.wait_ready()
    return c


def instances(c: Controller) -> dict[str, dict[str, Any]]:
    """The workers that answered /healthz, by instance."""
    seen: dict[str, dict[str, Any]] = {}
    for _ in range(40):  # a new connection each time: the kernel spreads them over the workers
        h = httpx.get(c.url + "/healthz", timeout=5, trust_env=False).json()
        seen[h["instance"]] = h
    return seen


def all_serving(c: Controller, n: int) -> dict[str, dict[str, Any]]:
    def every() -> dict[str, dict[str, Any]] | None:
        seen = instances(c)
        return seen if len(seen) == n else None
    return wait_until(every, 20, what=f"{n} workers serving")


def test_workers_share_one_port_with_one_leader_and_restart(fleet, tmp_path):
    c = workers(fleet, tmp_path, 2)

    both = all_serving(c, 2)
    assert sum(h["leader"] for h in both.values()) == 1
    victim = next(h for h in both.values() if not h["leader"])
    os.kill(victim["pid"], signal.SIGKILL)
    def replaced() -> bool:
        seen = instances(c)
        return len(seen) == 2 and victim["instance"] not in seen
    wait_until(replaced, 30, what="the killed worker restarted by the supervisor")
    assert c.stop() == 0  # SIGTERM: the supervisor stops every worker and waits for them


def test_workers_end_with_a_killed_supervisor(fleet, tmp_path):
    c = workers(fleet, tmp_path, 2)
    pids = {h["pid"] for h in all_serving(c, 2).values()}
    c.kill()  # SIGKILL: the supervisor cannot forward anything; the kernel tells the workers (PDEATHSIG)

    def port_free() -> bool:
        try:
            httpx.get(c.url + "/healthz", timeout=2, trust_env=False)
        except httpx.ConnectError:
            return True
        return False

    wait_until(port_free, 20, what="no worker left on the port")
    wait_until(lambda: all(gone(p) for p in pids), 20, what="both workers ended")


def gone(pid: int) -> bool:
    """Ended: no such process, or a zombie waiting for its new parent to reap it."""
    try:
        return "zombie" in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True


# ---- the supervisor of `--workers`: signals while starting, giving up, a worker that will not stop ----------

def _worker_url(fleet: Any, n: int) -> str:
    """The MQTT URL of `--workers n` as account `ctlw` (the accounts `workers` makes)."""
    if "ctlw" not in fleet.broker.passwords:
        password = fleet.broker.passwords[fleet.broker.add_account("controller", "ctlw")]
        for i in range(2, n + 1):
            fleet.broker.add_account("controller", f"ctlw-{i}", password=password)
    url: str = fleet.broker.url("ctlw")
    return url


def _stat(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command: state, ppid, pgrp, session, …; [] when gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return []


def _children(pid: int) -> list[int]:
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (st := _stat(int(d.name))) and int(st[1]) == pid:
            found.append(int(d.name))
    return found


def _started(log: str) -> dict[int, int]:
    """Worker index -> pid of its latest start, from the supervisor's log."""
    import re

    return {int(i): int(pid) for i, pid in re.findall(r"controller worker (\d+) started \(pid (\d+)\)", log)}


def _kill_left(pids: Any) -> None:
    for pid in pids:
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_worker_that_keeps_failing_at_start_makes_the_supervisor_give_up(fleet, tmp_path):
    """A configuration error that only the workers meet (here: their port is taken by another program)
    must not loop forever: after START_FAILURES quick exits in a row the supervisor stops the others and
    exits 1, saying why."""
    import socket

    from ollama_fleet.launcher import START_FAILURES

    url = _worker_url(fleet, 2)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        c = Controller(tmp_path, url, {"FLEET_WORKERS": "2", "FLEET_PORT": port}, wait=False)
        fleet._procs.append(c)
        assert c.proc is not None
        try:
            wait_until(lambda: c.proc.poll() is not None, 120, interval=0.5, what="the supervisor giving up")
        finally:
            _kill_left(_started(c.log()).values())
    log = c.log()
    assert c.proc.returncode == 1, log[-3000:]
    assert f"exited {START_FAILURES} times in a row" in log and "giving up" in log, log[-3000:]
    assert "Address already in use" in log  # the workers' own error is there to read
    assert all(gone(pid) for pid in _started(log).values())


def test_a_signal_while_workers_start_stops_those_started_and_starts_no_more(fleet, tmp_path):
    """SIGTERM while the supervisor is starting its workers: the one started stops, the others never start,
    and the workers are in sessions of their own (a terminal's Ctrl-C reaches only the supervisor). To catch
    the supervisor mid-start every time, its output goes to a pipe the test has filled: the line it writes
    after starting worker 1 blocks until the test reads."""
    import fcntl
    import sys
    import threading

    from ollama_fleet.broker.local import free_loopback_port
    from tests.support import ROOT, _env

    url = _worker_url(fleet, 3)
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETFL, os.O_NONBLOCK)
    for size in (65536, 1):
        try:
            while True:
                os.write(w, b"\n" * size)
        except BlockingIOError:
            pass
    fcntl.fcntl(w, fcntl.F_SETFL, 0)  # the supervisor's writes block (the flag is shared with it)
    env = _env({"FLEET_MQTT_URL": url, "FLEET_PORT": str(free_loopback_port()), "FLEET_DATA_DIR": str(tmp_path),
                "FLEET_WORKERS": "3", "FLEET_AUTO_DISTRIBUTE": "0"})
    sup = subprocess.Popen([sys.executable, "-m", "ollama_fleet.cli", "controller"], env=env, cwd=ROOT,
                           stdout=w, stderr=w, start_new_session=True)
    os.close(w)
    out: list[bytes] = []
    reader = threading.Thread(target=lambda: out.extend(iter(lambda: os.read(r, 65536), b"")), daemon=True)
    seen: set[int] = set()
    try:
        first = wait_until(lambda: _children(sup.pid), 30, what="the first worker forked")
        seen.update(first)
        sup.send_signal(signal.SIGTERM)  # the supervisor is still in its start loop, blocked on its log line
        worker = first[0]
        wait_until(lambda: (st := _stat(worker)) and int(st[3]) == worker, 5, what="the worker in its own session")
        reader.start()  # the supervisor goes on
        assert sup.wait(30) == 0
        reader.join(10)
    finally:
        seen.update(_children(sup.pid))
        if sup.poll() is None:
            sup.kill()
            sup.wait(5)
        _kill_left(seen)
        if reader.is_alive():
            reader.join(10)  # the end of the pipe comes once every writer is gone
        if not reader.is_alive():
            os.close(r)
    log = b"".join(out).decode(errors="replace")
    assert _started(log) == {1: worker}, log[-3000:]
    assert gone(worker)


def test_ctrl_c_stops_the_workers_and_one_that_will_not_stop_is_killed(fleet, tmp_path):
    """The terminal's Ctrl-C (SIGINT to the foreground process group): the supervisor forwards it and waits;
    a worker that does not stop (here: stopped with SIGSTOP) gets SIGKILL after STOP_DEADLINE."""
    from ollama_fleet.launcher import STOP_DEADLINE

    c = workers(fleet, tmp_path, 2)
    pids = {h["pid"] for h in all_serving(c, 2).values()}
    stuck = min(pids)
    os.kill(stuck, signal.SIGSTOP)
    try:
        os.killpg(c.pid, signal.SIGINT)
        assert c.proc is not None
        assert c.proc.wait(STOP_DEADLINE + 20) == 0
    finally:
        _kill_left(pids)
    assert all(gone(pid) for pid in pids)
    assert f"(pid {stuck}) still running" in c.log()
