"""Small helpers shared by the HTTP blueprints: error shapes, credentials, JSON body parsing."""

from __future__ import annotations

import logging
from typing import Any, Literal, cast

from types import SimpleNamespace

from sanic import Request, Sanic, json
from sanic.config import Config as SanicConfig
from sanic.exceptions import SanicException
from sanic.response import HTTPResponse

from ollama_fleet.contract.sanitize import TooDeep, clean_tree, depth, loads_strict

App = Sanic[SanicConfig, SimpleNamespace]  # the controller's Sanic application, as Sanic types it
# The API a client speaks, which decides the shape of its errors: Ollama's native API, OpenAI's, Anthropic's
Api = Literal["ollama", "openai", "anthropic"]
ANTHROPIC_PATHS = ("/v1/messages",)

log = logging.getLogger("fleet.controller")


def error(status: int, message: str, **extra: Any) -> HTTPResponse:
    """Management API errors use Ollama's own shape: {"error": "..."}."""
    return json({"error": message, **extra}, status=status)


def bearer(request: Request) -> str:
    """The Bearer credential; one that is not ASCII (no token or key of ours is) comes back as a value that
    matches nothing, so it fails (and is throttled) like any wrong credential instead of breaking a compare."""
    header = request.headers.get("authorization", "")
    value = header[7:].strip() if header.lower().startswith("bearer ") else ""
    return _ascii(value)


def api_key(request: Request) -> str:
    """An API key: the Bearer credential, else `x-api-key` (where Anthropic's clients send it); like
    bearer(), one that is not ASCII matches nothing."""
    return bearer(request) or _ascii(request.headers.get("x-api-key", "").strip())


def _ascii(value: str) -> str:
    return value if value.isascii() else "\ufffd"


MAX_JSON_DEPTH = 64  # nesting levels; LLM bodies (messages, tool schemas) need far fewer


class JSONError(ValueError):
    """A body that is not acceptable JSON; the message is meant for the client."""


def parse_json(raw: bytes | bytearray | str) -> Any:
    """Strict, bounded json.loads: raises JSONError (a ValueError) for invalid JSON, NaN/Infinity,
    integers beyond Python's digit limit and nesting deeper than MAX_JSON_DEPTH. Never RecursionError."""
    try:
        value = loads_strict(raw)
    except TooDeep:
        raise JSONError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, NaN, the int digit limit
        raise JSONError(str(e)) from None
    # Cheap bound first: fewer openers than the limit cannot nest deeper than it (the usual case).
    openers = raw.count("[") + raw.count("{") if isinstance(raw, str) else raw.count(b"[") + raw.count(b"{")
    if openers > MAX_JSON_DEPTH and depth(value) > MAX_JSON_DEPTH:
        raise JSONError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def json_body(request: Request, optional: bool = False) -> dict[str, Any] | HTTPResponse:
    """The request's JSON object, strings cleaned (ollama_fleet/contract/sanitize.py), or a 400 in the
    API's error shape. `optional`: no body (or only whitespace) is an empty object."""
    if not request.body or not request.body.strip():
        return {} if optional else error(400, "missing request body")
    try:
        body = parse_json(request.body)
    except JSONError as e:
        return error(400, f"invalid JSON body: {e}")
    if not isinstance(body, dict):
        return error(400, "request body must be a JSON object")
    return cast(dict[str, Any], clean_tree(body))


def api_of(path: str) -> Api:
    """The API a request path belongs to."""
    if path in ANTHROPIC_PATHS:
        return "anthropic"
    return "openai" if path.startswith("/v1/") else "ollama"


def error_response(api: Api | bool, status: int, message: str, code: str | None = None) -> HTTPResponse:
    """An error in the API's own shape: native `{"error": "..."}`, OpenAI's or Anthropic's error object.
    `api` True/False: OpenAI or native (the callers from before the Anthropic dialect)."""
    api = ("openai" if api else "ollama") if isinstance(api, bool) else api
    if api == "ollama":
        return json({"error": message}, status=status)
    return anthropic_error(status, message) if api == "anthropic" else openai_error(status, message, code)


# The error type per status of each API's error object (docs.anthropic.com/en/api/errors for Anthropic's);
# any other status: OpenAI's api_error, Anthropic's invalid_request_error (4xx) or api_error (5xx)
OPENAI_ERRORS = {400: "invalid_request_error", 401: "invalid_request_error", 404: "not_found_error",
                 408: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}
ANTHROPIC_ERRORS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                    503: "overloaded_error", 529: "overloaded_error"}


def openai_error(status: int, message: str, code: str | None = None) -> HTTPResponse:
    kind = OPENAI_ERRORS.get(status, "api_error")
    return json({"error": {"message": message, "type": kind, "param": None, "code": code}}, status=status)


def anthropic_error(status: int, message: str) -> HTTPResponse:
    kind = ANTHROPIC_ERRORS.get(status, "invalid_request_error" if status < 500 else "api_error")
    return json({"type": "error", "error": {"type": kind, "message": message}}, status=status)


def sanic_error(request: Request, exc: SanicException) -> HTTPResponse:
    """Sanic's own refusals (404, 405, 408, 413...) in the API's error shape, like every other error."""
    resp = error_response(api_of(request.path), exc.status_code, str(exc) or exc.message)
    for k, v in (getattr(exc, "headers", None) or {}).items():
        resp.headers[k] = v
    return resp


def unexpected_error(request: Request, exc: Exception) -> HTTPResponse:
    """A bug, not bad input: logged with its traceback, answered in the API's error shape."""
    log.error("unhandled error in %s %s", request.method, request.path[:200], exc_info=exc)
    return error_response(api_of(request.path), 500, "internal error (logged by the controller)")
