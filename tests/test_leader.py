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
import psycopg2
import pytest

from tests.jobs_support import wait_task
from tests.support import Controller, fresh_postgres_db, wait_until

MB = 1 << 20
STATS = "/api/ingest"


@pytest.fixture
def pg_url() -> Iterator[str]:
    with fresh_postgres_db() as url:
        yield url


def sql(url: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    conn = psycopg2.connect(url.replace("postgresql://", "postgres://", 1))
    try:
        with conn.cursor() as cur:
            cur.execute(query, args)
            return list(cur.fetchall())
    finally:
        conn.close()


def health(c: Controller) -> dict[str, Any]:
    body: dict[str, Any] = c.http.get("/healthz").json()
    return body


def leaders(*cs: Controller) -> list[Controller]:
    return [c for c in cs if health(c)["leader"]]


def one_leader(*cs: Controller, timeout: float = 10.0) -> Controller:
    return wait_until(lambda: (lambda ls: ls[0] if len(ls) == 1 else None)(leaders(*cs)), timeout,
                      what="exactly one leader")


def distribute(c: Controller, model: str, node: str) -> str:
    r = c.http.post("/api/models/distribute", json={"model_name": model, "target": "specific", "agent_ids": [node]})
    assert r.status_code == 202, r.text
    task_id: str = r.json()["task_ids"][0]
    return task_id


def test_any_controller_takes_jobs_and_changes_and_the_leader_alone_writes(fleet, pg_url):
    if "controller-3" not in fleet.broker.passwords:
        fleet.broker.add_account("controller", "controller-3")  # the sender of a hostile peer message
    c1 = fleet.controller(fleet_database_url=pg_url)
    c2 = fleet.controller(account="controller-2", fleet_database_url=pg_url)
    leader = one_leader(c1, c2)
    follower = c2 if leader is c1 else c1
    assert health(follower)["instance"] != health(leader)["instance"]
    fleet.agent("ha-a", fleet.fake_ollama("ha-a", pull_total=8 * MB, pull_speed=8 * MB).url)
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
    wait_until(lambda: sql(pg_url, "SELECT status FROM job WHERE task_id = %s", task_id) == [("completed",)],
               what="the job recorded once, completed")

    # an operator's change on the follower reaches the leader, which writes it
    r = follower.http.put("/api/agents/ha-a/settings", json={"display_name": "Via follower", "tags": ["ha"]})
    assert r.status_code == 200
    wait_until(lambda: leader.agent("ha-a")["name"] == "Via follower", what="the change on the leader")
    wait_until(lambda: sql(pg_url, "SELECT display_name FROM agent WHERE node_id = 'ha-a'") == [("Via follower",)],
               what="the change in the database")
    # every controller heard the agent register; the event is written once
    assert sql(pg_url, "SELECT count(*) FROM event WHERE node_id = 'ha-a' AND kind = 'registered'") == [(1,)]

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
    wait_until(lambda: sql(pg_url, "SELECT count(*) FROM agent WHERE node_id = 'ha-a'") == [(0,)],
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
    wait_until(lambda: sql(pg_url, "SELECT status FROM job WHERE task_id = %s", task_id) == [("completed",)],
               what="the pull's outcome written once by the new leader")
    # the new leader dispatches: a job asked of the remaining follower runs
    other = next(c for c in rest if c is not new)
    again = distribute(other, "gemma3:1b", "ha-b")
    wait_task(new, again, timeout=30, status="completed")
    assert sql(pg_url, "SELECT count(*) FROM job") == [(2,)]


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
    return wait_until(lambda: (lambda s: s if len(s) == n else None)(instances(c)), 20, what=f"{n} workers serving")


def test_workers_share_one_port_with_one_leader_and_restart(fleet, tmp_path):
    c = workers(fleet, tmp_path, 2)

    both = all_serving(c, 2)
    assert sum(h["leader"] for h in both.values()) == 1
    victim = next(h for h in both.values() if not h["leader"])
    os.kill(victim["pid"], signal.SIGKILL)
    wait_until(lambda: (lambda s: len(s) == 2 and victim["instance"] not in s)(instances(c)), 30,
               what="the killed worker restarted by the supervisor")
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
