"""The registry on PostgreSQL (the local server, when there is one): same models, same behaviour."""

from __future__ import annotations

from typing import Iterator

import pytest

from tests.support import fresh_postgres_db


@pytest.fixture
def pg_url() -> Iterator[str]:
    with fresh_postgres_db() as url:
        yield url


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
