"""The registry on PostgreSQL (the local server, when there is one): same models, same behaviour."""

from __future__ import annotations

import os
import uuid
from typing import Iterator

import pytest

PG_DSN = os.environ.get("FLEET_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")


@pytest.fixture
def pg_url() -> Iterator[str]:
    psycopg2 = pytest.importorskip("psycopg2")
    try:
        admin = psycopg2.connect(PG_DSN + "/postgres", connect_timeout=3)
    except psycopg2.OperationalError as e:
        pytest.skip(f"no PostgreSQL at {PG_DSN}: {e}")
    admin.autocommit = True
    name = f"fleet_test_{uuid.uuid4().hex[:10]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_DSN}/{name}"
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def test_registry_on_postgres_survives_restart(pg_url, fleet):  # fleet torn down first: then the DB
    from tests.support import wait_until

    c = fleet.controller(fleet_database_url=pg_url)
    fleet.agent("node-pg")
    c.wait_agent("node-pg", status="online")
    wait_until(lambda: c.agent("node-pg")["metrics"]["seq"], what="first heartbeat")
    assert c.http.put("/api/agents/node-pg/settings", json={"display_name": "On PG", "tags": ["pg"]}).status_code == 200
    seq = c.agent("node-pg")["metrics"]["seq"]
    wait_until(lambda: c.agent("node-pg")["metrics"]["seq"] > seq + 2, what="heartbeats (narrow UPDATE path)")
    c.restart()
    a = c.agent("node-pg")
    assert a["name"] == "On PG" and a["tags"] == ["pg"]
    assert a["metrics"]["seq"] > seq  # heartbeat figures were written behind, not only the first snapshot
    assert a["models"], "installed models were persisted"
    events = c.http.get("/api/events", params={"agent": "node-pg"}).json()["events"]
    assert any(e["kind"] == "registered" for e in events)
    assert "database" in c.http.get("/healthz").json() and c.http.get("/healthz").json()["database"] is True
