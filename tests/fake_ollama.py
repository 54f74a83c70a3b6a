"""A faithful fake Ollama HTTP server for tests (the project's only stand-in for Ollama).

Follows Ollama's API documentation (https://github.com/ollama/ollama/blob/main/docs/api.md): native
NDJSON API, pull progress, OpenAI-compatible /v1 (SSE), error shapes. Behaviour is configurable at
construction and at runtime via ``POST /_fake/config`` (keys: DEFAULT_CONFIG; unknown keys are a 400);
counters for assertions come from ``GET /_fake/stats``;
``POST /_fake/reset`` clears the stats (``{"config": true}`` also restores the initial config/models).
The instance name is echoed in generated text ("fake-<name> tok1 ...") and in the ``X-Fake-Name`` header.

Run as a process (prints one ``FAKE_OLLAMA_READY http://host:port`` line once listening)::

    uv run python -m tests.fake_ollama --host 127.0.0.1 --port 0 --name a --config-json '{"tokens": 3}'

or from tests: ``with start_fake_ollama("a", config={...}) as fake: ... fake.url ...`` (a child process:
set_config/stats/stop/kill/restart), or in the running event loop: ``async with FakeOllamaServer("a") as s``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import copy
import hashlib
import itertools
import json
import math
import os
import queue
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

READY_PREFIX = "FAKE_OLLAMA_READY"
ROOT = Path(__file__).resolve().parent.parent

NDJSON = "application/x-ndjson"
JSON_CT = "application/json; charset=utf-8"
TEXT_CT = "text/plain; charset=utf-8"
SSE_CT = "text/event-stream"
BUSY_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"
MANIFEST_MISSING = "pull model manifest: file does not exist"
MODIFIED_AT = "2025-05-04T17:37:44.706015396-07:00"

# Installed models: name -> spec. Missing spec keys get defaults in _model_spec().
DEFAULT_MODELS: dict[str, dict[str, Any]] = {
    "llama3.2:latest": {
        "size": 2019393189,
        "digest": "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72",
        "family": "llama",
        "parameter_size": "3.2B",
        "quantization": "Q4_K_M",
        "context_length": 131072,
        "embedding_length": 3072,
    },
    "qwen2.5:0.5b": {
        "size": 397821319,
        "digest": "a8b0c51577010a279d933d14c2a8ab4b268079d44c5c8830c0a93900f1827c67",
        "family": "qwen2",
        "parameter_size": "494.03M",
        "quantization": "Q4_K_M",
        "context_length": 32768,
        "embedding_length": 896,
    },
    "all-minilm:latest": {
        "size": 45960996,
        "digest": "1b226e2802dbb772b5fc32a58f103ca1804ef7501331012de126ab22f67475ef",
        "family": "bert",
        "parameter_size": "23M",
        "quantization": "F16",
        "embedding": True,
        "context_length": 512,
        "embedding_length": 384,
    },
}

# Names that /api/pull can find "in the registry" (installed models are always pullable too).
DEFAULT_REGISTRY: dict[str, dict[str, Any]] = {
    **DEFAULT_MODELS,
    "llama3.1:8b": {"size": 4920753328, "family": "llama", "parameter_size": "8.0B"},
    "gemma3:1b": {"size": 815319791, "family": "gemma3", "parameter_size": "999.89M"},
    "tinyllama:latest": {
        "size": 637700138,
        "family": "llama",
        "parameter_size": "1B",
        "quantization": "Q4_0",
    },
    "nomic-embed-text:latest": {
        "size": 274302450,
        "family": "nomic-bert",
        "parameter_size": "137M",
        "quantization": "F16",
        "embedding": True,
        "embedding_length": 768,
    },
}

DEFAULT_CONFIG: dict[str, Any] = {
    "version": "0.12.6",  # GET /api/version
    "models": DEFAULT_MODELS,  # installed models (replaced as a whole when set)
    "registry": DEFAULT_REGISTRY,  # pullable names
    "tokens": 5,  # tokens per generated response
    "reply": None,  # fixed reply text (split into word tokens) instead of the generated one
    "token_delay": 0.0,  # seconds between tokens
    "initial_delay": 0.0,  # seconds before the first byte of every inference request
    "load_delay": 0.0,  # extra seconds when the model is not loaded yet (reported in load_duration)
    "error_after": None,  # int: send an in-band error after N tokens
    "error_message": "an error was encountered while running the model",
    "stall_after": None,  # int: stop sending (forever) after N tokens
    "busy": False,  # inference endpoints answer 503 server busy
    "max_pending": None,  # int: 503 busy when more inference requests than this are in flight
    "force_status": None,  # int: every request (matching fault_paths) answers this status
    "force_error": "forced error",  # message for force_status
    "hang": False,  # every request (matching fault_paths) is accepted and never answered
    "fault_paths": None,  # list of path prefixes force_status/hang/busy apply to (None = all)
    "keep_alive": 300,  # default seconds a model stays in /api/ps
    "ps": None,  # list overriding /api/ps models (dicts, or names of installed models)
    "pull_total": 4_000_000,  # bytes per pull (None: the registry size)
    "pull_speed": 40_000_000,  # bytes/second (0 or None: instant)
    "pull_layers": 3,
    "pull_interval": 0.02,  # seconds between progress lines of a layer (Ollama: 0.06)
    "pull_fail_after": None,  # fraction 0..1 of the total after which the pull fails in-band
    "pull_error": "max retries exceeded: unexpected EOF",
}

INFERENCE_PATHS = (
    "/api/generate",
    "/api/chat",
    "/api/embed",
    "/api/embeddings",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
)
ANTHROPIC_PATH = "/v1/messages"  # Anthropic's Messages API (docs.ollama.com/api/anthropic-compatibility)
# Anthropic's error type per HTTP status (Ollama's anthropic.NewError); anything else is an api_error
ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
ANTHROPIC_STOP = {"stop": "end_turn", "length": "max_tokens"}  # Ollama's done_reason -> stop_reason

_id_counter = itertools.count(1)


# --------------------------------------------------------------------------------------------------
# helpers


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def normalize_name(name: str) -> str:
    """`llama3.2` -> `llama3.2:latest`; strip the default registry/namespace prefixes."""
    name = name.strip()
    for prefix in ("registry.ollama.ai/", "library/"):
        name = name.removeprefix(prefix)
    if ":" not in name.rsplit("/", 1)[-1]:
        name += ":latest"
    return name


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/]*(:[A-Za-z0-9_][A-Za-z0-9._\-]{0,127})?$")


def valid_name(name: str) -> bool:
    return bool(name) and bool(_NAME_RE.match(name))


def go_now() -> str:
    """UTC timestamp as Go marshals time.Now().UTC()."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def go_local(ts: float) -> str:
    return datetime.fromtimestamp(ts).astimezone().isoformat(timespec="microseconds")


def parse_keep_alive(value: Any, default: float) -> float:
    """Seconds; negative = forever. Accepts numbers (seconds) and Go durations ("5m", "1h30m", "300ms")."""
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        return default
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        pass
    units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(-?[\d.]+)(ns|us|µs|ms|s|m|h)", text)
    if not parts:
        return default
    return sum(float(n) * units[u] for n, u in parts)


def _model_spec(name: str, spec: dict[str, Any] | None) -> dict[str, Any]:
    spec = dict(spec or {})
    family = spec.get("family", "llama")
    embedding = bool(spec.get("embedding", family in ("bert", "nomic-bert")))
    out = {
        "size": int(spec.get("size", 1_000_000_000)),
        "digest": spec.get("digest") or hashlib.sha256(name.encode()).hexdigest(),
        "family": family,
        "families": spec.get("families", [family]),
        "parameter_size": spec.get("parameter_size", "1B"),
        "quantization": spec.get("quantization", "Q4_K_M"),
        "format": spec.get("format", "gguf"),
        "modified_at": spec.get("modified_at", MODIFIED_AT),
        "embedding": embedding,
        "context_length": int(spec.get("context_length", 4096)),
        "embedding_length": int(spec.get("embedding_length", 384 if embedding else 2048)),
    }
    out["capabilities"] = spec.get("capabilities", ["embedding"] if embedding else ["completion", "tools"])
    return out


def _models_from_config(models: Any) -> dict[str, dict[str, Any]]:
    if models is None:
        return {}
    if isinstance(models, (list, tuple)):
        models = {m: None for m in models}
    return {normalize_name(n): _model_spec(normalize_name(n), s) for n, s in dict(models).items()}


def _unix(go_time: str) -> int:
    try:
        return int(datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", go_time)).timestamp())
    except ValueError:
        return 0


def embedding_vector(text: str, dim: int) -> list[float]:
    """Deterministic unit vector for a text."""
    rnd = random.Random(hashlib.sha256(text.encode()).digest())
    vec = [rnd.gauss(0.0, 1.0) for _ in range(max(dim, 1))]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [round(v / norm, 7) for v in vec]


def _count_words(value: Any) -> int:
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_count_words(v) for v in value)
    if isinstance(value, dict):
        return _count_words(value.get("content", "")) + _count_words(value.get("text", ""))
    return 0


class _Run:
    """One generation: planned tokens and timing."""

    def __init__(self, cfg: dict[str, Any], tokens: list[str], done_reason: str, prompt_tokens: int):
        self.cfg = cfg
        self.tokens = tokens
        self.done_reason = done_reason
        self.prompt_tokens = max(prompt_tokens, 1)
        self.t0 = time.perf_counter_ns()
        self.load_ns = 0
        self.eval_start = 0
        self.eval_end = 0
        self.emitted = 0

    def metrics(self) -> dict[str, int]:
        now = time.perf_counter_ns()
        end = self.eval_end or now
        return {
            "total_duration": max(now - self.t0, 1),
            "load_duration": max(self.load_ns, 1),
            "prompt_eval_count": self.prompt_tokens,
            "prompt_eval_duration": self.prompt_tokens * 50_000,
            "eval_count": self.emitted,
            "eval_duration": max(end - (self.eval_start or end), 1),
        }

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.emitted,
            "total_tokens": self.prompt_tokens + self.emitted,
        }

    async def events(self) -> AsyncIterator[tuple[str, str]]:
        """Yield ("token", text) per token, or a final ("error", message)."""
        error_after = self.cfg.get("error_after")
        stall_after = self.cfg.get("stall_after")
        delay = float(self.cfg.get("token_delay") or 0)
        for i, tok in enumerate(self.tokens):
            if error_after is not None and i >= int(error_after):
                yield "error", str(self.cfg["error_message"])
                return
            if stall_after is not None and i >= int(stall_after):
                await asyncio.Event().wait()
            if i and delay:
                await asyncio.sleep(delay)
            if i == 0:
                self.eval_start = time.perf_counter_ns()
            self.emitted += 1
            yield "token", tok
        self.eval_end = time.perf_counter_ns()
        if error_after is not None and int(error_after) >= len(self.tokens):
            yield "error", str(self.cfg["error_message"])
            return
        if stall_after is not None and int(stall_after) >= len(self.tokens):
            await asyncio.Event().wait()


# --------------------------------------------------------------------------------------------------
# the fake


class FakeOllama:
    """State and Sanic app of one fake Ollama instance."""

    def __init__(
        self, name: str = "fake", config: dict[str, Any] | None = None, state_file: str | None = None
    ):
        self.name = name
        self.state_file = state_file  # installed models persist here (the fake's "disk")
        self.initial_config = dict(config or {})
        self.config: dict[str, Any] = {}
        self.models: dict[str, dict[str, Any]] = {}
        saved = None
        if state_file and os.path.exists(state_file):  # restarted: the models on "disk" win
            with open(state_file, encoding="utf-8") as f:
                saved = json.load(f)
        self.reset(config=True)
        if saved is not None:
            self.models = _models_from_config(saved)
            self.save_models()
        self.app = self._build_app()

    # ---- state ------------------------------------------------------------------------------

    def reset(self, config: bool = False) -> None:
        """Reset counters; with config=True also config, installed models, loaded models, pulls."""
        if config:
            self.config = copy.deepcopy(DEFAULT_CONFIG)
            self.models = {}
            self.loaded: dict[str, float] = {}  # name -> expiry (monotonic seconds, inf = forever)
            self.blobs: dict[str, int] = {}  # layer digest -> completed bytes (kept across pulls)
            self.uploaded: set[str] = set()
            self.pulls: dict[str, dict[str, Any]] = {}
            self.update_config(self.initial_config)
            if "models" not in self.initial_config:
                self.models = _models_from_config(DEFAULT_MODELS)
            self.save_models()
        self.requests: Counter[str] = Counter()
        self.finished: Counter[str] = Counter()
        self.cancelled_paths: Counter[str] = Counter()
        self.in_flight_paths: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.inference_in_flight = 0
        self.max_inference_in_flight = 0  # the most inference requests served at once (capacity checks)
        self.last_body: dict[str, Any] = {}
        self.body_digests: list[dict[str, Any]] = []  # every request body's size and SHA-256 (the last 100)
        self.last_headers: dict[str, dict[str, str]] = {}
        self.last_request: dict[str, Any] | None = None

    def update_config(self, values: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(values) - set(DEFAULT_CONFIG) - {"name"})
        if unknown:
            raise ValueError(f"unknown config key(s): {', '.join(unknown)}")
        for key, value in values.items():
            if key == "name":
                self.name = str(value)
            elif key == "models":
                self.models = _models_from_config(value)
                self.save_models()
            elif key == "registry":
                self.config["registry"] = {normalize_name(n): s for n, s in dict(value or {}).items()}
            else:
                self.config[key] = value
        return self.public_config()

    def save_models(self) -> None:
        if self.state_file:
            tmp = f"{self.state_file}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.models, f)
            os.replace(tmp, self.state_file)

    def public_config(self) -> dict[str, Any]:
        cfg = {k: v for k, v in self.config.items() if k != "models"}
        return {"name": self.name, **cfg, "models": self.models}

    def stats(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pid": os.getpid(),
            "requests": dict(self.requests),
            "requests_total": sum(self.requests.values()),
            "finished": dict(self.finished),
            "in_flight": self.in_flight,
            "in_flight_paths": {k: v for k, v in self.in_flight_paths.items() if v},
            "max_in_flight": self.max_in_flight,
            "inference_in_flight": self.inference_in_flight,
            "max_inference_in_flight": self.max_inference_in_flight,
            "cancelled": sum(self.cancelled_paths.values()),
            "cancelled_paths": dict(self.cancelled_paths),
            "last_body": self.last_body,
            "body_digests": self.body_digests,
            "last_headers": self.last_headers,
            "last_request": self.last_request,
            "loaded": sorted(self._loaded_names()),
            "pulls": self.pulls,
            "models": sorted(self.models),
        }

    def _lookup(self, model: str) -> tuple[str, dict[str, Any]] | None:
        name = normalize_name(model)
        spec = self.models.get(name)
        return (name, spec) if spec is not None else None

    def _loaded_names(self) -> list[str]:
        now = time.monotonic()
        for name in [n for n, exp in self.loaded.items() if exp <= now or n not in self.models]:
            self.loaded.pop(name, None)
        return list(self.loaded)

    def _keep(self, name: str, keep_alive: float) -> None:
        if keep_alive == 0:
            self.loaded.pop(name, None)
        else:
            self.loaded[name] = math.inf if keep_alive < 0 else time.monotonic() + keep_alive

    async def _warmup(self, run: _Run, name: str, keep_alive: float) -> None:
        """Initial delay, plus load delay when the model is not loaded; marks the model loaded."""
        t = time.perf_counter_ns()
        if run.cfg.get("initial_delay"):
            await asyncio.sleep(float(run.cfg["initial_delay"]))
        if name not in self._loaded_names() and run.cfg.get("load_delay"):
            await asyncio.sleep(float(run.cfg["load_delay"]))
        self.loaded[name] = math.inf  # loaded while in use; expiry set when done
        run.load_ns = time.perf_counter_ns() - t

    def _plan(self, cfg: dict[str, Any], limit: Any, prompt: Any) -> _Run:
        if cfg.get("reply") is not None:
            tokens = re.findall(r"\s*\S+", str(cfg["reply"]))
        else:
            n = max(int(cfg.get("tokens") or 0), 0)
            tokens = ([f"fake-{self.name}"] + [f" tok{i}" for i in range(1, n)]) if n else []
        reason = "stop"
        if isinstance(limit, int) and not isinstance(limit, bool) and 0 <= limit < len(tokens):
            tokens, reason = tokens[:limit], "length"
        return _Run(cfg, tokens, reason, _count_words(prompt))

    # ---- responses ----------------------------------------------------------------------------

    def _resp(self, body: Any = None, status: int = 200, content_type: str = JSON_CT) -> Any:
        from sanic.response import HTTPResponse

        if body is None:
            return HTTPResponse(status=status)  # empty 200 body, like gin's c.Status(200)
        data = body if isinstance(body, str) else dumps(body)
        return HTTPResponse(data, status=status, content_type=content_type)

    def _err(self, status: int, message: str, openai: bool = False, anthropic: bool = False) -> Any:
        if anthropic:
            kind = ANTHROPIC_ERRORS.get(status, "api_error")
            rid = f"req_{os.urandom(12).hex()}"
            return self._resp(
                {"type": "error", "error": {"type": kind, "message": message}, "request_id": rid}, status
            )
        if openai:
            kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
            return self._resp(
                {"error": {"message": message, "type": kind, "param": None, "code": None}}, status
            )
        return self._resp({"error": message}, status)

    def _json(
        self, request: Any, openai: bool = False, anthropic: bool = False
    ) -> tuple[dict[str, Any], Any]:
        raw = request.body or b""
        if not raw.strip():
            return {}, self._err(
                400, "EOF" if openai or anthropic else "missing request body", openai, anthropic
            )
        try:
            body = json.loads(raw)
        except ValueError as e:
            return {}, self._err(400, f"invalid character in JSON: {e}", openai, anthropic)
        if not isinstance(body, dict):
            return {}, self._err(
                400, "json: cannot unmarshal request body into a JSON object", openai, anthropic
            )
        return body, None

    def _fault_err(self, path: str, status: int, message: str) -> Any:
        """An error in the shape the path's API uses (faults and crashes apply to every endpoint)."""
        return self._err(status, message, path.startswith("/v1/"), path == ANTHROPIC_PATH)

    # ---- app --------------------------------------------------------------------------------

    def _build_app(self) -> Any:
        from sanic import Sanic
        from sanic.exceptions import MethodNotAllowed, NotFound, SanicException

        safe = re.sub(r"[^A-Za-z0-9_]", "_", self.name)
        app = Sanic(f"fake_ollama_{safe}_{os.getpid()}_{next(_id_counter)}", configure_logging=False)
        app.config.MOTD = False
        app.config.ACCESS_LOG = False
        app.config.NOISY_EXCEPTIONS = False
        app.config.RESPONSE_TIMEOUT = 3600
        app.config.REQUEST_TIMEOUT = 3600
        app.config.KEEP_ALIVE_TIMEOUT = 75
        app.config.REQUEST_MAX_SIZE = 1 << 33
        app.config.TOUCHUP = False
        app.config.AUTO_EXTEND = False  # sanic-ext is installed; its CORS middleware breaks create_server

        def add(handler: Callable[..., Awaitable[Any]], path: str, methods: list[str], control: bool = False):
            app.add_route(
                self._wrap(handler, control), path, methods=methods, name=handler.__name__, ignore_body=False
            )

        add(self.root, "/", ["GET", "HEAD"])
        add(self.version, "/api/version", ["GET", "HEAD"])
        add(self.status, "/api/status", ["GET"])
        add(self.generate, "/api/generate", ["POST"])
        add(self.chat, "/api/chat", ["POST"])
        add(self.embed, "/api/embed", ["POST"])
        add(self.embeddings, "/api/embeddings", ["POST"])
        add(self.tags, "/api/tags", ["GET", "HEAD"])
        add(self.ps, "/api/ps", ["GET"])
        add(self.show, "/api/show", ["POST"])
        add(self.copy_model, "/api/copy", ["POST"])
        add(self.delete, "/api/delete", ["DELETE"])
        add(self.pull, "/api/pull", ["POST"])
        add(self.push, "/api/push", ["POST"])
        add(self.create, "/api/create", ["POST"])
        add(self.blob_head, "/api/blobs/<digest>", ["HEAD"])
        add(self.blob_post, "/api/blobs/<digest>", ["POST"])
        add(self.v1_chat, "/v1/chat/completions", ["POST"])
        add(self.v1_completions, "/v1/completions", ["POST"])
        add(self.v1_embeddings, "/v1/embeddings", ["POST"])
        add(self.v1_models, "/v1/models", ["GET"])
        add(self.v1_model, "/v1/models/<model:path>", ["GET"])
        add(self.v1_responses, "/v1/responses", ["POST"])
        add(self.v1_messages, ANTHROPIC_PATH, ["POST"])
        add(self.fake_stats, "/_fake/stats", ["GET"], control=True)
        add(self.fake_get_config, "/_fake/config", ["GET"], control=True)
        add(self.fake_set_config, "/_fake/config", ["POST"], control=True)
        add(self.fake_reset, "/_fake/reset", ["POST"], control=True)

        async def not_found(request: Any, exc: Exception) -> Any:
            self._record(request)
            return self._resp("404 page not found", 404, TEXT_CT)

        async def not_allowed(request: Any, exc: Exception) -> Any:
            self._record(request)
            return self._resp("405 method not allowed", 405, TEXT_CT)

        async def crashed(request: Any, exc: Exception) -> Any:
            import traceback

            if isinstance(exc, SanicException):  # Sanic's own 4xx/5xx (bad request, timeouts, ...)
                return app.error_handler.default(request, exc)
            traceback.print_exception(exc, file=sys.stderr)
            return self._fault_err(request.path, 500, f"fake ollama bug: {exc!r}")

        app.error_handler.add(NotFound, not_found)
        app.error_handler.add(MethodNotAllowed, not_allowed)
        app.error_handler.add(Exception, crashed)

        @app.on_response
        async def name_header(request: Any, response: Any) -> None:
            response.headers["X-Fake-Name"] = self.name

        return app

    def _record(self, request: Any) -> None:
        path = request.path
        self.requests[path] += 1
        raw = request.body or b""
        body: Any
        try:
            body = json.loads(raw) if raw and len(raw) <= 1 << 20 else None
        except ValueError:
            body = raw[:65536].decode("utf-8", "replace")
        if path.startswith("/api/blobs/"):
            body = {"bytes": len(raw)}
        self.body_digests = [*self.body_digests[-99:],
                             {"path": path, "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}]
        if len(raw) > 1 << 20:  # a large body: its digest above, not its text in every stats answer
            body = {"bytes": len(raw)}
        headers = {k: v for k, v in request.headers.items()}
        self.last_body[path] = body
        self.last_headers[path] = headers
        self.last_request = {"method": request.method, "path": path, "body": body, "headers": headers}

    def _matches_faults(self, path: str) -> bool:
        prefixes = self.config.get("fault_paths")
        return prefixes is None or any(path.startswith(p) for p in prefixes)

    def _wrap(
        self, handler: Callable[..., Awaitable[Any]], control: bool
    ) -> Callable[..., Coroutine[Any, Any, Any]]:
        async def wrapped(request: Any, **kw: Any) -> Any:
            if control:
                return await handler(request, **kw)
            path = request.path
            self._record(request)
            self.in_flight += 1
            self.in_flight_paths[path] += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            inference = path in INFERENCE_PATHS
            counted = False
            try:
                cfg = self.config
                if self._matches_faults(path):
                    if cfg.get("hang"):
                        await asyncio.Event().wait()
                    if cfg.get("force_status"):
                        return self._fault_err(path, int(cfg["force_status"]), str(cfg["force_error"]))
                    pending = cfg.get("max_pending")
                    if inference and (
                        cfg.get("busy") or (pending is not None and self.inference_in_flight >= int(pending))
                    ):
                        return self._fault_err(path, 503, BUSY_MESSAGE)
                if inference:
                    self.inference_in_flight += 1
                    self.max_inference_in_flight = max(self.max_inference_in_flight, self.inference_in_flight)
                    counted = True
                result = await handler(request, **kw)
                self.finished[path] += 1
                return result
            except asyncio.CancelledError:
                self.cancelled_paths[path] += 1
                raise
            finally:
                self.in_flight -= 1
                self.in_flight_paths[path] -= 1
                if counted:
                    self.inference_in_flight -= 1

        wrapped.__name__ = handler.__name__
        return wrapped

    # ---- simple endpoints -----------------------------------------------------------------------

    async def root(self, request: Any) -> Any:
        return self._resp("Ollama is running", 200, TEXT_CT)

    async def version(self, request: Any) -> Any:
        return self._resp({"version": self.config["version"]})

    async def status(self, request: Any) -> Any:
        return self._resp({"cloud": {"disabled": True, "source": "fake"}})

    def _details(self, spec: dict[str, Any]) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": spec["format"],
            "family": spec["family"],
            "families": spec["families"],
            "parameter_size": spec["parameter_size"],
            "quantization_level": spec["quantization"],
        }

    async def tags(self, request: Any) -> Any:
        models = [
            {
                "name": name,
                "model": name,
                "modified_at": spec["modified_at"],
                "size": spec["size"],
                "digest": spec["digest"],
                "details": self._details(spec),
            }
            for name, spec in sorted(self.models.items(), key=lambda kv: kv[1]["modified_at"], reverse=True)
        ]
        return self._resp({"models": models})

    def _ps_entry(self, name: str, expires: float) -> dict[str, Any]:
        spec = self.models.get(name) or _model_spec(name, None)
        left = 292 * 365 * 86400 if math.isinf(expires) else max(expires - time.monotonic(), 0)
        return {
            "name": name,
            "model": name,
            "size": spec["size"],
            "digest": spec["digest"],
            "details": self._details(spec),
            "expires_at": go_local(time.time() + left),
            "size_vram": spec["size"],
            "context_length": min(spec["context_length"], 4096),
        }

    async def ps(self, request: Any) -> Any:
        override = self.config.get("ps")
        if override is not None:
            models = [
                self._ps_entry(normalize_name(m), time.monotonic() + 300) if isinstance(m, str) else m
                for m in override
            ]
        else:
            models = [self._ps_entry(n, self.loaded[n]) for n in self._loaded_names()]
        return self._resp({"models": models})

    async def show(self, request: Any) -> Any:
        body, err = self._json(request)
        if err:
            return err
        model = body.get("model") or body.get("name") or ""
        if not model:
            return self._err(400, "model is required")
        found = self._lookup(model)
        if not found:
            return self._err(404, f"model '{model}' not found")
        name, spec = found
        fam = spec["family"]
        return self._resp(
            {
                "license": "FAKE LICENSE",
                "modelfile": f'# Modelfile generated by "ollama show"\nFROM {name}\nTEMPLATE "{{{{ .Prompt }}}}"\n',
                "parameters": 'stop                           "<|eot_id|>"',
                "template": "{{ .Prompt }}",
                "details": self._details(spec),
                "model_info": {
                    "general.architecture": fam,
                    "general.file_type": 15,
                    "general.parameter_count": spec["size"] * 2,
                    "general.quantization_version": 2,
                    f"{fam}.context_length": spec["context_length"],
                    f"{fam}.embedding_length": spec["embedding_length"],
                },
                "capabilities": spec["capabilities"],
                "modified_at": spec["modified_at"],
            }
        )

    async def copy_model(self, request: Any) -> Any:
        body, err = self._json(request)
        if err:
            return err
        src, dst = str(body.get("source") or ""), str(body.get("destination") or "")
        if not valid_name(src) or not valid_name(dst):
            return self._err(400, "invalid model name")
        found = self._lookup(src)
        if not found:
            return self._err(404, f'model "{src}" not found')
        self.models[normalize_name(dst)] = {**found[1], "modified_at": go_local(time.time())}
        self.save_models()
        return self._resp()

    async def delete(self, request: Any) -> Any:
        body, err = self._json(request)
        if err:
            return err
        model = str(body.get("model") or body.get("name") or "")
        if not valid_name(model):
            return self._err(400, "invalid model name")
        found = self._lookup(model)
        if not found:
            return self._err(404, f"model '{model}' not found")
        self.models.pop(found[0], None)
        self.loaded.pop(found[0], None)
        self.save_models()
        return self._resp()

    async def blob_head(self, request: Any, digest: str) -> Any:
        known = digest in self.uploaded or digest in self.blobs
        return self._resp(None, 200 if known else 404)

    async def blob_post(self, request: Any, digest: str) -> Any:
        actual = "sha256:" + hashlib.sha256(request.body or b"").hexdigest()
        if actual != digest:
            return self._err(400, "digest mismatch")
        self.uploaded.add(digest)
        return self._resp(None, 201)

    # ---- generation ---------------------------------------------------------------------------

    def _check_model(
        self, body: dict[str, Any], capability: str, openai: bool = False, anthropic: bool = False
    ) -> tuple[str, dict[str, Any] | None, Any]:
        model = str(body.get("model") or "")
        if not model:
            return "", None, self._err(400, "model is required", openai, anthropic)
        found = self._lookup(model)
        if not found:
            message = f'model "{model}" not found, try pulling it first'
            return "", None, self._err(404, message, openai, anthropic)
        name, spec = found
        if capability not in ("embedding",) and spec["embedding"]:
            return "", None, self._err(400, f'"{model}" does not support {capability}', openai, anthropic)
        return name, spec, None

    async def generate(self, request: Any) -> Any:
        body, err = self._json(request)
        if err:
            return err
        name, _, err = self._check_model(body, "generate")
        if err:
            return err
        model = body["model"]
        keep = parse_keep_alive(body.get("keep_alive"), float(self.config["keep_alive"]))
        cfg = dict(self.config)
        run = self._plan(cfg, (body.get("options") or {}).get("num_predict"), body.get("prompt"))
        if not body.get("prompt") and not body.get("images"):
            if keep == 0:
                self.loaded.pop(name, None)
                return self._resp(
                    {
                        "model": model,
                        "created_at": go_now(),
                        "response": "",
                        "done": True,
                        "done_reason": "unload",
                    }
                )
            await self._warmup(run, name, keep)
            self._keep(name, keep)
            return self._resp(
                {"model": model, "created_at": go_now(), "response": "", "done": True, "done_reason": "load"}
            )
        await self._warmup(run, name, keep)
        try:
            return await self._native(
                request,
                run,
                body.get("stream", True) is not False,
                lambda tok: {"model": model, "created_at": go_now(), "response": tok, "done": False},
                lambda text: {
                    "model": model,
                    "created_at": go_now(),
                    "response": text,
                    "done": True,
                    "done_reason": run.done_reason,
                    "context": [128006, 882, 128007, 271] + list(range(1000, 1000 + run.emitted)),
                    **run.metrics(),
                },
            )
        finally:
            self._keep(name, keep)

    async def chat(self, request: Any) -> Any:
        body, err = self._json(request)
        if err:
            return err
        name, _, err = self._check_model(body, "chat")
        if err:
            return err
        model = body["model"]
        keep = parse_keep_alive(body.get("keep_alive"), float(self.config["keep_alive"]))
        cfg = dict(self.config)
        messages = body.get("messages") or []
        run = self._plan(cfg, (body.get("options") or {}).get("num_predict"), messages)
        if not messages:
            reason = "unload" if keep == 0 else "load"
            if keep == 0:
                self.loaded.pop(name, None)
            else:
                await self._warmup(run, name, keep)
                self._keep(name, keep)
            return self._resp(
                {
                    "model": model,
                    "created_at": go_now(),
                    "message": {"role": "assistant", "content": ""},
                    "done": True,
                    "done_reason": reason,
                }
            )
        await self._warmup(run, name, keep)
        try:
            return await self._native(
                request,
                run,
                body.get("stream", True) is not False,
                lambda tok: {
                    "model": model,
                    "created_at": go_now(),
                    "message": {"role": "assistant", "content": tok},
                    "done": False,
                },
                lambda text: {
                    "model": model,
                    "created_at": go_now(),
                    "message": {"role": "assistant", "content": text},
                    "done": True,
                    "done_reason": run.done_reason,
                    **run.metrics(),
                },
            )
        finally:
            self._keep(name, keep)

    async def _native(
        self,
        request: Any,
        run: _Run,
        stream: bool,
        chunk: Callable[[str], dict[str, Any]],
        final: Callable[[str], dict[str, Any]],
    ) -> Any:
        if not stream:
            parts: list[str] = []
            async for kind, value in run.events():
                if kind == "error":
                    return self._err(500, value)
                parts.append(value)
            return self._resp(final("".join(parts)))
        resp = await request.respond(content_type=NDJSON)
        async for kind, value in run.events():
            if kind == "error":
                await resp.send(dumps({"error": value}) + "\n")
                await resp.eof()
                return None
            await resp.send(dumps(chunk(value)) + "\n")
        await resp.send(dumps(final("")) + "\n")
        await resp.eof()
        return None

    # ---- embeddings ---------------------------------------------------------------------------

    def _vectors(self, spec: dict[str, Any], inputs: list[str], dims: Any) -> list[list[float]]:
        dim = spec["embedding_length"]
        if isinstance(dims, int) and 0 < dims < dim:
            dim = dims
        return [embedding_vector(t, dim) for t in inputs]

    async def embed(self, request: Any) -> Any:
        body, err = self._json(request)
        if err:
            return err
        name, spec, err = self._check_model(body, "embedding")
        if err:
            return err
        raw = body.get("input")
        inputs = [raw] if isinstance(raw, str) else list(raw or [])
        if not all(isinstance(i, str) for i in inputs):
            return self._err(400, "invalid input type")
        keep = parse_keep_alive(body.get("keep_alive"), float(self.config["keep_alive"]))
        run = self._plan(dict(self.config), None, inputs)
        await self._warmup(run, name, keep)
        self._keep(name, keep)
        vecs = self._vectors(spec, inputs, body.get("dimensions")) if spec else []
        m = run.metrics()
        return self._resp(
            {
                "model": body["model"],
                "embeddings": vecs,
                "total_duration": m["total_duration"],
                "load_duration": m["load_duration"],
                "prompt_eval_count": sum(max(len(i.split()), 1) for i in inputs),
            }
        )

    async def embeddings(self, request: Any) -> Any:
        body, err = self._json(request)
        if err:
            return err
        name, spec, err = self._check_model(body, "embedding")
        if err:
            return err
        keep = parse_keep_alive(body.get("keep_alive"), float(self.config["keep_alive"]))
        run = self._plan(dict(self.config), None, body.get("prompt"))
        await self._warmup(run, name, keep)
        self._keep(name, keep)
        prompt = body.get("prompt") or ""
        vec = self._vectors(spec or {}, [prompt], None)[0] if prompt and spec else []
        return self._resp({"embedding": vec})

    # ---- pull / push / create -----------------------------------------------------------------

    def _layers(self, name: str, total: int, count: int) -> list[tuple[str, int]]:
        count = max(int(count), 1)
        sizes = [total // count] * count
        sizes[0] += total - sum(sizes)
        return [
            ("sha256:" + hashlib.sha256(f"{name}|{i}|{total}".encode()).hexdigest(), size)
            for i, size in enumerate(sizes)
        ]

    async def _pull_events(
        self, name: str, spec: dict[str, Any] | None, cfg: dict[str, Any]
    ) -> AsyncIterator[dict]:
        """The progress sequence of server/images.go PullModel; partial progress survives cancellation."""
        yield {"status": "pulling manifest"}
        if spec is None:
            self.pulls[name] = {"status": "error", "completed": 0, "total": 0, "error": MANIFEST_MISSING}
            yield {"error": MANIFEST_MISSING}
            return
        total = int(cfg["pull_total"]) if cfg.get("pull_total") is not None else int(spec["size"])
        layers = self._layers(name, total, cfg.get("pull_layers") or 1)
        installed = name in self.models
        if installed:  # already on disk: every layer is a cache hit
            self.blobs.update({d: size for d, size in layers})
        speed = float(cfg.get("pull_speed") or 0)
        interval = max(float(cfg.get("pull_interval") or 0.0), 0.001)
        fail_after = cfg.get("pull_fail_after")
        fail_at = None if fail_after is None else float(fail_after) * total
        info = self.pulls[name] = {"status": "pulling", "completed": 0, "total": total}

        def overall() -> int:
            done = sum(min(self.blobs.get(d, 0), s) for d, s in layers)
            info["completed"] = done
            return done

        def line(digest: str, size: int) -> dict[str, Any]:
            out: dict[str, Any] = {"status": f"pulling {digest[7:19]}", "digest": digest}
            if size:
                out["total"] = size
            done = min(self.blobs.get(digest, 0), size)
            if done:
                out["completed"] = done
            return out

        for digest, size in layers:
            if self.blobs.get(digest, 0) >= size:  # cache hit: one line with total == completed
                yield line(digest, size)
                continue
            yield line(digest, size)
            while self.blobs.get(digest, 0) < size:
                if fail_at is not None and overall() >= fail_at:
                    info.update(status="error", error=cfg["pull_error"])
                    yield {"error": str(cfg["pull_error"])}
                    return
                await asyncio.sleep(interval if speed else 0)
                step = size if not speed else max(int(speed * interval), 1)
                if fail_at is not None:  # stop exactly at the failure point
                    step = min(step, max(math.ceil(fail_at - overall()), 1))
                self.blobs[digest] = min(self.blobs.get(digest, 0) + step, size)
                overall()
                yield line(digest, size)
        if fail_at is not None and overall() >= fail_at:  # e.g. pull_fail_after=1.0: fails at verification
            info.update(status="error", error=cfg["pull_error"])
            yield {"error": str(cfg["pull_error"])}
            return
        yield {"status": "verifying sha256 digest"}
        yield {"status": "writing manifest"}
        if not installed:
            self.models[name] = _model_spec(
                name, {**spec, "size": total, "modified_at": go_local(time.time())}
            )
            self.save_models()
        info["status"] = "success"
        yield {"status": "success"}

    async def pull(self, request: Any) -> Any:
        body, err = self._json(request)
        if err:
            return err
        model = str(body.get("model") or body.get("name") or "")
        if not model:
            return self._err(400, "model is required")
        if not valid_name(model):
            return self._err(400, "invalid model name")
        name = normalize_name(model)
        cfg = dict(self.config)
        registry = {normalize_name(n): s for n, s in (cfg.get("registry") or {}).items()}
        spec = self.models.get(name) or (_model_spec(name, registry[name]) if name in registry else None)
        return await self._progress(request, body, name, self._pull_events(name, spec, cfg), "pulls")

    async def _progress(
        self, request: Any, body: dict[str, Any], name: str, events: AsyncIterator[dict], kind: str
    ) -> Any:
        """Stream progress objects as NDJSON, or (stream:false) answer the last one / the error."""
        try:
            if body.get("stream", True) is False:
                last: dict[str, Any] = {}
                async for ev in events:
                    if "error" in ev:
                        return self._err(500, ev["error"])
                    last = ev
                return self._resp(last)
            resp = await request.respond(content_type=NDJSON)
            async for ev in events:
                await resp.send(dumps(ev) + "\n")
            await resp.eof()
            return None
        except asyncio.CancelledError:
            if kind == "pulls" and name in self.pulls and self.pulls[name]["status"] == "pulling":
                self.pulls[name]["status"] = "cancelled"
            raise

    async def _push_events(self, name: str, spec: dict[str, Any] | None) -> AsyncIterator[dict]:
        yield {"status": "retrieving manifest"}
        if spec is None:
            yield {"error": f'model "{name}" not found'}
            return
        digest, total = "sha256:" + spec["digest"], spec["size"]
        yield {"status": "starting upload", "digest": digest, "total": total}
        for frac in (0.5, 1.0):
            await asyncio.sleep(float(self.config.get("pull_interval") or 0))
            yield {
                "status": "starting upload",
                "digest": digest,
                "total": total,
                "completed": int(total * frac),
            }
        yield {"status": "pushing manifest"}
        yield {"status": "success"}

    async def push(self, request: Any) -> Any:
        body, err = self._json(request)
        if err:
            return err
        model = str(body.get("model") or body.get("name") or "")
        if not valid_name(model):
            return self._err(400, "invalid model name")
        found = self._lookup(model)
        return await self._progress(
            request, body, model, self._push_events(model, found[1] if found else None), "push"
        )

    async def _create_events(self, name: str, body: dict[str, Any]) -> AsyncIterator[dict]:
        base = body.get("from")
        spec: dict[str, Any]
        if base:
            found = self._lookup(str(base))
            if not found:
                yield {"error": f"model '{base}' not found"}
                return
            spec = dict(found[1])
        elif body.get("files"):
            spec = _model_spec(name, None)
        else:
            yield {"error": "neither 'from' or 'files' was specified"}
            return
        yield {"status": "gathering model components"}
        if body.get("quantize"):
            quant = str(body["quantize"]).upper()
            yield {
                "status": f"quantizing F16 model to {quant}",
                "digest": "0",
                "total": spec["size"],
                "completed": spec["size"],
            }
            spec["quantization"] = quant
        yield {"status": f"using existing layer sha256:{spec['digest']}"}
        yield {"status": "writing manifest"}
        self.models[name] = {**spec, "modified_at": go_local(time.time())}
        self.save_models()
        yield {"status": "success"}

    async def create(self, request: Any) -> Any:
        body, err = self._json(request)
        if err:
            return err
        model = str(body.get("model") or body.get("name") or "")
        if not valid_name(model):
            return self._err(400, "invalid model name")
        name = normalize_name(model)
        return await self._progress(request, body, name, self._create_events(name, body), "create")

    # ---- OpenAI compatibility -----------------------------------------------------------------

    async def _sse_stream(self, request: Any) -> Any:
        return await request.respond(content_type=SSE_CT)

    @staticmethod
    def _sse(obj: Any) -> str:
        return f"data: {dumps(obj)}\n\n"

    def _oai_error_obj(self, message: str) -> dict[str, Any]:
        return {"error": {"message": message, "type": "api_error", "param": None, "code": None}}

    async def _v1_generate(self, request: Any, chat: bool) -> Any:
        body, err = self._json(request, openai=True)
        if err:
            return err
        if chat and not body.get("messages"):
            return self._err(400, "[] is too short - 'messages'", openai=True)
        if not chat and not isinstance(body.get("prompt", ""), str):
            return self._err(400, "prompt must be a string", openai=True)
        name, _, err = self._check_model(body, "chat" if chat else "generate", openai=True)
        if err:
            return err
        model = body["model"]
        keep = float(self.config["keep_alive"])
        limit = body.get("max_completion_tokens", body.get("max_tokens")) if chat else body.get("max_tokens")
        run = self._plan(dict(self.config), limit, body.get("messages") if chat else body.get("prompt"))
        created = int(time.time())
        cid = f"{'chatcmpl' if chat else 'cmpl'}-{random.randint(0, 998)}"
        obj = "chat.completion" if chat else "text_completion"
        base = {
            "id": cid,
            "object": obj,
            "created": created,
            "model": model,
            "system_fingerprint": "fp_ollama",
        }
        await self._warmup(run, name, keep)
        try:
            if not body.get("stream", False):
                parts: list[str] = []
                async for kind, value in run.events():
                    if kind == "error":
                        return self._err(500, value, openai=True)
                    parts.append(value)
                text = "".join(parts)
                choice: dict[str, Any] = (
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": run.done_reason,
                    }
                    if chat
                    else {"text": text, "index": 0, "finish_reason": run.done_reason}
                )
                return self._resp({**base, "choices": [choice], "usage": run.usage()})
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            chunk_base = {**base, "object": "chat.completion.chunk" if chat else "text_completion"}
            resp = await self._sse_stream(request)
            first = True
            async for kind, value in run.events():
                if kind == "error":
                    await resp.send(self._sse(self._oai_error_obj(value)))
                    await resp.eof()
                    return None
                if chat:
                    delta = {"role": "assistant", "content": value} if first else {"content": value}
                    c: dict[str, Any] = {
                        **chunk_base,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
                    }
                else:
                    c = {**chunk_base, "choices": [{"text": value, "index": 0, "finish_reason": None}]}
                    if include_usage:
                        c["usage"] = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
                first = False
                await resp.send(self._sse(c))
            if chat:
                delta = {"role": "assistant"} if first else {}
                fin: dict[str, Any] = {
                    **chunk_base,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": run.done_reason}],
                }
            else:
                fin = {**chunk_base, "choices": [{"text": "", "index": 0, "finish_reason": run.done_reason}]}
                if include_usage:
                    fin["usage"] = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
            await resp.send(self._sse(fin))
            if include_usage:
                await resp.send(self._sse({**chunk_base, "choices": [], "usage": run.usage()}))
            await resp.send("data: [DONE]\n\n")
            await resp.eof()
            return None
        finally:
            self._keep(name, keep)

    async def v1_chat(self, request: Any) -> Any:
        return await self._v1_generate(request, chat=True)

    async def v1_completions(self, request: Any) -> Any:
        return await self._v1_generate(request, chat=False)

    async def v1_embeddings(self, request: Any) -> Any:
        body, err = self._json(request, openai=True)
        if err:
            return err
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            return self._err(
                400,
                f"Invalid value for 'encoding_format' = {fmt}. Supported values: ['float', 'base64'].",
                True,
            )
        raw = body.get("input")
        if raw is None or raw == "" or raw == []:
            return self._err(400, "invalid input", openai=True)
        inputs = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else [None]
        if not all(isinstance(i, str) for i in inputs):
            return self._err(400, "invalid input", openai=True)
        name, spec, err = self._check_model(body, "embedding", openai=True)
        if err:
            return err
        keep = float(self.config["keep_alive"])
        run = self._plan(dict(self.config), None, inputs)
        await self._warmup(run, name, keep)
        self._keep(name, keep)
        data = []
        for i, vec in enumerate(self._vectors(spec or {}, inputs, body.get("dimensions"))):
            emb: Any = vec
            if fmt == "base64":
                emb = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
            data.append({"object": "embedding", "embedding": emb, "index": i})
        tokens = sum(max(len(i.split()), 1) for i in inputs)
        return self._resp(
            {
                "object": "list",
                "data": data,
                "model": body["model"],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    def _v1_model(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        owner = name.split("/")[-2] if "/" in name else "library"
        return {"id": name, "object": "model", "created": _unix(spec["modified_at"]), "owned_by": owner}

    async def v1_models(self, request: Any) -> Any:
        data = [self._v1_model(n, s) for n, s in self.models.items()] or None  # Go nil slice -> null
        return self._resp({"object": "list", "data": data})

    async def v1_model(self, request: Any, model: str) -> Any:
        found = self._lookup(model)
        if not found:
            return self._err(404, f"model '{model}' not found", openai=True)
        return self._resp(self._v1_model(model, found[1]))

    async def v1_responses(self, request: Any) -> Any:
        body, err = self._json(request, openai=True)
        if err:
            return err
        name, _, err = self._check_model(body, "chat", openai=True)
        if err:
            return err
        model = body["model"]
        keep = float(self.config["keep_alive"])
        run = self._plan(dict(self.config), body.get("max_output_tokens"), body.get("input"))
        rid, mid = f"resp_{random.randint(0, 999999)}", f"msg_{random.randint(0, 999999)}"
        created = int(time.time())

        def response(status: str, text: str | None) -> dict[str, Any]:
            out = [] if text is None else [self._resp_item(mid, "completed", text)]
            r = {
                "id": rid,
                "object": "response",
                "created_at": created,
                "status": status,
                "model": model,
                "output": out,
                "usage": None,
            }
            if status == "completed":
                u = run.usage()
                r["usage"] = {
                    "input_tokens": u["prompt_tokens"],
                    "output_tokens": u["completion_tokens"],
                    "total_tokens": u["total_tokens"],
                }
            return r

        await self._warmup(run, name, keep)
        try:
            if not body.get("stream", False):
                parts: list[str] = []
                async for kind, value in run.events():
                    if kind == "error":
                        return self._err(500, value, openai=True)
                    parts.append(value)
                return self._resp(response("completed", "".join(parts)))
            resp = await self._sse_stream(request)
            seq = itertools.count()

            async def event(kind: str, **data: Any) -> None:
                await resp.send(
                    f"event: {kind}\ndata: {dumps({'type': kind, 'sequence_number': next(seq), **data})}\n\n"
                )

            await event("response.created", response=response("in_progress", None))
            await event("response.in_progress", response=response("in_progress", None))
            item = {"id": mid, "type": "message", "status": "in_progress", "role": "assistant", "content": []}
            await event("response.output_item.added", output_index=0, item=item)
            part = {"type": "output_text", "text": "", "annotations": []}
            await event(
                "response.content_part.added", item_id=mid, output_index=0, content_index=0, part=part
            )
            parts = []
            async for kind, value in run.events():
                if kind == "error":
                    await event("error", code=None, message=value, param=None)
                    await resp.eof()
                    return None
                parts.append(value)
                await event(
                    "response.output_text.delta",
                    item_id=mid,
                    output_index=0,
                    content_index=0,
                    delta=value,
                    logprobs=[],
                )
            text = "".join(parts)
            await event(
                "response.output_text.done",
                item_id=mid,
                output_index=0,
                content_index=0,
                text=text,
                logprobs=[],
            )
            await event(
                "response.content_part.done",
                item_id=mid,
                output_index=0,
                content_index=0,
                part={**part, "text": text},
            )
            await event(
                "response.output_item.done", output_index=0, item=self._resp_item(mid, "completed", text)
            )
            await event("response.completed", response=response("completed", text))
            await resp.eof()
            return None
        finally:
            self._keep(name, keep)

    @staticmethod
    def _resp_item(mid: str, status: str, text: str) -> dict[str, Any]:
        return {
            "id": mid,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
        }

    # ---- Anthropic compatibility --------------------------------------------------------------

    def _anthropic_request(self, body: dict[str, Any]) -> Any:
        """The checks of Ollama's AnthropicMessagesMiddleware before the request reaches the chat handler:
        Go's JSON binding first (a null max_tokens is Go's 0), then the required fields."""
        limit = body.get("max_tokens")
        limit = 0 if limit is None else limit
        messages = body.get("messages") or []
        if isinstance(limit, bool) or not isinstance(limit, int):
            return self._err(
                400,
                "json: cannot unmarshal into Go struct field MessagesRequest.max_tokens of type int",
                anthropic=True,
            )
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("content"), (str, list)) for m in messages
        ):
            return self._err(
                400, "json: cannot unmarshal into Go struct field MessagesRequest.messages", anthropic=True
            )
        for failed, message in (
            (not body.get("model"), "model is required"),
            (limit <= 0, "max_tokens is required and must be positive"),
            (not messages, "messages is required"),
        ):
            if failed:
                return self._err(400, message, anthropic=True)
        return None

    async def v1_messages(self, request: Any) -> Any:
        body, err = self._json(request, anthropic=True)
        if err:
            return err
        err = self._anthropic_request(body)
        if err:
            return err
        name, _, err = self._check_model(body, "chat", anthropic=True)
        if err:
            return err
        model = body["model"]
        keep = float(self.config["keep_alive"])
        run = self._plan(dict(self.config), body["max_tokens"], [body.get("system"), body["messages"]])
        mid = f"msg_{os.urandom(12).hex()}"

        def message(text: str | None) -> dict[str, Any]:
            """The whole answer; text None: message_start's (no content, no stop reason yet)."""
            done = text is not None
            return {
                "id": mid,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [{"type": "text", "text": text}] if text else [],
                "stop_reason": ANTHROPIC_STOP.get(run.done_reason, "stop_sequence") if done else None,
                "stop_sequence": None,
                "usage": {"input_tokens": run.prompt_tokens, "output_tokens": run.emitted},
            }

        await self._warmup(run, name, keep)
        try:
            if body.get("stream") is not True:
                parts: list[str] = []
                async for kind, value in run.events():
                    if kind == "error":
                        return self._err(500, value, anthropic=True)
                    parts.append(value)
                return self._resp(message("".join(parts)))
            return await self._anthropic_stream(request, run, message)
        finally:
            self._keep(name, keep)

    async def _anthropic_stream(
        self, request: Any, run: _Run, message: Callable[[str | None], dict[str, Any]]
    ) -> None:
        """Ollama's anthropic.StreamConverter: the text block opens with the first token; a failure ends the
        stream with Anthropic's `event: error`."""
        resp = await self._sse_stream(request)

        async def event(kind: str, **data: Any) -> None:
            await resp.send(f"event: {kind}\ndata: {dumps({'type': kind, **data})}\n\n")

        await event("message_start", message=message(None))
        started = False
        async for kind, value in run.events():
            if kind == "error":
                await event("error", error={"type": "api_error", "message": value})
                await resp.eof()
                return
            if not started:
                started = True
                await event("content_block_start", index=0, content_block={"type": "text", "text": ""})
            await event("content_block_delta", index=0, delta={"type": "text_delta", "text": value})
        if started:
            await event("content_block_stop", index=0)
        final = message("")
        await event(
            "message_delta",
            delta={"stop_reason": final["stop_reason"], "stop_sequence": None},
            usage=final["usage"],
        )
        await event("message_stop")
        await resp.eof()

    # ---- control ----------------------------------------------------------------------------

    async def fake_stats(self, request: Any) -> Any:
        return self._resp(self.stats())

    async def fake_get_config(self, request: Any) -> Any:
        return self._resp(self.public_config())

    async def fake_set_config(self, request: Any) -> Any:
        body, err = self._json(request)
        if err:
            return err
        try:
            return self._resp(self.update_config(body))
        except (ValueError, TypeError) as e:
            return self._err(400, str(e))

    async def fake_reset(self, request: Any) -> Any:
        try:
            body = json.loads(request.body) if (request.body or b"").strip() else {}
        except ValueError:
            body = {}
        self.reset(config=bool(body.get("config")))
        return self._resp(self.stats())


# --------------------------------------------------------------------------------------------------
# serving


def bind_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """Pre-bound listening socket (Sanic's port=0 silently means 8000)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # asyncio sets TCP_NODELAY only then
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def _close_server(server: Any) -> None:
    """Stop listening, drop open connections (hung requests included), let their handlers unwind."""
    server.server.close()
    conns = list(server.connections)
    tasks = [t for t in (getattr(c, "_task", None) for c in conns) if t is not None and not t.done()]
    for conn in conns:
        conn.close()
    if tasks:
        await asyncio.wait(tasks, timeout=2)
    await server.server.wait_closed()


class FakeOllamaServer:
    """Serve a FakeOllama in the running event loop: ``async with FakeOllamaServer("a") as fake:``.

    Attributes: url, port, fake (the FakeOllama: read .stats(), call .update_config()).
    """

    def __init__(
        self, name: str = "fake", config: dict[str, Any] | None = None, host: str = "127.0.0.1", port: int = 0
    ):
        self.fake = FakeOllama(name, config)
        self.host, self.port = host, port
        self.url = ""
        self._server: Any = None
        self._sock: socket.socket | None = None

    async def start(self) -> Self:
        self._sock = bind_socket(self.host, self.port)
        self.port = self._sock.getsockname()[1]
        self.url = _url(self.host, self.port)
        self._server = await self.fake.app.create_server(
            sock=self._sock, return_asyncio_server=True, access_log=False
        )
        await self._server.startup()
        return self

    async def stop(self) -> None:
        from sanic import Sanic

        if self._server is None:
            return
        server, self._server = self._server, None
        await _close_server(server)
        if self._sock is not None:
            self._sock.close()
        Sanic._app_registry.pop(self.fake.app.name, None)

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def _serve_process(fake: FakeOllama, sock: socket.socket, url: str, watch_parent: int | None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if watch_parent:  # the test process died: exit instead of lingering as an orphan

        async def watchdog() -> None:
            while os.getppid() == watch_parent:
                await asyncio.sleep(0.5)
            stop.set()

        watch_task = asyncio.create_task(watchdog())
    server = await fake.app.create_server(sock=sock, return_asyncio_server=True, access_log=False)
    assert server is not None
    await server.startup()
    print(f"{READY_PREFIX} {url}", flush=True)
    await stop.wait()
    if watch_parent:
        watch_task.cancel()
    await _close_server(server)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fake_ollama", description="fake Ollama server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--name", default="fake")
    parser.add_argument("--config-json", default=None, help="JSON object merged into the config")
    parser.add_argument(
        "--state-file", default=None, help="JSON file keeping installed models across restarts"
    )
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this parent process is gone")
    args = parser.parse_args(argv)
    config = json.loads(args.config_json) if args.config_json else {}
    fake = FakeOllama(args.name, config, state_file=args.state_file)
    sock = bind_socket(args.host, args.port)
    url = _url(args.host, sock.getsockname()[1])
    try:
        asyncio.run(_serve_process(fake, sock, url, args.parent_pid))
    finally:
        sock.close()
    return 0


# --------------------------------------------------------------------------------------------------
# test helpers (process based)


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def wait_until(
    predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01, what: str = ""
) -> Any:
    """Poll predicate until truthy (returned) or raise TimeoutError after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"condition not met within {timeout}s{': ' + what if what else ''}")
        time.sleep(interval)


class FakeOllamaProcess:
    """A fake Ollama running in a child process (see start_fake_ollama)."""

    def __init__(
        self,
        name: str = "a",
        port: int = 0,
        config: dict[str, Any] | None = None,
        host: str = "127.0.0.1",
        start_timeout: float = 15.0,
    ):
        self.name, self.host, self.port = name, host, port
        self.config: dict[str, Any] = dict(config or {})  # replayed on restart
        self.start_timeout = start_timeout
        self.url = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader: threading.Thread | None = None
        self._output: list[str] = []
        fd, self.state_file = tempfile.mkstemp(prefix=f"fake-ollama-{name}-", suffix=".json")
        os.close(fd)
        os.unlink(self.state_file)  # created by the child on the first model change
        weakref.finalize(self, _unlink_quietly, self.state_file)

    def start(self) -> Self:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("fake ollama already running")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        cmd = [
            sys.executable,
            "-m",
            "tests.fake_ollama",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--name",
            self.name,
            "--parent-pid",
            str(os.getpid()),
            "--state-file",
            self.state_file,
        ]
        if self.config:
            cmd += ["--config-json", json.dumps(self.config)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        stdout = self.proc.stdout
        assert stdout is not None
        lines: queue.Queue[str | None] = queue.Queue()
        self._lines = lines

        def reader() -> None:
            with contextlib.suppress(ValueError, OSError):
                for raw in stdout:
                    lines.put(raw.decode("utf-8", "replace").rstrip("\n"))
            lines.put(None)

        self._reader = threading.Thread(target=reader, daemon=True, name=f"fake-ollama-{self.name}-stdout")
        self._reader.start()
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                self.kill()
                raise TimeoutError(
                    f"fake ollama {self.name!r} not ready within {self.start_timeout}s"
                ) from None
            if line is None:
                rc = self.proc.wait()
                self._close_pipes()
                raise RuntimeError(f"fake ollama {self.name!r} exited with {rc} before ready")
            if line.startswith(READY_PREFIX + " "):
                self.url = line.split(" ", 1)[1].strip()
                self.port = int(self.url.rsplit(":", 1)[1])
                return self
            self._output.append(line)

    @property
    def output(self) -> list[str]:
        """Lines the child printed to stdout other than the ready line."""
        with contextlib.suppress(queue.Empty):
            while True:
                line = self._lines.get_nowait()
                if line is not None:
                    self._output.append(line)
        return self._output

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        import httpx

        with httpx.Client(timeout=10, trust_env=False) as client:
            r = client.request(method, self.url + path, json=body)
        if r.status_code != 200:
            raise RuntimeError(f"{method} {path} -> {r.status_code}: {r.text}")
        return r.json()

    def set_config(self, **kw: Any) -> dict[str, Any]:
        """Merge keys into the running fake's config (also remembered for restart())."""
        result = self._request("POST", "/_fake/config", kw)
        self.config.update(kw)
        return result

    def get_config(self) -> dict[str, Any]:
        return self._request("GET", "/_fake/config")

    def stats(self) -> dict[str, Any]:
        return self._request("GET", "/_fake/stats")

    def reset_stats(self) -> dict[str, Any]:
        return self._request("POST", "/_fake/reset", {})

    def wait_stats(self, predicate: Callable[[dict[str, Any]], Any], timeout: float = 5.0) -> dict[str, Any]:
        """Poll /_fake/stats until predicate(stats) is truthy; returns those stats."""
        box: dict[str, Any] = {}

        def check() -> bool:
            box["s"] = self.stats()
            return bool(predicate(box["s"]))

        wait_until(check, timeout, what=f"stats predicate on fake {self.name!r}")
        return box["s"]

    def _close_pipes(self) -> None:
        if self.proc is None:
            return
        if self._reader is not None:  # EOF follows the exit; let the reader finish before closing
            self._reader.join(timeout=2)
        if self.proc.stdout is not None:
            with contextlib.suppress(OSError):
                self.proc.stdout.close()

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not exit in time. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close_pipes()
        return self.proc.returncode

    def kill(self) -> int | None:
        """SIGKILL (a crashed node) and wait."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close_pipes()
        return self.proc.returncode

    def restart(self) -> Self:
        """Stop (if running) and start on the same port with the same config (incl. set_config changes).

        Installed models survive stop/kill like Ollama's disk (state file); stats and loaded models do not.
        """
        self.stop()
        return self.start()

    def __enter__(self) -> Self:
        return self if self.running else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_fake_ollama(
    name: str = "a", port: int = 0, config: dict[str, Any] | None = None, host: str = "127.0.0.1"
) -> FakeOllamaProcess:
    """Spawn ``python -m tests.fake_ollama`` and wait until it is listening."""
    return FakeOllamaProcess(name, port, config, host).start()


def fake_ollama_process(name: str = "a", config: dict[str, Any] | None = None) -> Iterator[FakeOllamaProcess]:
    """Fixture body: ``fake_ollama = pytest.fixture(fake_ollama_process)`` in a conftest."""
    with start_fake_ollama(name, config=config) as fake:
        yield fake


def fake_ollama_factory() -> Iterator[Callable[..., FakeOllamaProcess]]:
    """Fixture body yielding ``make(name="a", port=0, config=None)``; all started fakes stop at teardown."""
    started: list[FakeOllamaProcess] = []

    def make(name: str = "a", port: int = 0, config: dict[str, Any] | None = None) -> FakeOllamaProcess:
        fake = start_fake_ollama(name, port, config)
        started.append(fake)
        return fake

    try:
        yield make
    finally:
        for fake in started:
            fake.stop()


async def fake_ollama_server(
    name: str = "a", config: dict[str, Any] | None = None
) -> AsyncIterator[FakeOllamaServer]:
    """Async fixture body: an in-loop FakeOllamaServer (faster; cannot be killed like a process)."""
    async with FakeOllamaServer(name, config) as server:
        yield server


if __name__ == "__main__":
    sys.exit(main())
