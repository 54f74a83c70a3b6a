"""Request bodies and query parameters of every route, as JSON Schema, for the OpenAPI document at /docs.

One table instead of decorators spread over the blueprints: sanic-ext's type shorthand cannot say
"integer between 1 and 1000" or "required", and schemathesis (tests/test_schemathesis.py) generates its
requests from exactly these schemas. Keys are route names without the app prefix; a route missing here
is caught by tests/test_openapi.py.
"""

from __future__ import annotations

from typing import Any

from ollama_fleet.controller.edge.http import App
from sanic_ext.extensions.openapi.builders import OperationStore
from sanic_ext.extensions.openapi.definitions import Parameter, RequestBody

from ollama_fleet.contract.status import ALL
from ollama_fleet.controller.admission.priority import TIERS
from ollama_fleet.controller.readmodel import AGENT_SORTS
from ollama_fleet.controller.api.agents import EVENTS_MAX
from ollama_fleet.controller.registry.edits import MAX_NAME_LEN, MAX_NOTES_LEN, MAX_TAG_LEN, MAX_TAGS
from ollama_fleet.controller.api.models import MAX_PAGE
from ollama_fleet.controller.edge.params import INT_MAX, PARAM_MAX_LEN
from ollama_fleet.controller.proxy.requestlog import PAGE_SIZES

S = dict[str, Any]


def _obj(props: S, required: tuple[str, ...] = (), extra: bool = True) -> S:
    out: S = {"type": "object", "properties": props, "additionalProperties": extra}
    if required:
        out["required"] = list(required)
    return out


TEXT: S = {"type": "string", "maxLength": PARAM_MAX_LEN}
CSV: S = {"type": "string", "maxLength": PARAM_MAX_LEN, "description": "comma-separated"}
EPOCH: S = {"type": "number", "minimum": -1e15, "maximum": 1e15, "description": "epoch seconds"}
TIME: S = {"type": "string", "maxLength": 64, "description": "epoch seconds or ISO 8601", "example": "1700000000"}
BOOL: S = {"type": "boolean"}
MODEL: S = {"type": "string", "minLength": 1, "maxLength": 350, "example": "llama3.2:latest",
            "description": "[host/][namespace/]model[:tag]"}
AGENT_IDS: S = {"type": "array", "items": {"type": "string", "maxLength": 63}, "maxItems": 1000}
MESSAGES: S = {"type": "array", "maxItems": 1000, "items": _obj(
    {"role": {"type": "string", "enum": ["system", "user", "assistant", "tool"]}, "content": {"type": "string"}},
    ("role", "content")), "example": [{"role": "user", "content": "hi"}]}
# Anthropic's Messages API: content (and `system`) is a string or a list of content blocks
CONTENT: S = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]}
ANTHROPIC_MESSAGES: S = {"type": "array", "maxItems": 1000, "items": _obj(
    {"role": {"type": "string", "enum": ["user", "assistant"]}, "content": CONTENT}, ("role", "content")),
    "example": [{"role": "user", "content": "hi"}]}
OPTIONS: S = {"type": "object", "description": "model options (temperature, num_ctx, ...)"}
INPUT: S = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}], "example": "hi"}
NO_BODY: S = {"type": "object", "maxProperties": 0, "description": "no body needed; one is ignored"}

# route name -> (schema of the JSON body, required?)
BODIES: dict[str, tuple[S, bool]] = {
    "agents.agent_settings": (_obj({"display_name": {"type": "string", "maxLength": MAX_NAME_LEN},
                                    "tags": {"type": "array", "maxItems": MAX_TAGS, "items": {
                                        "type": "string", "minLength": 1, "maxLength": MAX_TAG_LEN}},
                                    "notes": {"type": "string", "maxLength": MAX_NOTES_LEN}}, extra=False), True),
    "agents.disconnect_agent": (_obj({"pause_s": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 86400,
                                                  "description": "keep the agent away this many seconds"}},
                                     extra=False), False),
    "models.distribute": (_obj({"model_name": MODEL, "target": {"type": "string", "enum": ["all", "specific", "auto"]},
                                "agent_ids": AGENT_IDS, "force": BOOL, "queue_if_offline": BOOL},
                               ("model_name",)), True),
    "models.pull_one": (_obj({"model_name": MODEL, "force": BOOL, "queue_if_offline": BOOL}, ("model_name",)), True),
    "models.auto": (NO_BODY, False),
    "models.cancel_task": (NO_BODY, False),
    # Ollama's model API, fleet-wide
    "ollama_models.pull": (_obj({"model": MODEL, "insecure": BOOL, "stream": BOOL}, ("model",)), True),
    "ollama_models.push": (_obj({"model": MODEL, "insecure": BOOL, "stream": BOOL}, ("model",)), True),
    "ollama_models.delete": (_obj({"model": MODEL}, ("model",)), True),
    "ollama_models.copy": (_obj({"source": MODEL, "destination": MODEL}, ("source", "destination")), True),
    "ollama_models.create": (_obj({"model": MODEL, "from": MODEL, "stream": BOOL, "quantize": {"type": "string"},
                                   "system": {"type": "string"}, "template": {"type": "string"},
                                   "parameters": {"type": "object"},
                                   "files": {"type": "object", "additionalProperties": {"type": "string"}},
                                   "adapters": {"type": "object", "additionalProperties": {"type": "string"}}},
                                  ("model",)), True),
    # the routed Ollama and OpenAI endpoints: forwarded to an agent as they are (other fields pass through)
    "proxy.proxy__api_chat": (_obj({"model": MODEL, "messages": MESSAGES, "stream": BOOL, "options": OPTIONS,
                                    "keep_alive": {"oneOf": [{"type": "string"}, {"type": "number"}]}, "format": {}, "tools": {
                                        "type": "array"}}, ("model",)), True),
    "proxy.proxy__api_generate": (_obj({"model": MODEL, "prompt": {"type": "string", "example": "hi"},
                                        "stream": BOOL, "options": OPTIONS}, ("model",)), True),
    "proxy.proxy__api_embed": (_obj({"model": MODEL, "input": INPUT},
                                    ("model",)), True),
    "proxy.proxy__api_embeddings": (_obj({"model": MODEL, "prompt": {"type": "string"}}, ("model",)), True),
    "proxy.proxy__api_show": (_obj({"model": MODEL, "verbose": BOOL}, ("model",)), True),
    "proxy.proxy__v1_chat_completions": (_obj({"model": MODEL, "messages": MESSAGES, "stream": BOOL,
                                               "max_tokens": {"type": "integer", "minimum": 1}},
                                              ("model", "messages")), True),
    "proxy.proxy__v1_completions": (_obj({"model": MODEL, "prompt": {"type": "string", "example": "hi"},
                                          "stream": BOOL}, ("model", "prompt")), True),
    "proxy.proxy__v1_embeddings": (_obj({"model": MODEL, "input": INPUT},
                                        ("model", "input")), True),
    "proxy.proxy__v1_responses": (_obj({"model": MODEL, "input": INPUT,
                                        "stream": BOOL}, ("model", "input")), True),
    # Anthropic's Messages API, routed like the others
    "proxy.proxy__v1_messages": (_obj({"model": MODEL, "max_tokens": {"type": "integer", "minimum": 1},
                                       "messages": ANTHROPIC_MESSAGES, "system": CONTENT, "stream": BOOL},
                                      ("model", "max_tokens", "messages")), True),
}
# Bodies that are not JSON: (media type, schema, required?)
OTHER_BODIES: dict[str, tuple[str, S, bool]] = {
    "unsupported.blobs": ("application/octet-stream", {"type": "string", "format": "binary"}, False),
    "dashboard.login": ("application/x-www-form-urlencoded",
                        _obj({"token": {"type": "string"}, "next": {"type": "string"}}), False),
    "dashboard.logout": ("application/x-www-form-urlencoded", NO_BODY, False),
}

PAGE: list[tuple[str, S, str]] = [
    ("page", {"type": "integer", "minimum": 1, "maximum": INT_MAX // max(PAGE_SIZES)}, "page number, from 1"),
    ("per_page", {"type": "integer", "enum": list(PAGE_SIZES)}, "rows per page"),
]
REQUEST_FILTERS: list[tuple[str, S, str]] = [
    ("model", TEXT, "model name"), ("agent", TEXT, "agent id"), ("endpoint", TEXT, "e.g. /api/chat"),
    ("client", TEXT, "client address"),
    ("status", {"type": "string", "maxLength": PARAM_MAX_LEN, "example": "200,5xx,error"},
     "codes (200), classes (4xx) or `error`, comma-separated"),
    ("since", TIME, "from this time"), ("until", TIME, "before this time"),
    ("priority", {"type": "string", "enum": list(TIERS)}, "a generation's priority tier"),
]
AGENT_VIEW: list[tuple[str, S, str]] = [
    ("status", {"type": "string", "enum": list(ALL)}, "agent status"),
    ("q", TEXT, "substring of id, name, host, IP or tag"),
    ("sort", {"type": "string", "enum": list(AGENT_SORTS)}, "sort column"),
    ("dir", {"type": "string", "enum": ["asc", "desc"]}, "sort direction"),
]
# route name -> query parameters: (name, schema, description)
QUERY: dict[str, list[tuple[str, S, str]]] = {
    "agents.list_agents": [("status", CSV, ", ".join(ALL)),
                           ("q", TEXT, "substring of id, name, host, IP or tag")],
    "agents.agent_metrics": [("since", EPOCH, "from this time (default: one hour ago)")],
    "agents.events": [("agent", TEXT, "agent id"), ("kind", TEXT, "event kind"), ("since", EPOCH, "from this time"),
                      ("limit", {"type": "integer", "minimum": 1, "maximum": EVENTS_MAX}, "events per page"),
                      ("before", {"type": "integer", "minimum": 1, "maximum": INT_MAX},
                       "events older than this id (next_before of the previous page)")],
    "models.available": [("q", TEXT, "substring of name or description"), ("tag", TEXT, "catalogue tag")],
    "models.list_tasks": [
        *[(k, CSV, f"{k} filter") for k in ("agent", "status", "model", "origin", "verb", "group")],
        ("limit", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}, "jobs per page"),
        ("offset", {"type": "integer", "minimum": 0, "maximum": INT_MAX}, "jobs to skip")],
    "requests.list_requests": [*REQUEST_FILTERS, *PAGE,
                               ("export", {"type": "string", "enum": ["csv", "json"]}, "every matching row as a file")],
    "ollama_models.pull": [("agents", CSV, "agent ids, `all` or `auto` (also: header X-Fleet-Agents)")],
    "ollama_models.push": [("agents", CSV, "the agent to push from")],
    "ollama_models.delete": [("agents", CSV, "agent ids (default: all)")],
    "ollama_models.copy": [("agents", CSV, "agent ids (default: all)")],
    "ollama_models.create": [("agents", CSV, "agent ids (default: all)")],
    "dashboard.agents": AGENT_VIEW, "dashboard.agents_csv": AGENT_VIEW, "dashboard.agents_json": AGENT_VIEW,
    "dashboard.requests_page": [*REQUEST_FILTERS[:3], ("status", {"type": "string", "enum": [
        "2xx", "4xx", "5xx", "error"]}, "status class"), ("period", {"type": "string", "enum": [
            "15m", "1h", "24h", "7d"]}, "how far back"), *PAGE],
    "dashboard.events_page": [("agent", TEXT, "agent id"), ("kind", TEXT, "event kind"),
                              ("before", {"type": "integer", "minimum": 1, "maximum": INT_MAX}, "older events")],
    "dashboard.stream": [("view", {"type": "string", "enum": ["overview", "agents", "agent", "models", "events",
                                                              "pulse"]}, "which page's sections"),
                         ("id", TEXT, "agent id (view=agent)"), ("agent", TEXT, "events filter"),
                         ("kind", TEXT, "events filter"), *AGENT_VIEW],
    "dashboard.login_form": [("next", TEXT, "where to go after login (a local path)")],
}
PATH_PARAMS = {
    "agent_id": "agent id (its node id)", "node": "agent id (its node id)", "task_id": "job id",
    "name": "model name, e.g. llama3.2:latest", "model": "model name, e.g. llama3.2:latest",
    "rid": "request id (X-Request-Id)", "digest": "blob digest, sha256:...",
}


def _raw(schema: S) -> Any:
    """sanic-ext types want a type or its Schema class; a JSON Schema dict serialises as it is."""
    return schema


def document(app: App) -> None:
    """Attach the tables above to the routes' OpenAPI operations: once every route exists, before sanic-ext
    builds the document (its builder runs last among the before_server_start listeners, priority -1000)."""
    store = OperationStore()  # type: ignore[no-untyped-call]  # sanic-ext leaves it unannotated
    for route in app.router.routes:
        name = route.name.split(".", 1)[1]
        op = store[route.handler]
        if name in BODIES:
            schema, required = BODIES[name]
            op.requestBody = RequestBody({"application/json": {"schema": schema}}, required=required)
        elif name in OTHER_BODIES:
            media, schema, required = OTHER_BODIES[name]
            op.requestBody = RequestBody({media: {"schema": schema}}, required=required)
        documented = {p.fields["name"] for p in op.parameters}
        for pname, schema, description in QUERY.get(name, []):
            if pname not in documented:
                op.parameters.append(Parameter(pname, _raw(schema), "query", description=description))
        for p in route.params.values():
            if p.name not in documented:
                op.parameters.append(Parameter(p.name, _raw({"type": "string", "minLength": 1}), "path",
                                               description=PATH_PARAMS.get(p.name, p.name), required=True))

