"""Ollama's model-management API at the controller, fleet-wide: /api/pull, /api/delete, /api/copy,
/api/create, /api/push.

`POST /api/pull` becomes durable fleet jobs and streams ONE merged progress stream in Ollama's own format
(per-layer lines with digest/total/completed summed over the agents), so `ollama pull` and the SDKs show
fleet progress unchanged. A client that disconnects does not cancel anything: the jobs belong to the
fleet (see them at /api/tasks). Targets: query `agents=a,b` or header `X-Fleet-Agents: a,b`, or `auto`
(agents whose memory fits the model); default: every online agent that lacks the model.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from sanic import Blueprint, Request
from sanic.response import HTTPResponse
from sanic.response import json as json_response

from ollama_fleet.contract.model_names import valid_model_name

from ollama_fleet.controller.compose import fleet_of
from ollama_fleet.controller.edge.access import Role, authorize
from ollama_fleet.controller.jobs.distribution import DistributionError, Distributor, has_model
from ollama_fleet.controller.edge.http import error, json_body
from ollama_fleet.controller.jobs.ledger import JobLedger, JobRec
from ollama_fleet.controller.proxy.upstream import JSON_HEADERS, UpstreamError
from ollama_fleet.controller.registry.live import AgentRecord

log = logging.getLogger("fleet.ollama_models")

bp = Blueprint("ollama_models")

NDJSON = "application/x-ndjson"
DELETE_WAIT = 120.0  # seconds /api/delete waits for the agents before answering 202 with the task ids
AGENTS_HEADER = "x-fleet-agents"


def _dist(request: Request) -> Distributor:
    return fleet_of(request).distributor


def _ledger(request: Request) -> JobLedger:
    return fleet_of(request).jobs


def _line(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":")) + "\n"


def _denied(request: Request) -> HTTPResponse | None:
    """Fleet-wide model changes: the admin token when one is set; without one, an API key when keys are
    in use (Ollama clients such as Open WebUI pull with theirs), else loopback clients only."""
    fleet = fleet_of(request)
    if not fleet.cfg.admin_token and fleet.proxy.keys.enabled:
        return fleet.proxy.authorize(request, False)[1]
    denied = authorize(request, Role.ADMIN)
    return denied.json() if denied else None


BOOL_FIELDS = ("stream", "insecure")  # Ollama's *bool fields: a string there is its 400 too


def _body(request: Request) -> dict[str, Any] | HTTPResponse:
    body = json_body(request)  # bounded depth, clean strings
    if isinstance(body, HTTPResponse):
        return body
    for name in BOOL_FIELDS:
        if body.get(name) is not None and not isinstance(body[name], bool):
            return error(400, f"{name} must be true or false")
    return body


def _name(body: dict[str, Any], *keys: str) -> str | None:
    """The first of `keys` present (Ollama still accepts the deprecated `name`), if it is a valid name."""
    value = next((body[k] for k in keys if body.get(k)), None)
    return value if valid_model_name(value) else None


def _request(request: Request, *keys: str) -> tuple[dict[str, Any], list[str]] | HTTPResponse:
    """The shared opening of every model-changing route: authorise, parse the body, read the names
    (`keys` groups: "model|name" takes the first present; each group must be a valid model name)."""
    if (denied := _denied(request)) is not None:
        return denied
    body = _body(request)
    if isinstance(body, HTTPResponse):
        return body
    names = [_name(body, *group.split("|")) for group in keys]
    if any(n is None for n in names):
        return error(400, "invalid model name")
    return body, [n for n in names if n is not None]


def _targets(request: Request) -> tuple[str, list[str] | None]:
    raw = (request.args.get("agents") or request.headers.get(AGENTS_HEADER) or "").strip()
    if raw in ("", "all"):
        return "all", None
    if raw == "auto":
        return "auto", None
    return "specific", [x.strip() for x in raw.split(",") if x.strip()]


def _chosen(request: Request, model: str) -> list[AgentRecord] | HTTPResponse:
    """Routable agents that have `model`, among the chosen ones (or all)."""
    agents = _dist(request).registry.agents
    target, ids = _targets(request)
    if target == "specific":
        assert ids is not None
        for node in ids:
            if node not in agents:
                return error(404, f"agent '{node}' not found")
        pool = [agents[n] for n in dict.fromkeys(ids)]
        down = [a for a in pool if not a.routable]
        if down:
            return error(503, f"agent '{down[0].node_id}' is {down[0].status}")
    else:
        pool = sorted(agents.values(), key=lambda a: a.node_id)
    return [a for a in pool if a.routable and has_model(a, model)]


async def _wait_done(ledger: JobLedger, recs: list[JobRec], timeout: float | None = None) -> bool:
    ids = [r.task_id for r in recs]
    ev = ledger.watch(ids)
    try:
        async with asyncio.timeout(timeout):
            while not all(r.done for r in recs):
                await ev.wait()
                ev.clear()
        return True
    except TimeoutError:
        return False
    finally:
        ledger.unwatch(ids, ev)


MISSING = ("file does not exist", "not found")  # how Ollama says the registry has no such model


def _failure_status(recs: list[JobRec]) -> int:
    """404 when every failed job found no such model (the client's mistake); else Ollama's own 500."""
    failed = [r for r in recs if r.status != "completed"]
    if failed and all(any(m in (r.error or "").lower() for m in MISSING) for r in failed):
        return 404
    return 500


def _failures(model: str, verb: str, recs: list[JobRec]) -> str | None:
    failed = [r for r in recs if r.status != "completed"]
    if not failed:
        return None
    detail = "; ".join(f"{r.node_id}: {r.error or r.status}" for r in failed)
    return f"{verb} of {model} failed on {len(failed)} of {len(recs)} agent(s): {detail}"


class MergedProgress:
    """Ollama pull lines for a set of jobs: one series per layer digest, summed over agents.

    A layer's total is its size times the agents that still pull it, fixed from its first sighting (the
    Ollama CLI sizes its bar from the first line of a digest); `completed` is omitted while 0, as Ollama does.
    """

    def __init__(self, recs: list[JobRec]) -> None:
        self.recs = recs
        self.order: list[str] = []
        self.sizes: dict[str, int] = {}
        self.sent: dict[str, tuple[int, int]] = {}

    def lines(self) -> list[dict[str, Any]]:
        for r in self.recs:
            for digest, (_, total) in r.layers.items():
                if digest not in self.sizes:
                    self.order.append(digest)
                self.sizes[digest] = max(self.sizes.get(digest, 0), int(total or 0))
        out = []
        for digest in self.order:
            total = done = 0
            for r in self.recs:
                if digest in r.layers:
                    c, t = r.layers[digest]
                    total, done = total + int(t or self.sizes[digest]), done + int(c or 0)
                elif not r.done:
                    total += self.sizes[digest]  # it will get there
            if not total or self.sent.get(digest) == (total, done):
                continue
            self.sent[digest] = (total, done)
            short = digest[7:19] if digest.startswith("sha256:") else digest[:12]
            line: dict[str, Any] = {"status": f"pulling {short}", "digest": digest, "total": total}
            if done:
                line["completed"] = done
            out.append(line)
        return out


@bp.post("/api/pull")
async def pull(request: Request) -> HTTPResponse | None:
    parsed = _request(request, "model|name")
    if isinstance(parsed, HTTPResponse):
        return parsed
    body, (model,) = parsed
    target, ids = _targets(request)
    dist, ledger = _dist(request), _ledger(request)
    try:
        plan = await dist.distribute(model, target, ids, origin="ollama_api", skip_installed=target != "specific")
    except DistributionError as e:
        return error(e.status, e.message)
    recs = plan.recs
    if not recs and not any(s["reason"] == "already installed" for s in plan.skipped):
        reasons = "; ".join(f"{s['agent_id']}: {s['reason']}" for s in plan.skipped) or "no agent"
        return error(503, f"no agent to pull {model} to ({reasons})")
    headers = {"X-Fleet-Tasks": ",".join(r.task_id for r in recs)}
    if body.get("stream", True) is False:
        await _wait_done(ledger, recs)
        failure = _failures(model, "pull", recs)
        return error(_failure_status(recs), failure) if failure else json_response({"status": "success"},
                                                                                 headers=headers)
    resp = await request.respond(content_type=NDJSON, headers=headers)
    await resp.send(_line({"status": "pulling manifest"}))
    merged = MergedProgress(recs)
    ids = [r.task_id for r in recs]
    ev = ledger.watch(ids)
    try:  # a client that goes away cancels only this loop, never the fleet's jobs
        while True:
            for line in merged.lines():
                await resp.send(_line(line))
            if all(r.done for r in recs):
                break
            await ev.wait()
            ev.clear()
    finally:
        ledger.unwatch(ids, ev)
    failure = _failures(model, "pull", recs)
    if failure:
        await resp.send(_line({"error": failure}))
    else:
        for status in ("verifying sha256 digest", "writing manifest", "success"):
            await resp.send(_line({"status": status}))
    await resp.eof()
    return None


@bp.delete("/api/delete")
async def delete(request: Request) -> HTTPResponse:
    parsed = _request(request, "model|name")
    if isinstance(parsed, HTTPResponse):
        return parsed
    body, (model,) = parsed
    chosen = _chosen(request, model)
    if isinstance(chosen, HTTPResponse):
        return chosen
    if not chosen:
        return error(404, f"model '{model}' not found")
    dist, ledger = _dist(request), _ledger(request)
    plan = await dist.delete(model, [a.node_id for a in chosen], origin="ollama_api")
    away = [a.node_id for a in dist.registry.agents.values() if not a.routable and has_model(a, model)]
    headers = {"X-Fleet-Agents": ",".join(a.node_id for a in chosen), "X-Fleet-Tasks": ",".join(
        r.task_id for r in plan.recs)}
    if away:
        headers["X-Fleet-Skipped"] = ",".join(sorted(away))  # offline: still have it; delete again later
    if not await _wait_done(ledger, plan.recs, DELETE_WAIT):
        return json_response({"status": "deleting", "task_ids": [r.task_id for r in plan.recs]}, status=202,
                             headers=headers)
    failure = _failures(model, "delete", plan.recs)
    return error(500, failure) if failure else HTTPResponse(status=200, headers=headers)


async def _on_agents(request: Request, agents: list[AgentRecord], path: str,
                     body: dict[str, Any]) -> list[tuple[AgentRecord, int, str]]:
    """The same non-streamed Ollama request on several agents at once: (agent, status, error text)."""
    http = _dist(request).http
    data = json.dumps(body, separators=(",", ":")).encode()

    async def one(a: AgentRecord) -> tuple[AgentRecord, int, str]:
        try:
            r = await http.call(a.ollama_url, path, data)
        except UpstreamError as e:
            return a, 502, f"{e.__class__.__name__}: {e}"
        text = ""
        if r.status >= 400:
            text = r.body.decode(errors="replace")
            try:
                doc = json.loads(r.body)
            except ValueError:
                doc = None
            if isinstance(doc, dict) and doc.get("error"):
                text = str(doc["error"])
        return a, r.status, text[:500]

    return list(await asyncio.gather(*(one(a) for a in agents)))


@bp.post("/api/copy")
async def copy(request: Request) -> HTTPResponse:
    """On every agent that has the source: an alias on one agent only would route inconsistently."""
    parsed = _request(request, "source", "destination")
    if isinstance(parsed, HTTPResponse):
        return parsed
    body, (source, dest) = parsed
    chosen = _chosen(request, source)
    if isinstance(chosen, HTTPResponse):
        return chosen
    if not chosen:
        return error(404, f'model "{source}" not found')
    results = await _on_agents(request, chosen, "/api/copy", {"source": source, "destination": dest})
    bad = [(a, s, t) for a, s, t in results if s >= 400]
    if bad:
        return error(min(500, bad[0][1]), "copy failed on " + "; ".join(
            f"{x.node_id}: {t}" for x, _, t in bad))
    return HTTPResponse(status=200, headers={"X-Fleet-Agents": ",".join(a.node_id for a in chosen)})


@bp.post("/api/create")
async def create(request: Request) -> HTTPResponse | None:
    """`from` a model the agents have: created on each of them. Uploaded files cannot reach every agent."""
    parsed = _request(request, "model|name")
    if isinstance(parsed, HTTPResponse):
        return parsed
    body, (model,) = parsed
    for field in ("files", "adapters"):  # {file name: blob digest}, as Ollama's CreateRequest has them
        value = body.get(field)
        if value is not None and not (isinstance(value, dict) and all(isinstance(v, str) for v in value.values())):
            return error(400, f"{field} must be an object of file names to blob digests")
    if body.get("files") or body.get("adapters"):
        return error(501, "create from uploaded files or adapters is not supported through the fleet controller: "
                         "the blobs would have to reach every agent. Create the model on one agent's Ollama "
                         "directly, or use `from` with a model the agents already have.")
    source = _name(body, "from")
    if source is None:
        return error(400, "neither 'from' or 'files' was specified")
    chosen = _chosen(request, source)
    if isinstance(chosen, HTTPResponse):
        return chosen
    if not chosen:
        return error(404, f"model '{source}' not found")
    results = await _on_agents(request, chosen, "/api/create", {**body, "stream": False})
    bad = [f"{a.node_id}: {t or s}" for a, s, t in results if s >= 400]
    failure = f"create of {model} failed on " + "; ".join(bad) if bad else None
    headers = {"X-Fleet-Agents": ",".join(a.node_id for a in chosen)}
    if body.get("stream", True) is False:
        # every agent refused the request (4xx): that is the client's error, answered with its status
        refused = sorted({s for _, s, _ in results if s >= 400})
        status = refused[0] if refused and refused[-1] < 500 else 500
        return error(status, failure) if failure else json_response({"status": "success"}, headers=headers)
    resp = await request.respond(content_type=NDJSON, headers=headers)
    await resp.send(_line({"status": f"creating {model} from {source} on {len(chosen)} agent(s)"}))
    for a, s, _ in results:
        if s < 400:
            await resp.send(_line({"status": f"created on {a.node_id}"}))
    await resp.send(_line({"error": failure} if failure else {"status": "success"}))
    await resp.eof()
    return None


@bp.post("/api/push")
async def push(request: Request) -> HTTPResponse | None:
    """A push uploads from one machine: the first online agent that has the model (or the one named)."""
    parsed = _request(request, "model|name")
    if isinstance(parsed, HTTPResponse):
        return parsed
    body, (model,) = parsed
    target, ids = _targets(request)
    if target == "specific" and ids and len(ids) > 1:
        return error(400, "a push runs on one agent: name one in `agents`")
    chosen = _chosen(request, model)
    if isinstance(chosen, HTTPResponse):
        return chosen
    if not chosen:
        return error(404, f'model "{model}" not found')
    agent = chosen[0]
    try:
        upstream = await _dist(request).http.post(agent.ollama_url, "/api/push", JSON_HEADERS, request.body)
    except UpstreamError as e:
        return error(502, f"agent {agent.node_id}: {e.__class__.__name__}: {e}")
    try:
        ctype = upstream.header("content-type", "application/json")
        headers = {"X-Fleet-Agent": agent.node_id}
        if upstream.status >= 400 or not ctype.startswith(NDJSON):
            data = await upstream.read()
            return HTTPResponse(data, status=upstream.status, content_type=ctype, headers=headers)
        resp = await request.respond(content_type=ctype, headers=headers)
        async for chunk in upstream.chunks():
            await resp.send(chunk)
        await resp.eof()
        return None
    finally:
        upstream.close()
