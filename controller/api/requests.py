"""The request log API: `GET /api/requests` with filters, pagination and CSV/JSON export."""

from __future__ import annotations

import json as jsonlib

from sanic import Blueprint, Request, json
from sanic.response import HTTPResponse
from sanic_ext import openapi

from ollama_fleet.controller.compose import fleet_of
from ollama_fleet.controller.proxy import requestlog
from ollama_fleet.controller.edge.http import error
from ollama_fleet.controller.edge.params import INT_MAX, ParamError, int_param

bp = Blueprint("requests")


@bp.get("/api/requests")
@openapi.summary("Request log, newest first")
@openapi.description(
    "Filters: `model`, `agent`, `endpoint`, `client`, `status` (a code like 200, a class like 5xx, or "
    "`error`; comma-separated), `priority` (high, normal or low: a generation's tier in force), "
    "`since`/`until` (epoch seconds or ISO 8601). Paging: `page` (from 1), `per_page` (25, 50 or 100). "
    "`export=csv|json` returns every matching row (up to 100,000) as a file. A row's `queue_ms` is the time "
    "it waited in the fleet queue (null: it never queued); `priority` is null for requests not admitted "
    "(embeddings, /api/show, refusals before admission).")
async def list_requests(request: Request) -> HTTPResponse | None:
    fleet = fleet_of(request)
    try:
        filters = requestlog.Filters(request.args)
    except ValueError as e:
        return error(400, str(e))
    try:
        # page * per_page becomes an SQL OFFSET: keep it within 64-bit integers
        page = int_param(request.args, "page", 1, 1, INT_MAX // max(requestlog.PAGE_SIZES)) or 1
        per_page = int_param(request.args, "per_page", requestlog.PAGE_SIZES[0], 1, max(requestlog.PAGE_SIZES))
    except ParamError as e:
        return error(400, str(e))
    if per_page not in requestlog.PAGE_SIZES:
        return error(400, f"per_page must be one of {', '.join(map(str, requestlog.PAGE_SIZES))}")
    export = request.args.get("export")
    if export not in (None, "csv", "json"):
        return error(400, "export must be csv or json")
    await fleet.proxy.flush(barrier=True)  # read-your-writes: requests just finished are in the answer
    if export is None:
        return json(await fleet.store.read(requestlog.query_page, filters, page, per_page))
    await _stream_export(request, filters, export)
    return None


async def _stream_export(request: Request, filters: requestlog.Filters, export: str) -> None:
    """CSV or a JSON array, written chunk by chunk as the rows are read (bounded memory at any size)."""
    store = fleet_of(request).store
    ctype = "text/csv; charset=utf-8" if export == "csv" else "application/json"
    resp = await request.respond(content_type=ctype,
                                 headers={"content-disposition": f'attachment; filename="requests.{export}"'})
    after: tuple[float, int] | None = None
    sent = 0
    if export == "json":
        await resp.send("[")
    while sent < requestlog.EXPORT_MAX:
        rows = await store.read(requestlog.query_export, filters, after,
                                min(requestlog.EXPORT_CHUNK, requestlog.EXPORT_MAX - sent))
        if not rows:
            break
        after = (rows[-1]["ts"], rows[-1]["id"])
        for r in rows:
            r.pop("id", None)
        if export == "csv":
            await resp.send(requestlog.to_csv(rows, header=sent == 0))
        else:
            await resp.send(("," if sent else "") + jsonlib.dumps(rows)[1:-1])
        sent += len(rows)
    if export == "csv" and sent == 0:
        await resp.send(requestlog.to_csv([]))
    await resp.send("]" if export == "json" else "", end_stream=True)
