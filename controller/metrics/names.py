"""The controller's Prometheus metrics: names, kinds, labels and help. Metric names are public API
(dashboards and alerts are built on them): change one only with a note in docs/metrics.md.

Every exporter in this package and the shipped Grafana dashboard (deploy/grafana/) take names from here;
tests check the exposition, this table and docs/metrics.md agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["counter", "gauge", "histogram"]

OTHER_MODEL = "other"  # the label value of a model neither in the catalogue nor on any agent (bounded cardinality)


@dataclass(frozen=True, slots=True)
class MetricSpec:
    name: str  # for counters, without the `_total` suffix prometheus_client adds
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()  # histograms: upper bounds in seconds (+Inf is implied)


DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5)
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
# a queued request's wait: a slot freed at once (10 ms) up to max_queue_wait's default range (5 min)
QUEUE_WAIT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# --- requests through the proxy (controller/metrics/requests.py) ---
REQUESTS = MetricSpec("fleet_requests", "counter", "Proxied requests, by endpoint, model, the agent that "
                      "answered (empty: none) and HTTP status code.", ("endpoint", "model", "agent", "code"))
REQUEST_ERRORS = MetricSpec("fleet_request_errors", "counter", "Proxied requests that failed, by reason "
                            "(no_route, upstream, client_gone, timeout, in_band, rejected, overloaded, "
                            "rate_limited, ...).", ("reason",))
REQUEST_DURATION = MetricSpec("fleet_request_duration_seconds", "histogram",
                              "Time from a request's arrival to its last byte, by model.", ("model",),
                              DURATION_BUCKETS)
REQUEST_TTFT = MetricSpec("fleet_request_ttft_seconds", "histogram",
                          "Time to first token, by model.", ("model",), TTFT_BUCKETS)
REQUEST_TPOT = MetricSpec("fleet_request_tpot_seconds", "histogram", "Time per output token (the final "
                          "chunk's eval_duration / eval_count), by model.", ("model",), TPOT_BUCKETS)
REQUEST_OVERHEAD = MetricSpec("fleet_request_overhead_seconds", "histogram", "Time the controller adds to a "
                              "request: its total minus the time spent waiting on the agent.", (),
                              OVERHEAD_BUCKETS)
INFLIGHT = MetricSpec("fleet_inflight_requests", "gauge", "Requests in flight, by agent.", ("agent",))
FAILOVERS = MetricSpec("fleet_failovers", "counter", "Attempts that failed over to another agent before the "
                       "first byte.")
TOKENS = MetricSpec("fleet_tokens", "counter", "Tokens through the proxy, by model and kind (prompt, "
                    "completion).", ("model", "kind"))

# --- admission control's queues (controller/admission/gate.py; observed in requests.py, read in fleet.py) ---
QUEUE_WAIT = MetricSpec("fleet_queue_wait_seconds", "histogram", "Time a queued request waited for a slot "
                        "(served, timed out or given up by the client), by priority tier.", ("tier",),
                        QUEUE_WAIT_BUCKETS)
QUEUE_OUTCOMES = MetricSpec("fleet_queue_outcomes", "counter", "What happened to requests at admission: "
                            "served (waited, then got a slot), full, timeout, gone (client left while "
                            "queued), or a key limit (concurrency, rpm, tpm).", ("outcome",))
QUEUE_DEPTH = MetricSpec("fleet_queue_depth", "gauge", "Requests waiting for a slot, by model.", ("model",))
QUEUE_OLDEST = MetricSpec("fleet_queue_oldest_wait_seconds", "gauge", "How long the oldest request waiting "
                          "in a model's queue has waited.", ("model",))
AGENT_CAPACITY = MetricSpec("fleet_agent_capacity", "gauge", "Generation slots of a routable agent in force "
                            "(its reported num_parallel, lower for a while after its Ollama said busy).",
                            ("agent",))
AGENT_SLOTS_BUSY = MetricSpec("fleet_agent_slots_busy", "gauge", "Generation slots held by requests, by "
                              "agent.", ("agent",))

# --- the fleet, from the registry (controller/metrics/fleet.py) ---
AGENTS = MetricSpec("fleet_agents", "gauge", "Agents by status.", ("status",))
AGENT_CPU = MetricSpec("fleet_agent_cpu_ratio", "gauge", "CPU use of the agent's machine (0-1).", ("agent",))
AGENT_MEMORY = MetricSpec("fleet_agent_memory_used_bytes", "gauge", "Memory used on the agent's machine.",
                          ("agent",))
AGENT_GPU_UTIL = MetricSpec("fleet_agent_gpu_utilization_ratio", "gauge", "GPU utilisation (0-1).",
                            ("agent", "gpu"))
AGENT_GPU_MEMORY = MetricSpec("fleet_agent_gpu_memory_used_bytes", "gauge", "GPU memory used.",
                              ("agent", "gpu"))
AGENT_GPU_TEMP = MetricSpec("fleet_agent_gpu_temperature_celsius", "gauge", "GPU temperature.",
                            ("agent", "gpu"))
AGENT_GPU_POWER = MetricSpec("fleet_agent_gpu_power_watts", "gauge", "GPU power draw.", ("agent", "gpu"))
AGENT_MODELS_LOADED = MetricSpec("fleet_agent_models_loaded", "gauge", "Models loaded in the agent's Ollama.",
                                 ("agent",))
MQTT_MESSAGES = MetricSpec("fleet_mqtt_messages", "counter", "MQTT messages ingested, by kind (topic kind).",
                           ("kind",))
MQTT_DROPPED = MetricSpec("fleet_mqtt_dropped", "counter", "MQTT messages dropped, by reason.", ("reason",))
JOBS = MetricSpec("fleet_jobs", "gauge", "Jobs the controller knows, by status.", ("status",))

ALL: tuple[MetricSpec, ...] = (
    REQUESTS, REQUEST_ERRORS, REQUEST_DURATION, REQUEST_TTFT, REQUEST_TPOT, REQUEST_OVERHEAD, INFLIGHT,
    FAILOVERS, TOKENS, QUEUE_WAIT, QUEUE_OUTCOMES, QUEUE_DEPTH, QUEUE_OLDEST, AGENT_CAPACITY, AGENT_SLOTS_BUSY,
    AGENTS, AGENT_CPU, AGENT_MEMORY, AGENT_GPU_UTIL, AGENT_GPU_MEMORY, AGENT_GPU_TEMP,
    AGENT_GPU_POWER, AGENT_MODELS_LOADED, MQTT_MESSAGES, MQTT_DROPPED, JOBS,
)


def exposed_names(spec: MetricSpec) -> tuple[str, ...]:
    """The sample names a spec shows in the text format (what PromQL and Grafana refer to)."""
    if spec.kind == "counter":
        return (spec.name + "_total",)
    if spec.kind == "histogram":
        return tuple(spec.name + s for s in ("_bucket", "_sum", "_count"))
    return (spec.name,)
