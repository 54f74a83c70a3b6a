"""Bounded request bodies on the proxy routes: limits (413 in the API's shape), large bodies spooled and
passed on intact, and the fields the proxy reads found in them without parsing them whole."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from tests.proxy_support import start_fleet, wait_routable

LIMIT = 8 << 20  # small enough for CI; the bench uses the default (64 MiB)
MANAGEMENT_LIMIT = 1 << 20


def sized_body(size: int, seed: int, model: str = "llama3.2", stream: bool = False, model_last: bool = False) -> bytes:
    """A chat request with a base64 image, padded to exactly `size` bytes."""
    head = {"messages": [{"role": "user", "content": "what is this?", "images": [""]}]}
    tail = {"model": model, "stream": stream}
    doc = {**head, **tail} if model_last else {**tail, **head}
    skeleton = len(json.dumps(doc).encode())
    raw = os.urandom(size)  # more than enough
    image = base64.b64encode(raw).decode()[:size - skeleton]
    doc["messages"][0]["images"][0] = image
    out = json.dumps(doc).encode()
    assert len(out) == size, (len(out), size)
    return out


def chunked(data: bytes, piece: int = 100_000) -> Iterator[bytes]:
    """No Content-Length: httpx sends a generator as Transfer-Encoding: chunked."""
    for i in range(0, len(data), piece):
        yield data[i:i + piece]


def _client(c: Any) -> httpx.Client:
    return httpx.Client(base_url=c.url, timeout=60, trust_env=False)


def test_six_concurrent_max_size_bodies_arrive_intact_and_one_byte_more_is_413(fleet):
    c, fakes = start_fleet(fleet, "big-a", controller_env={"fleet_max_body_bytes": str(LIMIT)})
    wait_routable(c, "big-a")
    bodies = [sized_body(LIMIT, i, model_last=i % 2 == 1) for i in range(6)]

    def send(i: int) -> tuple[int, str]:
        content: Any = bodies[i] if i < 3 else chunked(bodies[i])  # half of them without Content-Length
        with _client(c) as http:
            r = http.post("/api/chat", content=content)
        return r.status_code, r.text

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(send, range(6)))
    assert all(status == 200 for status, _ in results), results
    got = {d["sha256"] for d in fakes["big-a"].stats()["body_digests"] if d["bytes"] == LIMIT}
    assert got == {hashlib.sha256(b).hexdigest() for b in bodies}

    over = sized_body(LIMIT + 1, 9)
    r = c.http.post("/api/chat", content=over)
    assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]
    r = c.http.post("/v1/chat/completions", content=over)
    assert r.status_code == 413
    assert r.json()["error"]["type"] == "invalid_request_error" and "too large" in r.json()["error"]["message"]
    with _client(c) as http:
        r = http.post("/api/chat", content=chunked(over))  # the limit holds while a chunked body streams in
    assert r.status_code == 413 and r.json()["error"]
    # refused before any agent saw them
    assert not [d for d in fakes["big-a"].stats()["body_digests"] if d["bytes"] > LIMIT]
    # the controller still serves, and the refusals are in the log
    assert c.http.post("/api/chat", content=sized_body(1000, 1)).status_code == 200
    log = c.http.get("/api/requests", params={"status": "413"}).json()
    assert log["total"] == 3 and {x["endpoint"] for x in log["requests"]} == {"/api/chat", "/v1/chat/completions"}

    # management endpoints take small JSON only
    r = c.http.put("/api/agents/big-a/settings", content=b'{"notes":"' + b"x" * MANAGEMENT_LIMIT + b'"}')
    assert r.status_code == 413


def test_fields_of_a_large_body_are_found_without_parsing_it_whole(fleet):
    c, fakes = start_fleet(fleet, "scan-a", controller_env={"fleet_max_body_bytes": str(LIMIT)})
    wait_routable(c, "scan-a", models=("llama3.2:latest", "qwen2.5:0.5b"))
    size = 3 << 20  # above the in-memory parse threshold: the scanner path
    # `model` after the image, nested keys named `model` and `stream` ignored, escapes in the name
    doc = json.loads(sized_body(size, 1, model_last=True))
    doc["messages"][0]["model"] = "nope"
    doc["options"] = {"stream": False, "model": "nope"}
    doc["model"] = "qwen2.5:0.5b"
    raw = json.dumps(doc).replace('"qwen2.5:0.5b"', '"qwen2\\u002e5:0.5b"').encode()
    r = c.http.post("/api/chat", content=raw)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "qwen2.5:0.5b"
    assert fakes["scan-a"].stats()["body_digests"][-1]["sha256"] == hashlib.sha256(raw).hexdigest()

    # `stream` read from the large body: NDJSON comes back line by line
    with _client(c) as http, http.stream("POST", "/api/chat", content=sized_body(size, 2, stream=True)) as r:
        lines = [json.loads(x) for x in r.iter_lines() if x]
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    assert len(lines) > 1 and lines[-1]["done"] is True

    # bad large bodies: 400 in the API's shape, nothing forwarded (checked by digest: the agent's own
    # probes of the same fake Ollama may add bodies meanwhile, so a count would race)
    good = sized_body(size, 3)
    sent = set()
    for bad, why in ((good[:-1], "end"), (b"[" + good + b"]", "object"), (good + b"x", "trailing"),
                     (good.replace(b'"llama3.2"', b'{"x":1}    '), "model is required"),
                     (b'{"model":"' + b"m" * size + b'"}', "too long")):
        sent.add(hashlib.sha256(bad).hexdigest())
        r = c.http.post("/api/chat", content=bad)
        assert r.status_code == 400 and why in r.json()["error"], (why, r.text)
    r = c.http.post("/v1/chat/completions", content=good[:-1])
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    forwarded = {d["sha256"] for d in fakes["scan-a"].stats()["body_digests"]}
    assert hashlib.sha256(raw).hexdigest() in forwarded and not sent & forwarded
