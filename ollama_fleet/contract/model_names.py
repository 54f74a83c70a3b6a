"""Ollama model names: what a valid name looks like, and one spelling to compare names by.

Shared by the agent (is it installed already?) and the controller (validate before any job exists).
"""

from __future__ import annotations

import re

# [host[:port]/][namespace/]model[:tag] as Ollama's types/model/name.go accepts it (parts of at most 80
# characters; a tag may start with `_`). Digests (`@sha256:...`) are not accepted for pulls here.
_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}"
NAME_RE = re.compile(rf"^(?:{_PART}(?::\d{{1,5}})?/)?(?:{_PART}/)?{_PART}(?::[A-Za-z0-9_][A-Za-z0-9._-]{{0,79}})?$")
MAX_NAME = 350


def valid_model_name(name: object) -> bool:
    return isinstance(name, str) and 0 < len(name) <= MAX_NAME and bool(NAME_RE.match(name))


def normalize(name: str) -> str:
    """`llama3.2` -> `llama3.2:latest`; drops the default registry/namespace; case-insensitive like Ollama."""
    name = name.strip()
    for prefix in ("registry.ollama.ai/", "library/"):
        name = name.removeprefix(prefix)
    if ":" not in name.rsplit("/", 1)[-1]:
        name += ":latest"
    return name.casefold()
