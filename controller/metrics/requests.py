"""The proxy's request numbers: one source for `GET /metrics` and the dashboard's per-agent and per-model
figures.

The proxy hands one `Observation` per finished request to `RequestStats.observe()`: plain-Python counters
and bucket arrays, no locks (everything runs on the controller's event loop) and no allocation beyond a
new label set's first request. Two readers take from the same accumulators:
- `families()`: prometheus_client metric families, built at scrape time (names from names.py);
- `recent()`: requests/s, TTFT p50/p95 and tokens/s over the last minute, per agent or per model, from
  the same observations kept in 10-second slices; quantiles are interpolated from the histogram buckets
  exactly as PromQL's `histogram_quantile` does, so the dashboard and a Grafana panel agree.

Admission control's queue outcomes arrive the same way, through `observe_queue()` (registered as an
observer of controller/admission/gate.py's Admission when the `metrics` setting is on): outcomes counted,
the waits of queued requests in a histogram by tier and, per model, in the recent slices.

Model labels stay bounded: a model neither in the catalogue nor installed on some agent counts as
names.OTHER_MODEL (the caller's `known_model` decides; its answers are cached for a while).
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from ollama_fleet.controller.admission.gate import QueueEvent
from ollama_fleet.controller.metrics import names

SLICE_S = 10.0  # recent(): the width of one time slice
MAX_WINDOW_S = 300.0  # recent(): the longest window kept
MODEL_CACHE_MAX = 1024  # model names whose label is remembered; over it the cache starts afresh
MODEL_CACHE_TTL = 30.0  # seconds: a model installed (or removed) since is labelled anew within this

Dimension = Literal["agent", "model"]
QUEUED = frozenset(("served", "timeout", "gone"))  # queue outcomes of requests that waited: their wait counts


@dataclass(slots=True)
class Observation:
    """One finished proxied request, as the proxy measured it."""

    endpoint: str  # the routed path, e.g. /api/chat
    model: str  # as requested (normalized); "" when the request named none
    agent: str  # the agent that answered; "" when none did
    code: int  # the HTTP status the client got
    error_reason: str | None  # a short fixed word (names.REQUEST_ERRORS' help lists them); None: success
    duration_s: float
    ttft_s: float | None
    tpot_s: float | None
    overhead_s: float  # time the controller added: total minus the time awaiting the agent
    prompt_tokens: int | None
    completion_tokens: int | None
    failovers: int  # attempts that failed over before the first byte
    mono: float  # time.monotonic() at the end (recent() slices by it)


@dataclass(frozen=True, slots=True)
class Recent:
    """An agent's or model's last window: what the dashboard shows."""

    requests: int
    rps: float
    ttft_p50: float | None  # seconds; None without a TTFT in the window
    ttft_p95: float | None
    tokens_per_s: float | None  # completion tokens per second of the window; None when no request reported any
    queued: int = 0  # requests that waited in the model's queue and left it in the window (models only)
    wait_p50: float | None = None  # their wait, seconds; None without one
    wait_p95: float | None = None


class Histogram:
    """Per-bucket counts (not cumulative; the last is +Inf), their sum and count."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> int:
        """Counts the value; returns its bucket's index."""
        # bisect_left: a value equal to a bound belongs to that bucket (le = "less or equal")
        i = bisect_left(self.bounds, value)
        self.counts[i] += 1
        self.sum += value
        self.count += 1
        return i

    def cumulative(self) -> list[tuple[str, float]]:
        """prometheus_client's bucket list: (le, cumulative count), +Inf last."""
        out: list[tuple[str, float]] = []
        acc = 0
        for bound, n in zip((*map(floatToGoString, self.bounds), "+Inf"), self.counts, strict=True):
            acc += n
            out.append((bound, acc))
        return out


def histogram_quantile(q: float, bounds: Sequence[float], counts: Sequence[int]) -> float | None:
    """PromQL's histogram_quantile over per-bucket counts (the last is +Inf): linear interpolation inside
    the bucket where the rank falls, the first bucket starting at 0; a rank in +Inf answers the highest
    finite bound. None for an empty histogram (PromQL: NaN)."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    below = 0
    for i, bound in enumerate(bounds):
        n = counts[i]
        if below + n >= rank:
            start = 0.0 if i == 0 else bounds[i - 1]
            if i == 0 and bound <= 0:
                return bound
            return start + (bound - start) * ((rank - below) / n if n else 0.0)
        below += n
    return bounds[-1]


class Series:
    """One model's histograms and token counts (None: no request reported that kind)."""

    __slots__ = ("completion", "duration", "prompt", "tpot", "ttft")

    def __init__(self) -> None:
        self.duration = Histogram(names.REQUEST_DURATION.buckets)
        self.ttft = Histogram(names.TTFT_BUCKETS)
        self.tpot = Histogram(names.TPOT_BUCKETS)
        self.prompt: int | None = None
        self.completion: int | None = None


class _Cell:
    """One agent's or model's numbers in one time slice."""

    __slots__ = ("requests", "tokens", "tokens_seen", "ttft", "waits")

    def __init__(self) -> None:
        self.requests = 0
        self.ttft = [0] * (len(names.TTFT_BUCKETS) + 1)
        self.tokens = 0
        self.tokens_seen = False
        self.waits: list[int] | None = None  # queue waits per QUEUE_WAIT_BUCKETS bucket; None: no queued request


class _Slice:
    __slots__ = ("agent", "index", "model")

    def __init__(self, index: int) -> None:
        self.index = index
        self.agent: dict[str, _Cell] = {}
        self.model: dict[str, _Cell] = {}


class RequestStats:
    """Accumulates every proxied request; read by the /metrics collector and the dashboard."""

    def __init__(self, known_model: Callable[[str], bool] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`known_model(name)`: the model is in the catalogue or installed on some agent (None: every model
        is). `clock`: the time `recent()` reads (tests inject one; observations bring their own)."""
        self._known = known_model
        self._clock = clock
        self._labels: dict[str, tuple[str, float]] = {}  # model -> (label, checked at)
        self.started = clock()
        # the accumulators, by label values in names.py's order
        self.requests: dict[tuple[str, str, str, int], int] = {}  # (endpoint, model, agent, code)
        self.errors: dict[str, int] = {}
        self.models: dict[str, Series] = {}
        self.overhead = Histogram(names.REQUEST_OVERHEAD.buckets)
        self.failovers = 0
        self.queue_waits: dict[str, Histogram] = {}  # tier -> waits of queued requests
        self.queue_outcomes: dict[str, int] = {}
        self._slices: deque[_Slice] = deque()

    # ---- writing -----------------------------------------------------------------------------
    def model_label(self, model: str, now: float) -> str:
        """The model's label value: itself when known, else names.OTHER_MODEL; "" stays "" (no model)."""
        if not model or self._known is None:
            return model
        hit = self._labels.get(model)
        if hit is not None and now - hit[1] < MODEL_CACHE_TTL:
            return hit[0]
        label = model if self._known(model) else names.OTHER_MODEL
        if len(self._labels) >= MODEL_CACHE_MAX:
            self._labels.clear()
        self._labels[model] = (label, now)
        return label

    def label(self, model: str) -> str:
        """model_label() now: for readers outside the request path (the queue figures)."""
        return self.model_label(model, self._clock())

    def observe(self, o: Observation) -> None:
        model = self.model_label(o.model, o.mono)
        key = (o.endpoint, model, o.agent, o.code)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        if o.error_reason is not None:
            self.errors[o.error_reason] = self.errors.get(o.error_reason, 0) + 1
        if o.failovers:
            self.failovers += o.failovers
        self.overhead.observe(o.overhead_s)
        if not model:
            return  # no model: refused before one was read; no per-model numbers
        series = self.models.get(model)
        if series is None:
            series = self.models[model] = Series()
        series.duration.observe(o.duration_s)
        ttft_bucket = -1
        if o.ttft_s is not None:
            ttft_bucket = series.ttft.observe(o.ttft_s)
        if o.tpot_s is not None:
            series.tpot.observe(o.tpot_s)
        if o.prompt_tokens is not None:
            series.prompt = (series.prompt or 0) + o.prompt_tokens
        tokens = o.completion_tokens
        if tokens is not None:
            series.completion = (series.completion or 0) + tokens
        index = int(o.mono // SLICE_S)
        slices = self._slices
        sl = slices[-1] if slices and slices[-1].index == index else self._slice(index)
        _tally(sl.model, model, ttft_bucket, tokens)
        if o.agent:
            _tally(sl.agent, o.agent, ttft_bucket, tokens)

    def observe_queue(self, ev: QueueEvent) -> None:
        """An Admission observer: one request's outcome at the queue, on the event loop like observe()."""
        outcomes = self.queue_outcomes
        outcomes[ev.outcome] = outcomes.get(ev.outcome, 0) + 1
        if ev.outcome not in QUEUED:
            return  # refused without waiting: an outcome, not a wait
        waits = self.queue_waits.get(ev.tier)
        if waits is None:
            waits = self.queue_waits[ev.tier] = Histogram(names.QUEUE_WAIT_BUCKETS)
        bucket = waits.observe(ev.waited)
        now = self._clock()
        model = self.model_label(ev.model, now)
        if not model:  # (every queued request names one)
            return
        cells = self._slice(int(now // SLICE_S)).model
        cell = cells.get(model)
        if cell is None:
            cell = cells[model] = _Cell()
        if cell.waits is None:
            cell.waits = [0] * (len(names.QUEUE_WAIT_BUCKETS) + 1)
        cell.waits[bucket] += 1

    def _slice(self, index: int) -> _Slice:
        slices = self._slices
        if slices and slices[-1].index >= index:
            if slices[-1].index == index:
                return slices[-1]
            for sl in reversed(slices):  # a request that ended a moment before the latest (rare)
                if sl.index == index:
                    return sl
        sl = _Slice(index)
        slices.append(sl)
        oldest = index - int(MAX_WINDOW_S // SLICE_S)
        while slices[0].index <= oldest:
            slices.popleft()
        return sl

    # ---- reading -----------------------------------------------------------------------------
    def families(self) -> Iterator[Metric]:
        """The request metrics as prometheus_client families, built now from the accumulators."""
        spec = names.REQUESTS
        requests = CounterMetricFamily(spec.name, spec.help, labels=spec.labels)
        for (endpoint, model, agent, code), n in self.requests.items():
            requests.add_metric((endpoint, model, agent, str(code)), n)
        yield requests
        yield _by_one_label(names.REQUEST_ERRORS, self.errors)
        for spec in (names.REQUEST_DURATION, names.REQUEST_TTFT, names.REQUEST_TPOT):
            fam = HistogramMetricFamily(spec.name, spec.help, labels=spec.labels)
            for model, series in self.models.items():
                h = series.duration if spec is names.REQUEST_DURATION else \
                    series.ttft if spec is names.REQUEST_TTFT else series.tpot
                if h.count:
                    fam.add_metric((model,), h.cumulative(), h.sum)
            yield fam
        spec = names.REQUEST_OVERHEAD
        overhead = HistogramMetricFamily(spec.name, spec.help, labels=spec.labels)
        overhead.add_metric((), self.overhead.cumulative(), self.overhead.sum)
        yield overhead
        spec = names.FAILOVERS
        yield CounterMetricFamily(spec.name, spec.help, value=self.failovers)
        spec = names.TOKENS
        tokens = CounterMetricFamily(spec.name, spec.help, labels=spec.labels)
        for model, series in self.models.items():
            if series.prompt is not None:
                tokens.add_metric((model, "prompt"), series.prompt)
            if series.completion is not None:
                tokens.add_metric((model, "completion"), series.completion)
        yield tokens
        spec = names.QUEUE_WAIT
        waits = HistogramMetricFamily(spec.name, spec.help, labels=spec.labels)
        for tier, h in self.queue_waits.items():
            waits.add_metric((tier,), h.cumulative(), h.sum)
        yield waits
        yield _by_one_label(names.QUEUE_OUTCOMES, self.queue_outcomes)

    def recent(self, by: Dimension, window_s: float = 60.0) -> dict[str, Recent]:
        """Per agent or per model over the last `window_s` seconds (whole slices; at most MAX_WINDOW_S):
        rates divide by the time the window's slices cover, not more than the stats have existed."""
        now = self._clock()
        n = max(1, min(math.ceil(window_s / SLICE_S), int(MAX_WINDOW_S // SLICE_S)))
        current = int(now // SLICE_S)
        first = current - n + 1
        span = now - max(first * SLICE_S, self.started)
        span = max(span, 1e-9)
        acc: dict[str, _Cell] = {}
        for sl in self._slices:
            if sl.index < first or sl.index > current:
                continue
            for name, cell in (sl.agent if by == "agent" else sl.model).items():
                a = acc.get(name)
                if a is None:
                    a = acc[name] = _Cell()
                a.requests += cell.requests
                a.tokens += cell.tokens
                a.tokens_seen = a.tokens_seen or cell.tokens_seen
                a.ttft = [x + y for x, y in zip(a.ttft, cell.ttft, strict=True)]
                if cell.waits is not None:
                    a.waits = cell.waits if a.waits is None else [x + y for x, y in zip(a.waits, cell.waits,
                                                                                        strict=True)]
        return {name: Recent(
            requests=a.requests,
            rps=a.requests / span,
            ttft_p50=histogram_quantile(0.5, names.TTFT_BUCKETS, a.ttft),
            ttft_p95=histogram_quantile(0.95, names.TTFT_BUCKETS, a.ttft),
            tokens_per_s=a.tokens / span if a.tokens_seen else None,
            queued=sum(a.waits) if a.waits else 0,
            wait_p50=histogram_quantile(0.5, names.QUEUE_WAIT_BUCKETS, a.waits) if a.waits else None,
            wait_p95=histogram_quantile(0.95, names.QUEUE_WAIT_BUCKETS, a.waits) if a.waits else None,
        ) for name, a in acc.items()}


def _tally(cells: dict[str, _Cell], key: str, ttft_bucket: int, tokens: int | None) -> None:
    cell = cells.get(key)
    if cell is None:
        cell = cells[key] = _Cell()
    cell.requests += 1
    if ttft_bucket >= 0:
        cell.ttft[ttft_bucket] += 1
    if tokens is not None:
        cell.tokens += tokens
        cell.tokens_seen = True


def _by_one_label(spec: names.MetricSpec, counts: Mapping[str, float]) -> CounterMetricFamily:
    """A counter family with one label, from a label value -> count table."""
    fam = CounterMetricFamily(spec.name, spec.help, labels=spec.labels)
    for value, n in counts.items():
        fam.add_metric((value,), n)
    return fam
