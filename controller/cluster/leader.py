"""Leader election among controllers that share one database (docs/scaling.md, "One leader").

Every controller routes requests, serves the dashboard and follows the topic tree; one of them, the
leader, also does what must happen once: dispatching and timing out jobs, automatic distribution,
controller commands from MQTT, writing the registry's rows and pruning. The election is the database's
own lock, so there is nothing to configure and no second system to run:

- PostgreSQL: a session-level advisory lock held on a dedicated connection. The server frees it the
  moment that connection ends, so a killed leader (even kill -9: the kernel closes its socket) is
  replaced at the next attempt of a follower, within ELECT_EVERY. A leader that cannot reach the
  database steps down at its next check.
- SQLite: an exclusive `flock` on a file beside the database: the workers of one host
  (`fleet controller --workers N`) share it; the kernel frees it when the process dies.
- Anything else: this controller is the only one (a warning says so).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from playhouse.db_url import parse

log = logging.getLogger("fleet.leader")

ELECT_EVERY = 1.0  # seconds between a follower's attempts and a leader's checks that it still holds the lock
CHECK_TIMEOUT_MS = 2000  # a leader whose check takes longer steps down (the database is away)
# One advisory lock key for the leadership, distinct from the schema migrations' key.
LEADER_LOCK_KEY = zlib.crc32(b"ollama-fleet leader")


class _Lock(Protocol):
    def acquire(self) -> bool: ...  # True while this process holds the lock (blocking call, run in a thread)

    def release(self) -> None: ...


class _PgLock:
    """pg_try_advisory_lock on a connection of its own (not the pool's: the lock lives and dies with it)."""

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = params
        self.conn: Any = None
        self.held = False

    def acquire(self) -> bool:
        import psycopg2

        try:
            if self.conn is None:
                self.held = False
                self.conn = psycopg2.connect(connect_timeout=max(1, CHECK_TIMEOUT_MS // 1000),
                                             options=f"-c statement_timeout={CHECK_TIMEOUT_MS}",
                                             keepalives=1, keepalives_idle=5, keepalives_interval=2,
                                             keepalives_count=2, application_name="fleet-leader",
                                             **self.params)
                self.conn.autocommit = True
            with self.conn.cursor() as cur:
                if self.held:
                    cur.execute("SELECT 1")  # the session, and with it the lock, is still there
                else:
                    cur.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK_KEY,))
                    self.held = bool(cur.fetchone()[0])
            return self.held
        except Exception as e:
            if self.held:
                log.warning("leader lost the database (%s): stepping down", e)
            self.release()
            return False

    def release(self) -> None:
        conn, self.conn, self.held = self.conn, None, False
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()  # ends the session: the server frees the lock


class _FileLock:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> bool:
        import fcntl

        if self.fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock


class _Alone:
    def acquire(self) -> bool:
        return True

    def release(self) -> None:
        pass


def lock_for(url: str) -> _Lock:
    """The lock that elects one leader among the controllers on this database URL."""
    scheme = url.split("://", 1)[0].split("+", 1)[0]
    if scheme in ("postgres", "postgresql", "postgresext", "postgresqlext"):
        params = {k: v for k, v in parse(url, unquote_password=True, unquote_user=True).items()
                  if k in ("database", "user", "password", "host", "port")}
        if "database" in params:
            params["dbname"] = params.pop("database")
        return _PgLock(params)
    if scheme == "sqlite":
        path = url.split("://", 1)[1]
        if path not in ("", "/:memory:"):
            try:
                import fcntl  # noqa: F401  # POSIX only
            except ImportError:
                return _Alone()
            return _FileLock(Path(path[1:] if path.startswith("/") else path).with_suffix(".leader"))
    log.warning("no leader election on %s: run one controller on this database", scheme)
    return _Alone()


class Leadership:
    """Whether this controller leads; `listeners` hear each change (True: elected, False: stepped down).

    Alone (before `open`, or on a database without a lock) a controller leads."""

    def __init__(self) -> None:
        self.lock: _Lock = _Alone()
        self.is_leader = True
        self.changes = 0  # elections won and lost, for /healthz and tests
        self.listeners: list[Callable[[bool], None]] = []

    async def open(self, url: str) -> None:
        """The first election, before the parts that ask start; then `run` keeps it current."""
        self.lock = lock_for(url)
        self.is_leader = await asyncio.to_thread(self.lock.acquire)
        log.info("this controller %s", "is the leader" if self.is_leader else "follows the leader")

    async def run(self) -> None:
        while True:
            await asyncio.sleep(ELECT_EVERY)
            held = await asyncio.to_thread(self.lock.acquire)
            if held != self.is_leader:
                self.is_leader = held
                self.changes += 1
                log.warning("this controller %s", "is the leader now" if held else "is no longer the leader")
                for listener in list(self.listeners):
                    try:
                        listener(held)
                    except Exception:
                        log.exception("leadership listener failed")

    def close(self) -> None:
        """Let another controller lead at once (after the last writes of shutdown)."""
        self.is_leader = False
        self.lock.release()
