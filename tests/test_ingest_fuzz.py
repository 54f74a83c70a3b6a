"""Fuzzing the MQTT payload decoding with hypothesis (issue 9): `Ingest.handle(topic, payload)` is what
turns every message the broker delivers into registry updates (ollama_fleet.contract.protocol decode +
check, then the Registry handlers).

Properties:
* arbitrary bytes and arbitrary JSON (deep, wrong types, lone surrogates, NUL, huge numbers) never raise
  out of handle(), and never reach the catch-all (`dropped.handler_error`): bad input is a
  ProtocolError, counted by reason;
* what reaches the registry is clean text (no lone surrogate, no NUL, bounded length), and the rows the
  registry then hands to the flusher are accepted by a real SQLite database without a single drop.

Example counts are bounded (the whole file runs in seconds); no example database is written.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ollama_fleet.controller.db import init_db
from ollama_fleet.controller.hub import Hub
from ollama_fleet.controller.registry.ingest import Ingest
from ollama_fleet.controller.registry.live import MAX_TEXT, Registry
from ollama_fleet.controller.registry.store import BatchStats, apply_batch
from ollama_fleet.contract.protocol import NODE_TOPICS, STRING_MAX, decode
from ollama_fleet.settings import CONTROLLER, load

FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
NODE, SESSION = "fz-a", "f" * 32
KINDS = sorted(NODE_TOPICS)
BAD_TEXT = re.compile("[\ud800-\udfff\x00]")
# VARCHAR(255) columns filled from agent payloads
COLUMNS = ("hostname", "ollama_url", "ollama_version", "agent_version")

# Text that breaks encoders: lone surrogates, NUL, control characters, and plain text around them.
hostile_text = st.text(
    alphabet=st.one_of(st.characters(codec=None), st.sampled_from(["\ud800", "\udfff", "\x00", "\u2028"])),
    max_size=40,
) | st.sampled_from(["\ud800", "a\x00b", "x" * 5000, "=HYPERLINK()", ""])
json_scalar = (st.none() | st.booleans() | st.integers() | st.integers(min_value=2**63, max_value=2**80)
               | st.floats(allow_nan=False, allow_infinity=False) | hostile_text)
json_value = st.recursive(
    json_scalar,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(hostile_text, inner, max_size=5),
    max_leaves=30,
)


def _base(kind: str) -> dict[str, Any]:
    """A valid document of `kind`, so the fuzzed fields get past the envelope and reach the handlers."""
    docs: dict[str, dict[str, Any]] = {
        "state": {"state": "online", "hb_interval": 5},
        "heartbeat": {"ts": 1.0, "seq": 1, "gpus": [{"index": 0}]},
        "info": {"hostname": "h", "ollama": {"url": "http://127.0.0.1:11434", "up": True}},
        "gpus": {"gpus": [{"index": 0, "name": "g"}]},
        "models": {"models": [{"name": "m"}]},
        "running": {"models": [{"name": "m"}]},
        "events": {"event": "e"},
        "jobs": {"job_id": "j1", "status": "running"},
    }
    return {"v": 1, "session": SESSION, **docs[kind]}


@st.composite
def fuzzed_doc(draw: st.DrawFn) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(KINDS))
    doc = _base(kind)
    for _ in range(draw(st.integers(0, 3))):  # replace a field (possibly a required one) by anything
        _set(doc, draw(st.sampled_from(_paths(doc))), draw(json_value))
    doc.update(draw(st.dictionaries(hostile_text, json_value, max_size=4)))  # unknown fields of any kind
    if kind in ("gpus", "models", "running") and draw(st.booleans()):  # several items, duplicates included
        item = doc.get(kind if kind == "gpus" else "models")
        if isinstance(item, list) and item:
            item.extend(draw(st.lists(st.sampled_from(item) | json_value, max_size=4)))
    topic = f"fleet/v1/nodes/{NODE}/{kind}" + ("/j1" if kind == "jobs" else "")
    return topic, json.dumps(doc).encode()  # ensure_ascii: surrogates and NUL travel as \u escapes


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = []
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else []
    for k, v in items:
        if k != "v":
            out.append((*prefix, k))
            out.extend(_paths(v, (*prefix, k)))
    return out


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> None:
    for k in path[:-1]:
        doc = doc[k]
    doc[path[-1]] = value


def _strings(value: Any) -> Iterator[str]:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            yield v
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)


def _fresh() -> Ingest:
    registry = Registry(Hub())
    ingest = Ingest(load([CONTROLLER], env={}), registry)
    ingest.handle(f"fleet/v1/nodes/{NODE}/state",
                  json.dumps({"v": 1, "state": "online", "session": SESSION}).encode())
    assert NODE in registry.agents
    return ingest


@pytest.fixture(scope="module")
def sqlite_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    database = init_db(f"sqlite:///{Path(tmp_path_factory.mktemp('fuzz')) / 'fuzz.db'}")
    with database.connection_context():
        yield
    database.close()


def _handled_cleanly(ingest: Ingest, topic: str, payload: bytes) -> None:
    before = ingest.counters["received"]
    ingest.handle(topic, payload)  # must not raise
    assert ingest.counters["received"] == before + 1
    assert ingest.counters.get("dropped.handler_error", 0) == 0, f"a handler crashed on {payload[:300]!r}"


@FUZZ
@given(kind=st.sampled_from(KINDS), payload=st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(kind: str, payload: bytes) -> None:
    _handled_cleanly(_fresh(), f"fleet/v1/nodes/{NODE}/{kind}", payload)


@FUZZ
@given(topic=hostile_text | st.text(max_size=60).map(lambda t: f"fleet/v1/nodes/{t}")
       | st.sampled_from([f"fleet/v1/nodes/{NODE}/{k}/x/y" for k in KINDS] + ["fleet/v1/cmd/_controller/\ud800"]),
       payload=st.binary(max_size=50))
def test_arbitrary_topics_never_raise(topic: str, payload: bytes) -> None:
    ingest = _fresh()
    _handled_cleanly(ingest, topic, payload)
    assert all(not BAD_TEXT.search(s) for s in _strings(ingest.registry._events))


@FUZZ
@given(depth=st.integers(0, 5000), kind=st.sampled_from(KINDS), opener=st.sampled_from(["[", '{"k":']))
def test_deep_nesting_is_a_counted_drop(depth: int, kind: str, opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    body = opener * depth + "1" + closer * depth
    ingest = _fresh()
    _handled_cleanly(ingest, f"fleet/v1/nodes/{NODE}/{kind}",
                     json.dumps(_base(kind))[:-1].encode() + b',"deep":' + body.encode() + b"}")


@FUZZ
@given(case=fuzzed_doc())
def test_what_reaches_the_registry_is_clean_and_storable(case: tuple[str, bytes], sqlite_db: None) -> None:
    topic, payload = case
    ingest = _fresh()
    _handled_cleanly(ingest, topic, payload)
    registry = ingest.registry
    a = registry.agents[NODE]
    everything = [a.to_json(), a.info, a.metrics, a.loaded, a.models, a.gpus, registry._events]
    for s in _strings(everything):
        assert not BAD_TEXT.search(s), f"unclean text {s!r} from {payload[:300]!r}"
        assert len(s) <= STRING_MAX
    for col in COLUMNS:
        assert len(getattr(a, col) or "") <= MAX_TEXT
    assert all(len(m["name"]) <= MAX_TEXT for m in a.models)
    json.dumps(a.to_json()).encode("utf-8")  # what the API sends
    stats = BatchStats()
    apply_batch(registry.drain(), stats)  # real SQLite: the sanitiser alone must make every row storable
    assert stats.dropped == 0, f"rows dropped for {payload[:300]!r}"


@FUZZ
@given(value=json_value)
def test_decode_returns_clean_objects_or_raises_protocol_error(value: Any) -> None:
    from ollama_fleet.contract.protocol import ProtocolError

    raw = json.dumps({"v": 1, "x": value}).encode()
    try:
        doc = decode(raw, 65536)
    except ProtocolError:
        return
    assert all(not BAD_TEXT.search(s) and len(s) <= STRING_MAX for s in _strings(doc))
