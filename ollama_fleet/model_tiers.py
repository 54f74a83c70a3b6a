"""Default model by memory size (seed FR-016h / R-X1): one rule table, shared by agent and controller.

The table lives in `model_tiers.json` (or the file named by the `model_tiers_file` setting) so operators
can change it without code: the seed's own names (gpt-oss:7b/3b/1b) do not exist upstream.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

DEFAULT_PATH = Path(str(files(__package__ or "") / "model_tiers.json"))
GB = 1_000_000_000  # decimal: card makers' "16 GB" is ~17.2e9 bytes as NVML reports it


class TiersError(ValueError):
    """The tiers file cannot be used."""


@dataclass(frozen=True)
class Tier:
    min_bytes: int
    models: tuple[str, ...]


@dataclass(frozen=True)
class Tiers:
    tiers: tuple[Tier, ...]  # largest first
    ram_fraction: float = 0.5

    def choose(self, gpu_mem: int | None, ram: int | None = None) -> list[str]:
        """Models for the largest GPU's memory in bytes; without a GPU, for a share of system RAM."""
        if gpu_mem:
            budget = gpu_mem
        elif ram:
            budget = int(ram * self.ram_fraction)
        else:
            budget = 0
        for tier in self.tiers:
            if budget >= tier.min_bytes:
                return list(tier.models)
        return list(self.tiers[-1].models) if self.tiers else []


def parse(doc: Any, source: str = "tiers") -> Tiers:
    if not isinstance(doc, dict) or not isinstance(doc.get("tiers"), list) or not doc["tiers"]:
        raise TiersError(f"{source}: expected an object with a non-empty 'tiers' list")
    tiers = []
    for i, t in enumerate(doc["tiers"]):
        try:
            min_gb = float(t["min_gb"])
            models = tuple(str(m) for m in t["models"])
        except (KeyError, TypeError, ValueError):
            raise TiersError(f"{source}: tier {i} needs 'min_gb' (number) and 'models' (list)") from None
        if min_gb < 0 or not models:
            raise TiersError(f"{source}: tier {i} has a negative min_gb or no models")
        tiers.append(Tier(int(min_gb * GB), models))
    try:
        ram_fraction = float(doc.get("ram_fraction", 0.5))
    except (TypeError, ValueError):
        raise TiersError(f"{source}: 'ram_fraction' must be a number") from None
    return Tiers(tuple(sorted(tiers, key=lambda t: t.min_bytes, reverse=True)), ram_fraction)


def load_tiers(path: str | Path | None = None) -> Tiers:
    """The shipped table, or the operator's file (`model_tiers_file`)."""
    p = Path(path).expanduser() if path else DEFAULT_PATH
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise TiersError(f"{p}: {e}") from None
    return parse(doc, str(p))


def choose(gpu_mem: int | None, ram: int | None = None, tiers: Tiers | None = None) -> list[str]:
    return (tiers or load_tiers()).choose(gpu_mem, ram)


def largest_gpu_memory(gpus: list[dict[str, Any]]) -> int | None:
    """From an agent's `gpus` inventory (`mem_total` in bytes)."""
    sizes = [g.get("mem_total") or 0 for g in gpus]
    return max(sizes) if sizes and max(sizes) > 0 else None
