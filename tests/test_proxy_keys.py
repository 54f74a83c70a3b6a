"""API keys: managed with `fleet keys`, stored hashed, required by every proxy endpoint once one exists,
failing closed when the last is revoked; management then needs the admin token."""

from __future__ import annotations

import json

import httpx
import ollama
import openai
import pytest

from ollama_fleet.controller.proxy.forward import KEYS_RELOAD_EVERY
from tests.proxy_support import chat_body, db_rows, fleet_cli, start_fleet, wait_routable
from tests.support import wait_until


def _openai(c, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=c.url + "/v1", api_key=key, max_retries=0, http_client=httpx.Client(trust_env=False))


ADMIN = "adm1n-token-for-keys"


def test_keys_lifecycle_with_both_sdks(fleet):
    c, fakes = start_fleet(fleet, "key-a", controller_env={"fleet_admin_token": ADMIN})
    wait_routable(c, "key-a")
    data_dir = str(fleet.tmp)
    assert c.http.post("/api/chat", json=chat_body()).status_code == 200  # no key yet: open

    added = fleet_cli("keys", "add", "alice", "--data-dir", data_dir)
    assert added.returncode == 0, added.stderr
    key = added.stdout.strip()
    assert key.startswith("fk-") and len(key) > 40 and "cannot be shown again" in added.stderr
    wait_until(lambda: c.http.post("/api/chat", json=chat_body()).status_code == 401, 10,
               what="the controller to pick up the new key")

    r = c.http.post("/api/chat", json=chat_body())
    assert r.json()["error"].startswith("unauthorized")
    r = c.http.post("/v1/chat/completions", json=chat_body(), headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"
    assert r.json()["error"]["code"] == "invalid_api_key"
    for path in ("/api/tags", "/api/ps"):
        assert c.http.get(path).status_code == 401
    assert c.http.get("/v1/models").status_code == 401
    assert c.http.get("/").status_code == 200 and c.http.get("/api/version").status_code == 200
    assert c.http.get("/api/agents").status_code == 401  # management API: governed by admin_token instead
    assert c.http.get("/api/agents", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    assert c.api.get("/api/agents").status_code == 200

    msgs = [{"role": "user", "content": "x"}]
    with ollama.Client(host=c.url, trust_env=False, headers={"Authorization": f"Bearer {key}"}) as oll:
        assert oll.chat(model="llama3.2", messages=msgs).message.content
        assert [m.model for m in oll.list().models]
    with ollama.Client(host=c.url, trust_env=False) as anonymous, pytest.raises(ollama.ResponseError) as e:
        anonymous.chat(model="llama3.2", messages=msgs)
    assert e.value.status_code == 401
    with _openai(c, key) as oai:
        assert oai.chat.completions.create(model="llama3.2", messages=msgs).choices
        assert [m.id for m in oai.models.list()]
    with _openai(c, "fk-nope") as bad, pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="llama3.2", messages=msgs)
    assert "authorization" not in fakes["key-a"].stats()["last_headers"]["/v1/chat/completions"]

    log = c.api.get("/api/requests").json()["requests"]
    assert log[0]["status"] == 401 and log[0]["key"] is None
    assert {x["key"] for x in log if x["status"] == 200} == {None, "alice"}

    listed = fleet_cli("keys", "list", "--json", "--data-dir", data_dir)
    rows = json.loads(listed.stdout)
    assert [(r["name"], r["revoked"]) for r in rows] == [("alice", None)] and key not in listed.stdout
    stored = db_rows(fleet.tmp, "select hash, prefix from apikey")
    assert len(stored) == 1 and key not in stored[0][0] and key.startswith(stored[0][1])

    revoked = fleet_cli("keys", "revoke", "alice", "--data-dir", data_dir)
    assert revoked.returncode == 0 and "revoked key 1 (alice)" in revoked.stdout
    assert fleet_cli("keys", "revoke", "alice", "--data-dir", data_dir).returncode == 1
    # the last key revoked: keys fail closed, the proxy stays locked
    with ollama.Client(host=c.url, trust_env=False, headers={"Authorization": f"Bearer {key}"}) as oll:
        wait_until(lambda: c.http.post("/api/chat", json=chat_body(),
                                       headers={"Authorization": f"Bearer {key}"}).status_code == 401, 10,
                   what="revocation picked up")
        with pytest.raises(ollama.ResponseError) as e:
            oll.chat(model="llama3.2", messages=msgs)
        assert e.value.status_code == 401
    assert c.http.post("/api/chat", json=chat_body()).status_code == 401
    # only an explicit purge of the revoked keys opens it again
    purged = fleet_cli("keys", "purge", "--data-dir", data_dir)
    assert purged.returncode == 0 and "deleted 1 revoked key" in purged.stdout and "OPEN" in purged.stdout
    wait_until(lambda: c.http.post("/api/chat", json=chat_body()).status_code == 200, 10, what="keys reloaded")


def test_keys_without_admin_token_lock_management(fleet):
    """Management is never open merely because keys exist: without an admin token it is refused."""
    c, _ = start_fleet(fleet, "key-c")
    assert c.http.get("/api/agents").status_code == 200  # no keys, no token: a loopback newcomer manages
    key = fleet_cli("keys", "add", "bob", "--data-dir", str(fleet.tmp)).stdout.strip()
    wait_until(lambda: c.http.get("/api/agents").status_code == 403, 10, what="keys picked up")
    for headers in ({}, {"Authorization": f"Bearer {key}"}):
        r = c.http.get("/api/agents", headers=headers)
        assert r.status_code == 403 and "admin_token" in r.json()["error"]
        r = c.http.put("/api/agents/key-c/settings", json={"notes": "x"}, headers=headers)
        assert r.status_code == 403
    # the proxy itself follows the key
    assert c.http.post("/api/chat", json=chat_body(), headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_a_revoked_key_stops_working_while_others_do(fleet):
    c, _ = start_fleet(fleet, "key-b")
    wait_routable(c, "key-b")
    keep = fleet_cli("keys", "add", "keep", "--data-dir", str(fleet.tmp)).stdout.strip()
    drop = fleet_cli("keys", "add", "drop", "--data-dir", str(fleet.tmp)).stdout.strip()

    def status(key: str) -> int:
        return c.http.post("/api/generate", json={"model": "llama3.2", "prompt": "x", "stream": False},
                           headers={"Authorization": f"Bearer {key}"}).status_code

    # Every 401 counts against this client's 10 failed credentials a minute (controller/edge/throttle.py):
    # poll no faster than the key reload (2 s), so a reload that lands between the two `keys add` costs
    # a failure or two, not the whole budget (then every answer would be 429 until the window passes).
    every = KEYS_RELOAD_EVERY * 1.25
    wait_until(lambda: status(drop) == 200 and status("fk-other") == 401, 20, every, what="keys active")
    assert fleet_cli("keys", "revoke", drop[:10], "--data-dir", str(fleet.tmp)).returncode == 0  # by prefix
    wait_until(lambda: status(drop) == 401, 20, every, what="revocation picked up")
    assert status(keep) == 200
