"""OpenTelemetry traces of proxied requests (docs/tracing.md): one SERVER span per request, one CLIENT span
per upstream attempt, events for the routing decision and each failover, GenAI semantic-convention
attributes, exported over OTLP/HTTP.

Off (no `otel_endpoint`), the proxy gets `Tracer()` and `NO_TRACE`: methods that do nothing, and
opentelemetry is never imported. On, the SDK is imported here, lazily, from the optional `otel` extra.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

from ollama_fleet.settings import Config, ConfigError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span
    from opentelemetry.trace import Tracer as OtelApiTracer

    from ollama_fleet.controller.proxy.router import Decision
    from ollama_fleet.controller.registry.live import AgentRecord

EXTRA_HINT = "pip install 'ollama-fleet[otel]'"
EXPORT_TIMEOUT = 5.0  # seconds per OTLP export: bounds the flush at shutdown when the collector is away
SCOPE = "ollama_fleet.controller.proxy"

# gen_ai.operation.name per routed endpoint; /api/show is no GenAI operation (no attribute).
OPERATIONS = {
    "/api/chat": "chat", "/v1/chat/completions": "chat", "/v1/responses": "chat", "/v1/messages": "chat",
    "/api/generate": "text_completion", "/v1/completions": "text_completion",
    "/api/embed": "embeddings", "/api/embeddings": "embeddings", "/v1/embeddings": "embeddings",
}


class Finished(Protocol):
    """What a finished request reports (the proxy's Exchange fits)."""

    @property
    def status(self) -> int: ...
    @property
    def agent(self) -> str | None: ...
    @property
    def attempts(self) -> int: ...
    @property
    def prompt_tokens(self) -> int | None: ...
    @property
    def completion_tokens(self) -> int | None: ...
    @property
    def error(self) -> str | None: ...


class RequestTrace:
    """One request's trace. This base does nothing: it is what every request gets while tracing is off."""

    __slots__ = ()

    def routed(self, model: str, decision: Decision) -> None:
        """The router chose: `decision.order` is the order the agents will be tried in."""

    def attempt(self, agent: AgentRecord) -> None:
        """An attempt on `agent` begins (the previous one, if any, has failed over)."""

    def failover(self, why: str, status: int | None) -> None:
        """The current attempt failed before the first byte; the next agent, if any, gets the request."""

    def finish(self, x: Finished) -> None:
        """The request is answered (or abandoned): ends the open spans. Called once."""


NO_TRACE = RequestTrace()


class Tracer:
    """Builds each request's trace. This base is tracing off: no spans, no cost beyond a call."""

    def request(self, path: str, headers: Mapping[str, str]) -> RequestTrace:
        return NO_TRACE

    async def shutdown(self) -> None:
        """Export what is still buffered; at the controller's close."""


def build(cfg: Config) -> Tracer:
    """The tracer `cfg` asks for; a ConfigError when tracing is asked for but the extra is missing."""
    if not cfg.otel_endpoint:
        return Tracer()
    try:
        return OtelTracer(cfg.otel_endpoint, cfg.otel_service_name)
    except ImportError as e:
        raise ConfigError(f"otel_endpoint is set but OpenTelemetry is not installed ({e}): {EXTRA_HINT}") from None


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL: `endpoint` is the collector's base (as OTEL_EXPORTER_OTLP_ENDPOINT is)."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else endpoint + "/v1/traces"


class OtelTracer(Tracer):
    """A provider of our own (the global one is left to the host), batching spans to an OTLP exporter."""

    def __init__(self, endpoint: str, service_name: str) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        from ollama_fleet import __version__

        resource = Resource.create({"service.name": service_name, "service.version": __version__})
        self.provider: TracerProvider = TracerProvider(resource=resource)
        exporter = OTLPSpanExporter(endpoint=traces_url(endpoint), timeout=EXPORT_TIMEOUT)
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer: OtelApiTracer = self.provider.get_tracer(SCOPE, __version__)

    def request(self, path: str, headers: Mapping[str, str]) -> RequestTrace:
        return OtelRequestTrace(self.tracer, path, headers)

    async def shutdown(self) -> None:
        await asyncio.to_thread(self.provider.shutdown)  # blocking: the last batch goes out over HTTP


class OtelRequestTrace(RequestTrace):
    """The request's SERVER span (a child of the client's `traceparent`, when it sent one) and its CLIENT
    attempt spans, named as the GenAI conventions say: `{operation} {model}`."""

    __slots__ = ("agent", "current", "decision", "model", "operation", "span", "tracer")

    def __init__(self, tracer: OtelApiTracer, path: str, headers: Mapping[str, str]) -> None:
        from opentelemetry.propagate import extract
        from opentelemetry.trace import SpanKind

        self.tracer = tracer
        self.operation = OPERATIONS.get(path)
        self.model: str | None = None
        self.decision: Decision | None = None
        self.current: Span | None = None  # the open attempt's span
        self.agent = ""  # the open attempt's agent
        attrs: dict[str, str] = {"http.request.method": "POST", "http.route": path, "url.path": path,
                                 "gen_ai.system": "ollama", "gen_ai.provider.name": "ollama"}
        if self.operation:
            attrs["gen_ai.operation.name"] = self.operation
        self.span: Span = tracer.start_span(f"POST {path}", context=extract(headers), kind=SpanKind.SERVER,
                                            attributes=attrs)

    def routed(self, model: str, decision: Decision) -> None:
        self.model, self.decision = model, decision
        reason = decision.reason()
        self.span.set_attributes({"gen_ai.request.model": model, "fleet.route_reason": reason,
                                  "fleet.strategy": decision.strategy})
        self.span.add_event("fleet.routed", {"fleet.strategy": decision.strategy, "fleet.route_reason": reason,
                                             "fleet.candidates": [a.node_id for a in decision.order]})

    def attempt(self, agent: AgentRecord) -> None:
        from opentelemetry.trace import SpanKind, set_span_in_context

        self._end_attempt()
        self.agent = agent.node_id
        attrs: dict[str, str | int] = {"gen_ai.system": "ollama", "gen_ai.provider.name": "ollama",
                                       "fleet.agent": agent.node_id}
        if self.operation:
            attrs["gen_ai.operation.name"] = self.operation
        if self.model:
            attrs["gen_ai.request.model"] = self.model
        if agent.ollama_url:
            url = urlsplit(agent.ollama_url)
            attrs["server.address"] = url.hostname or ""
            try:
                attrs["server.port"] = url.port or (443 if url.scheme == "https" else 80)
            except ValueError:  # a bad port in an agent's URL: the attempt fails over, the span says where
                pass
        name = " ".join(p for p in (self.operation or "ollama", self.model) if p)
        self.current = self.tracer.start_span(name, context=set_span_in_context(self.span), kind=SpanKind.CLIENT,
                                              attributes=attrs)

    def failover(self, why: str, status: int | None) -> None:
        from opentelemetry.trace import StatusCode

        span = self.current
        if span is None:
            return
        if status is not None:
            span.set_attribute("http.response.status_code", status)
        kind = str(status) if status is not None else why.split(":", 1)[0]  # e.g. 503, ConnectError
        span.set_attribute("error.type", kind)
        span.set_status(StatusCode.ERROR, why)
        self._end_attempt()
        self.span.add_event("fleet.failover", {"fleet.agent": self.agent, "error.type": kind, "fleet.reason": why})

    def finish(self, x: Finished) -> None:
        from opentelemetry.trace import StatusCode

        attrs: dict[str, str | int] = {"http.response.status_code": x.status} if x.status else {}
        ok = 0 < x.status < 400 and x.error is None
        if ok:
            if self.decision is not None:
                attrs["gen_ai.response.model"] = self.decision.model  # the name the agent has it under
            if x.prompt_tokens is not None:
                attrs["gen_ai.usage.input_tokens"] = x.prompt_tokens
            if x.completion_tokens is not None:
                attrs["gen_ai.usage.output_tokens"] = x.completion_tokens
        # an error is ours: a 5xx, no answer at all, or a stream that failed after its first byte (a 4xx is
        # the client's, and 499 its disconnect)
        error_type = (str(x.status) if x.status >= 500 else "no_response" if not x.status
                      else "stream_failed" if x.status < 400 and x.error is not None else None)
        for span in (self.current, self.span):
            if span is not None:
                span.set_attributes(attrs)
                if error_type is not None:
                    span.set_attribute("error.type", error_type)
                    span.set_status(StatusCode.ERROR, x.error or error_type)
        self._end_attempt()
        self.span.set_attribute("fleet.attempts", x.attempts)
        if x.agent:
            self.span.set_attribute("fleet.agent", x.agent)
        self.span.end()

    def _end_attempt(self) -> None:
        if self.current is not None:
            self.current.end()
            self.current = None
