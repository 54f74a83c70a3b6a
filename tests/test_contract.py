"""The MQTT contract: specs/mqtt.md and specs/schemas/ against the code that implements them.

* every schema is a valid draft 2020-12 schema that types every field it names;
* payloads built by the real agent (fake Ollama, fake NVML, a recording stand-in for the MQTT client)
  validate against the schemas, use the QoS/retain of `protocol.NODE_TOPICS`, and are applied
  by the real controller ingest without a single drop;
* `protocol.decode` + `check` (ollama_fleet.contract.protocol) accept what the schemas accept and
  reject what they reject, with the few deliberate leniencies listed in SCHEMA_ONLY (and in specs/mqtt.md);
* the liveness rules the spec states (sessions, wills, rebirth, stale, snapshots before state);
* specs/mqtt.md's topic table, ACL copy, defaults and shell examples match the code.

No broker and no sleeps: the agent talks to `RecordingBroker`, and every wait is on an event.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import shlex
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Self

import aiomqtt
import pytest
from jsonschema import Draft202012Validator
from referencing import Registry as SchemaRegistry
from referencing import Resource

import ollama_fleet.agent.gpu as agent_gpu
from ollama_fleet.agent.service import Agent
from ollama_fleet.controller.hub import Hub
from ollama_fleet.controller.registry.ingest import Ingest
from ollama_fleet.controller.registry.live import Registry
from ollama_fleet import mqtt as fmqtt
from ollama_fleet.contract import protocol
from ollama_fleet import settings
from ollama_fleet.contract.protocol import NODE_ID_RE, NODE_TOPICS, ProtocolError, Topics
from tests.fake_ollama import start_fake_ollama

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "specs" / "mqtt.md"
SCHEMA_DIR = ROOT / "specs" / "schemas"
ACL = ROOT / "broker" / "fleet.acl"

KIND_SCHEMA = {
    "state": "state.json", "info": "info.json", "gpus": "gpus.json", "models": "models.json",
    "running": "running.json", "heartbeat": "heartbeat.json", "events": "event.json", "jobs": "job-status.json",
}
OTHER_SCHEMAS = {"command.json", "controller-status.json", "controller-load.json"}
SNAPSHOTS = ("info", "gpus", "models", "running")  # what the agent publishes after every birth, in order
VERBS = ("agent.rebirth", "agent.disconnect", "model.pull", "model.delete", "job.cancel", "distribute")
NODE = "gpu-01"
MAX = 65536
TOPICS = Topics()

# Fields the schemas require but protocol.check() lets through; specs/mqtt.md lists each one
# ("What the controller requires of each payload"). A path the check starts to reject must leave
# this table, a new leniency must enter it: either way the test below fails until both agree.
SCHEMA_ONLY = {
    ("state", "hb_interval"): "birth without it: the controller keeps the last known interval",
    ("state", "agent"): "birth without it: agent version unknown",
    ("state", "agent.version"): "ditto",
    ("state", "agent.proto"): "ditto",
    ("info", "session"): "accepted by check(), then ignored by the registry as stale_session",
    ("info", "ollama.url"): "accepted, but the node has no URL to route to",
    ("info", "ollama.up"): "accepted, Ollama flag left as it was",
    ("gpus", "session"): "ignored as stale_session",
    ("models", "session"): "ignored as stale_session",
    ("running", "session"): "ignored as stale_session",
    ("heartbeat", "ollama"): "accepted, Ollama flag then only follows info",
    ("heartbeat", "ollama.up"): "ditto",
    ("jobs", "seq"): "check() does not look at it; the job handler must discard updates without it",
    ("jobs", "error"): "failed/rejected without error: check() does not look at it",
}


# ---- schemas -------------------------------------------------------------------------------------

def _load_schemas() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(SCHEMA_DIR.glob("*.json"))}


SCHEMAS = _load_schemas()
_REGISTRY = SchemaRegistry().with_resources(
    [(s["$id"], Resource.from_contents(s)) for s in SCHEMAS.values() if "$id" in s])


def validator(name: str, verb: str | None = None) -> Draft202012Validator:
    schema = SCHEMAS[name]
    if verb is not None:
        assert verb in schema["$defs"], f"{name} has no $defs/{verb}"
        return Draft202012Validator({"$ref": f"{schema['$id']}#/$defs/{verb}"}, registry=_REGISTRY)
    return Draft202012Validator(schema, registry=_REGISTRY)


def assert_valid(name: str, doc: Any, verb: str | None = None) -> None:
    errors = sorted(validator(name, verb).iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, f"{name}{'#' + verb if verb else ''}: " + "; ".join(
        f"{'/'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errors)


def accepted(kind: str, doc: Any) -> bool:
    """What the controller's ingest does before a payload reaches the registry."""
    try:
        protocol.check(kind, protocol.decode(protocol.encode(doc), MAX))
    except ProtocolError:
        return False
    return True


def test_schema_directory_holds_exactly_the_contract() -> None:
    assert set(SCHEMAS) == set(KIND_SCHEMA.values()) | OTHER_SCHEMAS


@pytest.mark.parametrize("name", sorted(set(KIND_SCHEMA.values()) | OTHER_SCHEMAS))
def test_schema_is_valid_draft_2020_12(name: str) -> None:
    schema = SCHEMAS[name]
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)
    assert schema["$id"].endswith("/" + name)
    assert schema["type"] == "object" and "v" in schema["required"]
    assert schema.get("additionalProperties", True) is True, "forward compatibility: extra fields allowed"
    assert schema.get("examples"), "every schema carries examples"
    for example in schema["examples"]:
        assert_valid(name, example)
    untyped = list(_untyped_properties(schema))
    assert not untyped, f"properties without a type: {untyped}"


def _untyped_properties(node: Any, path: str = "") -> Iterator[str]:
    if isinstance(node, dict):
        for key, sub in (node.get("properties") or {}).items():
            if not isinstance(sub, dict) or not ({"type", "enum", "const", "$ref", "oneOf"} & sub.keys()):
                yield f"{path}/{key}"
        for key, sub in node.items():
            if key != "examples":
                yield from _untyped_properties(sub, f"{path}/{key}")
    elif isinstance(node, list):
        for i, sub in enumerate(node):
            yield from _untyped_properties(sub, f"{path}/{i}")


def test_command_schema_has_every_verb_and_examples_match_them() -> None:
    schema = SCHEMAS["command.json"]
    assert set(schema["$defs"]) == set(VERBS)
    good = {
        "agent.rebirth": {"v": 1}, "agent.disconnect": {"v": 1, "pause_s": 60},
        "model.pull": {"v": 1, "model": "llama3.1:8b"}, "model.delete": {"v": 1, "model": "llama3.1:8b"},
        "job.cancel": {"v": 1, "job_id": "op-1"},
        "distribute": {"v": 1, "model_name": "llama3.1:8b", "target": "specific", "agent_ids": ["gpu-01"]},
    }
    bad = {
        "agent.rebirth": {"v": 2}, "agent.disconnect": {"v": 1, "pause_s": 0},
        "model.pull": {"v": 1, "job_id": "op-1"}, "model.delete": {"v": 1, "model": ""},
        "job.cancel": {"v": 1},
        "distribute": {"v": 1, "model_name": "llama3.1:8b", "target": "some"},
    }
    for verb in VERBS:
        assert_valid("command.json", good[verb], verb)
        assert not validator("command.json", verb).is_valid(bad[verb]), (verb, bad[verb])
    assert not validator("command.json", "model.pull").is_valid({"v": 1, "model": "x", "job_id": "bad id"})


# ---- protocol.check against the schemas ----------------------------------------------------------

def _paths(doc: dict[str, Any]) -> Iterator[tuple[str, tuple[Any, ...]]]:
    """Every top-level key, every key of a nested object, every key of a list's first object."""
    for key, value in doc.items():
        yield key, (key,)
        if isinstance(value, dict):
            for sub in value:
                yield f"{key}.{sub}", (key, sub)
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for sub in value[0]:
                yield f"{key}[].{sub}", (key, 0, sub)


def _locate(doc: dict[str, Any], keys: tuple[Any, ...]) -> tuple[Any, Any]:
    parent: Any = doc
    for k in keys[:-1]:
        parent = parent[k]
    return parent, keys[-1]


def _wrong(value: Any) -> Any:
    return "wrong" if isinstance(value, (dict, list)) else {"wrong": 1}


@pytest.mark.parametrize("kind", sorted(KIND_SCHEMA))
def test_check_and_schema_agree_on_required_fields(kind: str) -> None:
    """(c) check() accepts every valid example and rejects what the schema requires, bar SCHEMA_ONLY."""
    name = KIND_SCHEMA[kind]
    val = validator(name)
    lenient_seen = set()
    for example in SCHEMAS[name]["examples"]:
        assert accepted(kind, example), f"check() rejects a valid {kind} example: {example}"
        for path, keys in _paths(example):
            removed, wrong = copy.deepcopy(example), copy.deepcopy(example)
            parent, key = _locate(removed, keys)
            del parent[key]
            parent, key = _locate(wrong, keys)
            parent[key] = _wrong(parent[key])
            if val.is_valid(removed):  # optional for the schema: check() must not need it either
                assert accepted(kind, removed), f"{kind}: check() needs {path}, the schema does not"
                continue
            lenient = (kind, path) in SCHEMA_ONLY
            lenient_seen |= {path} if lenient else set()
            assert not val.is_valid(wrong), f"{kind}: schema does not type required {path}"
            for mutation, doc in (("missing", removed), ("mistyped", wrong)):
                assert accepted(kind, doc) == lenient, (
                    f"{kind} with {path} {mutation}: schema rejects, check() "
                    f"{'accepts' if accepted(kind, doc) else 'rejects'}; update SCHEMA_ONLY and specs/mqtt.md together")
    expected = {path for (k, path) in SCHEMA_ONLY if k == kind}
    assert lenient_seen == expected, f"SCHEMA_ONLY entries never exercised: {expected - lenient_seen}"


@pytest.mark.parametrize("kind", sorted(KIND_SCHEMA))
def test_unsupported_version_and_booleans_are_rejected_by_both(kind: str) -> None:
    name = KIND_SCHEMA[kind]
    example = SCHEMAS[name]["examples"][0]
    for bad_v in (2, 0, True, "1", None):
        doc = {**example, "v": bad_v}
        assert not validator(name).is_valid(doc) and not accepted(kind, doc), bad_v
    with pytest.raises(ProtocolError) as e:
        protocol.decode(protocol.encode({**example, "v": 2}), MAX)
    assert e.value.reason == "unsupported_version"
    numeric = [k for k in ("ts",) if k in SCHEMAS[name]["required"]]
    for key in numeric:  # JSON true is not a number, for the schema nor for check()
        doc = {**example, key: True}
        assert not validator(name).is_valid(doc) and not accepted(kind, doc)


def test_state_enum_matches_protocol() -> None:
    assert tuple(SCHEMAS["state.json"]["properties"]["state"]["enum"]) == protocol.STATES
    example = SCHEMAS["state.json"]["examples"][0]
    for state in ("stale", "init", "draining", "ONLINE"):
        doc = {**example, "state": state}
        assert not validator("state.json").is_valid(doc) and not accepted("state", doc)


def test_job_status_examples_cover_every_status_shape() -> None:
    schema = SCHEMAS["job-status.json"]
    assert schema["properties"]["status"]["enum"] == [
        "pending", "in_progress", "completed", "failed", "cancelled", "rejected"]
    assert schema["properties"]["job_id"]["pattern"] == protocol.JOB_ID_RE.pattern
    assert SCHEMAS["command.json"]["properties"]["job_id"]["pattern"] == protocol.JOB_ID_RE.pattern
    ok = {"v": 1, "job_id": "j1", "status": "completed", "seq": 9, "progress": 1}
    assert_valid("job-status.json", ok)
    assert_valid("job-status.json", {**ok, "status": "failed", "error": "boom"})
    for bad in ({**ok, "status": "SUCCEEDED"}, {**ok, "progress": 1.5}, {**ok, "seq": 0},
                {**ok, "status": "failed"}, {**ok, "status": "rejected", "error": None},
                {**ok, "status": "failed", "error": ""}, {**ok, "job_id": "bad id"}):
        assert not validator("job-status.json").is_valid(bad), bad


# ---- the real agent ------------------------------------------------------------------------------

class FakeNvml:
    """Just enough of pynvml for agent.gpu: GPU 0 answers everything, GPU 1 is a consumer card."""

    NVML_TEMPERATURE_GPU = 0

    class NVMLError(Exception):
        pass

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlSystemGetDriverVersion(self) -> bytes:
        return b"550.54.15"

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        return SimpleNamespace(total=85520809984 >> h, used=9663676416 >> h, free=0)

    def nvmlDeviceGetUUID(self, h: int) -> str:
        if h:
            raise self.NVMLError("NotSupported")
        return "GPU-5f0e9a43-1c1d-4c3b-9d52-2f1b8a3c7e11"

    def nvmlDeviceGetName(self, h: int) -> Any:
        return b"NVIDIA GeForce RTX 4090" if h else "NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        return SimpleNamespace(gpu=87 - h, memory=40)

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        if h:
            raise self.NVMLError("NotSupported")
        return 71

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        if h:
            raise self.NVMLError("NotSupported")
        return 312400


PS_MODEL = {  # static /api/ps entry (the fake's own entries move expires_at on every call)
    "name": "llama3.2:latest", "model": "llama3.2:latest", "size": 2019393189,
    "digest": "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72",
    "details": {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
                "parameter_size": "3.2B", "quantization_level": "Q4_K_M"},
    "expires_at": "2030-01-01T00:00:00+00:00", "size_vram": 2019393189, "context_length": 4096,
}


@pytest.fixture(scope="module")
def fake_ollama() -> Iterator[Any]:
    with start_fake_ollama("contract", config={"ps": [PS_MODEL]}) as fake:
        yield fake


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_gpu, "pynvml", FakeNvml())


def make_agent(ollama_url: str, **settings_: Any) -> Agent:
    args = {"node_id": NODE, "ollama_url": ollama_url, "mqtt_url": "mqtt://gpu-01:secret@127.0.0.1:1883",
            "heartbeat_interval": 30, **settings_}
    return Agent(settings.load(["agent"], args, env={}))


@dataclass
class Pub:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Any

    @property
    def doc(self) -> dict[str, Any]:
        return json.loads(self.payload)

    @property
    def kind(self) -> str:
        return TOPICS.parse_node_topic(self.topic)[1]


CORE = ("state", *SNAPSHOTS, "heartbeat")  # the rest (events, jobs) comes from the Ollama manager, any time


class RecordingBroker:
    """Stands in for aiomqtt.Client: records connects, subscriptions, publishes; feeds `inbox` to the agent."""

    def __init__(self) -> None:
        self.connects: list[dict[str, Any]] = []
        self.subscriptions: list[tuple[str, int]] = []
        self.log: list[Pub | str] = []  # publishes, "connect", "disconnect"
        self.inbox: asyncio.Queue[Any] = asyncio.Queue()
        self.cond = asyncio.Condition()

    def client(self, **kwargs: Any) -> RecordingClient:
        self.connects.append(kwargs)
        return RecordingClient(self)

    async def record(self, entry: Pub | str) -> None:
        async with self.cond:
            self.log.append(entry)
            self.cond.notify_all()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10) -> None:
        async with self.cond:
            await asyncio.wait_for(self.cond.wait_for(predicate), timeout)

    def send(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.inbox.put_nowait(SimpleNamespace(topic=topic, payload=payload, qos=1, retain=retain))

    def cut(self) -> None:
        """The connection breaks: the agent's message loop raises MqttError."""
        self.inbox.put_nowait(aiomqtt.MqttError("connection lost"))

    @property
    def pubs(self) -> list[Pub]:
        return [e for e in self.log if isinstance(e, Pub)]

    def core(self) -> list[Pub]:
        return [p for p in self.pubs if p.kind in CORE]

    def births(self) -> list[Pub]:
        return [p for p in self.pubs if p.kind == "state" and p.doc["state"] == "online"]

    def count(self, kind: str) -> int:
        return sum(1 for p in self.pubs if p.kind == kind)

    def after(self, birth: Pub) -> dict[str, Pub]:
        """The latest snapshot of each kind published after this birth (and before the next state)."""
        out: dict[str, Pub] = {}
        pubs = self.pubs
        i = next(n for n, p in enumerate(pubs) if p is birth)
        for p in pubs[i + 1:]:
            if p.kind == "state":
                break
            if p.kind in SNAPSHOTS:
                out[p.kind] = p
        return out

    def reborn(self, n: int) -> Callable[[], bool]:
        """Predicate: the n-th birth and all four snapshots after it are out."""
        return lambda: len(self.births()) >= n and self.after(self.births()[n - 1]).keys() == set(SNAPSHOTS)

    def left(self) -> Pub:
        """The state published last before the (first) DISCONNECT; nothing of CORE may follow it."""
        i = self.log.index("disconnect")
        core = [e for e in self.log[:i] if isinstance(e, Pub) and e.kind in CORE]
        assert core[-1].kind == "state", f"{core[-1].kind} published after the last state"
        return core[-1]


class RecordingClient:
    def __init__(self, broker: RecordingBroker) -> None:
        self.broker = broker

    async def __aenter__(self) -> Self:
        await self.broker.record("connect")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.broker.record("disconnect")

    async def subscribe(self, topic: str, qos: int = 0, **kw: Any) -> None:
        self.broker.subscriptions.append((topic, qos))

    async def publish(self, topic: str, payload: Any = None, qos: int = 0, retain: bool = False,
                      properties: Any = None, **kw: Any) -> None:
        await self.broker.record(Pub(topic, payload, qos, retain, properties))

    @property
    def messages(self) -> Any:
        return self._messages()

    async def _messages(self) -> Any:
        while True:
            item = await self.broker.inbox.get()
            if isinstance(item, BaseException):
                raise item
            yield item


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch) -> RecordingBroker:
    b = RecordingBroker()
    monkeypatch.setattr(aiomqtt, "Client", b.client)
    monkeypatch.setattr(fmqtt, "Client", b.client)  # the connect loops build ollama_fleet.mqtt's subclass
    monkeypatch.setattr(fmqtt, "RECONNECT_MIN", 0.0)  # reconnect at once: no waiting in tests
    monkeypatch.setattr(fmqtt, "RECONNECT_MAX", 0.0)
    return b


class Running:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.task = asyncio.create_task(agent.run())

    async def stop(self) -> None:
        self.agent.stop()
        await asyncio.wait_for(self.task, 10)


@pytest.fixture
async def running() -> Any:
    started: list[Running] = []

    def start(agent: Agent) -> Running:
        started.append(Running(agent))
        return started[-1]

    yield start
    for r in started:
        r.agent.stop()
        if not r.task.done():
            await asyncio.wait_for(r.task, 10)


def check_node_publish(p: Pub, session: str) -> dict[str, Any]:
    """One agent publish against the contract: topic, QoS/retain, schema, check(), session."""
    node, kind, job_id = TOPICS.parse_node_topic(p.topic)
    assert node == NODE
    assert (p.qos, p.retain) == NODE_TOPICS[kind], f"{kind}: qos/retain {(p.qos, p.retain)}"
    doc = p.doc
    assert_valid(KIND_SCHEMA[kind], doc)
    assert accepted(kind, doc), f"check() rejects the agent's own {kind}: {doc}"
    assert doc["session"] == session
    if kind == "jobs":
        assert doc["job_id"] == job_id
    if kind != "heartbeat":
        assert p.properties is None, f"{kind} must not expire"
    return doc


@pytest.mark.parametrize("mqtt_protocol", ["5", "311"])
async def test_agent_connection_follows_the_contract(broker: RecordingBroker, running: Any, fake_ollama: Any,
                                                     fake_nvml: None, mqtt_protocol: str) -> None:
    agent = make_agent(fake_ollama.url, mqtt_protocol=mqtt_protocol)
    r = running(agent)
    await broker.wait_for(lambda: broker.count("heartbeat") >= 1)

    # connect: client id, username, protocol, Last Will "lost" with this connection's session
    kw = broker.connects[0]
    assert kw["identifier"] == f"fleet-agent-{NODE}" and kw["username"] == NODE
    assert kw["protocol"] == (aiomqtt.ProtocolVersion.V5 if mqtt_protocol == "5" else aiomqtt.ProtocolVersion.V311)
    will = kw["will"]
    assert (will.topic, will.qos, will.retain) == (TOPICS.node(NODE, "state"), 1, True)
    will_doc = json.loads(will.payload)
    assert_valid("state.json", will_doc)
    assert will_doc["state"] == "lost" and accepted("state", will_doc)
    session = will_doc["session"]
    assert session == agent.session

    # subscriptions before any publish, then birth, the four snapshots, the first heartbeat
    assert broker.log[0] == "connect"
    assert broker.subscriptions == [(t, 1) for t in TOPICS.agent_subscriptions(NODE)]
    first = broker.core()[:6]
    assert [p.kind for p in first] == ["state", *SNAPSHOTS, "heartbeat"]
    docs = {p.kind: check_node_publish(p, session) for p in first}
    birth = docs["state"]
    assert birth["state"] == "online" and birth["hb_interval"] == 30 and birth["seq"] == 0
    assert birth["agent"]["proto"] == list(protocol.PROTO_RANGE)
    ollama = docs["info"]["ollama"]
    assert (ollama["url"], ollama["version"], ollama["up"]) == (fake_ollama.url, "0.12.6", True)
    assert "disk_free" not in docs["info"] and docs["heartbeat"]["disk_free"] > 0
    assert [g["index"] for g in docs["gpus"]["gpus"]] == [0, 1]
    assert docs["gpus"]["gpus"][1]["uuid"] is None  # NotSupported fields fail soft to null
    assert docs["heartbeat"]["gpus"][1]["power"] is None and docs["heartbeat"]["gpus"][0]["power"] == 312.4
    assert "llama3.2:latest" in [m["name"] for m in docs["models"]["models"]]
    assert docs["running"]["models"][0]["name"] == docs["heartbeat"]["loaded"][0] == "llama3.2:latest"
    assert docs["heartbeat"]["ollama"]["up"] is True
    expiry = first[5].properties
    if mqtt_protocol == "5":  # spec: message expiry 3 x hb_interval on heartbeats
        assert expiry.MessageExpiryInterval == 3 * 30
    else:
        assert expiry is None

    # controller announce (the real controller's payload): birth + snapshots again, same session
    ingest = make_ingest()
    assert_valid("controller-status.json", json.loads(ingest._status(True)))
    # a retained status predates the connection: the birth already covers it, no second birth
    broker.send(TOPICS.controller_status, ingest._status(True), retain=True)
    # a live announcement (a controller starting now) is answered with birth + snapshots
    ingest = make_ingest()
    broker.send(TOPICS.controller_status, ingest._status(True), retain=False)
    await broker.wait_for(broker.reborn(2))
    # a rebirth broadcast is answered the same way
    rebirth = b'{"v":1}'
    assert_valid("command.json", json.loads(rebirth), "agent.rebirth")
    broker.send(TOPICS.cmd(protocol.BROADCAST_NODE, "agent.rebirth"), rebirth)
    await broker.wait_for(broker.reborn(3))
    # the same controller instance again is not a new controller: no birth before the next command
    broker.send(TOPICS.controller_status, ingest._status(True), retain=False)
    broker.send(TOPICS.cmd(NODE, "agent.disconnect"), b'{"v":1,"pause_s":3600}')
    await broker.wait_for(lambda: "disconnect" in broker.log)
    assert len(broker.births()) == 3
    for b in broker.births():
        assert broker.after(b).keys() == set(SNAPSHOTS)
    for p in broker.pubs:  # events and job statuses included
        check_node_publish(p, session)
    assert check_node_publish(broker.left(), session)["state"] == "offline"
    await r.stop()  # ends the hour-long pause
    assert len(broker.connects) == 1


async def test_clean_stop_publishes_offline_then_disconnects(broker: RecordingBroker, running: Any,
                                                             fake_ollama: Any) -> None:
    agent = make_agent(fake_ollama.url)
    r = running(agent)
    await broker.wait_for(lambda: broker.count("heartbeat") >= 1)
    await r.stop()
    assert broker.log[-1] == "disconnect" and broker.log.count("disconnect") == 1
    assert check_node_publish(broker.left(), agent.session)["state"] == "offline"


async def test_reconnect_uses_a_new_session_everywhere(broker: RecordingBroker, running: Any,
                                                       fake_ollama: Any) -> None:
    agent = make_agent(fake_ollama.url)
    running(agent)
    await broker.wait_for(lambda: broker.count("heartbeat") >= 1)
    s1 = agent.session
    broker.cut()
    await broker.wait_for(lambda: len(broker.connects) == 2 and broker.reborn(2)())
    s2 = agent.session
    assert s2 != s1 and json.loads(broker.connects[1]["will"].payload)["session"] == s2
    second = broker.births()[1]
    assert check_node_publish(second, s2)["state"] == "online"
    for p in broker.after(second).values():
        check_node_publish(p, s2)


async def test_ollama_down_keeps_models_and_flags_heartbeat(broker: RecordingBroker, running: Any) -> None:
    with start_fake_ollama("down-within-session", config={"ps": [PS_MODEL]}) as fake:
        agent = make_agent(fake.url)
        running(agent)
        await broker.wait_for(broker.reborn(1))
        models = broker.after(broker.births()[0])["models"].doc["models"]
        assert models
        fake.set_config(force_status=500)  # every Ollama endpoint answers 500: down
        await agent._refresh()  # what the next heartbeat does
        hb = agent.heartbeat()
        assert_valid("heartbeat.json", hb)
        assert hb["ollama"]["up"] is False and hb["loaded"] == []
        broker.send(TOPICS.cmd(NODE, "agent.rebirth"), b'{"v":1}')
        await broker.wait_for(broker.reborn(2))
        snap = {k: check_node_publish(p, agent.session) for k, p in broker.after(broker.births()[1]).items()}
        assert snap["info"]["ollama"]["up"] is False and isinstance(snap["info"]["ollama"]["error"], str)
        assert snap["models"]["models"] == models, "a down Ollama has not uninstalled anything"
        assert snap["running"]["models"] == []


async def test_ollama_down_keeps_models_across_reconnect(broker: RecordingBroker, running: Any) -> None:
    with start_fake_ollama("down-across-reconnect") as fake:
        agent = make_agent(fake.url)
        running(agent)
        await broker.wait_for(broker.reborn(1))
        models = broker.after(broker.births()[0])["models"].doc["models"]
        fake.set_config(force_status=500)
        broker.cut()
        await broker.wait_for(lambda: len(broker.connects) == 2 and broker.reborn(2)())
        after = broker.after(broker.births()[1])["models"].doc
        assert after["session"] == agent.session
        assert after["models"] == models


async def test_agent_payloads_with_ollama_unreachable() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    agent = make_agent(url)
    try:
        agent.session = protocol.new_session()
        await agent._refresh()
        assert agent.status.up is False
        docs = {"state": protocol.state_payload("online", agent.session, hb_interval=agent.interval,
                                                agent={"version": "x", "proto": [1, 1]}),
                "heartbeat": agent.heartbeat()}
        docs.update({k: {"v": protocol.PROTO, "session": agent.session, "ts": 1.0, **body}
                     for k, body in agent.snapshots().items()})
        for kind, doc in docs.items():
            assert_valid(KIND_SCHEMA[kind], doc)
            assert accepted(kind, doc)
        assert docs["info"]["ollama"]["up"] is False and docs["info"]["ollama"]["version"] is None
        assert docs["models"]["models"] == [] and docs["running"]["models"] == []
    finally:
        await agent.manager.stop()
        await agent.ollama.aclose()
        agent.gpus.close()


def test_real_job_status_documents_validate() -> None:
    from ollama_fleet.agent.progress import JobReport, Meter

    docs: list[dict[str, Any]] = []
    now = [100.0]

    def clock() -> float:
        return now[0]

    pull = JobReport("default-qwen2.5-0.5b-1735731100", "model.pull", docs.append, clock=clock, origin="default",
                     args={"model": "qwen2.5:0.5b"})
    pull.start(phase="pulling manifest")
    meter = Meter(clock=clock)
    now[0] += 2
    meter.update(0, 1000)
    now[0] += 2
    meter.update(250)
    pull.progress(meter, phase="pulling a8b0c5157701")
    now[0] += 2
    meter.update(1000)
    pull.finish(True, meter=meter)
    install = JobReport("ollama-install-0.12.6-1735731000", "ollama.install", docs.append, clock=clock,
                        args={"version": "0.12.6", "asset": "ollama-linux-amd64.tgz"})
    install.start(phase="checksum")
    install.finish(False, error="sha256 mismatch")
    seqs: dict[str, list[int]] = {}
    for d in docs:
        doc = {**d, "session": "3f2b0c6e9a4d4e0f8f5b1c2d3e4f5a6b"}  # the agent adds its session when publishing
        assert_valid("job-status.json", doc)
        assert accepted("jobs", doc)
        assert protocol.JOB_ID_RE.match(doc["job_id"])
        seqs.setdefault(doc["job_id"], []).append(doc["seq"])
    assert all(s == list(range(1, len(s) + 1)) for s in seqs.values()), seqs
    assert [d["status"] for d in docs] == ["in_progress", "in_progress", "completed", "in_progress", "failed"]
    assert docs[1]["progress"] == 0.25 and docs[2]["progress"] == 1.0 and docs[4]["error"] == "sha256 mismatch"


async def test_real_node_events_validate() -> None:
    from ollama_fleet.agent.manager import OllamaManager

    manager = OllamaManager(settings.load(["agent"], {"node_id": NODE}, env={}))
    try:
        manager.event("ollama_missing", "warning", "Ollama missing", url=manager.url)
        manager.event("ollama_install_failed", "error", "Ollama install failed: boom", error="boom", job_id=None)
        assert len(manager.events) == 2
        for doc in manager.events:
            assert_valid("event.json", doc)
            assert accepted("events", doc)
    finally:
        await manager.stop()


def test_real_gpu_collector_validates() -> None:
    """Whatever this machine's NVML says (usually nothing without an NVIDIA GPU) fits the schemas."""
    gpus = agent_gpu.Gpus()
    try:
        assert_valid("gpus.json", {"v": 1, "session": "s", "gpus": gpus.inventory()})
        assert_valid("heartbeat.json", {"v": 1, "session": "s", "ts": 1.0, "ollama": {"up": True},
                                        "gpus": gpus.metrics()})
    finally:
        gpus.close()


def test_state_payload_helper_builds_every_state() -> None:
    for state in protocol.STATES:
        doc = protocol.state_payload(state, protocol.new_session())
        if state != "online":  # a birth also needs hb_interval and agent (SCHEMA_ONLY)
            assert_valid("state.json", doc)
        assert accepted("state", doc)


# ---- the real controller ingest ------------------------------------------------------------------

def make_ingest(**settings_: Any) -> Ingest:
    return Ingest(settings.load(["controller"], settings_, env={}), Registry(Hub()))


class CommandRecorder:
    """Stands in for the ingest's aiomqtt client when the controller publishes commands."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, int, bool]] = []
        self.event = asyncio.Event()

    async def publish(self, topic: str, payload: Any = None, qos: int = 0, retain: bool = False, **kw: Any) -> None:
        self.sent.append((topic, payload, qos, retain))
        self.event.set()


def problems(ingest: Ingest) -> dict[str, int]:
    return {k: v for k, v in ingest.counters.items() if k.startswith(("dropped", "ignored"))}


async def test_controller_applies_everything_the_agent_publishes(broker: RecordingBroker, running: Any,
                                                                 fake_ollama: Any, fake_nvml: None) -> None:
    agent = make_agent(fake_ollama.url)
    r = running(agent)
    await broker.wait_for(lambda: broker.count("heartbeat") >= 1)
    await r.stop()
    offline = broker.left()
    ingest = make_ingest()
    for p in broker.pubs:
        if p is not offline:
            ingest.handle(p.topic, p.payload)
    assert problems(ingest) == {}
    a = ingest.registry.agents[NODE]
    assert (a.state, a.status, a.routable, a.session) == ("online", "online", True, agent.session)
    assert a.ollama_url == fake_ollama.url and a.hb_interval == 30
    assert [g["name"] for g in a.gpus] == ["NVIDIA H100 80GB HBM3", "NVIDIA GeForce RTX 4090"]
    assert [m["name"] for m in a.loaded] == ["llama3.2:latest"]
    assert ingest.counters["heartbeat"] >= 1 and ingest.counters["state"] == 1
    # the will of this connection: lost
    will = broker.connects[0]["will"]
    ingest.handle(will.topic, will.payload)
    assert a.state == "lost" and problems(ingest) == {}
    # and the clean stop's offline
    ingest.handle(offline.topic, offline.payload)
    assert a.state == "offline" and problems(ingest) == {}


def _doc(kind: str, i: int = 0, **over: Any) -> dict[str, Any]:
    return {**copy.deepcopy(SCHEMAS[KIND_SCHEMA[kind]]["examples"][i]), **over}


def feed(ingest: Ingest, kind: str, doc: dict[str, Any], node: str = NODE) -> None:
    ingest.handle(TOPICS.node(node, kind), protocol.encode(doc))


async def test_snapshots_before_state_are_buffered() -> None:
    ingest = make_ingest()
    s = "s1"
    for kind in SNAPSHOTS:
        feed(ingest, kind, _doc(kind, session=s))
    assert NODE not in ingest.registry.agents
    assert ingest.counters["ignored.unknown_agent"] == 4
    feed(ingest, "state", _doc("state", session=s))
    a = ingest.registry.agents[NODE]
    # the example agent is on another machine: its loopback Ollama URL is reached on its LAN address
    assert a.hostname == "gpu-01" and a.ollama_url == "http://10.0.0.21:11434"
    assert a.gpus and a.models and a.loaded


async def test_will_of_another_session_is_ignored_and_takeover_flaps() -> None:
    ingest = make_ingest()
    feed(ingest, "state", _doc("state", 0, session="new"))
    feed(ingest, "state", _doc("state", 2, session="old"))  # the old connection's will, after the birth
    a = ingest.registry.agents[NODE]
    assert a.state == "online" and ingest.counters["ignored.stale_session"] == 1
    feed(ingest, "heartbeat", _doc("heartbeat", session="new"))
    feed(ingest, "state", _doc("state", 2, session="new"))  # will of the current session
    assert a.state == "lost"
    # usual takeover order: the old will (current session) first, then the new birth
    feed(ingest, "state", _doc("state", 0, session="newer"))
    assert a.state == "online" and a.session == "newer"
    kinds = [e["kind"] for e in ingest.registry.drain().events if not e["kind"].startswith("ollama")]
    assert kinds == ["registered", "lost", "online"]


async def test_heartbeat_from_unknown_session_asks_for_rebirth() -> None:
    ingest = make_ingest()
    recorder = CommandRecorder()
    ingest.client = recorder  # type: ignore[assignment]
    feed(ingest, "state", _doc("state", session="current"))
    feed(ingest, "heartbeat", _doc("heartbeat", session="other"))
    await asyncio.wait_for(recorder.event.wait(), 5)
    feed(ingest, "heartbeat", _doc("heartbeat", session="other"))  # rate-limited: no second request
    topic, payload, qos, retain = recorder.sent[0]
    assert len(recorder.sent) == 1 and ingest.counters["rebirth_requests"] == 1
    assert TOPICS.parse_cmd_topic(topic) == (NODE, "agent.rebirth") and (qos, retain) == (1, False)
    assert_valid("command.json", json.loads(payload), "agent.rebirth")
    # events from a node never seen are ignored; no rebirth for those
    feed(ingest, "heartbeat", _doc("heartbeat", session="x"), node="gpu-99")
    assert ingest.counters["ignored.unknown_agent"] == 1 and len(recorder.sent) == 1


async def test_stale_and_ollama_down() -> None:
    ingest = make_ingest()
    reg = ingest.registry
    feed(ingest, "state", _doc("state", session="s"))  # hb_interval 5
    a = reg.agents[NODE]
    feed(ingest, "heartbeat", _doc("heartbeat", session="s"))
    assert a.ollama_up and a.routable
    assert reg.check_stale(a.last_seen + reg.stale_after * 5 - 0.1) == []
    assert reg.check_stale(a.last_seen + reg.stale_after * 5 + 0.1) == [NODE]
    assert a.state == "stale" and not a.routable
    feed(ingest, "heartbeat", _doc("heartbeat", session="s", ollama={"up": False}))
    assert a.state == "online" and a.status == "ollama_down" and not a.routable
    feed(ingest, "heartbeat", _doc("heartbeat", session="s"))
    assert a.status == "online" and a.routable


async def test_controller_commands_validate() -> None:
    ingest = make_ingest()
    recorder = CommandRecorder()
    ingest.client = recorder  # type: ignore[assignment]
    await ingest.publish_command(NODE, "agent.disconnect", {"pause_s": 60})
    await ingest.publish_command(NODE, "agent.disconnect", {})
    await ingest.publish_command(protocol.BROADCAST_NODE, "agent.rebirth", {})
    for topic, payload, qos, retain in recorder.sent:
        _, verb = TOPICS.parse_cmd_topic(topic)
        assert (qos, retain) == (1, False)
        assert_valid("command.json", json.loads(payload), verb)
    assert_valid("controller-status.json", json.loads(ingest._status(False)))


@pytest.mark.parametrize(("topic", "payload", "reason"), [
    ("fleet/v1/nodes/gpu-01/state", b"{", "bad_json"),
    ("fleet/v1/nodes/gpu-01/state", b"[1]", "bad_payload"),
    ("fleet/v1/nodes/gpu-01/state", b'{"state":"online","session":"s"}', "bad_payload"),
    ("fleet/v1/nodes/gpu-01/state", b'{"v":2,"state":"online","session":"s"}', "unsupported_version"),
    ("fleet/v1/nodes/gpu-01/state", b'{"v":1,"state":"stale","session":"s"}', "bad_payload"),
    ("fleet/v1/nodes/gpu-01/heartbeat", b'{"v":1,"session":"s"}', "bad_payload"),
    ("fleet/v1/nodes/gpu-01/info", b'{"v":1,"session":"s","hostname":"h"}', "bad_payload"),
    ("fleet/v1/nodes/gpu-01/state", b'{"v":1,"state":"online","session":"' + b"x" * 2000 + b'"}', "oversized"),
    ("fleet/v1/nodes/gpu-01/progress", b'{"v":1}', "unknown_topic"),
    ("fleet/v1/nodes/gpu-01/jobs/a/progress", b'{"v":1}', "unknown_topic"),
    ("fleet/v1/nodes/GPU_01/state", b'{"v":1}', "bad_node_id"),
    ("fleet/v1/cmd/_controller/no.such.verb", b'{"v":1}', "unknown_verb"),
])
async def test_controller_drops_and_counts_bad_messages(topic: str, payload: bytes, reason: str) -> None:
    ingest = make_ingest(max_payload_bytes=1024)
    ingest.handle(topic, payload)
    assert ingest.counters["dropped"] == 1 and ingest.counters[f"dropped.{reason}"] == 1
    assert ingest.registry.agents == {}


async def test_empty_payload_is_a_clear_and_jobs_wait_for_their_handler() -> None:
    ingest = make_ingest()
    ingest.handle(TOPICS.job(NODE, "op-1"), b"")
    assert ingest.counters["cleared"] == 1 and problems(ingest) == {}
    feed_topic = TOPICS.job(NODE, "op-20250101-001")
    ingest.handle(feed_topic, protocol.encode(_doc("jobs")))
    assert ingest.counters["ignored.no_job_handler"] == 1
    seen: list[tuple[str, str, dict[str, Any]]] = []
    ingest.job_handler = lambda node, job_id, doc: seen.append((node, job_id, doc)) or None  # type: ignore[func-returns-value]
    ingest.handle(feed_topic, protocol.encode(_doc("jobs")))
    assert seen and seen[0][:2] == (NODE, "op-20250101-001") and seen[0][2]["job_id"] == seen[0][1]


# ---- specs/mqtt.md -------------------------------------------------------------------------------

SPEC_TEXT = SPEC.read_text()
SAMPLE = {"<node>": NODE, "<verb>": "agent.rebirth", "<job_id>": "op-20250101-001",
          "<instance>": "9d3c1b7a5e2f4a6c8b0d1e2f3a4b5c6d"}


def _table_rows() -> dict[str, dict[str, str]]:
    """The topic table: topic -> {kind, writer, retain, qos, expiry, schema}."""
    rows = {}
    for line in SPEC_TEXT.splitlines():
        m = re.match(r"^\| `(fleet/v1/[^`]+)` \|", line)
        if not m:
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 7, line
        row = dict(zip(("topic", "kind", "writer", "retain", "qos", "expiry", "schema"), cells))
        rows[m.group(1)] = {**row, "topic": m.group(1)}
    return rows


def _concrete(topic: str) -> str:
    for placeholder, value in SAMPLE.items():
        topic = topic.replace(placeholder, value)
    return topic


def test_topic_table_matches_node_topics() -> None:
    """(d) every NODE_TOPICS kind has a row with its QoS/retain and an existing schema file."""
    rows = _table_rows()
    by_kind = {r["kind"].strip("`"): r for r in rows.values() if r["kind"] != "–"}
    assert set(by_kind) == set(NODE_TOPICS)
    for kind, (qos, retain) in NODE_TOPICS.items():
        row = by_kind[kind]
        assert row["qos"] == str(qos) and row["retain"] == ("yes" if retain else "no"), kind
        link = re.fullmatch(r"\[([\w.-]+)\]\(schemas/([\w.-]+)\)", row["schema"])
        assert link and link.group(1) == link.group(2) == KIND_SCHEMA[kind], row["schema"]
        assert (SCHEMA_DIR / link.group(2)).is_file()
        assert TOPICS.parse_node_topic(_concrete(row["topic"]))[1] == kind
        assert SCHEMAS[KIND_SCHEMA[kind]]["title"] == row["topic"]
    assert "3 × `hb_interval`" in by_kind["heartbeat"]["expiry"]
    for topic, row in rows.items():
        if row["kind"] == "–":
            concrete = _concrete(topic)
            if "/cmd/" in topic:
                TOPICS.parse_cmd_topic(concrete)
                assert row["retain"] == "no" and row["qos"] == "1"
                assert row["schema"] == "[command.json](schemas/command.json)"
            elif "/controllers/" in topic:  # controller to controller (PEER_KINDS)
                qos, retain = protocol.PEER_KINDS[TOPICS.parse_peer_topic(concrete)[1]]
                assert (row["retain"], row["qos"]) == ("yes" if retain else "no", str(qos)), topic
            else:
                assert concrete == TOPICS.controller_status
                assert row["schema"] == "[controller-status.json](schemas/controller-status.json)"
                assert (row["retain"], row["qos"]) == ("yes", "1")
    assert {f"fleet/v1/cmd/{n}/<verb>" for n in ("<node>", "_all", "_controller")} <= rows.keys()
    for name in SCHEMAS:
        assert f"(schemas/{name})" in SPEC_TEXT, f"{name} is not linked from specs/mqtt.md"


def test_documented_subscriptions_and_prefix() -> None:
    assert TOPICS.prefix == settings.BY_NAME["topic_prefix"].default == "fleet/v1"
    for sub in Topics().agent_subscriptions("<node>"):
        assert f"`{sub}`" in SPEC_TEXT, sub
    assert f"`{NODE_ID_RE.pattern}`" in SPEC_TEXT and f"`{protocol.JOB_ID_RE.pattern}`" in SPEC_TEXT
    assert f"`{protocol.CONTROLLER_NODE}`" in SPEC_TEXT and f"`{protocol.BROADCAST_NODE}`" in SPEC_TEXT
    for kind in protocol.RETAINED_KINDS:  # what DELETE /api/agents/<id> clears
        assert f"`{kind}`" in SPEC_TEXT.split("**Delete.**")[1].split("\n\n")[0]


def test_documented_defaults_match_settings() -> None:
    d = {s.name: s.default for s in settings.SETTINGS}
    assert f"`max_payload_bytes` (default {d['max_payload_bytes']:,})".replace(",", " ") in SPEC_TEXT
    assert f"`stale_after` (default {d['stale_after']:g})" in SPEC_TEXT
    assert f"(`heartbeat_interval`, default {d['heartbeat_interval']:g} s)" in SPEC_TEXT
    assert re.search(rf"keepalive `mqtt_keepalive`\s+\({d['mqtt_keepalive']} s\)", SPEC_TEXT)
    assert f"`ollama_timeout` ({d['ollama_timeout']:g} s)" in SPEC_TEXT
    assert d["mqtt_protocol"] == "5" and "`--mqtt-protocol 311`" in SPEC_TEXT
    assert "`ignored.forced_offline`" in SPEC_TEXT and "`ignored.stale_session`" in SPEC_TEXT
    conf = (ROOT / "broker" / "mosquitto.conf").read_text()
    limit = re.search(r"^message_size_limit (\d+)", conf, re.MULTILINE)
    assert limit and f"`message_size_limit {limit.group(1)}`" in SPEC_TEXT
    queued = re.search(r"^max_queued_messages (\d+)", conf, re.MULTILINE)
    assert queued and int(queued.group(1)) > 1000, "the spec says the shipped config raises it"


def test_acl_copy_matches_broker_acl() -> None:
    def rules(text: str) -> list[str]:
        return [" ".join(line.split()) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]

    block = re.search(r"```acl\n(.*?)```", SPEC_TEXT, re.DOTALL)
    assert block, "specs/mqtt.md has no ```acl block"
    assert rules(block.group(1)) == rules(ACL.read_text())


def _shell_commands() -> list[list[str]]:
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", SPEC_TEXT, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(shlex.split(line))
    return commands


def _opts(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def _matches(filt: str, topic: str) -> bool:
    f, t = filt.split("/"), topic.split("/")
    for i, part in enumerate(f):
        if part == "#":
            return True
        if i >= len(t) or part not in ("+", t[i]):
            return False
    return len(f) == len(t)


def test_shell_examples_use_valid_topics_and_payloads() -> None:
    """(e) every mosquitto_pub example is a valid command; every mosquitto_sub filter matches the tree."""
    commands = _shell_commands()
    pubs = [c for c in commands if c[0] == "mosquitto_pub"]
    subs = [c for c in commands if c[0] == "mosquitto_sub"]
    assert {c[0] for c in commands} == {"mosquitto_pub", "mosquitto_sub"}
    verbs, pulls = set(), []
    for argv in pubs:
        (topic,), (message,) = _opts(argv, "-t"), _opts(argv, "-m")
        assert _opts(argv, "-q") == ["1"] and "-r" not in argv, argv
        node, verb = TOPICS.parse_cmd_topic(topic)
        assert NODE_ID_RE.match(node) or node in (protocol.BROADCAST_NODE, protocol.CONTROLLER_NODE), node
        doc = json.loads(message)
        assert_valid("command.json", doc, verb)
        verbs.add(verb)
        if verb == "model.pull":
            pulls.append(doc)
    assert verbs == set(VERBS)
    assert any("job_id" in d for d in pulls) and any("job_id" not in d for d in pulls)
    samples = [TOPICS.node(NODE, k) for k in NODE_TOPICS if k != "jobs"]
    samples += [TOPICS.job(NODE, "op-20250101-001"), TOPICS.controller_status]
    filters = [f for argv in subs for f in _opts(argv, "-t")]
    for f in filters:
        assert f.startswith(TOPICS.prefix + "/"), f
        assert any(_matches(f, t) for t in samples), f"{f} matches no topic of the tree"
    # the follow-progress example watches the job the pull example names
    named = {d["job_id"] for d in pulls if "job_id" in d}
    assert any(_matches(f, TOPICS.job(NODE, j)) and "+" not in f for f in filters for j in named)


def test_json_examples_in_the_spec_validate() -> None:
    blocks = re.findall(r"```json\n(.*?)```", SPEC_TEXT, re.DOTALL)
    assert blocks
    for block in blocks:
        doc = json.loads(block)
        assert any(validator(name).is_valid(doc) for name in KIND_SCHEMA.values()), block
