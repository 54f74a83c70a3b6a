"""Regenerate what is derived from the settings table in ollama_fleet/settings.py: the README's configuration
table and the typed fields in ollama_fleet/_settings_fields.py. Run `uv run python -m tests.update_readme`;
tests/test_settings.py and tests/test_cli.py fail while either is stale."""

from __future__ import annotations

import json
import re
import textwrap
from typing import Any

from ollama_fleet.settings import SETTINGS, Setting, markdown_table
from tests.support import ROOT

START, END = "<!-- settings:start -->", "<!-- settings:end -->"
README = ROOT / "README.md"
FIELDS = ROOT / "ollama_fleet" / "_settings_fields.py"

_HEADER = '''\
"""GENERATED from SETTINGS in ollama_fleet/settings.py by `uv run python -m tests.update_readme`: do not edit.

Static, typed fields so that mypy knows every setting's type; settings.Config adds loading and sources.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True, kw_only=True)
class SettingsFields:
    """One field per setting, in table order, with its type and default."""
'''


def render(readme: str) -> str:
    return re.sub(re.escape(START) + ".*?" + re.escape(END), f"{START}\n{markdown_table()}\n{END}", readme,
                  flags=re.DOTALL)


def literal(value: Any) -> str:
    """Python source for a default, in the project's double-quote style."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, tuple):
        return "(" + "".join(literal(v) + ", " for v in value).rstrip(" ") + ")"
    return repr(value)


def annotation(s: Setting) -> str:
    if s.choices:
        return f"Literal[{', '.join(literal(c) for c in s.choices)}]"
    return "tuple[str, ...]" if s.type is tuple else s.type.__name__


def fields_module() -> str:
    """The source of ollama_fleet/_settings_fields.py. Secrets stay out of repr (a logged config leaks nothing)."""
    lines = [_HEADER]
    for s in SETTINGS:
        lines += textwrap.wrap(s.help, 104, initial_indent="    # ", subsequent_indent="    # ")
        default = f"field(default={literal(s.default)}, repr=False)" if s.secret else literal(s.default)
        lines.append(f"    {s.name}: {annotation(s)} = {default}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    README.write_text(render(README.read_text()))
    FIELDS.write_text(fields_module())
