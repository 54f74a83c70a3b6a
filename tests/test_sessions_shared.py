"""Dashboard sessions across controllers (controller/dashboard/login.py): two controller processes with the
same admin token on one PostgreSQL database. A login on one holds on the other at once (a load balancer may
send the next request anywhere); a logout on one ends the session on the other at once for writes and within
RECHECK_EVERY for reads."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import httpx
import pytest

from ollama_fleet.controller.dashboard.login import COOKIE, RECHECK_EVERY
from tests.support import Controller, fresh_postgres_db, wait_until
from tests.test_dashboard_auth import TOKEN, _login

WRITE = "/api/agents/nobody/settings"  # past the guard an unknown agent is 404: the status says who decided


@pytest.fixture
def pg_url() -> Iterator[str]:
    with fresh_postgres_db() as url:
        yield url


def _client(c: Controller) -> httpx.Client:
    return httpx.Client(base_url=c.url, timeout=10, trust_env=False)


def _csrf(page: str) -> str:
    found = re.search(r'name="csrf-token" content="([0-9a-f]+)"', page)
    assert found, page[:500]
    return found.group(1)


def test_a_login_holds_on_every_controller_and_a_logout_ends_it_on_all(fleet, pg_url):
    a = fleet.controller(fleet_admin_token=TOKEN, fleet_database_url=pg_url)
    b = fleet.controller(account="controller-2", fleet_admin_token=TOKEN, fleet_database_url=pg_url)
    # a client per controller and session: a cookie jar ignores ports, each controller must see only its own
    with _client(a) as on_a, _client(b) as on_b, _client(a) as on_a2, _client(b) as on_b2:
        csrf, csrf2 = _login(on_a), _login(on_a2)
        on_b.cookies.set(COOKIE, on_a.cookies[COOKIE])
        on_b2.cookies.set(COOKIE, on_a2.cookies[COOKIE])

        # B never saw these logins: it finds the sessions in the database
        r = on_b.get("/dashboard/agents")
        assert r.status_code == 200, (r.status_code, r.headers.get("location"))
        assert _csrf(r.text) == csrf  # the same session, so the same CSRF token
        assert on_b.get("/api/agents").status_code == 200
        assert on_b.put(WRITE, json={"notes": "x"}).status_code == 403  # CSRF is still required
        assert on_b.put(WRITE, json={"notes": "x"}, headers={"x-csrf-token": csrf}).status_code == 404
        assert on_b2.get("/dashboard/agents").status_code == 200

        # a bogus cookie of the right shape is refused on B, and asking again changes nothing
        with _client(b) as stranger:
            stranger.cookies.set(COOKIE, "A" * 43)
            for _ in range(3):
                assert stranger.get("/dashboard/agents").status_code == 303

        # both log out on A; B knows both sessions (seen just now)
        for client, token in ((on_a, csrf), (on_a2, csrf2)):
            r = client.post("/dashboard/logout", data={"csrf_token": token})
            assert r.status_code == 303 and r.headers["location"] == "/dashboard/login"
        ended = time.monotonic()
        # a write on B re-reads the session: refused at once
        assert on_b2.put(WRITE, json={"notes": "x"}, headers={"x-csrf-token": csrf2}).status_code == 401
        # reads on B: refused within RECHECK_EVERY
        wait_until(lambda: on_b.get("/dashboard/agents").status_code == 303, RECHECK_EVERY + 5,
                   what="B refusing the cookie logged out on A")
        assert time.monotonic() - ended < RECHECK_EVERY + 2
        assert on_b.get("/api/agents").status_code == 401
        with _client(a) as again:  # and on A, where it was ended
            again.cookies.set(COOKIE, on_b.cookies[COOKIE])
            assert again.get("/dashboard/agents").status_code == 303
