"""Make untrusted text safe where it enters (HTTP bodies and headers, MQTT payloads).

Anything that reaches the database, a log line or a page passes through here first: lone UTF-16
surrogates (legal in JSON's `\\ud800`, illegal in UTF-8, so every encoder downstream fails on them),
NUL (PostgreSQL rejects it in text), invalid UTF-8 bytes and unbounded lengths. Replacement keeps the
rest of the value readable; nothing raises.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

REPLACEMENT = "\ufffd"
TEXT_MAX = 255  # characters: fits a VARCHAR(255) on PostgreSQL
_BAD = re.compile("[\ud800-\udfff\x00]")


def clean_text(value: str, limit: int | None = TEXT_MAX) -> str:
    """`value` with lone surrogates and NUL replaced, cut to `limit` characters (None: no cut)."""
    if _BAD.search(value):
        value = _BAD.sub(REPLACEMENT, value)
    if limit is not None and len(value) > limit:
        value = value[:limit]
    return value


def clean_optional(value: Any, limit: int | None = TEXT_MAX) -> str | None:
    """A text column's value: None stays None, anything else becomes clean text."""
    if value is None:
        return None
    return clean_text(value if isinstance(value, str) else str(value), limit)


def decode(raw: bytes | bytearray | memoryview | str, limit: int | None = TEXT_MAX) -> str:
    """Bytes from the wire as clean text: invalid UTF-8 becomes U+FFFD."""
    text = raw if isinstance(raw, str) else bytes(raw).decode("utf-8", "replace")
    return clean_text(text, limit)


def clean_tree(value: Any, limit: int | None = None) -> Any:
    """A decoded JSON value with every string (keys too) cleaned; structure and other types unchanged.
    Iterative, so a deeply nested value cannot exhaust the stack."""
    if isinstance(value, str):
        return clean_text(value, limit)
    if not isinstance(value, (dict, list)):
        return value
    root: list[Any] = [None]
    stack: list[tuple[Any, Any, Any]] = [(value, root, 0)]  # (source, parent container, key in parent)
    while stack:
        src, parent, key = stack.pop()
        if isinstance(src, dict):
            out: Any = {}
            for k, v in src.items():
                ck = clean_text(k, limit) if isinstance(k, str) else k
                out[ck] = None
                stack.append((v, out, ck))
        elif isinstance(src, list):
            out = [None] * len(src)
            for i, v in enumerate(src):
                stack.append((v, out, i))
        else:
            out = clean_text(src, limit) if isinstance(src, str) else src
        parent[key] = out
    return root[0]


class TooDeep(ValueError):
    """JSON nested deeper than the parser (or a caller's limit) allows."""


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")  # json.loads accepts NaN/Infinity unless told otherwise


def loads_strict(raw: bytes | bytearray | str) -> Any:
    """json.loads for untrusted input: no NaN/Infinity; nesting too deep for the parser raises TooDeep
    (a ValueError) instead of RecursionError. Every failure is a ValueError."""
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except RecursionError:  # json.loads recurses once per nesting level
        raise TooDeep("JSON nested too deeply") from None


def depth(value: Any) -> int:
    """Nesting depth of a decoded JSON value (a scalar is 0), computed without recursion."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, level)
        stack.extend((c, level + 1) for c in children if isinstance(c, (dict, list)))
    return deepest


def finite(value: Any) -> float | None:
    """A finite number from an agent's document (for a REAL column or a metric), or None: a bool, a string,
    NaN, infinity or an int beyond float range is not one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        f = float(value)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None
