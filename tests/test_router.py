"""The router as a pure module: constructed AgentRecords in, an order of agents out."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from ollama_fleet.controller.registry.live import AgentRecord
from ollama_fleet.controller.proxy.router import Decision, NoRoute, Router, normalize_model, score, weight

LLAMA = {"name": "llama3.2:latest", "digest": "a80c", "size": 1}
QWEN = {"name": "qwen2.5:0.5b", "digest": "a8b0", "size": 1}
GIB = 1 << 30


def agent(node: str, models: list[dict[str, Any]] | None = None, *, cpu: float = 5.0, mem: float = 20.0,
          loaded: list[str] = (), tags: list[str] = (), state: str = "online", up: bool = True,
          gpus: list[dict[str, Any]] = (), in_flight: int = 0) -> AgentRecord:
    a = AgentRecord(node_id=node, first_seen=0, last_seen=0, state=state, ollama_up=up,
                    ollama_url=f"http://{node}:11434", tags=list(tags), models=list(models or [LLAMA]),
                    loaded=[{"name": n} for n in loaded],
                    metrics={"cpu": cpu, "mem": mem, "gpus": [{"index": i, **g} for i, g in enumerate(gpus)]},
                    gpus=[{"index": i, "mem_total": g.get("mem_total")} for i, g in enumerate(gpus)])
    a.in_flight = in_flight
    return a


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pick(router: Router, agents: list[AgentRecord], model: str = "llama3.2", **kw: Any) -> Decision:
    d = router.choose(agents, model, **kw)
    assert isinstance(d, Decision), d
    return d


def test_model_names_normalise_like_ollama():
    assert normalize_model("llama3.2") == "llama3.2:latest"
    assert normalize_model("registry.ollama.ai/library/llama3.2:3b") == "llama3.2:3b"
    assert normalize_model("Me/Model") == "me/model:latest"
    assert normalize_model("host:5000/ns/model") == "host:5000/ns/model:latest"


def test_round_robin_30_requests_over_3_idle_agents_is_10_each():
    r = Router("round_robin")
    agents = [agent("a"), agent("b"), agent("c")]
    counts = Counter(pick(r, agents).order[0].node_id for _ in range(30))
    assert counts == {"a": 10, "b": 10, "c": 10}


def test_round_robin_10_requests_give_each_of_3_agents_2_to_5():
    r = Router("round_robin")
    agents = [agent("a"), agent("b"), agent("c")]
    counts = Counter(pick(r, agents).order[0].node_id for _ in range(10))
    assert all(2 <= counts[n] <= 5 for n in "abc"), counts


def test_round_robin_weights_from_tags():
    r = Router("round_robin")
    agents = [agent("a", tags=["weight=2"]), agent("b"), agent("c", tags=["weight=0"])]
    counts = Counter(pick(r, agents).order[0].node_id for _ in range(30))
    assert counts == {"a": 20, "b": 10}
    assert weight(agents[2]) == 0.0 and weight(agent("x", tags=["weight=oops"])) == 1.0


def test_only_agents_with_the_model_are_candidates():
    r = Router("round_robin")
    agents = [agent("a", [QWEN]), agent("b", [LLAMA, QWEN]), agent("c", [QWEN])]
    assert {pick(r, agents).order[0].node_id for _ in range(6)} == {"b"}
    assert [a.node_id for a in pick(r, agents).order] == ["b"]


def test_offline_and_ollama_down_agents_are_never_candidates():
    r = Router("least_busy")
    agents = [agent("a", state="lost"), agent("b", up=False), agent("c", state="stale"), agent("d")]
    assert [a.node_id for a in pick(r, agents).order] == ["d"]


def test_no_agents_is_503_kind_and_unknown_model_is_404_kind():
    r = Router()
    none = r.choose([agent("a", state="offline")], "llama3.2")
    assert isinstance(none, NoRoute) and none.kind == "no_agents" and none.message == "no available agents"
    missing = r.choose([agent("a")], "nope")
    assert isinstance(missing, NoRoute) and missing.kind == "not_found"
    assert missing.message == "model 'nope' not found, try pulling it first"


def test_pin_restricts_to_one_agent():
    r = Router("round_robin")
    agents = [agent("a"), agent("b")]
    assert {pick(r, agents, pin="b").order[0].node_id for _ in range(4)} == {"b"}
    bad = r.choose(agents, "llama3.2", pin="zz")
    assert isinstance(bad, NoRoute) and bad.kind == "unavailable"


def test_least_busy_prefers_fewest_in_flight():
    r = Router("least_busy")
    agents = [agent("a", in_flight=3), agent("b", in_flight=1), agent("c", in_flight=2)]
    assert [a.node_id for a in pick(r, agents).order] == ["b", "c", "a"]


def test_least_busy_prefers_warm_agents_at_equal_load():
    r = Router("least_busy")
    agents = [agent("a"), agent("b", loaded=["llama3.2:latest"]), agent("c")]
    assert {pick(r, agents).order[0].node_id for _ in range(6)} == {"b"}
    agents[1].in_flight = 1  # busy warm agent: a free cold one is preferred
    assert pick(r, agents).order[0].node_id in ("a", "c")


def test_least_busy_ties_break_on_score_then_rotate():
    r = Router("least_busy")
    agents = [agent("a", cpu=50), agent("b", cpu=10), agent("c", cpu=10)]
    firsts = Counter(pick(r, agents).order[0].node_id for _ in range(10))
    assert set(firsts) == {"b", "c"} and firsts["b"] == firsts["c"] == 5


def test_metrics_score_is_the_seeds_formula():
    a = agent("a", cpu=10, mem=20, gpus=[{"util": 30, "mem_used": 4 * GIB, "mem_total": 8 * GIB}], in_flight=2)
    assert score(a) == pytest.approx(10 + 20 + 30 + 50 + 20)


def test_metrics_avoids_an_agent_at_90_percent_cpu():
    r = Router("metrics")
    agents = [agent("hot", cpu=90), agent("cool1", cpu=20), agent("cool2", cpu=25)]
    firsts = Counter(pick(r, agents).order[0].node_id for _ in range(20))
    assert firsts["hot"] == 0 and firsts["cool1"] == 20
    assert pick(r, agents).order[-1].node_id == "hot"


def test_metrics_counts_in_flight_requests():
    r = Router("metrics")
    agents = [agent("a", cpu=20, in_flight=3), agent("b", cpu=40)]
    assert pick(r, agents).order[0].node_id == "b"  # 20 + 30 > 40


def test_metrics_falls_back_to_round_robin_when_every_cpu_is_above_80():
    r = Router("metrics")
    agents = [agent("a", cpu=95), agent("b", cpu=85), agent("c", cpu=99)]
    counts = Counter(pick(r, agents).order[0].node_id for _ in range(9))
    assert counts == {"a": 3, "b": 3, "c": 3}
    assert "round-robin" in pick(r, agents).reason()


def test_metrics_ties_go_to_the_larger_gpu_then_rotate():
    r = Router("metrics")
    small = {"util": 0, "mem_used": 0, "mem_total": 8 * GIB}
    large = {"util": 0, "mem_used": 0, "mem_total": 24 * GIB}
    agents = [agent("a", gpus=[small]), agent("b", gpus=[large]), agent("c", gpus=[large])]
    firsts = Counter(pick(r, agents).order[0].node_id for _ in range(10))
    assert firsts == {"b": 5, "c": 5}


def test_metrics_prefers_warm_agent_at_similar_load():
    r = Router("metrics")
    agents = [agent("a", cpu=20), agent("b", cpu=25, loaded=["llama3.2:latest"])]
    assert pick(r, agents).order[0].node_id == "b"


def test_failed_agent_cools_down_then_returns():
    clock = Clock()
    r = Router("round_robin", cooldown=5.0, clock=clock)
    agents = [agent("a"), agent("b")]
    r.failed("a")
    orders = [[x.node_id for x in pick(r, agents).order] for _ in range(4)]
    assert all(o == ["b", "a"] for o in orders), orders  # `a` only as the last resort
    clock.now += 5.1
    assert {pick(r, agents).order[0].node_id for _ in range(4)} == {"a", "b"}


def test_every_candidate_cooling_still_gives_an_order():
    r = Router("least_busy", cooldown=60)
    agents = [agent("a"), agent("b")]
    r.failed("a")
    r.failed("b")
    assert sorted(a.node_id for a in pick(r, agents).order) == ["a", "b"]


def test_reason_names_the_choice_and_the_figures():
    r = Router("least_busy")
    d = pick(r, [agent("a", in_flight=2), agent("b", loaded=["llama3.2:latest"])])
    assert d.reason().startswith("least_busy: b")
    assert "b(in_flight=0 warm" in d.reason() and "a(in_flight=2 cold" in d.reason()


def test_model_cache_follows_registry_replacing_the_list():
    r = Router("least_busy")
    a = agent("a", [QWEN])
    assert isinstance(r.choose([a], "llama3.2"), NoRoute)
    a.models = [QWEN, LLAMA]  # what Registry.on_models does
    assert pick(r, [a]).order[0] is a
