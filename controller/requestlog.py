"""The request log: one row per proxied request, buffered in memory and written in batches.

The hot path only appends a dict; the flusher hands the batch to the store's writer thread, so a
request never waits for disk. Records completed before the last flush survive a crash.
"""

from __future__ import annotations

import csv
import io
import time
from datetime import datetime
from typing import Any

import peewee as pw

from .db import Base, db, register_models
from .router import normalize_model

PAGE_SIZES = (25, 50, 100)
EXPORT_MAX = 100_000  # rows in one CSV/JSON export


class RequestRecord(Base):
    id = pw.AutoField()
    rid = pw.CharField(max_length=32, unique=True)
    ts = pw.FloatField(index=True)  # when the request arrived (epoch seconds)
    client = pw.CharField(default="", max_length=64)
    key = pw.CharField(null=True, max_length=64)  # API key name, when keys are in use
    endpoint = pw.CharField(max_length=64)
    model = pw.CharField(null=True, index=True)
    stream = pw.BooleanField(default=False)
    agent = pw.CharField(null=True, max_length=63, index=True)
    status = pw.IntegerField(index=True)
    attempts = pw.IntegerField(default=0)
    ttfb_ms = pw.FloatField(null=True)
    duration_ms = pw.FloatField()
    prompt_tokens = pw.IntegerField(null=True)
    completion_tokens = pw.IntegerField(null=True)
    error = pw.TextField(null=True)  # the failure, in-band errors included (status stays 200 then)
    failover = pw.TextField(null=True)  # agents that failed before the first byte, and why


register_models(RequestRecord)

COLUMNS = [f.name for f in RequestRecord._meta.sorted_fields if f.name != "id"]


class RequestLog:
    """In-memory buffer of finished requests; `drain()` hands them to the flusher."""

    def __init__(self) -> None:
        self._pending: list[dict[str, Any]] = []
        self.recorded = 0

    def add(self, row: dict[str, Any]) -> None:
        self._pending.append(row)
        self.recorded += 1

    def drain(self) -> list[dict[str, Any]]:
        rows, self._pending = self._pending, []
        return rows

    def requeue(self, rows: list[dict[str, Any]]) -> None:
        """A failed write: keep its rows, ahead of newer ones, for the next flush."""
        self._pending[:0] = rows


def write_rows(rows: list[dict[str, Any]]) -> int:
    """One executemany in one transaction: peewee's insert_many spends ~20 us of Python per row building
    SQL, and at 1,000+ requests/s that time on the writer thread holds the GIL the proxy needs."""
    if not rows:
        return 0
    sql = _insert_sql()
    with db.atomic():
        db.cursor().executemany(sql, [tuple(r[c] for c in COLUMNS) for r in rows])
    return len(rows)


def _insert_sql() -> str:
    """The dialect's INSERT for one row, columns in COLUMNS order (peewee writes them in field order)."""
    return str(RequestRecord.insert(**{c: None for c in COLUMNS}).sql()[0])


def prune_rows(before: float) -> int:
    return RequestRecord.delete().where(RequestRecord.ts < before).execute()


def parse_time(value: str) -> float:
    """Epoch seconds or ISO 8601 (a date, or a date and time)."""
    try:
        return float(value)
    except ValueError:
        return datetime.fromisoformat(value).timestamp()


class Filters:
    """Query-string filters: model, agent, endpoint, client, status (200, 4xx, error; comma-separated),
    since/until (epoch seconds or ISO 8601). Raises ValueError with a message for the client."""

    def __init__(self, args: Any) -> None:
        self.model = args.get("model") or None
        self.agent = args.get("agent") or None
        self.endpoint = args.get("endpoint") or None
        self.client = args.get("client") or None
        self.status = [s.strip() for s in (args.get("status") or "").split(",") if s.strip()]
        for s in self.status:
            if not (s.isdigit() or (len(s) == 3 and s[0] in "12345" and s[1:] == "xx") or s == "error"):
                raise ValueError(f"status filter {s!r}: use a code (200), a class (5xx) or `error`")
        try:
            self.since = parse_time(args.get("since")) if args.get("since") else None
            self.until = parse_time(args.get("until")) if args.get("until") else None
        except ValueError:
            raise ValueError("since and until must be epoch seconds or ISO 8601 times") from None

    def apply(self, q: Any) -> Any:
        R = RequestRecord
        if self.model:
            q = q.where(R.model.in_({self.model, normalize_model(self.model)}))
        for field, value in ((R.agent, self.agent), (R.endpoint, self.endpoint), (R.client, self.client)):
            if value:
                q = q.where(field == value)
        if self.status:
            cond = None
            for s in self.status:
                if s == "error":
                    c = (R.status >= 400) | R.error.is_null(False)
                elif s.endswith("xx"):
                    base = int(s[0]) * 100
                    c = (R.status >= base) & (R.status < base + 100)
                else:
                    c = R.status == int(s)
                cond = c if cond is None else cond | c
            q = q.where(cond)
        if self.since is not None:
            q = q.where(R.ts >= self.since)
        if self.until is not None:
            q = q.where(R.ts < self.until)
        return q


def query_page(filters: Filters, page: int, per_page: int) -> dict[str, Any]:
    q = filters.apply(RequestRecord.select())
    total = q.count()
    rows: list[dict[str, Any]] = list(q.order_by(RequestRecord.ts.desc(), RequestRecord.id.desc())
                                      .paginate(page, per_page).dicts())
    for r in rows:
        r.pop("id", None)
    return {"requests": rows, "page": page, "per_page": per_page, "total": total,
            "pages": (total + per_page - 1) // per_page}


def query_export(filters: Filters) -> list[dict[str, Any]]:
    q = filters.apply(RequestRecord.select()).order_by(RequestRecord.ts.desc(), RequestRecord.id.desc())
    rows: list[dict[str, Any]] = list(q.limit(EXPORT_MAX).dicts())
    for r in rows:
        r.pop("id", None)
    return rows


def to_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=["time", *COLUMNS], extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({**r, "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(r["ts"])) + "Z"})
    return out.getvalue()
