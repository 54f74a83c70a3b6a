"""Leader election among controllers that share one database (docs/scaling.md, "One leader").

Every controller routes requests, serves the dashboard and follows the topic tree; one of them, the
leader, also does what must happen once: dispatching and timing out jobs, automatic distribution,
controller commands from MQTT, writing the registry's rows and pruning. The election is the database's
own lock, so there is nothing to configure and no second system to run:

- PostgreSQL: a session-level advisory lock held on a dedicated connection. The server frees it the
  moment that connection ends, so a killed leader (even kill -9: the kernel closes its socket) is
  replaced at the next attempt of a follower, within ELECT_EVERY. For a leader whose host vanished,
  the server's own TCP keepalives (set per session here; the server's defaults wait two hours) end the
  session within about KEEPALIVE_S. A leader whose check fails or hangs steps down.
- SQLite: an exclusive `flock` on a file beside the database: the workers of one host
  (`fleet controller --workers N`) share it; the kernel frees it when the process dies.
- Anything else: this controller is the only one (a warning says so).

A controller off the broker cannot lead (it hears no agent and its commands go nowhere): it competes
only while connected, and a leader that lost the broker steps down after STEP_DOWN_OFF_BROKER.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from playhouse.db_url import parse

log = logging.getLogger("fleet.leader")

ELECT_EVERY = 1.0  # seconds between a follower's attempts and a leader's checks that it still holds the lock
CHECK_TIMEOUT = 3.0  # seconds a check may take; a leader whose check takes longer steps down
STEP_DOWN_OFF_BROKER = 10.0  # seconds a leader may be off the broker before it lets another lead
KEEPALIVE_S = (5, 2, 2)  # TCP keepalive idle, interval, count on both ends: a vanished peer is noticed in ~9 s
USER_TIMEOUT_MS = 9000  # TCP_USER_TIMEOUT on both ends: the same bound while data waits for an acknowledgement
LOG_EVERY = 60.0  # seconds between log lines about an election connection that keeps failing
# One advisory lock key for the leadership, distinct from the schema migrations' key.
LEADER_LOCK_KEY = zlib.crc32(b"ollama-fleet leader")
_POOL_ONLY = frozenset({"max_connections", "stale_timeout", "timeout"})  # playhouse.pool's, not libpq's


class _Held:
    """A lock held through a resource (a connection, a file descriptor). Calls are serialized: a check still
    running in its thread when `release` or `close` comes finishes first; after `close`, never again."""

    def __init__(self) -> None:
        self.closed = False
        self._mutex = threading.Lock()

    def acquire(self) -> bool:
        """True while this process holds the lock (blocking: run in a thread)."""
        with self._mutex:
            held = False if self.closed else self._try()
            if self.closed:  # closed while we were checking
                self._drop()
                return False
            return held

    def release(self) -> None:
        with self._mutex:
            self._drop()

    def close(self) -> None:
        self.closed = True  # a check still hanging in its thread gives up the lock when it returns
        if self._mutex.acquire(timeout=CHECK_TIMEOUT):
            try:
                self._drop()
            finally:
                self._mutex.release()

    def _try(self) -> bool:
        raise NotImplementedError

    def _drop(self) -> None:
        raise NotImplementedError


class _PgLock(_Held):
    """pg_try_advisory_lock on a connection of its own (not the pool's: the lock lives and dies with it)."""

    def __init__(self, params: dict[str, Any]) -> None:
        super().__init__()
        self.params = params
        self.conn: Any = None
        self.held = False
        self._last_log = 0.0

    def _try(self) -> bool:
        import psycopg2

        try:
            if self.conn is None:
                self.held = False
                idle, interval, count = KEEPALIVE_S
                server = (f"-c statement_timeout={int(CHECK_TIMEOUT * 1000)} -c tcp_keepalives_idle={idle} "
                          f"-c tcp_keepalives_interval={interval} -c tcp_keepalives_count={count} "
                          f"-c tcp_user_timeout={USER_TIMEOUT_MS}")
                # tcp_user_timeout (both ends): unacknowledged data gives up too, not only an idle line
                params = {"connect_timeout": max(1, int(CHECK_TIMEOUT)), "keepalives": 1,
                          "keepalives_idle": idle, "keepalives_interval": interval,
                          "keepalives_count": count, "tcp_user_timeout": USER_TIMEOUT_MS,
                          "application_name": "fleet-leader", **self.params}
                params["options"] = f"{params.get('options', '')} {server}".strip()
                self.conn = psycopg2.connect(**params)
                self.conn.autocommit = True
            with self.conn.cursor() as cur:
                if self.held:
                    cur.execute("SELECT 1")  # the session, and with it the lock, is still there
                else:
                    cur.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK_KEY,))
                    self.held = bool(cur.fetchone()[0])
            return self.held
        except Exception as e:
            now = time.monotonic()
            if self.held or now - self._last_log >= LOG_EVERY:
                self._last_log = now
                log.warning("leader election: the database is unavailable (%s)%s", str(e).strip(),
                            ": stepping down" if self.held else "")
            self._drop()
            return False

    def _drop(self) -> None:
        conn, self.conn, self.held = self.conn, None, False
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()  # ends the session: the server frees the lock


class _FileLock(_Held):
    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.fd: int | None = None

    def _try(self) -> bool:
        import fcntl

        if self.fd is not None:
            return True
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            log.warning("leader election: cannot open %s (%s)", self.path, e)
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def _drop(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock


class _Alone:
    def acquire(self) -> bool:
        return True

    def release(self) -> None:
        pass

    def close(self) -> None:
        pass


def lock_for(url: str) -> _PgLock | _FileLock | _Alone:
    """The lock that elects one leader among the controllers on this database URL."""
    scheme = url.split("://", 1)[0].split("+", 1)[0]
    if scheme in ("postgres", "postgresql", "postgresext", "postgresqlext"):
        # every libpq parameter of the URL (sslmode, sslrootcert, a socket in ?host=, ...), not the pool's
        params = {k: v for k, v in parse(url, unquote_password=True, unquote_user=True).items()
                  if k not in _POOL_ONLY}
        if "database" in params:
            params["dbname"] = params.pop("database")
        return _PgLock(params)
    if scheme == "sqlite":
        path = url.split("://", 1)[1].split("?", 1)[0]
        if path not in ("", "/:memory:"):
            try:
                import fcntl  # noqa: F401  # POSIX only
            except ImportError:
                return _Alone()
            return _FileLock(Path(path.removeprefix("/")).with_suffix(".leader"))
    log.warning("no leader election on %s: run one controller on this database", scheme)
    return _Alone()


class Leadership:
    """Whether this controller leads; `listeners` hear each change (True: elected, False: stepped down).

    Alone (before `open`, or on a database without a lock) a controller leads. `connected` says whether
    the controller is on the broker (the ingest's connection)."""

    def __init__(self, connected: Callable[[], bool] = lambda: True) -> None:
        self.lock: _PgLock | _FileLock | _Alone = _Alone()
        self.connected = connected
        self.is_leader = True
        self.listeners: list[Callable[[bool], None]] = []
        self.closed = False
        self._off_since: float | None = None
        # one thread of its own, one check at a time: a check hanging on a dead network path must not
        # pile up in (and starve) the loop's default executor, which connects to the broker and agents
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="fleet-leader")
        self._check: asyncio.Future[bool] | None = None

    async def open(self, url: str) -> None:
        """The first election, before the parts that ask start (at start, before the broker answers: a
        controller that stays off the broker steps down after STEP_DOWN_OFF_BROKER); `run` keeps it current."""
        self.lock = lock_for(url)
        self.is_leader = await self._attempt()
        log.info("this controller %s", "is the leader" if self.is_leader else "follows the leader")

    async def _attempt(self) -> bool:
        if self._check is None or self._check.done():
            self._check = asyncio.get_running_loop().run_in_executor(self._thread, self.lock.acquire)
        try:
            return await asyncio.wait_for(asyncio.shield(self._check), CHECK_TIMEOUT + 1)
        except TimeoutError:  # the check hangs (a partition): do not act as the leader meanwhile
            log.warning("leader election: the database check hangs; not leading")
            return False

    async def run(self) -> None:
        while True:
            await asyncio.sleep(ELECT_EVERY)
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception:  # never end the elections for good
                log.exception("leader election step failed")

    async def _step(self) -> None:
        now = time.monotonic()
        if self.connected():
            self._off_since = None
            held = await self._attempt()
        else:
            self._off_since = self._off_since or now
            held = self.is_leader and now - self._off_since < STEP_DOWN_OFF_BROKER
            if held:
                held = await self._attempt()
            elif self.is_leader:
                log.warning("off the broker for %.0f s: letting another controller lead", STEP_DOWN_OFF_BROKER)
                await asyncio.get_running_loop().run_in_executor(self._thread, self.lock.release)
        if self.closed:
            return  # shutting down: never take the lead again
        if held != self.is_leader:
            self.is_leader = held
            log.warning("this controller %s", "is the leader now" if held else "is no longer the leader")
            for listener in list(self.listeners):
                try:
                    listener(held)
                except Exception:
                    log.exception("leadership listener failed")

    def close(self) -> None:
        """Let another controller lead at once (shutdown); never lead again."""
        self.closed = True
        self.is_leader = False
        self.lock.close()
        self._thread.shutdown(wait=False)
