"""`GET /metrics`: the controller's Prometheus exposition, built at scrape time.

One collector on the controller's own CollectorRegistry (not prometheus_client's global one, which would
mix in the process and platform collectors and every test's controller) yields:
- the proxy's request figures (RequestStats.families(), controller/metrics/requests.py);
- admission control's queues by model and each agent's generation slots (controller/metrics/queues.py);
- the fleet from the live registry: agents by status (the read model's counts), requests in flight per
  agent, and the node telemetry the agents' heartbeats carry, in Prometheus' base units (ratios 0-1,
  bytes, celsius, watts), so one scrape of the controller replaces an exporter on every GPU machine;
- the MQTT ingest counters and the job ledger's jobs by status.

Names, help and labels come from names.py. A scrape reads memory only; the families are built on the
event loop (the registry changes there) and turned into text on a worker thread, so a large fleet's
scrape does not hold the proxy's loop for its whole length.

What a scrape costs (tests/bench/bench_scrape.py; figures in docs/metrics.md): about 11 samples an agent,
and prometheus_client's generate_latest spends most of it, per sample. So the build makes Samples as cheaply
as Python allows, generate_latest is spared its name escaping (VERBATIM), and a family whose samples are
those of the last scrape keeps its text (Formatter).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.openmetrics.exposition import UNDERSCORES
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from sanic import Blueprint, Request
from sanic.response import HTTPResponse, raw
from sanic_ext import openapi

from ollama_fleet.contract.jobs import STATUSES as JOB_STATUSES
from ollama_fleet.contract.sanitize import finite
from ollama_fleet.contract.status import ALL as AGENT_STATUSES
from ollama_fleet.contract.status import AgentStatus

from ollama_fleet.controller.admission.gate import Admission
from ollama_fleet.controller.jobs.ledger import JobLedger
from ollama_fleet.controller.metrics import names, queues
from ollama_fleet.controller.metrics.requests import RequestStats
from ollama_fleet.controller.registry.ingest import Ingest
from ollama_fleet.controller.registry.live import MAX_LIST, Registry

PERCENT = 100.0  # the agent reports CPU and GPU use in percent; Prometheus wants ratios
ONLINE = AgentStatus.ONLINE.value  # plain str: compared once per agent per scrape

# A Sample straight from its fields, as tuple.__new__ makes it: half the cost of its NamedTuple constructor,
# which a large fleet's build calls 11 times an agent. TAIL is the fields after (name, labels, value) at
# their defaults (a later field without a default fails here, at import).
_new = tuple.__new__
TAIL = tuple(Sample._field_defaults[f] for f in Sample._fields[3:])

# The escaping generate_latest is given. prometheus_client (0.22 on) checks every metric and label name of
# every sample against the legacy character set for its default scheme, `underscores`: a quarter to a third
# of formatting a large fleet. Our names are names.py's constants, all legacy names, which that scheme leaves
# as they are; a scheme the library does not name takes its branch that leaves names as they are, unchecked.
# escaping() holds it to that: a probe of every family must come out byte for byte as with the default, else
# the default is used.
VERBATIM = "verbatim"


def gauge(spec: names.MetricSpec) -> GaugeMetricFamily:
    return GaugeMetricFamily(spec.name, spec.help, labels=spec.labels)


def counter(spec: names.MetricSpec) -> CounterMetricFamily:
    return CounterMetricFamily(spec.name, spec.help, labels=spec.labels)


def escaping() -> str:
    """VERBATIM if this prometheus_client formats every family of names.py with it exactly as with its default
    escaping, else the default."""
    probe: list[Metric] = []
    for spec in names.ALL:
        values = tuple(f"v{i}" for i in range(len(spec.labels)))
        if spec.kind == "histogram":
            h = HistogramMetricFamily(spec.name, spec.help, labels=spec.labels)
            h.add_metric(values, [(repr(b), 1.0) for b in spec.buckets] + [("+Inf", 2.0)], 3.0)
            probe.append(h)
        else:
            fam = counter(spec) if spec.kind == "counter" else gauge(spec)
            fam.add_metric(values, 1.5)
            probe.append(fam)
    try:
        same = generate_latest(Families(probe), escaping=VERBATIM) == generate_latest(Families(probe))
    except ValueError:  # a release that refuses a scheme it does not know
        same = False
    return VERBATIM if same else UNDERSCORES


class FleetCollector(Collector):
    """The fleet's figures at scrape time, from the parts that hold them."""

    def __init__(self, registry: Registry, ingest: Ingest, jobs: JobLedger, stats: RequestStats,
                 admission: Admission) -> None:
        self.registry, self.ingest, self.jobs, self.stats = registry, ingest, jobs, stats
        self.admission = admission

    def collect(self) -> Iterator[Metric]:
        yield from self.stats.families()
        yield from self._queues()
        yield from self._agents()
        yield from self._mqtt()
        yield self._jobs()

    def _agents(self) -> Iterator[Metric]:
        """Agents by status, then per agent: the hot part of a large fleet's build, so one pass with what it
        calls bound to locals. An agent's label dict is shared by its samples, a GPU's by its four."""
        by_status = dict.fromkeys(AGENT_STATUSES, 0)  # every status, 0 too (as the read model counts them)
        inflight, cpu, memory, loaded = (gauge(names.INFLIGHT), gauge(names.AGENT_CPU), gauge(names.AGENT_MEMORY),
                                         gauge(names.AGENT_MODELS_LOADED))
        util, gpu_mem, temp, power = (gauge(names.AGENT_GPU_UTIL), gauge(names.AGENT_GPU_MEMORY),
                                      gauge(names.AGENT_GPU_TEMP), gauge(names.AGENT_GPU_POWER))
        capacity, busy = gauge(names.AGENT_CAPACITY), gauge(names.AGENT_SLOTS_BUSY)
        n_capacity, n_busy, n_inflight, n_loaded = capacity.name, busy.name, inflight.name, loaded.name
        n_cpu, n_memory, n_util, n_gpu_mem, n_temp, n_power = (
            cpu.name, memory.name, util.name, gpu_mem.name, temp.name, power.name)
        add_capacity, add_busy, add_inflight, add_loaded = (capacity.samples.append, busy.samples.append,
                                                            inflight.samples.append, loaded.samples.append)
        add_cpu, add_memory, add_util, add_gpu_mem, add_temp, add_power = (
            cpu.samples.append, memory.samples.append, util.samples.append, gpu_mem.samples.append,
            temp.samples.append, power.samples.append)
        admission, held, capacity_of = self.admission, queues.busy, self.admission.capacity
        new, tail, number = _new, TAIL, finite
        for a in self.registry.agents.values():
            status, node = a.status, a.node_id
            by_status[status] = by_status.get(status, 0) + 1
            agent = {"agent": node}
            add_inflight(new(Sample, (n_inflight, agent, a.in_flight) + tail))
            add_busy(new(Sample, (n_busy, agent, held(admission, node)) + tail))
            if a.routable:  # capacity that can take requests now (queues.slots' capacity)
                add_capacity(new(Sample, (n_capacity, agent, capacity_of(a)) + tail))
            if a.state != ONLINE:
                continue  # a stale, lost or offline agent's last figures are not its present: no series
            m = a.metrics
            add_loaded(new(Sample, (n_loaded, agent, len(a.loaded)) + tail))
            if (v := number(m.get("cpu"))) is not None:
                add_cpu(new(Sample, (n_cpu, agent, v / PERCENT) + tail))
            if (v := number(m.get("mem_used"))) is not None:
                add_memory(new(Sample, (n_memory, agent, v) + tail))
            gpus = m.get("gpus")
            if not isinstance(gpus, list):
                continue
            seen: set[int] = set()  # one series per GPU index, even if a heartbeat repeats one
            for g in gpus[:MAX_LIST]:  # ingest checked each is an object with an integer index
                index = g["index"]
                if index in seen:
                    continue
                seen.add(index)
                labels = {"agent": node, "gpu": str(index)}
                if (v := number(g.get("util"))) is not None:
                    add_util(new(Sample, (n_util, labels, v / PERCENT) + tail))
                if (v := number(g.get("mem_used"))) is not None:
                    add_gpu_mem(new(Sample, (n_gpu_mem, labels, v) + tail))
                if (v := number(g.get("temp"))) is not None:
                    add_temp(new(Sample, (n_temp, labels, v) + tail))
                if (v := number(g.get("power"))) is not None:
                    add_power(new(Sample, (n_power, labels, v) + tail))
        agents = gauge(names.AGENTS)
        for status, n in by_status.items():
            agents.add_metric((status,), n)
        yield from (agents, inflight, capacity, busy, cpu, memory, util, gpu_mem, temp, power, loaded)

    def _queues(self) -> Iterator[Metric]:
        """Each model's waiting requests and its oldest one's wait; a model without a queue has no series."""
        depth, oldest = gauge(names.QUEUE_DEPTH), gauge(names.QUEUE_OLDEST)
        for model, q in sorted(queues.queues(self.admission, self.stats.label).items()):
            depth.add_metric((model,), q.depth)
            oldest.add_metric((model,), q.oldest_wait)
        yield from (depth, oldest)

    def _mqtt(self) -> Iterator[Metric]:
        messages = counter(names.MQTT_MESSAGES)
        for kind, n in self.ingest.messages_by_kind().items():
            messages.add_metric((kind,), n)
        yield messages
        dropped = counter(names.MQTT_DROPPED)
        for reason, n in sorted(self.ingest.dropped_by_reason().items()):
            dropped.add_metric((reason,), n)
        yield dropped

    def _jobs(self) -> Metric:
        """Unfinished jobs and the finished ones the ledger still keeps (its `recent`, bounded)."""
        counts = Counter(r.status.value for r in self.jobs.active.values())
        counts.update(r.status.value for r in self.jobs.recent.values())
        jobs = gauge(names.JOBS)
        for status in JOB_STATUSES:
            jobs.add_metric((status,), counts[status])
        return jobs


class Families(Collector):
    """Families already built: what the worker thread formats, while the loop moves on."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


class Formatter:
    """Families -> the text format, on a worker thread. generate_latest formats each family on its own, so it
    is called per family and the texts joined: the same bytes as one call for all. A family whose samples are
    those of the last scrape (an idle fleet's slots, in-flight counts, capacity, loaded models, request
    counters) keeps its text; the check (Metric equality) costs a few per cent of formatting it again. Two
    scrapes at once each read the last scrape's table and put their own in its place whole: neither sees a
    half-made one. (A value turning from 0.0 to -0.0 keeps the text 0.0: the same number.)"""

    def __init__(self, escaping: str) -> None:
        self.escaping = escaping
        self.last: dict[str, tuple[Metric, bytes]] = {}  # family name -> (the family, its text)

    def __call__(self, families: Families) -> bytes:
        before, last = self.last, {}
        texts = []
        for fam in families.families:
            kept = before.get(fam.name)
            if kept is not None and kept[0] == fam:
                text = kept[1]
            else:
                text = generate_latest(Families([fam]), escaping=self.escaping)
            last[fam.name] = (fam, text)
            texts.append(text)
        self.last = last
        return b"".join(texts)


class FleetMetrics:
    """The controller's metrics registry (compose.Fleet.metrics): the fleet collector on its own
    CollectorRegistry, which a future exporter can join."""

    def __init__(self, registry: Registry, ingest: Ingest, jobs: JobLedger, stats: RequestStats,
                 admission: Admission) -> None:
        self.registry = CollectorRegistry()
        self.collector = FleetCollector(registry, ingest, jobs, stats, admission)
        self.registry.register(self.collector)
        self.format = Formatter(escaping())

    def snapshot(self) -> Families:
        """Every family, built now from live memory: call it on the event loop."""
        return Families(list(self.registry.collect()))

    def exposition(self) -> bytes:
        """The text format in one call (the bench; tests)."""
        return self.format(self.snapshot())

    async def render(self) -> bytes:
        """The route's: built on the loop, formatted on a worker thread (the families are its own: nothing
        changes them or their samples after the build)."""
        snapshot = self.snapshot()
        return await asyncio.to_thread(self.format, snapshot)


def blueprint(metrics: FleetMetrics) -> Blueprint:
    """The `/metrics` route over this controller's metrics. A read under controller/edge/access.py's policy:
    an admin or viewer token (Prometheus' `authorization` scrape option sends it as a Bearer token) or a
    dashboard login; without tokens, direct loopback clients only."""
    bp = Blueprint("metrics")

    @bp.get("/metrics")
    @openapi.summary("Prometheus metrics: requests, queues, agents, GPU telemetry, MQTT ingest, jobs")
    async def metrics_text(request: Request) -> HTTPResponse:
        return raw(await metrics.render(), content_type=CONTENT_TYPE_LATEST)

    return bp
