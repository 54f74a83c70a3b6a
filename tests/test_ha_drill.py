"""The failure drill (issue 13, docs/scaling.md "The failure drill, measured"): three controllers on one
PostgreSQL database behind nginx with the shipped deploy/nginx/fleet.conf, two agents with fake Ollamas.
While streamed generations run through nginx, new requests keep coming and a fleet pull runs, the leader
is killed with SIGKILL. Then: the leader moves to one of the others; every request that started after the
kill is answered 200 (nginx, refused by the dead one, moves on); the only streams that break are the
killed controller's (`X-Fleet-Controller`); the pull finishes and is one `completed` row per job; every
answered request is one row in the request log (the killed controller's own answered rows come back
from its journal when it is started again) and each agent's `registered` event is in the database once."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import FleetFactory
from tests.nginx import NginxProcess, find_nginx, start_nginx
from tests.proxy_support import chat_body, wait_routable
from tests.support import Controller, fresh_postgres_db, health, pg_rows, wait_until

REQUIRE_TOOLS = os.environ.get("FLEET_TEST_REQUIRE_MOSQUITTO") == "1"  # CI: nginx must be there
MB = 1 << 20
ACCOUNTS = ("controller", "controller-2", "controller-3")
NODES = ("drill-a", "drill-b")
MODEL = "tinyllama"  # pulled onto both agents: not installed on the fakes
STREAM_TOKENS = 40
TOKEN_DELAY = 0.1  # a stream lasts STREAM_TOKENS x TOKEN_DELAY = 4 s: the kill lands in the middle
QUICK = {"num_predict": 2}  # the steady flow: short answers (~0.2 s) from the same fakes
FLOW_WORKERS = 3
PULL_TOTAL, PULL_SPEED = 24 * MB, 4 * MB  # 6 s: running when the leader dies, done under the new one
FAILOVER_GOAL_S = 5.0  # the bound on a leader's replacement
MAX_STREAMS = 12  # opened until each controller holds one; least_conn spreads them
AFTER_KILL = 20  # answers of requests started after the kill, at least
PARALLEL = 32  # each agent's generations at once (admission's capacity): the drill never queues
TOKEN = "drill-admin-token"  # through nginx the controllers see a proxy, not a loopback client: reads need it


@dataclass
class Call:
    """One request through nginx: when it started and ended, its status and fleet headers, how it ended."""

    started: float
    ended: float = 0.0
    status: int = 0
    rid: str = ""
    controller: str = ""
    complete: bool = False  # a stream: its final `done: true` line arrived; otherwise the whole answer did
    error: str = ""


@dataclass
class Flow:
    """Workers sending short chats through nginx one after the other until `stop` is set."""

    url: str
    calls: list[Call] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for _ in range(FLOW_WORKERS):
            t = threading.Thread(target=self._work, daemon=True)
            t.start()
            self.threads.append(t)

    def _work(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30, trust_env=False) as client:
            while not self.stop.is_set():
                call = Call(time.monotonic())
                try:
                    r = client.post("/api/chat", json=chat_body(options=QUICK))
                    call.status, call.complete = r.status_code, r.status_code == 200 and r.json()["done"]
                    call.rid = r.headers.get("x-fleet-request-id", "")
                    call.controller = r.headers.get("x-fleet-controller", "")
                except httpx.HTTPError as e:
                    call.error = f"{type(e).__name__}: {e}"
                call.ended = time.monotonic()
                with self.lock:
                    self.calls.append(call)

    def snapshot(self) -> list[Call]:
        with self.lock:
            return list(self.calls)

    def finish(self) -> list[Call]:
        self.stop.set()
        for t in self.threads:
            t.join(35)
            assert not t.is_alive(), "a flow worker hangs"
        return self.snapshot()


class Stream:
    """One long streamed chat through nginx, read in a thread; `opened` once its headers arrived."""

    def __init__(self, url: str) -> None:
        self.call = Call(time.monotonic())
        self.opened = threading.Event()
        self.thread = threading.Thread(target=self._read, args=(url,), daemon=True)
        self.thread.start()

    def _read(self, url: str) -> None:
        try:
            with httpx.Client(base_url=url, timeout=30, trust_env=False) as client, \
                    client.stream("POST", "/api/chat", json=chat_body(stream=True)) as r:
                self.call.status, self.call.rid = r.status_code, r.headers.get("x-fleet-request-id", "")
                self.call.controller = r.headers.get("x-fleet-controller", "")
                self.opened.set()
                for line in r.iter_lines():
                    self.call.complete = self.call.complete or '"done":true' in line
        except httpx.HTTPError as e:
            self.call.error = f"{type(e).__name__}: {e}"
        finally:
            self.call.ended = time.monotonic()
            self.opened.set()

    def join(self) -> Call:
        self.thread.join(30)
        assert not self.thread.is_alive(), "a stream hangs"
        return self.call






def one_leader(cs: list[Controller], timeout: float = 10.0) -> Controller:
    def leader() -> Controller | None:
        ls = [c for c in cs if health(c)["leader"]]
        return ls[0] if len(ls) == 1 else None
    found = wait_until(leader, timeout, interval=0.05, what="exactly one leader")
    assert found is not None
    return found


def task_status(client: httpx.Client, task_id: str) -> str | None:
    r = client.get(f"/api/tasks/{task_id}")
    status: str | None = r.json()["status"] if r.status_code == 200 else None
    return status


def wait_status(client: httpx.Client, task_id: str, status: str, timeout: float) -> None:
    wait_until(lambda: task_status(client, task_id) == status, timeout, what=f"task {task_id} {status}")


def request_rows(pg_url: str, rids: set[str]) -> dict[str, int] | None:
    """rid -> its rows in the request log, once every one of `rids` has one; None before."""
    found = dict(pg_rows(pg_url, "SELECT rid, count(*) FROM requestrecord WHERE rid = ANY(%s) GROUP BY rid",
                     list(rids)))
    return found if len(found) == len(rids) else None


@pytest.fixture
def pg_url() -> Iterator[str]:
    with fresh_postgres_db("fleet_drill") as url:
        yield url


def _nginx_or_skip() -> str:
    binary = find_nginx()
    if binary is None:
        if REQUIRE_TOOLS:
            pytest.fail("FLEET_TEST_REQUIRE_MOSQUITTO=1 but nginx is missing (Debian's nginx-light)")
        pytest.skip("nginx is not installed (Debian's nginx-light)")
    return binary


def start_controllers(fleet: FleetFactory, tmp: Path, env: dict[str, str]) -> list[Controller]:
    """One controller per account, each with its own data_dir (its request log journal), started together."""
    cs = []
    for i, account in enumerate(ACCOUNTS, 1):
        if account not in fleet.broker.passwords:
            fleet.broker.add_account("controller", account)
        (tmp / f"c{i}").mkdir()
        c = Controller(tmp / f"c{i}", fleet.broker.url(account), env, wait=False)
        fleet._procs.append(c)  # stopped at teardown, also when it fails to start
        cs.append(c)
    for c in cs:
        c.wait_ready(30)
    return cs


def test_the_leader_killed_under_load_behind_nginx(fleet: FleetFactory, pg_url: str, tmp_path: Path) -> None:
    _nginx_or_skip()
    fakes = {n: fleet.fake_ollama(n, tokens=STREAM_TOKENS, token_delay=TOKEN_DELAY, pull_total=PULL_TOTAL,
                                  pull_speed=PULL_SPEED) for n in NODES}
    for n in NODES:
        fleet.agent(n, fakes[n].url, ollama_num_parallel=str(PARALLEL))
    cs = start_controllers(fleet, tmp_path, {"FLEET_DATABASE_URL": pg_url, "FLEET_ADMIN_TOKEN": TOKEN})
    for c in cs:
        wait_routable(c, *NODES, timeout=20)
    instance = {health(c)["instance"]: c for c in cs}
    assert len(instance) == 3
    with ExitStack() as stack:
        nginx = start_nginx(tmp_path / "nginx", [f"127.0.0.1:{c.port}" for c in cs])
        stack.callback(nginx.stop)
        front = httpx.Client(base_url=nginx.url, timeout=10, trust_env=False,
                             headers={"authorization": f"Bearer {TOKEN}"})
        stack.callback(front.close)
        flow = Flow(nginx.url)
        stack.callback(flow.stop.set)
        _drill(cs, instance, nginx, front, flow, pg_url)


def _drill(cs: list[Controller], instance: dict[str, Controller], nginx: NginxProcess, front: httpx.Client,
           flow: Flow, pg_url: str) -> None:
    victim = one_leader(cs)
    victim_id = health(victim)["instance"]
    rest = [c for c in cs if c is not victim]

    # load: the steady flow, a fleet pull (asked through nginx, of any controller), long streams on each controller
    flow.start()
    r = front.post("/api/models/distribute", json={"model_name": MODEL, "target": "all"})
    assert r.status_code == 202, r.text
    task_ids: list[str] = r.json()["task_ids"]
    assert len(task_ids) == len(NODES)
    for t in task_ids:
        wait_status(front, t, "in_progress", 15)
    wait_until(lambda: {c.controller for c in flow.snapshot() if c.status == 200} == set(instance), 15,
               what="the flow answered by every controller")
    streams: list[Stream] = []  # opened last: they must still run at the kill
    while {s.call.controller for s in streams} != set(instance) and len(streams) < MAX_STREAMS:
        streams.append(Stream(nginx.url))
        assert streams[-1].opened.wait(10) and streams[-1].call.status == 200, streams[-1].call
    held = {i: sum(s.call.controller == i for s in streams) for i in instance}
    assert all(held.values()), f"nginx spread {len(streams)} streams as {held}"

    kill_sent = time.monotonic()
    victim.kill()  # SIGKILL, and reaped: its sockets are closed from here on
    killed_at = time.monotonic()

    new = one_leader(rest, timeout=15)
    failover = time.monotonic() - killed_at
    assert failover < FAILOVER_GOAL_S, f"the leader moved after {failover:.1f} s"
    assert health(new)["instance"] != victim_id

    # new requests keep coming; nginx, refused by the dead controller, sends them on to the others
    refused = "connect() failed (111: Connection refused) while connecting to upstream"
    dead = f"upstream: \"http://127.0.0.1:{victim.port}/"
    wait_until(lambda: any(refused in line and dead in line for line in nginx.log_text().splitlines()), 15,
               what="nginx refused by the killed controller")
    wait_until(lambda: sum(c.started > killed_at and c.ended > 0 for c in flow.snapshot()) >= AFTER_KILL, 20,
               what=f"{AFTER_KILL} requests started after the kill answered")
    calls = flow.finish()
    after = [c for c in calls if c.started > killed_at]
    assert after and all(c.status == 200 and c.complete for c in after), \
        [c for c in after if c.status != 200 or not c.complete][:5]
    assert victim_id not in {c.controller for c in after}
    # what failed before: only requests in flight at the kill, and at most one per worker
    failed = [c for c in calls if c.started <= killed_at and (c.status != 200 or not c.complete)]
    assert all(c.ended >= kill_sent for c in failed), failed
    assert len(failed) <= FLOW_WORKERS, failed
    # of the streams, exactly the killed controller's broke; the others ran to their end
    ended = [s.join() for s in streams]
    broken = [s for s in ended if not s.complete]
    assert {s.controller for s in broken} == {victim_id} and len(broken) == held[victim_id], \
        [(s.controller[:8], s.error) for s in broken]
    assert all(s.complete for s in ended if s.controller != victim_id)

    # the pull finishes, seen through nginx and through each survivor, one completed row per job
    for t in task_ids:
        wait_status(front, t, "completed", 30)
        for c in rest:
            assert task_status(c.api, t) == "completed"
    wait_until(lambda: sorted(pg_rows(pg_url, "SELECT task_id, status FROM job")) ==
               sorted((t, "completed") for t in task_ids), 10, what="one completed row per job")

    # the request log: every answer of a survivor is one row; the killed controller, started again, replays
    # the rows of the answers it gave from its journal
    answered = [c for c in calls + ended if c.status == 200 and c.complete]
    mine = {c.rid for c in answered if c.controller == victim_id}
    survivors = {c.rid for c in answered if c.controller != victim_id}
    assert mine and survivors and all(c.rid for c in answered)
    logged = wait_until(lambda: request_rows(pg_url, survivors), 10, what="every survivor's answer logged")
    assert logged is not None and set(logged.values()) == {1}
    victim.start()
    victim.wait_ready(30)
    logged = wait_until(lambda: request_rows(pg_url, mine | survivors), 15,
                        what="the killed controller's answers replayed from its journal")
    assert logged is not None and set(logged.values()) == {1}
    # beyond those: at most the rows of requests in flight at the kill (journalled, answer cut short)
    total = pg_rows(pg_url, "SELECT count(*), count(DISTINCT rid) FROM requestrecord")[0]
    assert total[0] == total[1] and total[0] - len(logged) <= len(failed) + len(broken), total
    # the restarted controller follows: the leadership stays where it moved
    assert one_leader(cs) is new

    # each agent registered once, written once, whoever led
    assert sorted(pg_rows(pg_url, "SELECT node_id, count(*) FROM event WHERE kind = 'registered' GROUP BY node_id")) \
        == [(n, 1) for n in NODES]
