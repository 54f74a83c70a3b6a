"""Topic tree v1: names, QoS/retain per topic, and cheap payload checks (specs/mqtt.md is the prose).

Agents and the controller both import this module, so the contract lives in exactly one place.
The JSON Schemas under specs/schemas/ describe the same payloads; tests check both agree.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, cast

from ollama_fleet.contract.sanitize import clean_tree, depth, loads_strict
from ollama_fleet.contract.status import WIRE_STATES

PROTO = 1  # payload "v"; the topic's /v1 is the major version
PROTO_RANGE = (1, 1)

NODE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
# Broker accounts that are roles, not nodes (broker/fleet.acl grants them by name): `controller`,
# `controller-2`, … (one per controller process, docs/scaling.md) and `operator`. No agent may take one.
ROLE_ACCOUNT_RE = re.compile(r"^(controller(-[0-9]{1,4})?|operator)$")

# Node topics: kind -> (qos, retain). `jobs/<id>` is retained status; `events` is a log stream.
NODE_TOPICS: dict[str, tuple[int, bool]] = {
    "state": (1, True),
    "info": (1, True),
    "gpus": (1, True),
    "models": (1, True),
    "running": (1, True),
    "heartbeat": (0, False),
    "events": (1, False),
    "jobs": (1, True),
}
RETAINED_KINDS = tuple(k for k, (_, r) in NODE_TOPICS.items() if r and k != "jobs")

# Controller-to-controller topics (several controllers, docs/scaling.md): kind -> (qos, retain), under
# `controllers/<instance>/`, where the instance is a controller process's session id. Agents never read them.
PEER_KINDS: dict[str, tuple[int, bool]] = {
    "registry": (1, False),  # an operator's change to the registry made on one controller: all apply it
    "load": (0, False),  # its in-flight requests, slots and queue, every LOAD_EVERY (controller/cluster/load.py)
}
SESSION_RE = re.compile(r"^[0-9a-f]{32}$")  # a controller instance (new_session)

# Payload hardening (decode): every string is cleaned (lone surrogates and NUL replaced, invalid UTF-8
# replaced) and cut, and nesting is bounded, so nothing downstream (registry, JSON columns, SQL) can fail
# on what an agent sent. Real payloads nest 4 levels and carry strings far shorter than these.
STRING_MAX = 4096  # characters per string (keys too)
DEPTH_MAX = 32  # levels of objects/arrays
SESSION_MAX = 64  # a session id is a uuid4 hex (32); the database column holds 64

# A controller's load document (controllers/<instance>/load): maps and counts are bounded here; the sender
# also cuts a document to its byte budget (controller/cluster/load.py LOAD_BYTES, under max_payload_bytes).
LOAD_MAPS = ("inflight", "slots", "queued")  # agent -> requests in flight, agent -> admission slots, model -> queued
LOAD_ENTRIES_MAX = 512  # entries per map
LOAD_COUNT_MAX = 1_000_000  # per entry
MODEL_KEY_MAX = 255  # characters of a model name in `queued`

STATES = WIRE_STATES  # what an agent (or its will) says about itself
CONTROLLER_NODE = "_controller"  # fleet-level commands the controller obeys: cmd/_controller/<verb>
BROADCAST_NODE = "_all"


class ProtocolError(ValueError):
    """A message that does not follow the contract; `reason` is a short counter key."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def new_session() -> str:
    return uuid.uuid4().hex


def now() -> float:
    return time.time()


@dataclass(frozen=True)
class Topics:
    prefix: str = "fleet/v1"

    def node(self, node_id: str, kind: str) -> str:
        return f"{self.prefix}/nodes/{node_id}/{kind}"

    def job(self, node_id: str, job_id: str) -> str:
        return f"{self.prefix}/nodes/{node_id}/jobs/{job_id}"

    def cmd(self, node_id: str, verb: str) -> str:
        return f"{self.prefix}/cmd/{node_id}/{verb}"

    @property
    def controller_status(self) -> str:
        return f"{self.prefix}/controller/status"

    @property
    def nodes_wildcard(self) -> str:
        return f"{self.prefix}/nodes/#"

    @property
    def controller_cmd_wildcard(self) -> str:
        return f"{self.prefix}/cmd/{CONTROLLER_NODE}/+"

    def peer(self, instance: str, kind: str) -> str:
        """`<prefix>/controllers/<instance>/<kind>`: what one controller tells the others (PEER_KINDS)."""
        return f"{self.prefix}/controllers/{instance}/{kind}"

    def parse_peer_topic(self, topic: str) -> tuple[str, str]:
        """`<prefix>/controllers/<instance>/<kind>` -> (instance, kind) or ProtocolError."""
        head = self.prefix + "/controllers/"
        parts = topic[len(head):].split("/") if topic.startswith(head) else []
        if len(parts) != 2 or not SESSION_RE.match(parts[0]) or parts[1] not in PEER_KINDS:
            raise ProtocolError("unknown_topic", topic)
        return parts[0], parts[1]

    def agent_subscriptions(self, node_id: str) -> list[str]:
        return [f"{self.prefix}/cmd/{node_id}/+", f"{self.prefix}/cmd/{BROADCAST_NODE}/+", self.controller_status]

    def parse_node_topic(self, topic: str) -> tuple[str, str, str | None]:
        """`<prefix>/nodes/<node>/<kind>[/<job_id>]` -> (node, kind, job_id) or ProtocolError."""
        head = self.prefix + "/nodes/"
        if not topic.startswith(head):
            raise ProtocolError("unknown_topic", topic)
        parts = topic[len(head):].split("/")
        node = parts[0]
        if not NODE_ID_RE.match(node):
            raise ProtocolError("bad_node_id", topic)
        if len(parts) == 2 and parts[1] in NODE_TOPICS and parts[1] != "jobs":
            return node, parts[1], None
        if len(parts) == 3 and parts[1] == "jobs" and JOB_ID_RE.match(parts[2]):
            return node, "jobs", parts[2]
        raise ProtocolError("unknown_topic", topic)

    def parse_cmd_topic(self, topic: str) -> tuple[str, str]:
        head = self.prefix + "/cmd/"
        parts = topic[len(head):].split("/") if topic.startswith(head) else []
        if len(parts) != 2 or not parts[1]:
            raise ProtocolError("unknown_topic", topic)
        return parts[0], parts[1]


def encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def decode(raw: bytes | bytearray | memoryview | str, max_bytes: int) -> dict[str, Any]:
    """Parse and check the envelope every payload shares: a JSON object with a supported `v`.

    Never raises anything but ProtocolError. The result is clean: invalid UTF-8 became U+FFFD, lone
    surrogates and NUL in strings (and keys) became U+FFFD, strings are at most STRING_MAX characters
    and the document nests at most DEPTH_MAX levels."""
    data = raw.encode("utf-8", "replace") if isinstance(raw, str) else bytes(raw)
    if len(data) > max_bytes:
        raise ProtocolError("oversized", f"{len(data)} bytes")
    text = data.decode("utf-8", "replace")
    try:
        doc = loads_strict(text)
    except ValueError as e:  # bad JSON, NaN, too deep for the parser, ints beyond Python's digit limit
        raise ProtocolError("bad_json", str(e)[:80]) from None
    if not isinstance(doc, dict):
        raise ProtocolError("bad_payload", "not a JSON object")
    # A string can only hold a surrogate or NUL through a \u escape, and can only be too long in a long
    # payload: the usual small heartbeat skips the cleaning pass.
    if "\\u" in text or len(text) > STRING_MAX:
        doc = clean_tree(doc, STRING_MAX)
    if text.count("{") + text.count("[") > DEPTH_MAX and depth(doc) > DEPTH_MAX:
        raise ProtocolError("bad_payload", f"nested deeper than {DEPTH_MAX} levels")
    v = doc.get("v")
    if not isinstance(v, int) or isinstance(v, bool):
        raise ProtocolError("bad_payload", "missing integer 'v'")
    if not PROTO_RANGE[0] <= v <= PROTO_RANGE[1]:
        raise ProtocolError("unsupported_version", f"v={v}")
    return cast(dict[str, Any], doc)


def _require(doc: dict[str, Any], key: str, types: type | tuple[type, ...]) -> Any:
    value = doc.get(key)
    bool_where_number = isinstance(value, bool) and bool not in _as_tuple(types)
    if bool_where_number or not isinstance(value, types):
        raise ProtocolError("bad_payload", f"'{key}' must be {_names(types)}")
    return value


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _names(types: type | tuple[type, ...]) -> str:
    return "/".join(t.__name__ for t in _as_tuple(types))


def _list_of_dicts(doc: dict[str, Any], key: str) -> list[dict[str, Any]]:
    items = _require(doc, key, list)
    if not all(isinstance(i, dict) for i in items):
        raise ProtocolError("bad_payload", f"'{key}' must be a list of objects")
    return cast(list[dict[str, Any]], items)


NUM = (int, float)


def check(kind: str, doc: dict[str, Any]) -> dict[str, Any]:
    """Validate the fields the controller relies on for this topic kind; unknown fields are allowed."""
    session = doc.get("session")
    if isinstance(session, str) and len(session) > SESSION_MAX:
        raise ProtocolError("bad_payload", f"'session' longer than {SESSION_MAX} characters")
    if kind == "state":
        if _require(doc, "state", str) not in STATES:
            raise ProtocolError("bad_payload", f"unknown state {doc['state']!r}")
        _require(doc, "session", str)
    elif kind == "heartbeat":
        _require(doc, "session", str)
        _require(doc, "ts", NUM)
        for g in _list_of_dicts(doc, "gpus") if "gpus" in doc else []:
            _require(g, "index", int)
    elif kind == "info":
        _require(doc, "hostname", str)
        _require(doc, "ollama", dict)
    elif kind == "gpus":
        for g in _list_of_dicts(doc, "gpus"):
            _require(g, "index", int)
            _require(g, "name", str)
    elif kind in ("models", "running"):
        for m in _list_of_dicts(doc, "models"):
            _require(m, "name", str)
    elif kind == "jobs":
        _require(doc, "job_id", str)
        _require(doc, "status", str)
    elif kind == "events":
        _require(doc, "event", str)
    return doc


def check_load(doc: dict[str, Any], instance: str) -> dict[str, Any]:
    """Validate a controller's load document (after `decode`) published on `instance`'s topic."""
    if _require(doc, "instance", str) != instance:
        raise ProtocolError("bad_payload", "'instance' differs from the topic's")
    _require(doc, "ts", NUM)
    _require(doc, "leader", bool)
    for key in LOAD_MAPS:
        counts = _require(doc, key, dict)
        if len(counts) > LOAD_ENTRIES_MAX:
            raise ProtocolError("bad_payload", f"'{key}' has more than {LOAD_ENTRIES_MAX} entries")
        for name, n in counts.items():
            ok_name = len(name) <= MODEL_KEY_MAX if key == "queued" else NODE_ID_RE.match(name) is not None
            if not ok_name or not name:
                raise ProtocolError("bad_payload", f"'{key}' has a bad name")
            if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= LOAD_COUNT_MAX:
                raise ProtocolError("bad_payload", f"'{key}' counts must be integers 0..{LOAD_COUNT_MAX}")
    return doc


def state_payload(state: str, session: str, **extra: Any) -> dict[str, Any]:
    return {"v": PROTO, "state": state, "session": session, "ts": now(), **extra}
