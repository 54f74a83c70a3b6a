"""Priority tiers: what `X-Fleet-Priority` may say, and an API key's ceiling on it. The one place for them."""

from __future__ import annotations

HEADER = "x-fleet-priority"
HIGH, NORMAL, LOW = "high", "normal", "low"
TIERS: tuple[str, ...] = (HIGH, NORMAL, LOW)  # best first: a tier's rank is its index
DEFAULT = NORMAL
RANK: dict[str, int] = {t: i for i, t in enumerate(TIERS)}


def parse(value: str | None) -> str | None:
    """The tier a header names (case and surrounding blanks ignored); DEFAULT when absent or empty;
    None when it names no tier (the caller answers 400)."""
    if value is None:
        return DEFAULT
    v = value.strip().lower()
    if not v:
        return DEFAULT
    return v if v in RANK else None


def capped(tier: str, ceiling: str | None) -> str:
    """`tier`, lowered to `ceiling` when that is worse (a key limited to `normal` asking for `high`)."""
    if ceiling is None or ceiling not in RANK:
        return tier
    return tier if RANK[tier] >= RANK[ceiling] else ceiling
