"""The structured access log (setting `access_log`, off by default): one JSON object per proxied request
with exactly the request log's fields (requestlog.COLUMNS), written when the row is recorded.

Records go to the `fleet.access` logger, whose own handler queues the bare JSON line for a writer thread
that puts it on stdout, so a slow reader never blocks the event loop (the
controller's diagnostics go to stderr, in text or JSON): `fleet controller > access.jsonl`, or a log
shipper, reads one object per line with no prefix to strip and no log fields mixed into the row's.
"""

from __future__ import annotations

import atexit
import logging
import queue
import sys
from collections.abc import Callable, Mapping
from logging.handlers import QueueHandler, QueueListener
from typing import Any

log = logging.getLogger("fleet.access")

QUEUE_MAX = 10_000  # lines waiting for stdout; beyond, lines are dropped and counted (never block the proxy)
DROP_REPORT_EVERY = 1000


class _DropWhenFull(QueueHandler):
    """Hands records to the writer thread; a stalled stdout (a full pipe, a stuck log shipper) costs lines,
    counted and said on the diagnostic log, instead of stalling the event loop that serves every request."""

    dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            _DropWhenFull.dropped += 1
            if _DropWhenFull.dropped % DROP_REPORT_EVERY == 1:  # the first, then one line per thousand
                logging.getLogger("fleet.proxy").warning(
                    "access log: stdout is not keeping up; %d lines dropped so far", _DropWhenFull.dropped)


class _Bare(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return record.getMessage()


def open_access_log(dumps: Callable[[Any], str], columns: list[str]) -> Callable[[Mapping[str, Any]], None]:
    """The writer the request log calls per row. Installs the stdout handler once per process (an
    operator's own logging config that already put a handler on `fleet.access` is kept)."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(_Bare())
        lines: queue.Queue[logging.LogRecord] = queue.Queue(QUEUE_MAX)
        listener = QueueListener(lines, handler)  # its thread does the writing
        listener.start()
        atexit.register(listener.stop)  # writes what is queued before the process ends
        log.addHandler(_DropWhenFull(lines))
    log.propagate = False  # the row's own line only, never a second copy in the diagnostic log
    log.setLevel(logging.INFO)

    def write(row: Mapping[str, Any]) -> None:
        log.info(dumps({c: row[c] for c in columns}))

    return write
