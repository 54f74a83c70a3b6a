"""Issue 9, HTTP side, against a real controller (+ agent + fake Ollama where a route needs one):
browser origins and DNS rebinding, reads behind the token, the viewer token, throttling of wrong
credentials, server-side sessions, trusted reverse proxies."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.support import wait_until

ADMIN, VIEWER = "adm-tok-0123456789", "view-tok-0123456789"
EVIL = "http://evil.example"

# every state-changing endpoint a drive-by page could reach (issue 9, item 1)
WRITES = [
    ("/api/pull", {"model": "llama3.2"}),
    ("/api/models/distribute", {"model": "llama3.2", "target": "all"}),
    ("/api/agents/sec-a/models/pull", {"model": "llama3.2"}),
    ("/api/create", {"model": "x", "from": "llama3.2"}),
    ("/api/copy", {"source": "llama3.2", "destination": "evil"}),
    ("/api/agents/sec-a/disconnect", {}),
]
READS = ["/api/agents", "/api/agents/sec-a", "/api/requests", "/api/events", "/api/tasks", "/api/models/available",
         "/api/models/matrix", "/api/ingest"]


def _client(c, **headers: str) -> httpx.Client:
    return httpx.Client(base_url=c.url, timeout=10, trust_env=False, headers=headers)


@pytest.fixture
def open_fleet(fleet):
    """The newcomer's default: no admin token, loopback bind."""
    c = fleet.controller()
    fleet.agent("sec-a")
    c.wait_agent("sec-a", status="online")
    return c


def test_cross_origin_writes_are_refused(open_fleet):
    c = open_fleet
    for path, body in WRITES:
        import json

        r = c.http.post(path, content=json.dumps(body), headers={"origin": EVIL, "content-type": "text/plain"})
        assert r.status_code == 403, (path, r.status_code, r.text)
        assert "origin" in r.json()["error"]
        r = c.http.post(path, content=json.dumps(body), headers={"origin": "null", "content-type": "text/plain"})
        assert r.status_code == 403, path
    assert c.agent("sec-a")["status"] == "online"  # the disconnect never happened
    # OpenAI surface: OpenAI's error object
    r = c.http.post("/v1/chat/completions", json={"model": "m", "messages": []}, headers={"origin": EVIL})
    assert r.status_code == 403 and "origin" in r.json()["error"]["message"]
    # the controller's own pages (same origin) and clients that send no Origin go on working
    own = c.url
    assert c.http.get("/api/agents", headers={"origin": own}).status_code == 200
    assert c.http.put("/api/agents/sec-a/settings", json={"notes": "mine"}, headers={"origin": own}).status_code == 200
    assert c.http.put("/api/agents/sec-a/settings", json={"notes": "curl"}).status_code == 200
    assert c.http.get("/api/version", headers={"origin": EVIL}).status_code == 403


def test_dns_rebinding_host_names_refused_on_loopback(open_fleet):
    c = open_fleet
    port = c.port
    for host in ("evil.example", f"evil.example:{port}", f"rebind.attacker.test:{port}"):
        r = c.http.get("/api/agents", headers={"host": host})
        assert r.status_code == 403, host
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", f"fleet.localhost:{port}"):
        assert c.http.get("/api/agents", headers={"host": host}).status_code == 200, host


def test_allowed_origins_get_cors(fleet):
    c = fleet.controller(fleet_allowed_origins="http://localhost:*,https://ui.example")
    for origin in ("http://localhost:3000", "https://ui.example"):
        r = c.http.get("/api/version", headers={"origin": origin})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
        pre = c.http.request("OPTIONS", "/api/chat", headers={
            "origin": origin, "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type"})
        assert pre.status_code == 204 and pre.headers["access-control-allow-origin"] == origin
        assert "authorization" in pre.headers["access-control-allow-headers"].lower()
    for origin in ("http://localhost.evil.example", "https://ui.example.evil", "http://ui.example"):
        assert c.http.get("/api/version", headers={"origin": origin}).status_code == 403, origin
        pre = c.http.request("OPTIONS", "/api/chat", headers={"origin": origin, "access-control-request-method": "POST"})
        assert pre.status_code == 403 and "access-control-allow-origin" not in pre.headers


def test_reads_need_a_token_and_the_viewer_only_reads(fleet):
    c = fleet.controller(fleet_admin_token=ADMIN, fleet_viewer_token=VIEWER)
    fleet.agent("sec-a")
    c.wait_agent("sec-a", status="online")
    for path in READS:
        assert c.http.get(path).status_code == 401, path
        assert c.http.get(path, headers={"authorization": f"Bearer {ADMIN}"}).status_code == 200, path
        assert c.http.get(path, headers={"authorization": f"Bearer {VIEWER}"}).status_code == 200, path
    for path in ("/healthz", "/api/version", "/"):
        assert c.http.get(path).status_code == 200, path
    viewer = {"authorization": f"Bearer {VIEWER}"}
    r = c.http.put("/api/agents/sec-a/settings", json={"notes": "x"}, headers=viewer)
    assert r.status_code == 403 and "read-only" in r.json()["error"]
    for path, body in WRITES:
        assert c.http.post(path, json=body, headers=viewer).status_code == 403, path
        assert c.http.post(path, json=body).status_code == 401, path
    assert c.agent("sec-a")["status"] == "online"
    # a viewer logs in to the dashboard and sees it, but its session cannot change anything
    with _client(c) as http:
        assert http.post("/dashboard/login", data={"token": VIEWER, "next": "/dashboard"}).status_code == 303
        page = http.get("/dashboard/agents")
        assert page.status_code == 200 and "data-read-only" in page.text and ">read-only<" in page.text
        csrf = re.search(r'name="csrf-token" content="([0-9a-f]+)"', page.text).group(1)
        r = http.put("/api/agents/sec-a/settings", json={"notes": "v"}, headers={"x-csrf-token": csrf})
        assert r.status_code == 403
        assert http.get("/api/agents").status_code == 200


def test_without_admin_token_only_direct_loopback_clients_manage(fleet):
    """A reverse proxy on the same host must not turn every remote client into a local one."""
    c = fleet.controller()
    assert c.http.get("/api/agents").status_code == 200
    for h in ({"x-forwarded-for": "203.0.113.9"}, {"x-real-ip": "203.0.113.9"}, {"forwarded": "for=203.0.113.9"}):
        r = c.http.get("/api/agents", headers=h)
        assert r.status_code == 403 and "admin_token" in r.json()["error"], h
    assert c.http.get("/dashboard", headers={"x-forwarded-for": "203.0.113.9", "accept": "text/html"}).status_code == 403


def test_wrong_tokens_are_throttled_per_address_and_logged_without_the_secret(fleet):
    c = fleet.controller(fleet_admin_token=ADMIN, fleet_trusted_proxies="127.0.0.1/32")
    attacker = {"x-forwarded-for": "198.51.100.7"}
    codes = [c.http.get("/api/agents", headers={**attacker, "authorization": f"Bearer guess-{i}"}).status_code
             for i in range(12)]
    assert codes[:10] == [401] * 10 and codes[10:] == [429, 429]
    r = c.http.get("/api/agents", headers={**attacker, "authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0  # no oracle while throttled
    r = c.http.post("/dashboard/login", data={"token": ADMIN}, headers=attacker)
    assert r.status_code == 429
    # another address is unaffected
    ok = {"x-forwarded-for": "198.51.100.8", "authorization": f"Bearer {ADMIN}"}
    assert c.http.get("/api/agents", headers=ok).status_code == 200
    log = wait_until(lambda: "198.51.100.7" in c.log() and c.log(), 5, what="auth failure logged")
    assert "guess-" not in log and ADMIN not in log


def test_wrong_logins_throttled_and_global_budget(fleet):
    c = fleet.controller(fleet_admin_token=ADMIN, fleet_trusted_proxies="127.0.0.1")
    with _client(c, **{"x-forwarded-for": "192.0.2.1"}) as http:
        codes = [http.post("/dashboard/login", data={"token": f"nope{i}"}).status_code for i in range(11)]
    assert codes[:10] == [401] * 10 and codes[10] == 429
    # a distributed guesser: one wrong token from each of many addresses spends the fleet-wide budget
    for i in range(100):
        c.http.get("/api/agents", headers={"x-forwarded-for": f"10.9.{i // 250}.{i % 250 + 1}",
                                           "authorization": "Bearer wrong"})
    r = c.http.get("/api/agents", headers={"x-forwarded-for": "10.99.0.1", "authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 429 and r.headers["retry-after"]


def test_global_budget_spares_clients_already_at_work(fleet):
    """A distributed guesser cannot lock out clients that authenticated before it started."""
    c = fleet.controller(fleet_admin_token=ADMIN, fleet_trusted_proxies="127.0.0.1")
    worker = {"x-forwarded-for": "10.8.0.1", "authorization": f"Bearer {ADMIN}"}
    assert c.http.get("/api/agents", headers=worker).status_code == 200
    for i in range(100):
        c.http.get("/api/agents", headers={"x-forwarded-for": f"10.9.0.{i + 1}", "authorization": "Bearer wrong"})
    newcomer = {"x-forwarded-for": "10.7.0.1", "authorization": f"Bearer {ADMIN}"}
    assert c.http.get("/api/agents", headers=newcomer).status_code == 429
    assert c.http.get("/api/agents", headers=worker).status_code == 200


def test_rebinding_cannot_borrow_the_loopback_newcomer_rule_on_a_lan_bind(fleet):
    """Bound to 0.0.0.0 without a token: a rebinding page arrives from a loopback peer, but with its own
    host name, so it is not the local newcomer."""
    c = fleet.controller(fleet_host="0.0.0.0")
    port = c.port
    for path in ("/api/agents", "/api/requests"):
        r = c.http.get(path, headers={"host": f"evil.example:{port}", "origin": f"http://evil.example:{port}"})
        assert r.status_code == 403, path
    r = c.http.post("/api/copy", content=b'{"source":"a","destination":"b"}',
                    headers={"host": f"evil.example:{port}", "origin": f"http://evil.example:{port}",
                             "content-type": "text/plain"})
    assert r.status_code == 403
    assert c.http.get("/api/agents").status_code == 200  # the real local user


def test_malformed_credentials_origins_and_hosts_are_4xx(fleet):
    c = fleet.controller(fleet_admin_token=ADMIN)
    for headers in ({"authorization": b"Bearer \xff\xfe"}, {"cookie": b"fleet_session=\xff"},
                    {"authorization": "Bearer " + "x" * 5000}):
        r = c.http.get("/api/agents", headers=headers)
        assert r.status_code == 401, (headers, r.status_code, r.text[:200])
    for headers in ({"origin": "http://["}, {"origin": "http://a:99999"}, {"host": "["}, {"host": "a:notaport"},
                    {"origin": "\u00e9".encode("latin-1")}):
        r = c.http.get("/api/version", headers=headers)
        assert r.status_code == 403, (headers, r.status_code)
    assert "Traceback" not in c.log()


def test_a_trusted_tls_proxy_may_forward_the_public_name(fleet):
    """The docs' nginx setup: loopback bind, `Host $host`, the proxy listed in trusted_proxies."""
    c = fleet.controller(fleet_admin_token=ADMIN, fleet_trusted_proxies="127.0.0.1")
    public = {"host": "fleet.example.com", "x-forwarded-proto": "https", "x-forwarded-for": "198.51.100.20"}
    r = c.http.post("/dashboard/login", data={"token": ADMIN}, headers={**public, "origin": "https://fleet.example.com"})
    assert r.status_code == 303 and "secure" in r.headers["set-cookie"].lower()
    r = c.http.get("/api/agents", headers={**public, "authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200
    # a page elsewhere is still refused through the proxy
    r = c.http.post("/dashboard/login", data={"token": ADMIN}, headers={**public, "origin": "https://evil.example"})
    assert r.status_code == 403


def test_wrong_api_keys_are_throttled(fleet):
    from tests.proxy_support import chat_body, fleet_cli

    c = fleet.controller(fleet_admin_token=ADMIN)
    key = fleet_cli("keys", "add", "k", "--data-dir", str(fleet.tmp)).stdout.strip()
    wait_until(lambda: c.http.post("/api/chat", json=chat_body()).status_code == 401, 10, what="keys loaded")
    codes = [c.http.post("/v1/chat/completions", json=chat_body(), headers={"authorization": f"Bearer fk-{i}"})
             .status_code for i in range(11)]
    assert codes[-1] == 429
    r = c.http.post("/v1/chat/completions", json=chat_body(), headers={"authorization": f"Bearer {key}"})
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error" and r.headers["retry-after"]


def test_logout_ends_the_session_on_the_server_and_secure_behind_tls(fleet):
    c = fleet.controller(fleet_admin_token=ADMIN, fleet_trusted_proxies="127.0.0.1")
    with _client(c) as http:
        r = http.post("/dashboard/login", data={"token": ADMIN, "next": "/dashboard"})
        assert r.status_code == 303 and "secure" not in r.headers["set-cookie"].lower()
        cookie = http.cookies["fleet_session"]
        csrf = re.search(r'name="csrf-token" content="([0-9a-f]+)"', http.get("/dashboard").text).group(1)
    c.restart()  # sessions live in the database: a restart keeps them
    with _client(c) as copy:
        copy.cookies.set("fleet_session", cookie)
        assert copy.get("/dashboard").status_code == 200
        assert copy.post("/dashboard/logout", data={"csrf_token": csrf}).status_code == 303
    with _client(c) as stolen:  # the same cookie value, kept by someone else: dead now
        stolen.cookies.set("fleet_session", cookie)
        assert stolen.get("/dashboard").status_code == 303
        assert stolen.get("/api/agents").status_code == 401
    # TLS terminated by a trusted proxy: Secure cookie; the same header from an untrusted peer is ignored
    r = c.http.post("/dashboard/login", data={"token": ADMIN}, headers={"x-forwarded-proto": "https"})
    assert "secure" in r.headers["set-cookie"].lower()


def test_untrusted_forwarded_proto_is_ignored(fleet):
    c = fleet.controller(fleet_admin_token=ADMIN)
    r = c.http.post("/dashboard/login", data={"token": ADMIN}, headers={"x-forwarded-proto": "https"})
    assert r.status_code == 303 and "secure" not in r.headers["set-cookie"].lower()


def test_viewer_token_needs_admin_token(fleet):
    from tests.support import Controller

    c = Controller(fleet.tmp, fleet.broker.url("controller"), {"FLEET_VIEWER_TOKEN": VIEWER}, wait=False)
    try:
        assert c.proc is not None and c.proc.wait(20) != 0
        assert "viewer_token needs admin_token" in c.log()
    finally:
        c.close()


def test_the_security_doc_states_the_real_limits():
    """docs/security.md quotes these numbers: keep it honest."""
    from ollama_fleet.controller.edge import throttle
    from ollama_fleet.controller.dashboard.login import SESSION_TTL
    from ollama_fleet.settings import BY_NAME
    from tests.support import ROOT

    doc = " ".join((ROOT / "docs" / "security.md").read_text().split())
    assert f"After {throttle.PER_ADDRESS} failures from one client address within {throttle.WINDOW:.0f} s" in doc
    assert f"After {throttle.GLOBAL} failures from all addresses" in doc
    assert f"in the last {throttle.GOOD_FOR / 3600:.0f} hour" in doc.replace("last hour", "last 1 hour")
    assert f"end after {SESSION_TTL // 3600} h" in doc
    assert f"`header_timeout` ({BY_NAME['header_timeout'].default:g} s)" in doc
    assert f"`body_timeout` ({BY_NAME['body_timeout'].default:g} s)" in doc
    assert f"`max_body_bytes` ({BY_NAME['max_body_bytes'].default >> 20} MiB" in doc
