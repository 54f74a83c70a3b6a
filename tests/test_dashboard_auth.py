"""Dashboard login, session cookie and CSRF protection (admin_token set), and the `/` redirect for
browsers that must leave Ollama clients alone."""

from __future__ import annotations

import re

import httpx
from playwright.sync_api import expect

from tests.browser import browser_fixture, open_live, page_fixture  # noqa: F401 (fixtures)

TOKEN = "s3cret-admin-token"


def _client(c) -> httpx.Client:
    return httpx.Client(base_url=c.url, timeout=10, trust_env=False)


def _login(http: httpx.Client) -> str:
    """Log in with the form; returns the page's CSRF token."""
    r = http.post("/dashboard/login", data={"token": TOKEN, "next": "/dashboard/agents"})
    assert r.status_code == 303 and r.headers["location"] == "/dashboard/agents", r.text
    body = http.get("/dashboard/agents").text
    return re.search(r'name="csrf-token" content="([0-9a-f]+)"', body).group(1)


def test_root_redirects_browsers_only(fleet):
    c = fleet.controller()
    browser_accept = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
    r = c.http.get("/", headers={"accept": browser_accept})
    assert r.status_code == 302 and r.headers["location"] == "/dashboard"
    for headers in ({}, {"accept": "*/*"}, {"accept": "application/json"}, {"accept": "text/plain, text/html;q=0.5"}):
        r = c.http.get("/", headers=headers)
        assert r.status_code == 200 and r.text == "Ollama is running", headers
    assert c.http.head("/").status_code == 200


def test_login_required_session_cookie_and_csrf(fleet):
    c = fleet.controller(fleet_admin_token=TOKEN)
    fleet.agent("auth-a")
    c.wait_agent("auth-a", status="online")
    with _client(c) as http:
        r = http.get("/dashboard/agents?status=online")
        assert r.status_code == 303
        assert r.headers["location"] == "/dashboard/login?next=%2Fdashboard%2Fagents%3Fstatus%3Donline"
        assert http.get("/dashboard/stream?view=agents").status_code == 401
        assert http.get("/dashboard/data/series.json").status_code == 401
        assert http.get("/dashboard/agents.csv").status_code == 303
        assert http.get("/dashboard/static/dashboard.css").status_code == 200  # assets need no login

        r = http.post("/dashboard/login", data={"token": "wrong", "next": "/dashboard"})
        assert r.status_code == 401 and "not correct" in r.text and "fleet_session" not in r.headers.get("set-cookie", "")
        r = http.post("/dashboard/login", data={"token": TOKEN, "next": "https://evil.example/"})
        assert r.headers["location"] == "/dashboard"  # no open redirect
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
        csrf = _login(http)
        assert http.get("/dashboard/agents").status_code == 200

        # the cookie authorises the management API, but a write needs the CSRF token too
        url = "/api/agents/auth-a/settings"
        assert http.put(url, json={"display_name": "Forged"}).status_code == 403
        assert http.put(url, json={"display_name": "Forged"}, headers={"x-csrf-token": "0" * 32}).status_code == 403
        r = http.put(url, json={"display_name": "Real"}, headers={"x-csrf-token": csrf})
        assert r.status_code == 200 and r.json()["name"] == "Real"
        # without the cookie: the API still wants the bearer token, which still works alone
        assert c.http.put(url, json={"notes": "x"}).status_code == 401
        assert c.http.put(url, json={"notes": "x"}, headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200

        # a tampered or foreign cookie is no session
        value = http.cookies["fleet_session"]
        with _client(c) as other:
            other.cookies.set("fleet_session", value[:-1] + ("0" if value[-1] != "0" else "1"))
            assert other.get("/dashboard").status_code == 303
            assert other.put(url, json={"notes": "y"}, headers={"x-csrf-token": csrf}).status_code == 401

        assert http.post("/dashboard/logout").status_code == 403  # logging out is a write too
        r = http.post("/dashboard/logout", data={"csrf_token": csrf})
        assert r.status_code == 303 and "max-age=0" in r.headers["set-cookie"].lower()
        assert http.get("/dashboard").status_code == 303


def test_browser_login_then_actions_carry_csrf(fleet, page):
    c = fleet.controller(fleet_admin_token=TOKEN)
    fleet.agent("auth-b")
    c.wait_agent("auth-b", status="online")
    page.goto(c.url + "/dashboard/agents/auth-b")
    expect(page.locator("h1")).to_have_text("Log in")
    page.get_by_label("Admin token").fill("nope")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("alert")).to_contain_text("not correct")
    page.get_by_label("Admin token").fill(TOKEN)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url("**/dashboard/agents/auth-b")
    page.wait_for_selector("#live-state[data-state=open]")  # the stream is authorised by the cookie
    cookie = next(k for k in page.context.cookies() if k["name"] == "fleet_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

    page.get_by_label("Display name").fill("Secured Box")
    page.get_by_role("button", name="Save settings").click()
    expect(page.locator("#agent-live h1")).to_have_text("Secured Box")

    # a forged request: the browser's cookie, but no CSRF token
    forged = page.request.post(c.url + "/api/agents/auth-b/disconnect")
    assert forged.status == 403 and "CSRF" in forged.json()["error"]
    assert c.agent("auth-b")["status"] == "online"
    # a cross-site form post: the SameSite=Strict cookie is not even sent
    page.set_content(f'<form method="post" action="{c.url}/dashboard/logout"><button>go</button></form>')
    page.get_by_role("button", name="go").click()
    page.wait_for_load_state()
    assert page.url.startswith(c.url) and "fleet_session" in {k["name"] for k in page.context.cookies()}

    open_live(page, c.url + "/dashboard")
    page.get_by_role("button", name="Log out").click()
    page.wait_for_url("**/dashboard/login")
    page.goto(c.url + "/dashboard")
    expect(page.locator("h1")).to_have_text("Log in")
    assert not page.js_errors, page.js_errors
