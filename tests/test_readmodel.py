"""The read model (controller/readmodel.py) over a real Registry fed through its ingest handlers, real job
records and a real catalogue: agent lists, counts, sorting, models available, the agents x models matrix;
and the status tables every list, label and sort is built from."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest

from ollama_fleet.contract.jobs import JobStatus
from ollama_fleet.contract.status import ALL, WIRE_STATES, AgentStatus
from ollama_fleet.controller import readmodel
from ollama_fleet.controller.dashboard import data
from ollama_fleet.controller.hub import Hub
from ollama_fleet.controller.jobs.catalogue import Catalogue, CatalogueModel, estimate_memory
from ollama_fleet.controller.jobs.machine import JobRec
from ollama_fleet.controller.readmodel import AgentFilter
from ollama_fleet.controller.registry.live import Registry

GB = 10**9
ROOT = Path(__file__).resolve().parents[1]


def join(reg: Registry, node: str, *, name: str = "", state: str = "online", ollama_up: bool = True,
         host: str = "", ips: tuple[str, ...] = (), tags: tuple[str, ...] = (), models: tuple[str, ...] = (),
         loaded: tuple[str, ...] = (), gpus: tuple[dict[str, Any], ...] = (),
         sizes: dict[str, int] | None = None) -> None:
    """An agent as the MQTT ingest would register it: birth, info, GPUs, models, running models."""
    s = "sess-" + node
    reg.on_state(node, {"state": "online", "session": s, "hb_interval": 5})
    reg.on_info(node, {"session": s, "hostname": host, "ips": list(ips),
                       "ollama": {"url": "http://127.0.0.1:11434", "version": "0.6.0", "up": ollama_up}})
    reg.on_gpus(node, {"session": s, "gpus": [{"index": i, "name": g.get("name"),
                                               "mem_total": g.get("mem_total")} for i, g in enumerate(gpus)]})
    reg.on_heartbeat(node, {"session": s, "cpu": 10.0, "mem": 20.0, "ollama": {"up": ollama_up},
                            "gpus": [{"index": i, "util": g.get("util"), "mem_used": g.get("mem_used")}
                                     for i, g in enumerate(gpus)]})
    reg.on_models(node, {"session": s, "models": [{"name": m, "digest": "sha256:" + m,
                                                   "size": (sizes or {}).get(m, GB),
                                                   "details": {"family": "x"}} for m in models]})
    reg.on_running(node, {"session": s, "models": [{"name": m, "size_vram": GB} for m in loaded]})
    if name or tags:
        reg.update_settings(node, name or None, sorted(tags) if tags else None, None)
    if state == "stale":
        reg.check_stale(reg.agents[node].last_seen + 3600)
    elif state != "online":
        reg.on_state(node, {"state": state, "session": s})


def job(n: int, node: str, model: str | None, status: JobStatus = JobStatus.IN_PROGRESS,
        verb: str = "model.pull", created_at: float = 0.0) -> JobRec:
    return JobRec(task_id=f"t{n}", job_id=f"j{n}", node_id=node, verb=verb, model=model, args={},
                  origin="api", status=status, created_at=created_at or float(n), updated_at=float(n))


@pytest.fixture
def reg() -> Registry:
    r = Registry(Hub())
    join(r, "n4", name="delta", state="stale")  # first: going stale is checked over every agent joined so far
    join(r, "n1", name="Alpha", host="box-1", ips=("10.0.0.1",), tags=("lab",),
         models=("llama3.2", "qwen2.5:0.5b"), loaded=("llama3.2",),
         gpus=({"name": "A100", "mem_total": 80 * GB, "util": 50, "mem_used": 10 * GB},))
    join(r, "n2", name="beta", host="box-2", ips=("10.0.0.2",), models=("llama3.2:latest",), ollama_up=False)
    join(r, "n3", host="gpu-box", tags=("prod",), state="lost",
         gpus=({"name": "T4", "mem_total": 16 * GB, "util": 90, "mem_used": 8 * GB},))
    join(r, "n0", name="Gamma", state="offline", models=("custom/thing:v1",))
    return r


# ---- statuses ------------------------------------------------------------------------------------
def test_every_status_table_covers_every_agent_status() -> None:
    members = set(AgentStatus)
    assert set(ALL) == members and set(WIRE_STATES) < members
    assert set(readmodel.ATTENTION) == members, "the attention order of the status sort"
    assert set(data.STATUS_LABELS) == members, "the dashboard's labels"
    assert list(data.STATUS_LABELS) == list(AgentStatus)  # chips and options in the enum's order
    assert min(AgentStatus, key=readmodel.ATTENTION.__getitem__) == AgentStatus.LOST


def test_the_dashboard_does_not_import_the_json_api() -> None:
    for path in sorted((ROOT / "controller" / "dashboard").glob("*.py")):
        tree = ast.parse(path.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [n for n in names if n.startswith("ollama_fleet.controller.api")], path.name


# ---- agents --------------------------------------------------------------------------------------
def test_statuses_come_from_the_registry(reg: Registry) -> None:
    assert {n: a.status for n, a in reg.agents.items()} == {
        "n1": "online", "n2": "ollama_down", "n3": "lost", "n4": "stale", "n0": "offline"}


def test_find_agents_filters_searches_and_lists_by_name(reg: Registry) -> None:
    def ids(flt: AgentFilter) -> list[str]:
        return [a.node_id for a in readmodel.find_agents(reg, flt)]

    assert ids(AgentFilter()) == ["n1", "n0", "n2", "n4", "n3"]  # Alpha, Gamma, beta, delta, n3: exact order
    assert ids(AgentFilter(frozenset({"online"}))) == ["n1"]
    assert ids(AgentFilter(frozenset({"online"}), state_too=True)) == ["n1", "n2"]  # n2: its Ollama is down
    assert ids(AgentFilter(frozenset({"lost", "stale"}))) == ["n4", "n3"]
    assert ids(AgentFilter(q="BOX")) == ["n1", "n2", "n3"]  # host names, case-insensitive
    assert ids(AgentFilter(q="10.0.0.2")) == ["n2"]
    assert ids(AgentFilter(q="prod")) == ["n3"]  # tags
    assert ids(AgentFilter(q="n4")) == ["n4"]  # ids
    assert ids(AgentFilter(frozenset({"online"}), q="prod")) == []
    assert ids(AgentFilter(frozenset({"nonsense"}))) == []


def test_fleet_counts_every_status_and_gpus_of_online_agents_only(reg: Registry) -> None:
    reg.agents["n1"].in_flight, reg.agents["n3"].in_flight = 2, 1
    c = readmodel.fleet_counts(reg.agents.values())
    assert c.by_status == {"online": 1, "offline": 1, "lost": 1, "stale": 1, "ollama_down": 1}
    assert list(c.by_status) == list(ALL)
    assert (c.total, c.routable, c.in_flight) == (5, 1, 3)
    assert (c.gpu_count, c.gpu_util, c.vram_used, c.vram_total) == (1, 50.0, 10 * GB, 80 * GB)  # not n3's T4
    empty = readmodel.fleet_counts([])
    assert empty.by_status == dict.fromkeys(ALL, 0) and empty.gpu_util is None and empty.total == 0


def test_agent_table_rows_and_sorts(reg: Registry) -> None:
    now = reg.agents["n1"].online_since or 0.0
    rows = readmodel.agent_table(reg, now=now + 125)
    assert [r["name"] for r in rows] == ["Alpha", "beta", "delta", "Gamma", "n3"]  # case-insensitive
    alpha = rows[0]
    assert alpha == {**alpha, "id": "n1", "hostname": "box-1", "ip": "10.0.0.1", "status": "online",
                     "uptime": 125, "gpu_count": 1, "gpu_names": ["A100"], "vram_total": 80 * GB,
                     "vram_used": 10 * GB, "models": 2, "loaded": 1, "tags": ["lab"], "cpu": 10.0,
                     "mean_latency_ms": None}
    assert rows[1]["uptime"] is not None and rows[4]["uptime"] is None  # online (Ollama down) / lost

    def order(sort: str, desc: bool = False) -> list[str]:
        return [r["id"] for r in readmodel.agent_table(reg, sort=sort, desc=desc)]

    assert order("status") == ["n3", "n4", "n2", "n0", "n1"]  # lost, stale, Ollama down, offline, online
    assert order("status", desc=True) == ["n1", "n0", "n2", "n4", "n3"]
    assert order("models") == ["n4", "n3", "n2", "n0", "n1"]  # 0, 0, 1, 1, 2; ties by name (delta < n3)
    assert order("gpus", desc=True)[:2] == ["n1", "n3"]
    assert [r["id"] for r in readmodel.agent_table(reg, AgentFilter(frozenset({"lost"})))] == ["n3"]
    assert set(readmodel.AGENT_SORTS) >= {"name", "status", "host", "ip", "version", "uptime", "requests"}


def test_one_agents_models_say_which_are_loaded(reg: Registry) -> None:
    a = reg.agents["n1"]
    assert [(m["name"], m["loaded"], m["size"]) for m in readmodel.agent_models(a)] == [
        ("llama3.2", True, GB), ("qwen2.5:0.5b", False, GB)]
    assert list(readmodel.loaded_by_name(a)) == ["llama3.2"]
    assert readmodel.loaded_by_name(a)["llama3.2"]["size_vram"] == GB


# ---- jobs ----------------------------------------------------------------------------------------
def test_job_list_unfinished_oldest_first_then_latest_finished() -> None:
    active = [job(5, "n1", "a"), job(2, "n2", "b"), job(3, "n1", "c")]
    recent = [job(n, "n1" if n % 2 else "n2", "m", JobStatus.COMPLETED) for n in range(10, 20)]  # oldest 1st

    def ids(agent: str | None = None, limit: int = 25) -> list[str]:
        return [r.task_id for r in readmodel.job_list(active, recent, agent, limit)]

    assert ids(limit=5) == ["t2", "t3", "t5", "t19", "t18"]
    assert ids("n1", limit=4) == ["t3", "t5", "t19", "t17"]
    assert ids(limit=2) == ["t2", "t3", "t5"]  # every unfinished job, whatever the limit
    assert readmodel.job_list([], [], agent="n9") == []


# ---- models --------------------------------------------------------------------------------------
CATALOGUE = Catalogue([CatalogueModel("llama3.2:latest", 2 * GB, "Meta's small model", 3 * GB, ("chat",)),
                       CatalogueModel("all-minilm:latest", 50_000_000, "Embeddings", GB, ("embedding",))],
                      "test")


def test_available_models_are_the_catalogue_then_what_agents_have(reg: Registry) -> None:
    models = readmodel.available_models(reg, CATALOGUE)
    assert [(m.name, m.source, [a.node_id for a in m.agents]) for m in models] == [
        ("llama3.2:latest", "catalogue", ["n1", "n2"]),  # both spellings of the same model
        ("all-minilm:latest", "catalogue", []),
        ("custom/thing:v1", "agents", ["n0"]),  # agent models in node id order of their first agent
        ("qwen2.5:0.5b", "agents", ["n1"]),
    ]
    llama, _, thing, _ = models
    assert (llama.size, llama.required_memory, llama.tags, llama.details) == (2 * GB, 3 * GB, ("chat",), None)
    assert (thing.size, thing.required_memory, thing.tags) == (GB, estimate_memory(GB), ())
    assert thing.details == {"family": "x"}
    assert [m.name for m in readmodel.available_models(reg, CATALOGUE, q="EMBED")] == ["all-minilm:latest"]
    assert [m.name for m in readmodel.available_models(reg, CATALOGUE, q="thing")] == ["custom/thing:v1"]
    assert [m.name for m in readmodel.available_models(reg, CATALOGUE, tag="chat")] == ["llama3.2:latest"]


def test_an_agent_model_without_a_size_has_no_memory_estimate() -> None:
    r = Registry(Hub())
    join(r, "z", models=("mystery:1b",), sizes={"mystery:1b": 0})
    (m,) = readmodel.available_models(r, Catalogue([], "empty"))
    assert (m.size, m.required_memory) == (0, None)


def test_model_matrix_cells_columns_and_jobs(reg: Registry) -> None:
    active = [job(1, "n2", "qwen2.5:0.5b"), job(2, "n1", "llama3.2:latest", verb="model.delete"),
              job(3, "ghost", "ghost-model:1b"), job(4, "n1", None, verb="agent.restart"),
              job(5, "n2", "qwen2.5:0.5b", status=JobStatus.PENDING)]
    mx = readmodel.model_matrix(reg, active)
    assert [a.node_id for a in mx.agents] == ["n0", "n1", "n2", "n3", "n4"]
    assert mx.keys == ["custom/thing:v1", "llama3.2:latest", "qwen2.5:0.5b"]  # ghost agents' jobs left out
    assert mx.columns == ["custom/thing:v1", "llama3.2", "qwen2.5:0.5b"]  # first spelling, node id order
    n1, n2, n3 = reg.agents["n1"], reg.agents["n2"], reg.agents["n3"]
    cell = mx.cell(n1, "llama3.2:latest")
    assert cell.installed is not None and cell.installed["name"] == "llama3.2" and cell.loaded
    assert cell.job is active[1]
    pulling = mx.cell(n2, "qwen2.5:0.5b")
    assert pulling.installed is None and pulling.job is active[4]  # the last of two
    assert [(c.installed is not None, c.loaded, c.job is not None) for c in mx.row(n1)] == [
        (False, False, False), (True, True, True), (True, False, False)]
    assert list(mx.occupied(n1)) == ["llama3.2:latest", "qwen2.5:0.5b"]
    assert list(mx.occupied(n2)) == ["llama3.2:latest", "qwen2.5:0.5b"]  # installed first, then jobs
    assert mx.occupied(n3) == {}
    by_name = readmodel.model_matrix(reg, [], order=lambda a: a.name.lower())
    assert [a.name for a in by_name.agents] == ["Alpha", "beta", "delta", "Gamma", "n3"]
    assert by_name.columns == ["custom/thing:v1", "llama3.2", "qwen2.5:0.5b"]


def test_an_empty_fleet_reads_as_empty() -> None:
    r = Registry(Hub())
    assert readmodel.find_agents(r) == [] and readmodel.agent_table(r) == []
    mx = readmodel.model_matrix(r, [job(1, "gone", "llama3.2")])
    assert (mx.agents, mx.columns) == ([], [])
    assert [m.source for m in readmodel.available_models(r, CATALOGUE)] == ["catalogue", "catalogue"]


def test_silence_before_the_controller_could_hear_does_not_make_an_agent_stale() -> None:
    r = Registry(Hub())
    join(r, "quiet")
    seen = r.agents["quiet"].last_seen
    later = seen + 3600  # an hour of silence, but the broker connection is 5 s old (3 heartbeats of 5 s: 15 s)
    assert r.check_stale(later, heard_since=later - 5) == [] and r.agents["quiet"].status == "online"
    assert r.check_stale(later, heard_since=later - 16) == ["quiet"] and r.agents["quiet"].status == "stale"
