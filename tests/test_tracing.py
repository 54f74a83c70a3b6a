"""Traces (docs/tracing.md): a real controller exports OTLP/HTTP to a receiver run by the test, whose
protobuf bodies are decoded with opentelemetry-proto; without `otel_endpoint` opentelemetry is never
imported; asked for without the extra, tracing fails closed at startup."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from ollama_fleet.broker.local import free_loopback_port
from tests.proxy_support import chat_body, start_fleet
from tests.support import ROOT, wait_until

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@dataclass
class Recorded:
    """A span as it arrived: attributes and events decoded to plain values."""

    name: str
    kind: int
    trace_id: str
    span_id: str
    parent: str
    attrs: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    status: int
    message: str
    resource: dict[str, Any] = field(default_factory=dict)


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def _attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs if isinstance(kv, KeyValue)}


class OtlpReceiver:
    """The smallest OTLP/HTTP collector: records every span POSTed to /v1/traces."""

    def __init__(self) -> None:
        self.spans: list[Recorded] = []
        self.posts = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # http.server's name for it
                body = self.rfile.read(int(self.headers["content-length"]))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces" or self.headers["content-type"] != "application/x-protobuf":
                    self.send_error(404)
                    return
                receiver.record(ExportTraceServiceRequest.FromString(body))
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *_a: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_loopback_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def record(self, req: ExportTraceServiceRequest) -> None:
        with self.lock:
            self.posts += 1
            for rs in req.resource_spans:
                resource = _attrs(rs.resource.attributes)
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        self.spans.append(Recorded(
                            s.name, s.kind, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                            _attrs(s.attributes), [(e.name, _attrs(e.attributes)) for e in s.events],
                            s.status.code, s.status.message, resource))

    def snapshot(self) -> list[Recorded]:
        with self.lock:
            return list(self.spans)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _children(spans: list[Recorded], parent: Recorded) -> list[Recorded]:
    return [s for s in spans if s.parent == parent.span_id and s.trace_id == parent.trace_id]


def test_request_spans_attempts_failover_and_genai_attributes(fleet):
    receiver = OtlpReceiver()
    try:
        # round_robin tries tr-a first (sorted ids); its 500 moves the first request on to tr-b
        c, fakes = start_fleet(fleet, "tr-a", "tr-b", controller_env={
            "fleet_routing_strategy": "round_robin", "fleet_proxy_cooldown": "60",
            "fleet_otel_endpoint": receiver.url, "fleet_otel_service_name": "fleet-under-test",
            "otel_bsp_schedule_delay": "100",  # the SDK's batch delay (ms): spans arrive while we watch
        })
        fakes["tr-a"].set_config(force_status=500, fault_paths=["/api/chat"])
        r = c.http.post("/api/chat", json=chat_body(),
                        headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
        assert r.status_code == 200 and r.headers["x-fleet-agent"] == "tr-b"
        answer = r.json()
        r = c.http.post("/api/generate", json={"model": "llama3.2", "prompt": "hi", "stream": True})
        assert r.status_code == 200 and r.headers["x-fleet-agent"] == "tr-b"  # tr-a cools down: 1 attempt
        r = c.http.post("/v1/chat/completions", json=chat_body("no-such-model"))
        assert r.status_code == 404

        def servers() -> list[Recorded]:
            spans = receiver.snapshot()
            return [s for s in spans if s.kind == Span.SPAN_KIND_SERVER] if len(spans) >= 6 else []
        wait_until(lambda: len(servers()) == 3, 15, what="3 request spans and their attempts exported")
        spans = receiver.snapshot()
        by_route = {s.attrs["http.route"]: s for s in servers()}
        chat, generate, missing = (by_route[p] for p in ("/api/chat", "/api/generate", "/v1/chat/completions"))
        assert chat.resource["service.name"] == "fleet-under-test"

        # the chat request: a child of the client's traceparent, two attempts, one failover
        assert (chat.trace_id, chat.parent) == (TRACE_ID, PARENT_ID)
        assert chat.name == "POST /api/chat" and chat.status != Status.STATUS_CODE_ERROR
        assert {k: chat.attrs[k] for k in ("gen_ai.system", "gen_ai.provider.name", "gen_ai.operation.name",
                                          "gen_ai.request.model", "gen_ai.response.model")} == {
            "gen_ai.system": "ollama", "gen_ai.provider.name": "ollama", "gen_ai.operation.name": "chat",
            "gen_ai.request.model": "llama3.2:latest", "gen_ai.response.model": "llama3.2:latest"}
        assert chat.attrs["gen_ai.usage.input_tokens"] == answer["prompt_eval_count"] > 0
        assert chat.attrs["gen_ai.usage.output_tokens"] == answer["eval_count"] > 0
        assert chat.attrs["http.response.status_code"] == 200
        assert chat.attrs["fleet.agent"] == "tr-b" and chat.attrs["fleet.attempts"] == 2
        assert chat.attrs["fleet.route_reason"].startswith("round_robin: tr-a")
        events = dict(chat.events)
        assert events["fleet.routed"]["fleet.candidates"] == ["tr-a", "tr-b"]
        assert events["fleet.failover"]["fleet.agent"] == "tr-a"
        assert events["fleet.failover"]["error.type"] == "500"
        assert events["fleet.failover"]["fleet.reason"] == "HTTP 500"
        first, second = _children(spans, chat)
        fake_port = {n: int(f.url.rsplit(":", 1)[1]) for n, f in fakes.items()}
        assert first.kind == second.kind == Span.SPAN_KIND_CLIENT
        assert first.name == second.name == "chat llama3.2:latest"
        assert first.attrs["fleet.agent"] == "tr-a" and first.attrs["http.response.status_code"] == 500
        assert first.attrs["error.type"] == "500"
        assert first.status == Status.STATUS_CODE_ERROR and first.message == "HTTP 500"
        assert (first.attrs["server.address"], first.attrs["server.port"]) == ("127.0.0.1", fake_port["tr-a"])
        assert second.attrs["fleet.agent"] == "tr-b" and second.attrs["server.port"] == fake_port["tr-b"]
        assert second.status != Status.STATUS_CODE_ERROR and second.attrs["http.response.status_code"] == 200
        assert second.attrs["gen_ai.usage.output_tokens"] == answer["eval_count"]

        # a streamed completion: one attempt, its tokens read from the final chunk
        assert generate.attrs["gen_ai.operation.name"] == "text_completion"
        assert generate.attrs["fleet.attempts"] == 1 and generate.attrs["gen_ai.usage.output_tokens"] > 0
        (only,) = _children(spans, generate)
        assert only.attrs["fleet.agent"] == "tr-b" and only.name == "text_completion llama3.2:latest"
        assert "fleet.failover" not in dict(generate.events)

        # refused before routing: a span with its status, no attempt, and not our error (a 4xx)
        assert missing.attrs["http.response.status_code"] == 404 and missing.attrs["fleet.attempts"] == 0
        assert missing.status != Status.STATUS_CODE_ERROR and not _children(spans, missing)
        assert "gen_ai.usage.input_tokens" not in missing.attrs
    finally:
        receiver.close()


def test_shutdown_exports_the_last_spans(fleet):
    receiver = OtlpReceiver()
    try:  # a batch delay longer than the test: only the shutdown flush can deliver the span
        c, _ = start_fleet(fleet, "sd-a", controller_env={"fleet_otel_endpoint": receiver.url + "/v1/traces",
                                                          "otel_bsp_schedule_delay": "600000"})
        assert c.http.post("/api/chat", json=chat_body()).status_code == 200
        assert c.stop() == 0
        names = {s.name for s in receiver.snapshot()}
        assert {"POST /api/chat", "chat llama3.2:latest"} <= names, names
    finally:
        receiver.close()


def test_tracing_off_never_imports_opentelemetry(fleet):
    # Python logs every import of the controller process (at start and later, lazy ones too) to its log
    c, _ = start_fleet(fleet, "off-a", controller_env={"pythonprofileimporttime": "1"})
    r = c.http.post("/api/chat", json=chat_body(stream=True))
    assert r.status_code == 200 and r.headers["x-fleet-agent"] == "off-a"
    assert c.stop() == 0
    imports = [line for line in c.log().splitlines() if line.startswith("import time:")]
    assert any(line.endswith("ollama_fleet.controller.proxy.tracing") for line in imports)  # the log works
    assert not [line for line in imports if "opentelemetry" in line]


def test_otel_endpoint_without_the_extra_is_a_configuration_error(tmp_path):
    # the extra missing, as Python sees it: an import of opentelemetry fails
    code = ("import sys; sys.modules['opentelemetry'] = None\n"
            "from ollama_fleet.cli import main; sys.exit(main(['controller']))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update({"PYTHONPATH": str(ROOT), "FLEET_OTEL_ENDPOINT": "http://127.0.0.1:4318",
                "FLEET_DATA_DIR": str(tmp_path), "FLEET_PORT": str(free_loopback_port())})
    p = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=60, check=False)
    assert p.returncode == 2, p.stderr
    assert "configuration error: otel_endpoint is set but OpenTelemetry is not installed" in p.stderr
    assert "pip install 'ollama-fleet[otel]'" in p.stderr
