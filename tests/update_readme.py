"""Regenerate the README's configuration table from fleet/settings.py: `uv run python -m tests.update_readme`."""

from __future__ import annotations

import re

from ollama_fleet.settings import markdown_table
from tests.support import ROOT

START, END = "<!-- settings:start -->", "<!-- settings:end -->"


def render(readme: str) -> str:
    return re.sub(re.escape(START) + ".*?" + re.escape(END), f"{START}\n{markdown_table()}\n{END}", readme,
                  flags=re.S)


if __name__ == "__main__":
    path = ROOT / "README.md"
    path.write_text(render(path.read_text()))
