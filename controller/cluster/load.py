"""The shared load picture: what every controller has running and waiting on each agent, so that `least_busy`
and the agents' capacities hold across controllers, not per controller (docs/scaling.md, "Several
controllers: the shared load picture").

Each controller publishes its load on `controllers/<instance>/load` (QoS 0, not retained): per agent the
requests it has in flight and the admission slots it holds, per model the requests in its queue. It does so
every LOAD_EVERY seconds, and within LOAD_SOON of a change of its slots or queue, so that a burst or a
release is seen at once. It keeps the latest document of every other controller until LOAD_TTL after it
arrived; the sums over them are `inflight` (the router adds them to its own counts) and `slots` (admission
subtracts them from each agent's capacity). A document that lowers another controller's slots on an agent,
or one that expires, hands the freed slots to the requests waiting here. A document is at most LOAD_BYTES
encoded: beyond that it carries the largest counts only, slots first (`fit`).

Staleness: a live controller's counts are at most LOAD_SOON + the broker's delay old after a change of its
slots (LOAD_EVERY + delay for in-flight requests that hold no slot); a dead controller's counts are gone
LOAD_TTL after its last document arrived (its last document left at most LOAD_EVERY before it died).
Expiry counts from local arrival, so the controllers' clocks need not agree.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt

from ollama_fleet.contract.protocol import (LOAD_ENTRIES_MAX, LOAD_MAPS, MODEL_KEY_MAX, PROTO, check_load,
                                            encode)

from ollama_fleet.controller.admission.gate import Admission
from ollama_fleet.controller.registry.ingest import Ingest
from ollama_fleet.controller.registry.live import Registry

log = logging.getLogger("fleet.load")

KIND = "load"  # protocol.PEER_KINDS: controllers/<instance>/load
LOAD_EVERY = 0.5  # seconds between documents while nothing changes (also what says "I am alive")
LOAD_SOON = 0.05  # seconds: a change is published within this, and documents never come faster
LOAD_TTL = 2.0  # seconds another controller's document counts after it arrived: 4 missed documents
# bytes a document may take once encoded: under the default max_payload_bytes (65,536), which the others
# drop beyond. LOAD_ENTRIES_MAX alone does not bound it (512 long agent ids per map are about 35 KB a map)
LOAD_BYTES = 60_000
FIT_ORDER = ("slots", "inflight", "queued")  # what a full document keeps first: capacity, routing, the view


@dataclass(slots=True)
class Peer:
    """Another controller's latest load document."""

    instance: str
    leader: bool
    arrived: float  # monotonic, here
    inflight: dict[str, int]
    slots: dict[str, int]
    queued: dict[str, int]


def _top(counts: dict[str, int]) -> dict[str, int]:
    """At most LOAD_ENTRIES_MAX entries, the largest counts first (the contract's bound)."""
    if len(counts) <= LOAD_ENTRIES_MAX:
        return counts
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:LOAD_ENTRIES_MAX])


def fit(doc: dict[str, Any], budget: int) -> bool:
    """Cut `doc`'s maps (in place) so that it encodes, with the `v` ingest adds, to at most `budget` bytes:
    maps in FIT_ORDER, each its largest counts first, until the next entry would not fit. True when nothing
    was cut. Each entry is costed as it encodes (`"name":count,`), so no trial encoding per entry."""
    def cost(name: str, n: int) -> int:
        return len(json.dumps(name)) + len(str(n)) + 2  # quotes and escapes, the colon, a comma

    size = len(encode({"v": PROTO, **doc, **{k: {} for k in LOAD_MAPS}}))
    if size + sum(cost(name, n) for key in FIT_ORDER for name, n in doc[key].items()) <= budget:
        return True  # the usual case: no sorting
    for key in FIT_ORDER:
        kept: dict[str, int] = {}
        for name, n in sorted(doc[key].items(), key=lambda kv: -kv[1]):
            if size + cost(name, n) > budget:
                break
            size += cost(name, n)
            kept[name] = n
        doc[key] = kept
    return False


class SharedLoad:
    def __init__(self, ingest: Ingest, registry: Registry, admission: Admission, leader: Callable[[], bool],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ingest, self.registry, self.admission = ingest, registry, admission
        self.leader = leader
        self.clock = clock
        self.instance = ingest.instance
        self.peers: dict[str, Peer] = {}
        # sums over the other controllers: read by the router (in flight) and the scheduler (slots)
        self.inflight: Counter[str] = Counter()
        self.slots: Counter[str] = Counter()
        self._sent: tuple[dict[str, int], dict[str, int]] = ({}, {})  # slots and queue of the last document
        self._next = 0.0  # monotonic time the next periodic document is due
        self._cut = False  # the last document was cut to LOAD_BYTES
        ingest.peers[KIND] = self.on_doc

    # ---- what others say -------------------------------------------------------------------------
    def on_doc(self, instance: str, doc: dict[str, Any]) -> None:
        """Another controller's document (ingest decoded it; ProtocolError here makes ingest count and drop it)."""
        check_load(doc, instance)
        new = Peer(instance, doc["leader"], self.clock(), *(dict(doc[k]) for k in LOAD_MAPS))
        self._replace(self.peers.get(instance), new)
        self.peers[instance] = new

    def expire(self) -> None:
        """Forget controllers whose last document is older than LOAD_TTL (stopped, killed or cut off)."""
        limit = self.clock() - LOAD_TTL
        for instance in [i for i, p in self.peers.items() if p.arrived < limit]:
            log.info("controller %s sent no load for %.1f s: its counts no longer hold", instance[:12], LOAD_TTL)
            self._replace(self.peers.pop(instance), None)

    def _replace(self, old: Peer | None, new: Peer | None) -> None:
        """Swap one controller's counts in the sums; the slots it gave back go to our waiting requests."""
        if old is None:
            log.info("controller %s shares its load", new.instance[:12] if new else "?")
            before: dict[str, int] = {}
        else:
            before = {n: self.slots[n] for n in old.slots}
            self.inflight.subtract(old.inflight)
            self.slots.subtract(old.slots)
        if new is not None:
            self.inflight.update(new.inflight)
            self.slots.update(new.slots)
        for counts in (self.inflight, self.slots):  # only agents someone is busy on stay in the sums
            for node in [n for n, c in counts.items() if c <= 0]:
                del counts[node]
        for node, n in before.items():
            if self.slots[node] < n:
                self.admission.others_released(node)

    # ---- what we say -----------------------------------------------------------------------------
    def document(self) -> dict[str, Any]:
        """Our load, as the contract has it (ingest.publish_peer adds `v`)."""
        sched = self.admission.sched
        inflight = {a.node_id: a.in_flight for a in self.registry.agents.values() if a.in_flight > 0}
        queued = {m: n for m, n in sched.depths().items() if len(m) <= MODEL_KEY_MAX}
        doc: dict[str, Any] = {"instance": self.instance, "ts": time.time(), "leader": self.leader(),
                               "inflight": _top(inflight), "queued": _top(queued),
                               "slots": _top({n: c for n, c in sched.busy.items() if c > 0})}
        budget = min(LOAD_BYTES, self.ingest.max_bytes)
        cut = not fit(doc, budget)
        if cut != self._cut:  # said when cutting starts and when it ends, not twice a second
            self._cut = cut
            if cut:
                log.warning("our load document would exceed %d bytes: publishing the largest counts only "
                            "(%d slots, %d in flight, %d queued)", budget, *(len(doc[k]) for k in FIT_ORDER))
            else:
                log.info("our load document fits in %d bytes again", budget)
        return doc

    def _changed(self) -> bool:
        sched = self.admission.sched
        return sched.busy != self._sent[0] or sched.depths() != self._sent[1]

    async def publish(self) -> None:
        doc = self.document()
        self._sent = (dict(self.admission.sched.busy), self.admission.sched.depths())
        self._next = self.clock() + LOAD_EVERY
        try:  # QoS 0: done once written; aiomqtt's own timeout ends a wedged write with MqttError
            await self.ingest.publish_peer(KIND, doc)
        except aiomqtt.MqttError:
            pass  # off the broker: the others forget our counts after LOAD_TTL, and we theirs

    async def run(self) -> None:
        """Publish every LOAD_EVERY and soon after a change; forget silent controllers. Runs until cancelled."""
        while True:
            try:
                self.expire()
                if self.clock() >= self._next or self._changed():
                    await self.publish()
            except Exception:  # never end the load picture for good
                log.exception("shared load step failed")
            await asyncio.sleep(LOAD_SOON)

    # ---- the view (GET /api/cluster) -------------------------------------------------------------
    def view(self) -> dict[str, Any]:
        now = self.clock()
        return {
            "instance": self.instance,
            "leader": self.leader(),
            "load_every": LOAD_EVERY,
            "load_ttl": LOAD_TTL,
            "controllers": [
                {"instance": p.instance, "leader": p.leader, "age": round(now - p.arrived, 3),
                 "in_flight": sum(p.inflight.values()), "slots": sum(p.slots.values()),
                 "queued": sum(p.queued.values()), "agents": dict(sorted(p.inflight.items()))}
                for p in sorted(self.peers.values(), key=lambda p: p.instance)
            ],
        }
