"""The curated model catalogue (R-X4): names, download sizes, descriptions, memory needs.

The Ollama library has no public API, so the list is a data file (`catalogue.json`, or the file named by
`models_catalogue_file`). `GET /api/models/available` merges it with what agents already have; free-text
names are accepted too when they are valid Ollama names (their size is then unknown).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

from ollama_fleet.contract.model_names import normalize, valid_model_name

DEFAULT_PATH = Path(str(files(__package__ or "") / "catalogue.json"))
KV_FACTOR = 1.2  # required memory ~ weights + KV cache at the default context...
RUNTIME_BYTES = 500_000_000  # ...+ the runner itself


class CatalogueError(ValueError):
    """The catalogue file cannot be used."""


@dataclass(frozen=True)
class CatalogueModel:
    name: str
    size: int
    description: str = ""
    required_memory: int = 0
    tags: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "description": self.description,
                "required_memory": self.required_memory, "tags": list(self.tags)}


def estimate_memory(size: int) -> int:
    return math.ceil(size * KV_FACTOR) + RUNTIME_BYTES


class Catalogue:
    def __init__(self, models: list[CatalogueModel], source: str) -> None:
        self.models = models
        self.source = source
        self._by_name = {normalize(m.name): m for m in models}

    def get(self, name: str) -> CatalogueModel | None:
        return self._by_name.get(normalize(name))

    def size(self, name: str) -> int | None:
        m = self.get(name)
        return m.size if m else None


def load_catalogue(path: str | Path | None = None) -> Catalogue:
    p = Path(path).expanduser() if path else DEFAULT_PATH
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise CatalogueError(f"{p}: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), list):
        raise CatalogueError(f"{p}: expected an object with a 'models' list")
    models = []
    for i, m in enumerate(doc["models"]):
        if not isinstance(m, dict) or not valid_model_name(m.get("name")):
            raise CatalogueError(f"{p}: model {i} needs a valid Ollama 'name'")
        size = m.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise CatalogueError(f"{p}: {m['name']}: 'size' must be a positive number of bytes")
        required = m.get("required_memory")
        if required is not None and (not isinstance(required, int) or required <= 0):
            raise CatalogueError(f"{p}: {m['name']}: 'required_memory' must be a positive number of bytes")
        models.append(CatalogueModel(m["name"], size, str(m.get("description") or ""),
                                     required or estimate_memory(size),
                                     tuple(str(t) for t in m.get("tags") or ())))
    return Catalogue(models, str(p))
