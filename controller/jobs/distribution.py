"""Model distribution: which agents get which model (one, some, all, auto by memory), and when.

Every entry point lands here: the HTTP API, the Ollama `/api/pull`, the MQTT `distribute` command and
the automatic pull when an agent first registers (its memory tier in `ollama_fleet/model_tiers.json`).
The result is jobs in the ledger (controller/jobs/ledger.py); this module only decides and validates.
It imports no HTTP handler: the API modules call into it, never the other way round.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from ollama_fleet.contract.jobs import JobVerb
from ollama_fleet.contract.model_names import normalize, valid_model_name
from ollama_fleet.model_tiers import Tiers, largest_gpu_memory
from ollama_fleet.settings import Config

from ollama_fleet.controller.jobs.catalogue import Catalogue
from ollama_fleet.controller.jobs.ledger import JobLedger, JobRec
from ollama_fleet.controller.proxy.upstream import UpstreamPool
from ollama_fleet.controller.registry.live import AgentRecord, Registry

log = logging.getLogger("fleet.distribution")

TARGETS = ("all", "specific", "auto")
GB = 1e9
HUB_QUEUE = 10000  # events buffered for the distribution consumer (it only does in-memory work)


class DistributionError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Plan:
    group: str
    jobs: list[JobRec] = field(default_factory=list)
    reused: list[JobRec] = field(default_factory=list)  # an unfinished identical job already existed
    skipped: list[dict[str, str]] = field(default_factory=list)

    @property
    def recs(self) -> list[JobRec]:
        return [*self.jobs, *self.reused]

    def to_json(self) -> dict[str, Any]:
        return {"task_ids": [r.task_id for r in self.recs], "tasks": {r.node_id: r.task_id for r in self.recs},
                "skipped": self.skipped, "group": self.group}


def gb(n: float | None) -> str:
    return "?" if n is None else f"{n / GB:.1f} GB"


def has_model(a: AgentRecord, model: str) -> bool:
    wanted = normalize(model)
    return any(normalize(m["name"]) == wanted for m in a.models)


def disk_free(a: AgentRecord) -> int | None:
    free = a.metrics.get("disk_free", a.info.get("disk_free"))
    return free if isinstance(free, int) and not isinstance(free, bool) else None


class Distributor:
    def __init__(self, cfg: Config, registry: Registry, ledger: JobLedger, catalogue: Catalogue,
                 tiers: Tiers) -> None:
        self.cfg, self.registry, self.ledger, self.catalogue, self.tiers = cfg, registry, ledger, catalogue, tiers
        self.auto_enabled = cfg.auto_distribute
        # the agents' Ollama for /api/copy, /api/create, /api/push (controller/api/ollama_models.py)
        self.http = UpstreamPool(10.0, cfg.proxy_read_timeout)
        self._awaiting: set[str] = set()  # registered agents whose first heartbeat we wait for
        self._tasks: list[asyncio.Task[Any]] = []

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._consume(), name="fleet-distribution"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.http.close()

    # ---- memory ----------------------------------------------------------------------------
    def memory(self, a: AgentRecord) -> tuple[int | None, int | None]:
        """(largest GPU memory, system RAM) in bytes; the agent's gpu_mem_override wins over NVML."""
        override = a.info.get("gpu_mem_override")
        gpu = override if isinstance(override, int) and override > 0 else largest_gpu_memory(a.gpus)
        ram = a.info.get("mem_total")
        return gpu, ram if isinstance(ram, int) else None

    def budget(self, a: AgentRecord) -> int:
        gpu, ram = self.memory(a)
        return gpu or int((ram or 0) * self.tiers.ram_fraction)

    def tier_models(self, a: AgentRecord) -> list[str]:
        return self.tiers.choose(*self.memory(a))

    def fits(self, a: AgentRecord, model: str) -> tuple[bool, str]:
        m = self.catalogue.get(model)
        if m is None:
            return True, ""  # unknown requirement: let the agent try
        budget = self.budget(a)
        if budget >= m.required_memory:
            return True, ""
        return False, f"needs about {gb(m.required_memory)} of memory, {a.node_id} has {gb(budget)}"

    # ---- planning --------------------------------------------------------------------------
    async def distribute(self, model: Any, target: Any = "all", agent_ids: Any = None, force: bool = False,
                         queue_if_offline: bool = False, origin: str = "api", group: str | None = None,
                         skip_installed: bool | None = None) -> Plan:
        """Create pull jobs (or raise DistributionError with the HTTP status to answer)."""
        if not valid_model_name(model):
            raise DistributionError(400, f"invalid model name {model!r}: expected [namespace/]model[:tag]")
        if target not in TARGETS:
            raise DistributionError(400, f"target must be one of {', '.join(TARGETS)}")
        if skip_installed is None:
            skip_installed = target != "specific"
        agents = self.registry.agents
        plan = Plan(group or uuid.uuid4().hex)
        if target == "specific":
            if (not isinstance(agent_ids, list) or not agent_ids
                    or not all(isinstance(i, str) for i in agent_ids)):
                raise DistributionError(400, "agent_ids (a non-empty list of agent ids) is required for target "
                                             "'specific'")
            for node in agent_ids:
                if node not in agents:
                    raise DistributionError(404, f"agent '{node}' not found")
            candidates = [agents[n] for n in dict.fromkeys(agent_ids)]
            for a in candidates:
                if not a.routable and not queue_if_offline:
                    raise DistributionError(503, f"agent '{a.node_id}' is {a.status}; set queue_if_offline to "
                                                 "pull when it is back online")
        else:
            candidates = sorted((a for a in agents.values()
                                 if a.routable or (queue_if_offline and not a.forced_offline)),
                                key=lambda a: a.node_id)
            if not candidates:
                raise DistributionError(503, "no available agents")
            if target == "auto":
                fitting = []
                for a in candidates:
                    ok, why = self.fits(a, model)
                    if ok:
                        fitting.append(a)
                    else:
                        plan.skipped.append({"agent_id": a.node_id, "reason": why})
                candidates = fitting
        size = self.catalogue.size(model)
        disk_skips = 0
        for a in candidates:
            if skip_installed and not force and has_model(a, model):
                plan.skipped.append({"agent_id": a.node_id, "reason": "already installed"})
                continue
            existing = self.ledger.find_active(a.node_id, JobVerb.PULL, model)
            if existing is not None and not force:
                plan.reused.append(existing)
                continue
            free = disk_free(a)
            if size and free is not None and free < size:
                disk_skips += 1
                plan.skipped.append({"agent_id": a.node_id, "reason": f"insufficient storage: {model} needs "
                                                                      f"{gb(size)}, {gb(free)} free"})
                continue
            args: dict[str, Any] = {"model": model}
            if force:
                args["force"] = True
            if size:
                args["size"] = size
            plan.jobs.append(self.ledger.new(a.node_id, JobVerb.PULL, args, origin, plan.group,
                                             queue_if_offline or origin == "auto"))
        if not plan.recs and disk_skips:
            raise DistributionError(507, "; ".join(s["reason"] + f" on {s['agent_id']}"
                                                   for s in plan.skipped if "storage" in s["reason"]))
        await self.ledger.submit(plan.jobs)
        if plan.jobs:
            log.info("distribute %s (%s, origin %s): %d jobs, %d reused, %d skipped", model, target, origin,
                     len(plan.jobs), len(plan.reused), len(plan.skipped))
        return plan

    async def delete(self, model: str, nodes: list[str], origin: str, group: str | None = None) -> Plan:
        plan = Plan(group or uuid.uuid4().hex)
        for node in nodes:
            existing = self.ledger.find_active(node, JobVerb.DELETE, model)
            if existing is not None:
                plan.reused.append(existing)
            else:
                plan.jobs.append(self.ledger.new(node, JobVerb.DELETE, {"model": model}, origin, plan.group))
        await self.ledger.submit(plan.jobs)
        return plan

    async def auto(self, node: str, origin: str = "auto") -> dict[str, Any]:
        """Pull the agent's tier models it lacks (R-X1); returns what was decided and why."""
        a = self.registry.agents[node]
        gpu, ram = self.memory(a)
        models = self.tier_models(a)
        basis = f"GPU memory {gb(gpu)}" if gpu else f"no GPU, RAM {gb(ram)} x {self.tiers.ram_fraction:g}"
        plan = Plan(uuid.uuid4().hex)
        for model in models:
            try:
                p = await self.distribute(model, "specific", [node], queue_if_offline=True, origin=origin,
                                          group=plan.group, skip_installed=True)
            except DistributionError as e:
                plan.skipped.append({"agent_id": node, "reason": f"{model}: {e.message}"})
                continue
            plan.jobs += p.jobs
            plan.reused += p.reused
            plan.skipped += [{**s, "reason": f"{model}: {s['reason']}"} for s in p.skipped]
        self.registry.event("auto_distribute", node, f"{a.name}: {basis} -> {', '.join(models) or 'no model'}"
                            f" ({self._progress(plan)})", models=models, gpu_mem=gpu, ram=ram)
        return {**plan.to_json(), "models": models, "basis": basis}

    @staticmethod
    def _progress(plan: Plan) -> str:
        """Say "queued" for a job still held by the ledger (fleet cap, agent slot, agent away): not started."""
        started = [r for r in plan.jobs if not r.held]
        queued = [r for r in plan.jobs if r.held]
        parts = [f"{len(started)} pull(s) started"] if started else []
        if queued:
            parts.append(f"{len(queued)} pull(s) queued: {queued[0].phase or 'waiting'}")
        if plan.reused:
            parts.append(f"{len(plan.reused)} already under way")
        return "; ".join(parts) or "nothing to pull"

    # ---- events ----------------------------------------------------------------------------
    async def _consume(self) -> None:
        q = self.registry.hub.subscribe(HUB_QUEUE)
        try:
            while True:
                topic, data = await q.get()
                try:
                    if topic == "event":
                        kind: str = data["kind"]  # Registry.event always sets both
                        node: str | None = data["node_id"]
                        self.ledger.agent_event(kind, node)
                        if kind == "registered" and node and self.auto_enabled and self.ledger.leading:
                            self._awaiting.add(node)
                            self._maybe_auto(node)
                        elif kind == "ollama_up" and node in self._awaiting:
                            self._maybe_auto(node)
                    elif topic == "agent" and data.get("id") in self._awaiting:
                        self._maybe_auto(data["id"])
                except Exception:
                    log.exception("distribution event handling failed")
        finally:
            self.registry.hub.unsubscribe(q)

    def _maybe_auto(self, node: str) -> None:
        """Decide once the agent's info, gpus and models are in (its first heartbeat follows them) and its
        Ollama answers: a pull queued for a machine without a running Ollama would only wait there, and
        a newcomer's first look would show a multi-GB download "started" that cannot start."""
        a = self.registry.agents.get(node)
        if a is None:
            self._awaiting.discard(node)
        elif a.info and a.metrics.get("seq") is not None and a.ollama_up:
            self._awaiting.discard(node)
            asyncio.get_running_loop().create_task(self._auto_quietly(node))

    async def _auto_quietly(self, node: str) -> None:
        try:
            await self.auto(node)
        except Exception:
            log.exception("auto-distribution for %s failed", node)

    async def on_command(self, doc: dict[str, Any]) -> None:
        """`fleet/v1/cmd/_controller/distribute`: the body of POST /api/models/distribute. Every
        controller hears it; the leader obeys."""
        if not self.ledger.leading:
            return
        model = doc.get("model_name", doc.get("model"))
        try:
            plan = await self.distribute(model, doc.get("target", "all"), doc.get("agent_ids"),
                                         force=doc.get("force") is True,
                                         queue_if_offline=doc.get("queue_if_offline") is True, origin="mqtt")
        except DistributionError as e:
            log.warning("MQTT distribute of %r refused: %s", model, e.message)
            self.registry.event("distribute_refused", None, f"MQTT distribute of {model!r} refused: {e.message}",
                                "warning", status=e.status)
            return
        self.registry.event("distribute", None, f"MQTT distribute of {model}: {len(plan.recs)} job(s), "
                            f"{len(plan.skipped)} skipped", **plan.to_json())
