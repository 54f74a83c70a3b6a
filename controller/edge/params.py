"""Query parameters, checked: bounded integers and finite numbers, bounded text. A bad value is a
ParamError whose message names the parameter (answer it as a 400 in the API's error shape)."""

from __future__ import annotations

import math
from typing import Any

INT_MAX = 2**53  # every integer parameter stays below this: exact in JSON clients, fits SQLite and PostgreSQL
PARAM_MAX_LEN = 1000  # characters in one query value


class ParamError(ValueError):
    """A bad query parameter; the message names it and is meant for the client (a 400)."""


def text_param(args: Any, name: str, max_len: int = PARAM_MAX_LEN) -> str | None:
    """The parameter's first value, or None when absent or empty; too long is a ParamError."""
    value = args.get(name)
    if not value:
        return None
    if len(value) > max_len:
        raise ParamError(f"{name} must be at most {max_len} characters")
    return str(value)


def int_param(args: Any, name: str, default: int | None, lo: int = 0, hi: int = INT_MAX) -> int | None:
    """A decimal integer in [lo, hi] (ASCII digits only: no 1_000, no 1.5, no ٣), or `default` if absent."""
    raw = args.get(name)
    if raw is None or raw == "":
        return default
    text = raw.strip()
    digits = text[1:] if text[:1] in "+-" else text
    if not digits.isascii() or not digits.isdigit() or len(digits) > 20:
        raise ParamError(f"{name} must be an integer between {lo} and {hi}")
    value = int(text)
    if not lo <= value <= hi:
        raise ParamError(f"{name} must be an integer between {lo} and {hi}")
    return value


def float_param(args: Any, name: str, default: float | None, lo: float = -1e15, hi: float = 1e15) -> float | None:
    """A finite number in [lo, hi] (no nan, no inf), or `default` if absent."""
    raw = args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw) if len(raw) <= 64 and raw.strip().isascii() else math.nan
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and lo <= value <= hi):
        raise ParamError(f"{name} must be a number between {lo:g} and {hi:g}")
    return value
