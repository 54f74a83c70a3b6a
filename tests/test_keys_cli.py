"""`fleet keys` and per-key limits: the real command (a separate process, as an operator runs it) against a real
SQLite data dir and the local PostgreSQL; what it stores is what the controller's KeyRing loads."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ollama_fleet.controller.admission.limits import NONE, KeyLimits
from ollama_fleet.controller.db import init_db
from ollama_fleet.controller.proxy import keys
from tests.proxy_support import fleet_cli
from tests.support import fresh_postgres_db

LIMIT_FIELDS = ("max_concurrent", "rpm", "tpm", "max_priority")


@dataclass
class Db:
    flags: tuple[str, ...]  # how `fleet keys` finds the database
    url: str  # how this process opens it

    def fleet(self, *args: str) -> Any:
        return fleet_cli("keys", *args, *self.flags)

    def rows(self) -> list[dict[str, Any]]:
        listed = self.fleet("list", "--json")
        assert listed.returncode == 0, listed.stderr
        return list(json.loads(listed.stdout))

    def limits(self, rows: list[dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
        """Each key's limits: from these rows of `list --json`, or from a new listing."""
        return {r["name"]: {f: r[f] for f in LIMIT_FIELDS} for r in (self.rows() if rows is None else rows)}


BACKENDS = ["sqlite", "postgresql"]
Alice = tuple[Db, list[dict[str, Any]]]  # a database holding alice, and its `list --json`


@contextmanager
def empty_db(backend: str, tmp_path: Path) -> Iterator[Db]:
    if backend == "sqlite":
        yield Db(("--data-dir", str(tmp_path)), f"sqlite:///{tmp_path / 'fleet.db'}")
        return
    with fresh_postgres_db("fleet_keys") as url:
        yield Db(("--database-url", url), url)


@pytest.fixture(params=BACKENDS)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Db]:
    with empty_db(request.param, tmp_path) as d:
        yield d


@pytest.fixture(scope="module", params=BACKENDS)
def alice_db(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Alice]:
    """For the tests that must change nothing: one database per backend holding alice (--rpm 10), and what
    `list --json` says of it, which each of them checks is all there still is afterwards."""
    with empty_db(request.param, tmp_path_factory.mktemp("keys")) as d:
        add(d, "alice", "--rpm", "10")
        yield d, d.rows()


def add(db: Db, name: str, *flags: str) -> str:
    proc = db.fleet("add", name, *flags)
    assert proc.returncode == 0, proc.stderr
    return str(proc.stdout.strip())


def test_add_with_limits_and_list_them(db: Db) -> None:
    add(db, "alice", "--max-concurrent", "2", "--rpm", "60", "--tpm", "100000", "--max-priority", "normal")
    proc = db.fleet("add", "bob")
    assert proc.returncode == 0 and "(bob, no limits) created" in proc.stderr

    rows = db.rows()
    assert set(rows[0]) == {"id", "name", "prefix", "created", "revoked", *LIMIT_FIELDS}  # the old fields stay
    assert db.limits(rows) == {
        "alice": {"max_concurrent": 2, "rpm": 60, "tpm": 100000, "max_priority": "normal"},
        "bob": {"max_concurrent": None, "rpm": None, "tpm": None, "max_priority": None},
    }
    text = db.fleet("list").stdout.splitlines()
    assert text[0].endswith("active  2 concurrent, 60 rpm, 100000 tpm, priority at most normal"), text
    assert text[1].endswith("active  no limits"), text


def test_limit_changes_only_the_given_flags_and_clears_with_0_or_none(db: Db) -> None:
    key = add(db, "alice", "--max-concurrent", "2", "--rpm", "60", "--max-priority", "high")
    add(db, "bob", "--tpm", "500")

    proc = db.fleet("limit", "alice", "--rpm", "30", "--tpm", "9000")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "key 1 (alice): 2 concurrent, 30 rpm, 9000 tpm, priority at most high"
    assert db.limits()["alice"] == {"max_concurrent": 2, "rpm": 30, "tpm": 9000, "max_priority": "high"}

    assert db.fleet("limit", key[:10], "--max-concurrent", "0", "--max-priority", "none").returncode == 0  # prefix
    assert db.fleet("limit", "1", "--rpm", "NONE").returncode == 0  # id
    assert db.limits() == {"alice": {"max_concurrent": None, "rpm": None, "tpm": 9000, "max_priority": None},
                           "bob": {"max_concurrent": None, "rpm": None, "tpm": 500, "max_priority": None}}


def test_limit_of_no_active_key_says_so(db: Db) -> None:
    add(db, "alice")
    assert db.fleet("revoke", "alice").returncode == 0
    for ref in ("alice", "nobody"):
        proc = db.fleet("limit", ref, "--rpm", "5")
        assert proc.returncode == 1 and f"no active key matches {ref!r}" in proc.stderr
    assert db.limits()["alice"]["rpm"] is None


@pytest.mark.parametrize("flags, says", [
    (("--rpm", "-1"), "'-1' is not a limit"),
    (("--tpm", "lots"), "'lots' is not a limit"),
    (("--max-concurrent", "2.5"), "'2.5' is not a limit"),
    (("--rpm", "99999999999"), "too large"),
    (("--max-priority", "urgent"), "'urgent' is not a priority: give one of high, normal, low"),
])
def test_bad_limits_are_refused_with_exit_2_and_nothing_written(alice_db: Alice, flags: tuple[str, ...],
                                                                 says: str) -> None:
    db, before = alice_db
    for args in (("add", "bob", *flags), ("limit", "alice", "--tpm", "7", *flags)):
        proc = db.fleet(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert db.rows() == before  # no key added, no limit changed (not even the valid --tpm)


def test_limit_without_a_limit_is_a_usage_error(alice_db: Alice) -> None:
    db, before = alice_db
    proc = db.fleet("limit", "alice")
    assert proc.returncode == 2 and "nothing to change" in proc.stderr and "--max-priority" in proc.stderr
    rows = db.rows()
    assert db.limits(rows)["alice"]["rpm"] == 10 and rows == before


def test_the_key_ring_loads_what_the_command_stored(db: Db) -> None:
    """What the proxy loads every KEYS_RELOAD_EVERY: names and limits of active keys; keys sharing a name share
    the strictest of their limits; a revoked key's limits are gone with it."""
    alice = add(db, "alice", "--rpm", "60", "--max-priority", "normal")
    team_a = add(db, "team", "--max-concurrent", "4", "--tpm", "1000")
    add(db, "team", "--max-concurrent", "2", "--max-priority", "low")
    old = add(db, "old", "--rpm", "1")
    assert db.fleet("revoke", "old").returncode == 0

    database = init_db(db.url)
    with database.connection_context():
        ring = keys.KeyRing()
        ring.load(*keys.state())
    assert ring.enabled
    assert ring.check(alice) == "alice" and ring.check(team_a) == "team"
    assert ring.check(old) is None and ring.check("fk-wrong") is None and ring.check("") is None
    assert ring.limits("alice") == KeyLimits(rpm=60, max_priority="normal")
    assert ring.limits("team") == KeyLimits(max_concurrent=2, tpm=1000, max_priority="low")
    assert ring.limits("old") == NONE and ring.limits("nobody") == NONE
