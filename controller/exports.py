"""CSV exports that a spreadsheet cannot turn into formulas (OWASP "CSV injection")."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from typing import Any

# A cell starting with one of these is read as a formula (or DDE) by Excel, LibreOffice and Sheets.
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r", "\n", "\uff1d", "\uff0b", "\uff0d", "\uff20")


def csv_cell(value: Any) -> Any:
    """Text a spreadsheet would evaluate, prefixed with a single quote; numbers and None unchanged."""
    if isinstance(value, str) and value.lstrip(" ").startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


def to_csv(rows: Iterable[dict[str, Any]], columns: Sequence[str], header: bool = True) -> str:
    """Rows as CSV (header first unless `header` is False, for later chunks of a streamed export; keys
    outside `columns` ignored), every cell neutralised."""
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    if header:
        w.writeheader()
    for r in rows:
        w.writerow({k: csv_cell(v) for k, v in r.items()})
    return out.getvalue()
