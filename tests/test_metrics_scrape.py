"""How `GET /metrics` formats (controller/metrics/fleet.py): generate_latest spared its name escaping
(VERBATIM) and a family that did not move keeping its text (Formatter) must leave the text exactly what
prometheus_client's generate_latest makes of the same families. In-process: the controller's parts
(compose.Fleet, no I/O) fed through the real ingest path."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ollama_fleet.controller.compose import Fleet
from ollama_fleet.controller.metrics import names
from ollama_fleet.controller.metrics.fleet import VERBATIM, escaping
from ollama_fleet.settings import Config

GB = 10**9


def send(fleet: Fleet, node: str, kind: str, doc: dict[str, object]) -> None:
    fleet.ingest.handle(f"fleet/v1/nodes/{node}/{kind}",
                        json.dumps({"v": 1, "session": f"s-{node}", "ts": time.time(), **doc}))


def heartbeat(fleet: Fleet, node: str, seq: int, cpu: float, gpus: int = 2) -> None:
    send(fleet, node, "heartbeat", {"seq": seq, "cpu": cpu, "mem_used": 53 * GB, "gpus": [
        {"index": g, "util": 62.0, "mem_used": 14 * GB, "temp": 61, "power": 280.5} for g in range(gpus)]})


def fleet_of(tmp: Path, agents: int) -> Fleet:
    fleet = Fleet(Config(data_dir=str(tmp), auto_distribute=False))
    for i in range(agents):
        node = f"n{i}"
        send(fleet, node, "state", {"state": "online", "hb_interval": 5.0})
        send(fleet, node, "info", {"hostname": node, "ollama": {"url": "http://127.0.0.1:11434", "up": True}})
        heartbeat(fleet, node, 1, 35.0)
    return fleet


def values(text: bytes, family: str) -> dict[tuple[tuple[str, str], ...], float]:
    fams = {f.name: f for f in text_string_to_metric_families(text.decode())}
    return {tuple(sorted(s.labels.items())): s.value for s in fams[family].samples}


def test_verbatim_is_in_force_and_changes_no_byte(tmp_path: Path) -> None:
    assert escaping() == VERBATIM  # this prometheus_client takes it: the figures in docs/metrics.md are real
    fleet = fleet_of(tmp_path, 3)
    snap = fleet.metrics.snapshot()
    text = fleet.metrics.format(snap)
    assert text == generate_latest(snap)
    assert {f.name for f in text_string_to_metric_families(text.decode())} == {s.name for s in names.ALL}


def test_a_family_keeps_its_text_only_while_its_samples_stay(tmp_path: Path) -> None:
    fleet = fleet_of(tmp_path, 3)
    metrics = fleet.metrics
    metrics.exposition()
    first = dict(metrics.format.last)

    heartbeat(fleet, "n1", 2, 80.0)  # one agent's CPU moves; nothing else does
    snap = metrics.snapshot()
    text = metrics.format(snap)
    assert text == generate_latest(snap)
    assert values(text, "fleet_agent_cpu_ratio")[(("agent", "n1"),)] == 0.8
    kept = {name for name, (_, t) in metrics.format.last.items() if t is first[name][1]}
    assert names.AGENT_CAPACITY.name in kept and names.AGENT_GPU_POWER.name in kept
    assert names.AGENT_CPU.name not in kept

    send(fleet, "n2", "state", {"state": "offline"})  # a series goes; the family's text must follow
    snap = metrics.snapshot()
    text = metrics.format(snap)
    assert text == generate_latest(snap)
    assert set(values(text, "fleet_agent_capacity")) == {(("agent", "n0"),), (("agent", "n1"),)}


def test_scrapes_at_once_each_get_a_whole_text(tmp_path: Path) -> None:
    """The route formats on worker threads: scrapes at once, while the figures move between them, each get
    the text of their own families."""
    fleet = fleet_of(tmp_path, 20)
    metrics = fleet.metrics
    snaps = []
    for seq in range(2, 10):
        heartbeat(fleet, f"n{seq}", seq, 10.0 * seq)
        snaps.append(metrics.snapshot())
    got: list[bytes | None] = [None] * len(snaps)

    def scrape(i: int) -> None:
        got[i] = metrics.format(snaps[i])

    threads = [threading.Thread(target=scrape, args=(i,)) for i in range(len(snaps))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert got == [generate_latest(s) for s in snaps]
