"""The agent's outbox: the one queue between the agent's parts and the broker.

The broker side is a recording transport (what aiomqtt.Client.publish is to the agent); everything else is
the real Outbox with the job and event documents the agent's parts post.
"""

from __future__ import annotations

import json
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.properties import Properties

from ollama_fleet.agent import outbox as ob
from ollama_fleet.agent.outbox import NotConnected, Outbox
from ollama_fleet.contract.protocol import Topics, state_payload
from tests.ollama_support import until

NODE = "gpu-01"
TOPICS = Topics()
EVENTS = TOPICS.node(NODE, "events")


def job_topic(job_id: str) -> str:
    return TOPICS.job(NODE, job_id)


class Wire:
    """The broker side of one connection: records what is published on it."""

    def __init__(self) -> None:
        self.got: list[tuple[str, dict[str, Any], int, bool]] = []

    async def publish(self, topic: str, payload: bytes, qos: int, retain: bool, properties: Properties | None) -> None:
        self.got.append((topic, json.loads(payload), qos, retain))

    def topics(self) -> list[str]:
        return [t for t, *_ in self.got]

    def docs(self, topic: str) -> list[dict[str, Any]]:
        return [d for t, d, *_ in self.got if t == topic]


class Agentish:
    """The two agent callbacks the outbox forwards (`refresh`, `wake`), counted."""

    def __init__(self) -> None:
        self.refreshed = 0
        self.woken = 0

    async def refresh(self) -> None:
        self.refreshed += 1

    def wake(self) -> None:
        self.woken += 1


@pytest.fixture
async def outbox() -> Any:
    agent = Agentish()
    box = Outbox(TOPICS, NODE, refresh=agent.refresh, wake=agent.wake)
    box.start()
    yield box
    await box.stop()


async def connect(box: Outbox, wire: Wire, session: str) -> None:
    """What the agent does per connection: attach, birth (a direct send), then open the queue."""
    box.attach(wire.publish, session)
    await box.send("state", state_payload("online", session))
    box.open()


def job_doc(job_id: str, status: str, seq: int) -> dict[str, Any]:
    return {"v": 1, "job_id": job_id, "verb": "ollama.install", "status": status, "seq": seq}


async def test_waits_for_the_birth_then_sends_in_posting_order_on_that_session(outbox: Outbox) -> None:
    outbox.event({"v": 1, "event": "ollama_install_started"})
    outbox.job_status("install-1", job_doc("install-1", "in_progress", 1))
    outbox.event({"v": 1, "event": "ollama_installed"})
    assert [m.kind for m in outbox.pending()] == ["events", "jobs", "events"]
    wire = Wire()
    await connect(outbox, wire, "s1")
    await until(lambda: len(wire.got) == 4, 5, "the queue after the birth")
    assert wire.topics() == [TOPICS.node(NODE, "state"), EVENTS, job_topic("install-1"), EVENTS]
    assert [d.get("event") for d in wire.docs(EVENTS)] == ["ollama_install_started", "ollama_installed"]
    assert all(d["session"] == "s1" for _, d, *_ in wire.got)
    # qos and retain come from the contract: events are not retained, job status is
    assert [(q, r) for t, _, q, r in wire.got if t != TOPICS.node(NODE, "state")] == [(1, False), (1, True), (1, False)]
    assert outbox.pending() == []


async def test_a_job_status_replaces_its_queued_one_in_place(outbox: Outbox) -> None:
    outbox.job_status("a", job_doc("a", "in_progress", 1))
    outbox.job_status("b", job_doc("b", "in_progress", 1))
    outbox.job_status("a", job_doc("a", "in_progress", 2))
    outbox.job_status("a", job_doc("a", "completed", 3))
    assert [m.topic for m in outbox.pending()] == [job_topic("a"), job_topic("b")]
    wire = Wire()
    await connect(outbox, wire, "s1")
    await until(lambda: len(wire.got) == 3, 5, "both jobs")
    assert wire.topics()[1:] == [job_topic("a"), job_topic("b")]
    assert [(d["status"], d["seq"]) for d in wire.docs(job_topic("a"))] == [("completed", 3)]  # no stale one


async def test_events_kept_while_away_are_bounded_oldest_first(outbox: Outbox) -> None:
    outbox.job_status("a", job_doc("a", "in_progress", 1))
    for n in range(outbox.events_kept + 5):
        outbox.event({"v": 1, "event": "e", "n": n})
    waiting = outbox.pending()
    events = [m.payload for m in waiting if m.kind == "events"]
    assert len(events) == outbox.events_kept
    assert [e["n"] for e in events if isinstance(e, dict)] == list(range(5, outbox.events_kept + 5))
    assert [m.topic for m in waiting if m.kind == "jobs"] == [job_topic("a")]  # statuses never give way


async def test_a_running_job_is_announced_again_on_every_connection_until_it_ends(outbox: Outbox) -> None:
    job: dict[str, Any] = {"status": "in_progress", "seq": 0}

    def render(session: str) -> dict[str, Any]:
        job["seq"] += 1  # like the job runner: rendered when it goes out, numbered then
        return {"v": 1, "job_id": "pull-1", **job, "session": session}

    outbox.job_status("pull-1", render, live=True)
    first = Wire()
    await connect(outbox, first, "s1")
    await until(lambda: first.docs(job_topic("pull-1")), 5, "the status on the first connection")
    outbox.detach()
    second = Wire()
    await connect(outbox, second, "s2")
    await until(lambda: second.docs(job_topic("pull-1")), 5, "the status again on the new connection")
    assert second.docs(job_topic("pull-1")) == [{"v": 1, "job_id": "pull-1", "status": "in_progress", "seq": 2,
                                                 "session": "s2"}]
    job["status"] = "completed"
    outbox.job_status("pull-1", render, live=False)  # finished: retained on the broker, nothing to repeat
    await until(lambda: len(second.docs(job_topic("pull-1"))) == 2, 5, "the final status")
    outbox.detach()
    third = Wire()
    await connect(outbox, third, "s3")
    outbox.event({"v": 1, "event": "marker"})
    await until(lambda: third.docs(EVENTS), 5, "the marker event")
    assert third.topics() == [TOPICS.node(NODE, "state"), EVENTS]  # no replay of the finished job


async def test_a_publish_that_fails_with_the_connection_goes_first_on_the_next(outbox: Outbox,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ob, "FLUSH_RETRY", 0.01)
    tried: list[str] = []

    async def breaking(topic: str, payload: bytes, qos: int, retain: bool, properties: Properties | None) -> None:
        tried.append(topic)
        outbox.detach()  # the connection ends under the publish: the agent's session loop detaches
        raise aiomqtt.MqttError("connection lost")

    outbox.attach(breaking, "s1")
    outbox.open()
    outbox.job_status("a", job_doc("a", "in_progress", 1))
    outbox.event({"v": 1, "event": "after"})
    await until(lambda: tried, 5, "the failed publish")
    assert tried == [job_topic("a")] and not outbox.connected.is_set()
    assert [m.topic for m in outbox.pending()] == [job_topic("a"), EVENTS]  # kept, in order
    second = Wire()
    await connect(outbox, second, "s2")
    await until(lambda: len(second.got) == 3, 5, "the queue on the new connection")
    assert second.topics() == [TOPICS.node(NODE, "state"), job_topic("a"), EVENTS]
    assert all(d["session"] == "s2" for _, d, *_ in second.got)


async def test_a_document_that_cannot_be_rendered_is_dropped_not_blocking(outbox: Outbox) -> None:
    def broken(session: str) -> dict[str, Any]:
        raise RuntimeError("bug")

    outbox.job_status("gone", lambda session: None)  # forgotten meanwhile: nothing to say
    outbox.job_status("bad", broken)
    outbox.event({"v": 1, "event": "after"})
    wire = Wire()
    await connect(outbox, wire, "s1")
    await until(lambda: wire.docs(EVENTS), 5, "the event behind the broken one")
    assert wire.topics() == [TOPICS.node(NODE, "state"), EVENTS] and outbox.pending() == []


async def test_direct_sends_need_a_connection_and_refresh_and_wake_reach_the_agent() -> None:
    agent = Agentish()
    box = Outbox(TOPICS, NODE, refresh=agent.refresh, wake=agent.wake)
    with pytest.raises(NotConnected):
        await box.send("heartbeat", {"v": 1})
    assert isinstance(NotConnected("x"), aiomqtt.MqttError)  # the agent's session loop reconnects on it
    wire = Wire()
    box.attach(wire.publish, "s1")
    await box.send("heartbeat", {"v": 1, "session": "s1"})
    box.detach()
    with pytest.raises(NotConnected):
        await box.send("heartbeat", {"v": 1})
    assert wire.got == [(TOPICS.node(NODE, "heartbeat"), {"v": 1, "session": "s1"}, 0, False)]
    await box.refresh()
    box.wake()
    assert (agent.refreshed, agent.woken) == (1, 1)
