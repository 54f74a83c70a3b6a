"""The shared load picture (controller/cluster/load.py): two controller processes on one Mosquitto, each with
its own MQTT account and database, fake Ollamas with slow generations. What one controller has running on an
agent counts in the other's `least_busy` and against the agent's capacity; hostile load documents are
counted and dropped; a killed controller's load is forgotten within LOAD_TTL."""

from __future__ import annotations

import copy
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest

from ollama_fleet.contract import protocol
from ollama_fleet.contract.protocol import LOAD_ENTRIES_MAX, ProtocolError, Topics
from ollama_fleet.controller.admission.gate import Admission
from ollama_fleet.controller.admission.scheduler import Ticket
from ollama_fleet.controller.cluster.load import LOAD_BYTES, LOAD_EVERY, LOAD_SOON, LOAD_TTL, SharedLoad
from ollama_fleet.controller.hub import Hub
from ollama_fleet.controller.registry.ingest import Ingest
from ollama_fleet.controller.registry.live import AgentRecord, Registry
from ollama_fleet.settings import Config
from tests.proxy_support import ADMIN, chat_body, depth, post, start_fleet, wait_routable
from tests.support import Controller, wait_until
from tests.test_contract import SCHEMAS, assert_valid, validator

SECOND = "controller-2"  # the second controller's own account: client ids are bound to accounts
SLOW = {"tokens": 4, "token_delay": 0.75}  # a generation of about 3 s


# ---- the contract ----------------------------------------------------------------------------------

def _accepted(doc: dict[str, Any], instance: str) -> bool:
    try:
        protocol.check_load(protocol.decode(protocol.encode(doc), 65536), instance)
    except ProtocolError:
        return False
    return True


def _hostile(example: dict[str, Any]) -> list[dict[str, Any]]:
    def with_(key: str, value: Any) -> dict[str, Any]:
        doc = copy.deepcopy(example)
        doc[key] = value
        return doc
    too_many = {f"gpu-{i}": 1 for i in range(LOAD_ENTRIES_MAX + 1)}
    docs = [with_(k, v) for k, v in [
        ("slots", {"gpu-01": -1}), ("slots", {"gpu-01": True}), ("slots", {"gpu-01": 1.5}),
        ("inflight", {"GPU_01": 1}), ("inflight", {"gpu-01": 10**7}), ("inflight", too_many),
        ("queued", {"": 1}), ("queued", {"m" * 256: 1}), ("queued", ["llama3.2:latest"]),
        ("leader", "yes"), ("ts", True), ("instance", 7), ("v", 2),
    ]]
    for key in ("instance", "ts", "leader", "inflight", "slots", "queued"):
        docs.append({k: v for k, v in example.items() if k != key})
    return docs


def test_check_load_and_the_schema_agree() -> None:
    name = "controller-load.json"
    for example in SCHEMAS[name]["examples"]:
        assert _accepted(example, example["instance"])
        assert not _accepted(example, uuid.uuid4().hex), "another topic's instance"
        for doc in _hostile(example):
            assert not validator(name).is_valid(doc), doc
            assert not _accepted(doc, example["instance"]), doc
    topics = Topics()
    instance = SCHEMAS[name]["examples"][0]["instance"]
    assert topics.parse_peer_topic(topics.peer(instance, "load")) == (instance, "load")
    assert protocol.PEER_KINDS["load"] == (0, False)
    for bad in ("fleet/v1/controllers/not-hex/load", f"fleet/v1/controllers/{instance}/lod",
                f"fleet/v1/controllers/{instance}/load/more"):
        with pytest.raises(ProtocolError):
            topics.parse_peer_topic(bad)


# ---- two controllers -------------------------------------------------------------------------------

@pytest.fixture
def second(fleet: Any) -> Iterator[Callable[..., Controller]]:
    """Starts the second controller: its own account, data directory (database) and port."""
    started: list[Controller] = []

    def start(**env: str) -> Controller:
        if SECOND not in fleet.broker.passwords:
            fleet.broker.add_account("controller", SECOND)
        data = fleet.tmp / "controller-b"
        data.mkdir(exist_ok=True)
        c = Controller(data, fleet.broker.url(SECOND), {k.upper(): v for k, v in env.items()}, wait=False)
        started.append(c)
        c.wait_ready()
        return c

    try:
        yield start
    finally:
        for c in started:
            c.close()


def cluster(c: Controller) -> dict[str, Any]:
    r = c.api.get("/api/cluster")
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def seen(c: Controller, instance: str) -> dict[str, Any] | None:
    """What `c` last heard of the controller `instance` (None: nothing within LOAD_TTL)."""
    return next((p for p in cluster(c)["controllers"] if p["instance"] == instance), None)


def wait_seen(c: Controller, instance: str, what: str, pred: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    def match() -> dict[str, Any] | None:
        p = seen(c, instance)
        return p if p is not None and pred(p) else None
    return wait_until(match, 10, what=what)


def stream_in_thread(pool: ThreadPoolExecutor, c: Controller, headers: dict[str, str] | None = None) -> Future[Any]:
    def run() -> Any:
        try:
            return post(c, "/api/chat", chat_body(stream=True), headers)
        except httpx.HTTPError as e:  # a controller killed under it
            return e
    return pool.submit(run)


def test_a_slot_held_through_one_controller_is_full_for_the_other_until_released_or_its_holder_dies(fleet, second):
    a, fakes = start_fleet(fleet, "sl-one", agent_env={"fleet_ollama_num_parallel": "1"}, **SLOW)
    b = second()
    wait_routable(b, "sl-one", models=())
    me_a, me_b = cluster(a)["instance"], cluster(b)["instance"]
    assert me_a != me_b and cluster(b)["load_ttl"] == LOAD_TTL and cluster(b)["load_every"] == LOAD_EVERY
    wait_seen(b, me_a, "A's load heard by B", lambda p: p["in_flight"] == 0 and p["age"] < LOAD_TTL)
    wait_seen(a, me_b, "B's load heard by A", lambda p: p["slots"] == 0)
    assert all(p["instance"] != me_b for p in cluster(b)["controllers"]), "a controller ignores its own documents"
    with ThreadPoolExecutor(4) as pool:
        # (a) B sees A's request on the agent while A streams it
        first = stream_in_thread(pool, a)
        held = wait_seen(b, me_a, "A's request seen by B", lambda p: p["slots"] == 1)
        assert held["in_flight"] == 1 and held["agents"] == {"sl-one": 1} and held["queued"] == 0
        # (b) through B, the same agent's one slot is taken: the request waits in B's queue, not in Ollama's
        waiting = pool.submit(post, b, "/api/chat", chat_body())
        wait_until(lambda: depth(b) == 1, 10, what="B's request queued behind A's")
        assert not waiting.done()
        assert first.result().status_code == 200
        r = waiting.result()
        assert r.status_code == 200 and r.headers["x-fleet-agent"] == "sl-one", r.text
        assert int(r.headers["x-fleet-queue-wait"]) > 0
        assert fakes["sl-one"].stats()["max_inference_in_flight"] == 1  # never two on a capacity of 1

        # (e) A killed while it holds the slot: B forgets A's load within LOAD_TTL, and its queue moves on
        orphan = stream_in_thread(pool, a)
        wait_seen(b, me_a, "A's second request seen by B", lambda p: p["slots"] == 1)
        after_kill = pool.submit(post, b, "/api/chat", chat_body())
        wait_until(lambda: depth(b) == 1, 10, what="B's request queued behind A's second")
        killed = time.monotonic()
        a.kill()
        wait_until(lambda: seen(b, me_a) is None, LOAD_TTL + 2, interval=0.02, what="A's load forgotten")
        gone = time.monotonic() - killed
        # the last document arrived before the kill; B checks every LOAD_SOON; one poll and one HTTP read on top
        assert gone <= LOAD_TTL + LOAD_SOON + 0.5, gone
        r = after_kill.result()
        assert r.status_code == 200 and int(r.headers["x-fleet-queue-wait"]) > 0, r.text
        assert isinstance(orphan.result(), httpx.HTTPError)  # its controller died under it


def test_least_busy_counts_the_requests_other_controllers_have_on_an_agent(fleet, second):
    a = fleet.controller()
    slow, fast = fleet.fake_ollama("lb-slow", **SLOW), fleet.fake_ollama("lb-fast")
    fleet.agent("lb-1", slow.url, fleet_ollama_num_parallel="2")  # a free slot left: only routing decides
    fleet.agent("lb-2", fast.url, fleet_ollama_num_parallel="2")
    wait_routable(a, "lb-1", "lb-2", models=())
    b = second()
    wait_routable(b, "lb-1", "lb-2", models=())
    me_a = cluster(a)["instance"]
    with ThreadPoolExecutor(1) as pool:
        busy = stream_in_thread(pool, a, {"X-Fleet-Agent": "lb-1"})
        wait_seen(b, me_a, "A's request on lb-1 seen by B", lambda p: p["agents"] == {"lb-1": 1})
        for _ in range(4):  # without A's count the two agents tie and B would alternate
            r = post(b, "/api/chat", chat_body(), {"X-Fleet-Debug": "1"})
            assert r.status_code == 200 and r.headers["x-fleet-agent"] == "lb-2", r.headers
            assert "lb-1(in_flight=1 " in r.headers["x-fleet-route-reason"], r.headers["x-fleet-route-reason"]
            assert "x-fleet-queue-wait" not in r.headers
        assert busy.result().status_code == 200
    assert fast.stats()["requests"].get("/api/chat") == 4 and slow.stats()["requests"].get("/api/chat") == 1


# ---- hostile documents -----------------------------------------------------------------------------

def _publish(broker: Any, messages: list[tuple[str, bytes]]) -> None:
    """Publish as a controller-role account of its own (an operator may not write under controllers/)."""
    user = broker.add_account("controller")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-load-{uuid.uuid4().hex[:6]}")
    client.username_pw_set(user, broker.passwords[user])
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        for topic, payload in messages:
            client.publish(topic, payload, qos=1).wait_for_publish(5)
    finally:
        client.loop_stop()
        client.disconnect()


def _counters(c: Controller) -> dict[str, int]:
    counters: dict[str, int] = c.api.get("/api/ingest").json()["counters"]
    return counters


def test_hostile_load_documents_are_dropped_and_counted_and_change_nothing(fleet):
    c, fakes = start_fleet(fleet, "hl-a", controller_env={"fleet_admin_token": ADMIN},
                           agent_env={"fleet_ollama_num_parallel": "1"})
    assert c.http.get("/api/cluster").status_code == 401  # a read like /api/queue: viewer or admin
    forged = uuid.uuid4().hex
    topic = Topics().peer(forged, "load")
    good = {"v": 1, "instance": forged, "ts": time.time(), "leader": True, "inflight": {"hl-a": 1},
            "slots": {"hl-a": 1}, "queued": {}}
    assert_valid("controller-load.json", good)
    bad = [(topic, protocol.encode(doc)) for doc in _hostile(good)]
    bad += [(topic, b"{"), (topic, b"[1]"), (topic, protocol.encode({**good, "instance": uuid.uuid4().hex})),
            ("fleet/v1/controllers/not-hex/load", protocol.encode(good))]  # (other kinds are not subscribed)
    before = _counters(c)
    _publish(fleet.broker, bad)
    wait_until(lambda: _counters(c).get("dropped", 0) - before.get("dropped", 0) == len(bad), 10,
               what="every hostile document dropped")
    now = _counters(c)
    grew = {k: now[k] - before.get(k, 0) for k in now if k.startswith("dropped.") and now[k] != before.get(k, 0)}
    assert grew == {"dropped.bad_payload": len(bad) - 3, "dropped.unsupported_version": 1,
                    "dropped.bad_json": 1, "dropped.unknown_topic": 1}, grew
    assert cluster(c)["controllers"] == []
    r = post(c, "/api/chat", chat_body())  # the agent's one slot is free: served at once
    assert r.status_code == 200 and "x-fleet-queue-wait" not in r.headers, r.headers

    # the control: the same claim, well formed, holds the slot until it expires LOAD_TTL after it arrived
    _publish(fleet.broker, [(topic, protocol.encode({**good, "ts": time.time()}))])
    wait_until(lambda: seen(c, forged), 5, what="the well-formed document applied")
    r = post(c, "/api/chat", chat_body())
    assert r.status_code == 200 and int(r.headers["x-fleet-queue-wait"]) > 0, r.headers
    assert seen(c, forged) is None
    assert fakes["hl-a"].stats()["requests"].get("/api/chat") == 2


def test_a_worst_case_load_document_stays_under_max_payload_bytes() -> None:
    """More agents than LOAD_ENTRIES_MAX in flight and holding slots, all with the longest ids, and as many
    longest model names queued: unbounded in bytes that is about 210 KB, which every other controller
    would drop. The document keeps the largest counts, slots first, and fits the default limit."""
    cfg = Config().replace(max_queue=8)
    registry = Registry(Hub())
    admission = Admission(cfg, registry, lambda a, m: True, lambda a, m: True)
    shared = SharedLoad(Ingest(cfg, registry), registry, admission, lambda: True)
    n = LOAD_ENTRIES_MAX + 20
    for i in range(n):
        node = f"{i:04d}".ljust(63, "n")  # NODE_ID_RE's longest
        registry.agents[node] = AgentRecord(node_id=node, first_seen=0.0, last_seen=0.0,
                                            in_flight=protocol.LOAD_COUNT_MAX - i)
        admission.sched.busy[node] = protocol.LOAD_COUNT_MAX - 2 * i
    for i in range(n):
        model = f"{i:04d}".ljust(protocol.MODEL_KEY_MAX, "m")
        for _ in range(1 + i % 3):
            assert admission.sched.enqueue(Ticket(model, "normal", "p", 0.0))

    doc = shared.document()
    raw = protocol.encode({"v": protocol.PROTO, **doc})
    assert len(raw) <= LOAD_BYTES < cfg.max_payload_bytes == 65536, len(raw)
    protocol.check_load(protocol.decode(raw, cfg.max_payload_bytes), doc["instance"])  # what the others do
    assert len(raw) > LOAD_BYTES - 400  # the budget is used, not left empty: less than one entry is left
    full = {"slots": dict(admission.sched.busy), "queued": admission.sched.depths(),
            "inflight": {a.node_id: a.in_flight for a in registry.agents.values()}}
    assert len(doc["slots"]) == LOAD_ENTRIES_MAX  # capacity first: every slot entry the contract allows
    assert 0 < len(doc["inflight"]) < LOAD_ENTRIES_MAX
    for key, counts in full.items():
        dropped = [c for name, c in counts.items() if name not in doc[key]]
        assert not doc[key] or not dropped or min(doc[key].values()) >= max(dropped), key  # the largest kept
        assert all(counts[name] == c for name, c in doc[key].items()), key
