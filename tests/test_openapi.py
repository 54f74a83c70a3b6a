"""The OpenAPI document at /docs/openapi.json describes every route: bodies of every write, every path
parameter, and the query parameters the handlers read (schemathesis generates its requests from it)."""

from __future__ import annotations

import re

# Methods whose operations must document a body (body-less actions document an optional, ignored one).
WRITE_METHODS = ("post", "put", "patch")


def test_every_operation_documents_its_body_and_parameters(fleet):
    c = fleet.controller()
    spec = c.http.get("/docs/openapi.json").json()
    problems = []
    count = 0
    for path, ops in spec["paths"].items():
        path_params = set(re.findall(r"{(\w+)}", path))
        for method, op in ops.items():
            count += 1
            where = f"{method.upper()} {path}"
            body = op.get("requestBody")
            if method in WRITE_METHODS or (method == "delete" and path == "/api/delete"):
                if not body or not body.get("content"):
                    problems.append(f"{where}: no request body documented")
                else:
                    for media, content in body["content"].items():
                        schema = content.get("schema") or {}
                        if not schema.get("type") and not schema.get("format"):
                            problems.append(f"{where}: {media} body without a schema type")
            params = {p["name"]: p for p in op.get("parameters", [])}
            for name in path_params:
                p = params.get(name)
                if not p or p.get("in") != "path" or not p.get("description") or not p.get("required"):
                    problems.append(f"{where}: path parameter {name} not described")
            for p in params.values():
                if not p.get("schema", {}).get("type") and "enum" not in p.get("schema", {}):
                    problems.append(f"{where}: parameter {p['name']} without a schema type")
    assert not problems, "\n".join(problems)
    assert count >= 55  # every route of the controller is in the document
    # paging parameters are bounded, so generated requests stay in range
    events = {p["name"]: p["schema"] for p in spec["paths"]["/api/events"]["get"]["parameters"]}
    assert events["limit"]["maximum"] == 1000 and events["before"]["minimum"] == 1
    settings = spec["paths"]["/api/agents/{agent_id}/settings"]["put"]["requestBody"]["content"]["application/json"]
    assert settings["schema"]["properties"]["tags"]["items"]["maxLength"] == 40
