"""The Store on PostgreSQL through its connection pool (controller/db.py): a bounded number of server
connections, reused call after call, and no harm from connections the server ends (a restart, an
administrator, a failover: pg_terminate_backend here)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from playhouse.pool import MaxConnectionsExceeded, PooledPostgresqlDatabase

from ollama_fleet.controller.db import POOL_MAX_CONNECTIONS, Event, db, pooled
from ollama_fleet.controller.registry import store as store_mod
from ollama_fleet.controller.registry.live import Batch
from tests.support import PG_DSN, fresh_postgres_db, wait_until

STORE_THREADS = store_mod.WRITER_THREADS + store_mod.READER_THREADS


@pytest.fixture
def pg_url() -> Iterator[str]:
    with fresh_postgres_db("fleet_pool") as url:
        yield url


class Server:
    """A separate plain connection that watches (and ends) the test database's backends."""

    def __init__(self, url: str) -> None:
        import psycopg2

        self.name = url.rsplit("/", 1)[1]
        self.conn = psycopg2.connect(PG_DSN + "/postgres", connect_timeout=3)
        self.conn.autocommit = True

    def backends(self) -> set[int]:
        with self.conn.cursor() as cur:
            cur.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", (self.name,))
            return {pid for (pid,) in cur.fetchall()}

    def terminate(self, pids: set[int]) -> None:
        with self.conn.cursor() as cur:
            for pid in pids:
                cur.execute("SELECT pg_terminate_backend(%s)", (pid,))
        wait_until(lambda: not (self.backends() & pids), what=f"backends {pids} gone")

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def server(pg_url: str) -> Iterator[Server]:
    s = Server(pg_url)
    try:
        yield s
    finally:
        s.close()


def _event(message: str) -> dict[str, Any]:
    return {"ts": time.time(), "node_id": "n1", "kind": "test", "level": "info", "message": message, "data": None}


def _backend_pid() -> int:
    pid: int = db.execute_sql("SELECT pg_backend_pid()").fetchone()[0]
    return pid


def _messages() -> list[str]:
    return sorted(e.message for e in Event.select())


def test_postgres_urls_get_a_pool_whose_defaults_the_url_overrides() -> None:
    url, options = pooled("postgresql://fleet@db.example/fleet", 9)
    assert url == "postgresql+pool://fleet@db.example/fleet"
    assert options["max_connections"] == 9 and options["stale_timeout"] > 0 and options["timeout"] > 0
    assert options["connect_timeout"] > 0
    url, options = pooled("postgres://db.example/fleet?max_connections=20&sslmode=require")
    assert url.startswith("postgresql+pool://") and "max_connections" not in options
    assert options["stale_timeout"] > 0
    assert pooled("sqlite:////var/lib/fleet.db") == ("sqlite:////var/lib/fleet.db", {})
    assert POOL_MAX_CONNECTIONS >= STORE_THREADS


def test_many_concurrent_calls_share_a_few_reused_connections(pg_url: str, server: Server) -> None:
    store = store_mod.Store(pg_url)
    assert isinstance(store.database, PooledPostgresqlDatabase)
    peak = 0
    done = threading.Event()

    def watch() -> None:  # the server's view, sampled while the calls run
        nonlocal peak
        while not done.is_set():
            peak = max(peak, len(server.backends()))
            done.wait(0.005)  # sampling interval, not a wait for anything

    watcher = threading.Thread(target=watch)
    watcher.start()

    async def burst() -> list[int]:
        writes = [store.flush(Batch(events=[_event(f"e{i}")])) for i in range(60)]
        reads = [store.read(_backend_pid) for _ in range(300)]
        got = await asyncio.gather(*writes, *reads)
        return [pid for pid in got if pid is not None]

    try:
        pids = asyncio.run(burst())
        done.set()
        watcher.join()
        assert len(pids) == 300
        # 300 reads and 60 writes on at most one connection per Store thread: without the pool each
        # call would have had a server backend of its own
        assert 1 <= len(set(pids)) <= STORE_THREADS, set(pids)
        assert 1 <= peak <= STORE_THREADS
        idle = server.backends()
        assert set(pids) <= idle and len(idle) <= STORE_THREADS  # kept open for the next calls
        assert asyncio.run(store.read(_messages)) == sorted(f"e{i}" for i in range(60))
    finally:
        done.set()
        store.close()
    wait_until(lambda: not server.backends(), what="close() ends the pooled connections")


def test_connections_the_server_ended_are_replaced_not_reused(pg_url: str, server: Server) -> None:
    store = store_mod.Store(pg_url)
    try:
        async def pids(n: int) -> set[int]:
            return set(await asyncio.gather(*(store.read(_backend_pid) for _ in range(n))))

        killed = asyncio.run(pids(40)) | server.backends()
        server.terminate(killed)  # every pooled connection, idle in the pool, is now dead

        # the very next write and reads succeed, each on a new connection
        asyncio.run(store.flush(Batch(events=[_event("after the kill")])))
        assert asyncio.run(store.read(_messages)) == ["after the kill"]
        fresh = asyncio.run(pids(40))
        assert fresh and not fresh & killed
        assert len(server.backends()) <= STORE_THREADS
    finally:
        store.close()


def _dies_in_a_transaction() -> None:
    with db.atomic():
        Event.insert(**_event("never committed")).execute()
        db.execute_sql("SELECT pg_terminate_backend(pg_backend_pid())")


def test_a_connection_lost_inside_a_transaction_is_transient_and_dropped(pg_url: str, server: Server) -> None:
    store = store_mod.Store(pg_url)
    try:
        with pytest.raises(Exception) as exc:
            asyncio.run(store.write(_dies_in_a_transaction))
        assert store_mod.transient(exc.value), repr(exc.value)  # the flusher requeues its batch

        async def after() -> None:
            await asyncio.gather(*(store.flush(Batch(events=[_event(f"later {i}")])) for i in range(10)),
                                 *(store.read(_backend_pid) for _ in range(20)))
        asyncio.run(after())
        assert asyncio.run(store.read(_messages)) == sorted(f"later {i}" for i in range(10))
    finally:
        store.close()


def test_an_exhausted_pool_is_a_transient_failure(pg_url: str) -> None:
    """Only the Store's own threads never exhaust the pool; another user holding connections makes a call
    wait `timeout` seconds, then fail as a transient error (the flusher requeues), never drop rows."""
    store = store_mod.Store(pg_url + "?max_connections=1&timeout=1")
    try:
        store.database.connect()  # this thread holds the only connection
        started = time.monotonic()
        with pytest.raises(MaxConnectionsExceeded) as exc:
            asyncio.run(store.flush(Batch(events=[_event("waits")])))
        assert time.monotonic() - started >= 0.9
        assert store_mod.transient(exc.value)
        store.database.close()  # back to the pool
        asyncio.run(store.flush(Batch(events=[_event("written")])))
        assert asyncio.run(store.read(_messages)) == ["written"]
    finally:
        store.close()

