"""The request log: one row per proxied request, journalled at once, written to the database in batches.

The hot path cleans the row's text (ollama_fleet/contract/sanitize.py), appends it to a journal segment
(one `write(2)` into the page cache, before the answer's last byte leaves: a SIGKILL loses no answered
request) and to an in-memory buffer; the flusher hands the buffer to the store's writer thread and
deletes the journal segments once their rows are committed. A start replays the segments a crash left
behind. A row the database refuses is logged, counted and dropped; the rest of its batch is written.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import peewee as pw

from ollama_fleet.contract.model_names import normalize as normalize_model
from ollama_fleet.contract.sanitize import clean_text
from ollama_fleet.controller.admission.priority import TIERS
from ollama_fleet.controller.db import Base, db, register_models
from ollama_fleet.controller.exports import to_csv as safe_csv
from ollama_fleet.controller.proxy.access_log import open_access_log

log = logging.getLogger("fleet.requestlog")

try:  # ~0.8 us a row instead of ~3.6 (json): the journal append is on every request's path
    from ujson import dumps as _ujson_dumps  # Sanic's own JSON encoder, installed with it

    _dumps: Callable[[Any], str] = _ujson_dumps
except ImportError:  # pragma: no cover
    _dumps = json.dumps

PAGE_SIZES = (25, 50, 100)
EXPORT_MAX = 100_000  # rows in one CSV/JSON export
EXPORT_CHUNK = 2_000  # rows read and sent at a time: an export streams in bounded memory


class RequestRecord(Base):
    id = pw.AutoField()
    rid = pw.CharField(max_length=32, unique=True)
    ts = pw.DoubleField(index=True)  # when the request arrived (epoch seconds)
    client = pw.CharField(default="", max_length=64)
    key = pw.CharField(null=True, max_length=64)  # API key name, when keys are in use
    endpoint = pw.CharField(max_length=64)
    model = pw.CharField(null=True, index=True)
    stream = pw.BooleanField(default=False)
    agent = pw.CharField(null=True, max_length=63, index=True)
    status = pw.IntegerField(index=True)
    attempts = pw.IntegerField(default=0)
    ttfb_ms = pw.DoubleField(null=True)
    duration_ms = pw.DoubleField()
    prompt_tokens = pw.IntegerField(null=True)
    completion_tokens = pw.IntegerField(null=True)
    error = pw.TextField(null=True)  # the failure, in-band errors included (status stays 200 then)
    failover = pw.TextField(null=True)  # agents that failed before the first byte, and why
    # admission control (docs/admission.md); columns added later go last: see ADDED_COLUMNS
    queue_ms = pw.DoubleField(null=True)  # time waited in the fleet queue; None: it never queued
    priority = pw.CharField(null=True, max_length=8)  # a generation's tier in force; None: not admitted


register_models(RequestRecord)

COLUMNS = [f.name for f in RequestRecord._meta.sorted_fields if f.name != "id"]
# Nullable columns added since the journal's first format, in order, at the end of COLUMNS: a journal line
# written by an older release is shorter by some of these and replays with them as None.
ADDED_COLUMNS = ("queue_ms", "priority")
assert tuple(COLUMNS[-len(ADDED_COLUMNS):]) == ADDED_COLUMNS, "new request log columns go last"


# Text columns and their lengths (VARCHAR on PostgreSQL); None: TEXT, bounded where the proxy writes it.
TEXT_COLUMNS = (("rid", 32), ("client", 64), ("key", 64), ("endpoint", 64), ("model", 255), ("agent", 63),
                ("error", 2000), ("failover", 2000), ("priority", 8))
MAX_PENDING = 50_000  # rows buffered while the database fails; beyond, the journal alone keeps them
REPLAY_CHUNK = 1000  # journal rows per transaction at start
# Errors that say nothing about the row: the batch is kept for the next flush instead of being split.
TRANSIENT = frozenset({"OperationalError", "InterfaceError"})


def clean_row(row: dict[str, Any]) -> dict[str, Any]:
    """Text columns made safe in place: client text (model names, header values, upstream errors) may
    hold lone surrogates or NUL, which every database encoder refuses."""
    for name, limit in TEXT_COLUMNS:
        v = row.get(name)
        if v is not None:
            row[name] = clean_text(v if isinstance(v, str) else str(v), limit)
    return row


JOURNALS_MAX = 64  # controller processes on one data_dir (`fleet controller --workers N`)


def _claim(directory: Path) -> Path:
    """The first of `<dir>`, `<dir>.2`, … that no other process holds: several controllers on one data_dir
    (workers) each keep a journal of their own, and a restarted one replays only its own leftovers. The
    lock (`flock` on `.lock`) lives as long as the process; the kernel drops it when the process dies."""
    try:
        import fcntl
    except ImportError:  # not POSIX: one controller per data_dir
        directory.mkdir(parents=True, exist_ok=True)
        return directory
    for i in range(1, JOURNALS_MAX + 1):
        candidate = directory if i == 1 else directory.with_name(f"{directory.name}.{i}")
        candidate.mkdir(parents=True, exist_ok=True)
        fd = os.open(candidate / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        _HELD.append(fd)  # kept open for the life of the process
        return candidate
    raise OSError(f"{JOURNALS_MAX} controllers already hold journals in {directory.parent}")


_HELD: list[int] = []


class Journal:
    """Append-only segment files (`<seq>.jsonl`, one JSON array per row in COLUMNS order). A segment is
    sealed when the flusher drains the buffer and deleted once its rows are committed."""

    def __init__(self, directory: Path) -> None:
        directory = _claim(directory)
        self.dir = directory
        self.leftover = sorted(directory.glob("*.jsonl"))  # from a crash: replayed by `replay_journal`
        self._seq = max((int(p.stem) for p in self.leftover if p.stem.isdigit()), default=0)
        self.sealed: list[Path] = []
        self.pinned: set[Path] = set()  # segments holding rows evicted from the buffer: kept for the next start
        self.failed = False
        self._fd = -1
        self._rows = 0
        self.path = self._open()

    def _open(self) -> Path:
        self._seq += 1
        path = self.dir / f"{self._seq:012d}.jsonl"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._rows = 0
        return path

    def append(self, row: dict[str, Any]) -> None:
        if self.failed:
            return
        data = _dumps([row[c] for c in COLUMNS]).encode() + b"\n"
        try:
            os.write(self._fd, data)
            self._rows += 1
        except OSError as e:  # disk full, I/O error: the buffer still has the row; say it once
            self.failed = True
            log.error("request log journal %s: %s; rows now reach the database only at the next flush",
                      self.path, e)

    def seal(self) -> int:
        """Close the current segment (if it has rows); the number of sealed segments not yet committed.
        After a write error, journalling is retried here with a fresh segment."""
        if self.failed:
            try:
                os.close(self._fd)
                self.path = self._open()
                self.failed = False
                log.warning("request log journal: writing again to %s", self.path)
            except OSError:
                pass
        elif self._rows:
            os.close(self._fd)
            self.sealed.append(self.path)
            self.path = self._open()
        return len(self.sealed)

    def pin(self) -> None:
        """Rows were evicted from the buffer: every segment written so far stays on disk for the next start;
        segments after this are deleted as usual once committed."""
        self.pinned.update(self.sealed)
        self.pinned.add(self.path)

    def release(self, count: int) -> None:
        """The rows of the first `count` sealed segments are in the database."""
        done, self.sealed = self.sealed[:count], self.sealed[count:]
        for p in done:
            if p in self.pinned:
                continue
            try:
                p.unlink()
            except OSError as e:
                log.warning("request log journal: cannot delete %s: %s", p, e)

    def close(self, committed: bool) -> None:
        """At the end: the current segment goes when everything was written, else it stays for replay."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if committed and self.path not in self.pinned:
            self.path.unlink(missing_ok=True)


class RequestLog:
    """Finished requests: journalled, buffered; `drain()` hands them to the flusher."""

    def __init__(self, journal_dir: Path | None = None, access_log: bool = False) -> None:
        self._pending: list[dict[str, Any]] = []
        # setting `access_log`: each row also goes out as a JSON line (access_log.py); off, no work at all
        self.access: Callable[[Mapping[str, Any]], None] | None = (
            open_access_log(_dumps, COLUMNS) if access_log else None)
        self.recorded = 0
        self.dropped = 0  # rows the database refused (each logged), never written
        self.deferred = 0  # rows evicted from a full buffer: in the journal, written at the next start
        self.replayed = 0  # rows recovered from the journal at start
        self.journal = Journal(journal_dir) if journal_dir is not None else None

    def add(self, row: dict[str, Any]) -> None:
        clean_row(row)
        if self.journal is not None:
            self.journal.append(row)
        self._pending.append(row)
        self.recorded += 1
        if self.access is not None:
            self.access(row)
        if len(self._pending) > MAX_PENDING:
            self._evict()

    def _evict(self) -> None:
        """The database has been failing for a while: bound memory; the journal keeps the rows."""
        n = len(self._pending) - MAX_PENDING
        del self._pending[:n]
        self.deferred += n
        if self.journal is not None:
            first = not self.journal.pinned
            self.journal.pin()
        if self.journal is not None and first:
            log.error("request log: database writes keep failing; rows beyond %d stay in the journal %s "
                      "and are written at the next start", MAX_PENDING, self.journal.dir)

    def drain(self) -> tuple[list[dict[str, Any]], int]:
        """The buffered rows and the journal segments that hold them (for `committed`)."""
        rows, self._pending = self._pending, []
        return rows, self.journal.seal() if self.journal is not None else 0

    def committed(self, sealed: int, dropped: int) -> None:
        self.dropped += dropped
        if self.journal is not None:
            self.journal.release(sealed)

    def requeue(self, rows: list[dict[str, Any]]) -> None:
        """A failed write: keep its rows, ahead of newer ones, for the next flush."""
        self._pending[:0] = rows
        if len(self._pending) > MAX_PENDING:
            self._evict()

    def stats(self) -> dict[str, Any]:
        return {"recorded": self.recorded, "pending": len(self._pending), "dropped": self.dropped,
                "deferred": self.deferred, "replayed": self.replayed,
                "journal": None if self.journal is None else str(self.journal.dir)}


def write_rows(rows: list[dict[str, Any]]) -> tuple[int, int]:
    """(written, dropped). One executemany in one transaction: peewee's insert_many spends ~20 us of Python
    per row building SQL, and at 1,000+ requests/s that time on the writer thread holds the GIL the proxy
    needs. A batch the database refuses is split in halves until the bad rows are alone: each is logged
    and dropped, the rest written. Transient errors (locked, connection lost) propagate: the caller keeps
    the batch. Rows already present (same rid: a journal replayed after a crash) are skipped."""
    if not rows:
        return 0, 0
    sql = _insert_sql()
    try:
        with db.atomic():
            # .get: a row made before a column was added (journal replay, older callers) writes NULL there
            db.cursor().executemany(sql, [tuple(r.get(c) for c in COLUMNS) for r in rows])
        return len(rows), 0
    except Exception as e:
        if type(e).__name__ in TRANSIENT:
            raise
        if len(rows) == 1:
            log.warning("request log: row %s dropped, the database refused it: %s: %s",
                        str(rows[0].get("rid"))[:32], type(e).__name__, str(e)[:200])
            return 0, 1
    mid = len(rows) // 2
    w1, d1 = write_rows(rows[:mid])
    w2, d2 = write_rows(rows[mid:])
    return w1 + w2, d1 + d2


def _insert_sql() -> str:
    """The dialect's INSERT for one row, columns in COLUMNS order (peewee writes them in field order),
    ignoring a row whose rid is already there."""
    q = RequestRecord.insert(**{c: None for c in COLUMNS})
    return str(q.on_conflict(conflict_target=[RequestRecord.rid], action="NOTHING").sql()[0])


def replay_journal(paths: list[Path]) -> tuple[int, int]:
    """Write the rows of journal segments left by a crash, then delete them. (rows written, rows dropped:
    unreadable lines and rows the database refused)."""
    total = dropped = 0
    for path in paths:
        rows: list[dict[str, Any]] = []
        try:
            data = path.read_bytes()
        except OSError as e:
            log.error("request log journal: cannot read %s: %s", path, e)
            continue
        for line in data.splitlines():
            row = _journal_row(line)
            if row is None:  # a torn last line (killed mid-write) or a foreign file
                dropped += 1
                continue
            rows.append(row)
        for i in range(0, len(rows), REPLAY_CHUNK):
            w, d = write_rows(rows[i:i + REPLAY_CHUNK])
            total += w
            dropped += d
        path.unlink(missing_ok=True)
    return total, dropped


def _journal_row(line: bytes) -> dict[str, Any] | None:
    """One journal line as a row; a line of an older release (fewer ADDED_COLUMNS) gets None in the ones
    it lacks. None: not a row."""
    try:
        values = json.loads(line)
    except ValueError:
        return None
    if not isinstance(values, list) or not len(COLUMNS) - len(ADDED_COLUMNS) <= len(values) <= len(COLUMNS):
        return None
    return clean_row(dict(zip(COLUMNS, values + [None] * (len(COLUMNS) - len(values)))))


def prune_rows(before: float) -> int:
    return int(RequestRecord.delete().where(RequestRecord.ts < before).execute())


def parse_time(value: str) -> float:
    """Epoch seconds or ISO 8601 (a date, or a date and time)."""
    try:
        t = float(value)
    except ValueError:
        try:
            t = datetime.fromisoformat(value).timestamp()
        except (OverflowError, OSError) as e:  # year 1 or 9999 in some zones
            raise ValueError(str(e)) from None
    if not math.isfinite(t):
        raise ValueError("not a finite time")
    return t


class Filters:
    """Query-string filters: model, agent, endpoint, client, status (200, 4xx, error; comma-separated),
    priority (a tier), since/until (epoch seconds or ISO 8601). Raises ValueError with a message for the
    client."""

    def __init__(self, args: Any) -> None:
        self.model = args.get("model") or None
        self.agent = args.get("agent") or None
        self.endpoint = args.get("endpoint") or None
        self.client = args.get("client") or None
        self.priority = args.get("priority") or None
        if self.priority is not None and self.priority not in TIERS:
            raise ValueError(f"priority filter must be one of {', '.join(TIERS)}")
        self.status = [s.strip() for s in (args.get("status") or "").split(",") if s.strip()]
        for s in self.status:
            if not ((len(s) == 3 and s.isascii() and s.isdigit()) or (len(s) == 3 and s[0] in "12345" and s[1:] == "xx") or s == "error"):
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
        for field, value in ((R.agent, self.agent), (R.endpoint, self.endpoint), (R.client, self.client),
                             (R.priority, self.priority)):
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


def query_export(filters: Filters, after: tuple[float, int] | None, limit: int) -> list[dict[str, Any]]:
    """One chunk of an export, newest first: rows older than the `after` cursor (ts, id), `id` included
    (the next chunk's cursor). Keyset paging: each chunk costs the same, however deep the export is."""
    q = filters.apply(RequestRecord.select())
    if after is not None:
        ts, rid = after
        q = q.where((RequestRecord.ts < ts) | ((RequestRecord.ts == ts) & (RequestRecord.id < rid)))
    q = q.order_by(RequestRecord.ts.desc(), RequestRecord.id.desc()).limit(limit)
    return list(q.dicts())


def to_csv(rows: list[dict[str, Any]], header: bool = True) -> str:
    """Model names, errors and client text come from clients: formula prefixes are neutralised."""
    return safe_csv(({**r, "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(r["ts"])) + "Z"} for r in rows),
                    ["time", *COLUMNS], header)
