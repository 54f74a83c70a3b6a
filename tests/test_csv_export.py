"""CSV exports neutralise spreadsheet formulas (OWASP CSV injection): the request log export and the
dashboard's agents export, from a live controller, plus the cell rule itself."""

from __future__ import annotations

import csv
import io

import pytest

from ollama_fleet.controller.exports import FORMULA_PREFIXES, csv_cell, to_csv
from tests.proxy_support import chat_body, start_fleet

TOKEN = "csv-admin-token"
FORMULA = '=HYPERLINK("http://x","y")'


@pytest.mark.parametrize("prefix", FORMULA_PREFIXES)
def test_every_formula_prefix_is_neutralised(prefix):
    assert csv_cell(prefix + "1+1") == "'" + prefix + "1+1"
    assert csv_cell("  " + prefix + "A1") == "'  " + prefix + "A1"  # leading spaces do not hide it


def test_plain_text_and_numbers_are_kept():
    for value in ("llama3.2:latest", "a=b", "192.168.1.2", "", None, -5, 3.5, 0):
        assert csv_cell(value) == value
    rows = list(csv.reader(io.StringIO(to_csv([{"a": "-2+3", "b": -2}], ["a", "b"]))))
    assert rows == [["a", "b"], ["'-2+3", "-2"]]


def _cells(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_request_log_and_agents_exports_of_a_live_controller(fleet):
    c, _ = start_fleet(fleet, "node-csv", controller_env={"fleet_admin_token": TOKEN})
    c.http.headers["authorization"] = f"Bearer {TOKEN}"
    for model in (FORMULA, "@SUM(1+1)", "llama3.2"):
        c.http.post("/api/chat", json=chat_body(model))  # logged whether routed (200) or not (404)
    r = c.http.get("/api/requests", params={"export": "csv"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/csv")
    models = [row["model"] for row in _cells(r.text)]  # stored normalised: lower case, with a tag
    assert any(m.startswith("'" + FORMULA.lower()) for m in models), models
    assert any(m.startswith("'@sum(1+1)") for m in models), models
    assert any(m.startswith("llama3.2") for m in models), models
    assert not any(m[:1] in "=+-@" for m in models if m), models
    # an operator-set display name and tag reach the agents export neutralised too
    r = c.http.put("/api/agents/node-csv/settings", json={"display_name": "=1+2", "tags": ["+cmd"]})
    assert r.status_code == 200, r.text
    r = c.http.get("/dashboard/agents.csv")
    assert r.status_code == 200, r.text
    (row,) = _cells(r.text)
    assert row["name"] == "'=1+2" and row["tags"] == "'+cmd", row
