"""The structured access log (setting `access_log`, off by default): one JSON object per proxied request
with exactly the request log's fields (requestlog.COLUMNS), written when the row is recorded.

Records go to the `fleet.access` logger, whose own handler writes the bare JSON line to stdout (the
controller's diagnostics go to stderr, in text or JSON): `fleet controller > access.jsonl`, or a log
shipper, reads one object per line with no prefix to strip and no log fields mixed into the row's.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger("fleet.access")


class _Bare(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return record.getMessage()


def open_access_log(dumps: Callable[[Any], str], columns: list[str]) -> Callable[[Mapping[str, Any]], None]:
    """The writer the request log calls per row. Installs the stdout handler once per process (an
    operator's own logging config that already put a handler on `fleet.access` is kept)."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(_Bare())
        log.addHandler(handler)
    log.propagate = False  # the row's own line only, never a second copy in the diagnostic log
    log.setLevel(logging.INFO)

    def write(row: Mapping[str, Any]) -> None:
        log.info(dumps({c: row[c] for c in columns}))

    return write
