"""The request log API: `GET /api/requests` with filters, pagination and CSV/JSON export."""

from __future__ import annotations

import json as jsonlib

from sanic import Blueprint, Request, json
from sanic.response import HTTPResponse, raw
from sanic_ext import openapi

from . import requestlog
from .http import error
from .params import INT_MAX, ParamError, int_param

bp = Blueprint("requests")


@bp.get("/api/requests")
@openapi.summary("Request log, newest first")
@openapi.description(
    "Filters: `model`, `agent`, `endpoint`, `client`, `status` (a code like 200, a class like 5xx, or "
    "`error`; comma-separated), `since`/`until` (epoch seconds or ISO 8601). Paging: `page` (from 1), "
    "`per_page` (25, 50 or 100). `export=csv|json` returns every matching row (up to 100,000) as a file.")
async def list_requests(request: Request) -> HTTPResponse:
    fleet = request.app.ctx.fleet
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
    rows = await fleet.store.read(requestlog.query_export, filters)
    if export == "csv":
        body, ctype = requestlog.to_csv(rows).encode(), "text/csv; charset=utf-8"
    else:
        body, ctype = jsonlib.dumps(rows).encode(), "application/json"
    return raw(body, content_type=ctype,
               headers={"content-disposition": f'attachment; filename="requests.{export}"'})
