"""An operator's settings for an agent (name, tags, notes): their limits and the one parser of them,
for the HTTP API and for the same change relayed by another controller (controller/cluster/sync.py)."""

from __future__ import annotations

from typing import Any, TypeAlias

MAX_TAGS, MAX_TAG_LEN, MAX_NAME_LEN, MAX_NOTES_LEN = 32, 40, 80, 4000

Settings: TypeAlias = tuple[str | None, list[str] | None, str | None]  # display_name, tags, notes; None: unchanged


def parse_settings(body: dict[str, Any], allowed: frozenset[str] = frozenset()) -> Settings | str:
    """The settings in `body`, or why they are refused; keys beyond the three (and `allowed`) are refused."""
    unknown = set(body) - {"display_name", "tags", "notes"} - allowed
    if unknown:
        return f"unknown field(s): {', '.join(sorted(unknown))}"
    name, tags, notes = body.get("display_name"), body.get("tags"), body.get("notes")
    if name is not None and (not isinstance(name, str) or len(name.strip()) > MAX_NAME_LEN):
        return f"display_name must be a string of at most {MAX_NAME_LEN} characters"
    if tags is not None:
        if not isinstance(tags, list) or len(tags) > MAX_TAGS or not all(
                isinstance(t, str) and 0 < len(t.strip()) <= MAX_TAG_LEN for t in tags):
            return f"tags must be a list of at most {MAX_TAGS} non-empty strings of at most {MAX_TAG_LEN} characters"
        tags = sorted({t.strip() for t in tags})
    if notes is not None and (not isinstance(notes, str) or len(notes) > MAX_NOTES_LEN):
        return f"notes must be a string of at most {MAX_NOTES_LEN} characters"
    return (name.strip() if isinstance(name, str) else None), tags, notes
