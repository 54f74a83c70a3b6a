"""The job ledger's state machine (controller/jobs/machine.py) without I/O: inputs in, state and effects out.

Agents are the registry's real AgentRecord; the time is passed in, so timeouts need no waiting.
The ledger's I/O loop around it is tested end to end in test_jobs_controller.py.
"""

from __future__ import annotations

import logging
from typing import Any

from ollama_fleet.contract.jobs import JobStatus
from ollama_fleet.controller.jobs.machine import (
    ROW_FIELDS,
    Command,
    Effect,
    JobMachine,
    JobRec,
    Log,
    Lookup,
    Notify,
    Now,
    Purpose,
    new_job,
)
from ollama_fleet.controller.jobs.store import COLUMNS
from ollama_fleet.controller.registry.live import AgentRecord

T0 = Now(wall=1_700_000_000.0, mono=5_000.0)
STEP = 120.0


def at(seconds: float) -> Now:
    return Now(T0.wall + seconds, T0.mono + seconds)


def agent(node: str, session: str = "s1", state: str = "online", ollama_up: bool = True,
          slots: int | None = None) -> AgentRecord:
    info: dict[str, Any] = {"jobs": {"pull_concurrency": slots}} if slots else {}
    return AgentRecord(node_id=node, first_seen=T0.wall, last_seen=T0.wall, state=state, session=session,
                       ollama_up=ollama_up, info=info)


def pull(node: str, model: str = "llama3:8b", job_id: str | None = None, now: Now = T0,
         queue_if_offline: bool = False) -> JobRec:
    return new_job(job_id or f"j-{node}-{model}", node, "model.pull", {"model": model}, "api", now,
                   queue_if_offline=queue_if_offline)


def submit(m: JobMachine, *recs: JobRec) -> list[Effect]:
    m.accept(recs)
    return m.accepted(recs)


def commands(effects: list[Effect]) -> list[Command]:
    return [e for e in effects if isinstance(e, Command)]


def notified(effects: list[Effect]) -> list[str]:
    return [e.rec.task_id for e in effects if isinstance(e, Notify)]


def running(m: JobMachine, rec: JobRec, agents: dict[str, AgentRecord], now: Now = T0) -> None:
    """Submit and dispatch `rec`, then have its agent report it in progress (seq 1)."""
    submit(m, rec)
    assert [c.rec for c in commands(m.pump(agents, True, now))] == [rec]
    ignored, _ = m.report(rec.node_id, rec.job_id, {"seq": 1, "status": "in_progress",
                                                     "session": agents[rec.node_id].session}, agents, now)
    assert ignored is None and rec.status is JobStatus.IN_PROGRESS


# ---- dispatching ---------------------------------------------------------------------------------
def test_a_new_job_is_held_until_written_then_dispatched_with_its_command() -> None:
    m, agents = JobMachine(10, STEP), {"a": agent("a")}
    rec = pull("a")
    assert rec.status is JobStatus.PENDING and rec.held and rec.phase == "queued"
    m.accept([rec])
    assert m.find_active("a", "model.pull", "llama3:8b") is rec  # a second identical request finds it
    assert m.pump(agents, True, T0) == [] and rec.held  # not in the database yet: not sent
    assert notified(m.accepted([rec])) == [rec.task_id]
    effects = m.pump(agents, True, at(1))
    assert commands(effects) == [Command(rec, "model.pull", {"job_id": rec.job_id, "model": "llama3:8b",
                                                             "origin": "api"}, Purpose.DISPATCH)]
    assert notified(effects) == [rec.task_id]
    assert not rec.held and rec.dispatched_at == at(1).wall and rec.attempts == 1 and rec.phase == "dispatched"
    assert rec.last_heard == at(1).mono and rec.task_id in m.dirty
    assert m.pump(agents, True, at(2)) == []  # dispatched once


def test_a_write_that_failed_withdraws_the_jobs() -> None:
    m = JobMachine(10, STEP)
    rec = pull("a")
    m.accept([rec])
    m.withdraw([rec])
    assert m.active == {} and m.by_task == {} and m.find_active("a", "model.pull", "llama3:8b") is None


def test_the_fleet_cap_and_the_agent_slots_hold_extra_pulls_but_not_deletes() -> None:
    m = JobMachine(2, STEP)
    agents = {"a": agent("a"), "b": agent("b", slots=2)}
    a1, a2, b1, b2 = pull("a", "m1", now=at(0)), pull("a", "m2", now=at(1)), pull("b", "m1", now=at(2)), \
        pull("b", "m2", now=at(3))
    delete = new_job("d-1", "a", "model.delete", {"model": "old"}, "api", at(4))
    submit(m, a1, a2, b1, b2, delete)
    sent = [c.rec for c in commands(m.pump(agents, True, at(5)))]
    assert sent == [a1, b1, delete]  # oldest first; a has one pull slot; the cap of 2 is reached
    assert a2.phase == "waiting for a pull slot on a"
    assert b2.phase == "waiting for a fleet pull slot (2 running: max_concurrent_pulls)"
    assert [r.task_id for r in m.running_pulls()] == [a1.task_id, b1.task_id]
    m.report("b", b1.job_id, {"seq": 1, "status": "completed", "session": "s1"}, agents, at(6))
    assert m.pump_due  # a slot freed
    assert [c.rec for c in commands(m.tick(agents, True, at(7)))] == [b2]  # b has two slots


def test_an_offline_agent_fails_the_job_unless_it_may_wait_and_a_deleted_one_always_does() -> None:
    m = JobMachine(10, STEP)
    agents = {"off": agent("off", state="offline"), "down": agent("down", ollama_up=False)}
    fails, waits, gone = pull("off", "m1"), pull("down", "m2", queue_if_offline=True), pull("nowhere")
    submit(m, fails, waits, gone)
    effects = m.pump(agents, True, at(1))
    assert commands(effects) == []
    assert fails.status is JobStatus.FAILED and fails.error_code == "agent_offline"
    assert fails.finished_at == at(1).wall
    assert "agent off is offline" in (fails.error or "")
    assert gone.status is JobStatus.FAILED and gone.error_code == "agent_gone"
    assert waits.held and waits.phase == "waiting for down to come online (ollama_down)"
    assert not m.to_clear  # never reported by an agent: no retained status to clear
    assert any(isinstance(e, Log) and e.level == logging.WARNING for e in effects)
    agents["down"].ollama_up = True
    m.agent_event("ollama_up", "down", agents, at(2))
    assert m.pump_due and [c.rec for c in commands(m.tick(agents, True, at(3)))] == [waits]


def test_without_a_broker_jobs_wait_and_a_failed_send_holds_them_again() -> None:
    m, agents = JobMachine(10, STEP), {"a": agent("a")}
    rec = pull("a")
    submit(m, rec)
    assert commands(m.pump(agents, False, T0)) == [] and rec.phase == "waiting for the broker"
    [command] = commands(m.pump(agents, True, at(1)))
    effects = m.send_failed(command, "not connected to the broker", at(2))
    assert rec.held and rec.phase == "broker unavailable, will retry" and notified(effects) == [rec.task_id]
    [again] = commands(m.tick(agents, True, at(3)))
    assert again.rec is rec and rec.attempts == 2


# ---- status documents ----------------------------------------------------------------------------
def test_status_documents_move_the_job_to_completed() -> None:
    m, agents = JobMachine(10, STEP), {"a": agent("a")}
    rec = pull("a")
    running(m, rec, agents, at(1))
    assert rec.started_at == at(1).wall and rec.session == "s1" and rec.seq == 1
    ignored, effects = m.report("a", rec.job_id, {
        "seq": 2, "status": "in_progress", "progress": 0.5, "completed": 50, "total": 100, "speed": 10,
        "eta": 5, "phase": "pulling sha256:abc", "layers": {"sha256:abc": [50, 100]}}, agents, at(2))
    assert ignored is None and notified(effects) == [rec.task_id]
    assert (rec.progress, rec.completed, rec.total, rec.speed, rec.eta) == (0.5, 50, 100, 10.0, 5.0)
    assert rec.phase == "pulling sha256:abc" and rec.layers == {"sha256:abc": [50, 100]}
    assert rec.last_heard == at(2).mono and not m.to_clear
    ignored, _ = m.report("a", rec.job_id, {"seq": 3, "status": "completed", "finished_at": T0.wall + 2.5},
                          agents, at(3))
    assert ignored is None and rec.done and rec.status is JobStatus.COMPLETED and rec.progress == 1.0
    assert rec.finished_at == T0.wall + 2.5
    assert rec.key not in m.active and m.recent[rec.key] is rec and m.by_task[rec.task_id] is rec
    assert m.to_clear == [rec.key] and m.pump_due  # its retained status goes once the outcome is written


def test_out_of_order_and_duplicate_documents_are_ignored_by_seq() -> None:
    m, agents = JobMachine(10, STEP), {"a": agent("a")}
    rec = pull("a")
    running(m, rec, agents)
    m.report("a", rec.job_id, {"seq": 5, "status": "in_progress", "progress": 0.5}, agents, at(1))
    for seq in (5, 4, 2):
        ignored, effects = m.report("a", rec.job_id, {"seq": seq, "status": "in_progress", "progress": 0.1},
                                    agents, at(2))
        assert ignored == "stale_job_update" and effects == []
    assert rec.seq == 5 and rec.progress == 0.5 and rec.last_heard == at(1).mono
    assert m.report("a", rec.job_id, {"status": "completed"}, agents, at(3)) == ("job_without_seq", [])
    assert rec.status is JobStatus.IN_PROGRESS
    bogus, _ = m.report("a", rec.job_id, {"seq": 6, "status": "exploded", "progress": 0.6}, agents, at(4))
    assert bogus is None and rec.status is JobStatus.IN_PROGRESS and rec.progress == 0.6  # unknown status kept


def test_a_new_agent_session_numbers_anew_but_an_old_session_is_stale() -> None:
    m, agents = JobMachine(10, STEP), {"a": agent("a", session="s1")}
    rec = pull("a")
    running(m, rec, agents)
    m.report("a", rec.job_id, {"seq": 9, "status": "in_progress", "session": "s1"}, agents, at(1))
    agents["a"].session = "s2"  # the agent restarted
    ignored, _ = m.report("a", rec.job_id, {"seq": 1, "status": "in_progress", "session": "s1"}, agents, at(2))
    assert ignored == "stale_job_update"  # a late copy from the old session
    ignored, _ = m.report("a", rec.job_id, {"seq": 1, "status": "in_progress", "session": "s2"}, agents, at(3))
    assert ignored is None and rec.seq == 1 and rec.session == "s2"


def test_a_terminal_status_is_final() -> None:
    m, agents = JobMachine(10, STEP), {"a": agent("a")}
    rec = pull("a")
    running(m, rec, agents)
    m.report("a", rec.job_id, {"seq": 2, "status": "failed", "error": "disk full", "error_code": "no_space"},
             agents, at(1))
    assert rec.status is JobStatus.FAILED and rec.error == "disk full" and rec.error_code == "no_space"
    m.to_clear.clear()
    ignored, effects = m.report("a", rec.job_id, {"seq": 3, "status": "completed"}, agents, at(2))
    assert ignored == "finished_job" and effects == [] and rec.status is JobStatus.FAILED
    assert m.to_clear == [rec.key]  # a late copy re-published it: clear it again
    assert m.cancel(rec, agents, True, at(3)) == [] and rec.status is JobStatus.FAILED
    assert m.timeouts(True, at(STEP * 10)) == [] and rec.finished_at == at(1).wall
    assert m.agent_event("deleted", "a", agents, at(4)) == [] and rec.error_code == "no_space"


def test_a_rejected_command_takes_its_code_from_the_error() -> None:
    m, agents = JobMachine(10, STEP), {"a": agent("a", slots=3)}
    first, second, third = pull("a", "m1"), pull("a", "m2"), pull("a", "m3")
    submit(m, first, second, third)
    assert len(commands(m.pump(agents, True, T0))) == 3
    for rec, doc in ((first, {"status": "rejected", "error": "unsupported_version: v 9"}),
                     (second, {"status": "rejected", "error": "bad payload"}),
                     (third, {"status": "failed", "error": {"code": "pull_failed", "message": "no"}})):
        assert m.report("a", rec.job_id, {"seq": 1, **doc}, agents, at(1))[0] is None
    assert first.status is JobStatus.REJECTED and first.done and first.error_code == "unsupported_version"
    assert second.error_code == "rejected" and second.error == "bad payload"
    assert (third.error_code, third.error) == ("pull_failed", "no")
    assert first.started_at is None and first.finished_at == at(1).wall


# ---- timeouts --------------------------------------------------------------------------------------
def test_a_quiet_job_times_out_and_the_agent_is_told_to_stop() -> None:
    m = JobMachine(10, STEP)
    agents = {"a": agent("a"), "b": agent("b")}
    quiet, talking, held = pull("a", "m1"), pull("b", "m1"), pull("a", "m2", queue_if_offline=True)
    running(m, quiet, agents)
    running(m, talking, agents)
    m.report("b", talking.job_id, {"seq": 2, "status": "in_progress"}, agents, at(STEP))
    agents["a"].state = "offline"
    submit(m, held)
    assert m.timeouts(True, at(STEP)) == []  # exactly job_step_timeout: not yet
    effects = m.tick(agents, True, at(STEP + 1))
    assert quiet.status is JobStatus.FAILED and quiet.error_code == "timed_out"
    assert quiet.error == f"no status from agent a for {STEP + 1:.0f} s (job_step_timeout {STEP:g} s)"
    assert commands(effects) == [Command(quiet, "job.cancel", {"job_id": quiet.job_id}, Purpose.STOP)]
    assert quiet.key in m.to_clear  # it reported: its retained status is cleared
    assert talking.status is JobStatus.IN_PROGRESS and held.held and held.status is JobStatus.PENDING
    assert m.send_failed(commands(effects)[0], "gone", at(STEP + 2)) == []  # a failed stop changes nothing


def test_without_a_broker_a_timed_out_job_ends_without_a_stop_command() -> None:
    m, agents = JobMachine(10, STEP), {"a": agent("a")}
    rec = pull("a")
    running(m, rec, agents)
    effects = m.timeouts(False, at(STEP + 1))
    assert rec.error_code == "timed_out" and commands(effects) == []


# ---- agents coming and going -----------------------------------------------------------------------
def test_an_agent_back_with_a_new_session_gets_its_jobs_again() -> None:
    m, agents = JobMachine(10, STEP), {"a": agent("a", session="s1")}
    rec = pull("a")
    running(m, rec, agents)
    assert commands(m.agent_event("reconnected", "a", agents, at(1))) == []  # same session: it has the job
    agents["a"].session = "s2"
    effects = m.agent_event("online", "a", agents, at(2))
    assert commands(effects) == [Command(rec, "model.pull", {"job_id": rec.job_id, "model": "llama3:8b",
                                                             "origin": "api"}, Purpose.DISPATCH)]
    assert rec.attempts == 2 and rec.phase == "re-sent after the agent reconnected"
    assert rec.last_heard == at(2).mono and m.pump_due
    assert any(isinstance(e, Log) and "new session" in e.text for e in effects)


def test_a_deleted_agent_fails_its_jobs() -> None:
    m, agents = JobMachine(10, STEP), {"a": agent("a"), "b": agent("b")}
    mine, other = pull("a"), pull("b")
    running(m, mine, agents)
    running(m, other, agents)
    del agents["a"]
    m.agent_event("deleted", "a", agents, at(1))
    assert mine.status is JobStatus.FAILED and mine.error_code == "agent_gone"
    assert other.status is JobStatus.IN_PROGRESS and m.pump_due  # a slot freed
    m.pump_due = False
    assert m.agent_event("online", None, agents, at(2)) == [] and not m.pump_due  # an event about no agent


# ---- cancelling ----------------------------------------------------------------------------------
def test_cancel_ends_a_held_job_at_once() -> None:
    m, agents = JobMachine(10, STEP), {"a": agent("a")}
    rec = pull("a")
    submit(m, rec)
    effects = m.cancel(rec, agents, True, at(1))
    assert commands(effects) == [] and rec.status is JobStatus.CANCELLED and rec.error_code == "cancelled"
    assert rec.error == "cancelled before it started" and rec.key in m.recent and not m.to_clear


def test_cancel_of_a_running_job_asks_the_agent_and_ends_here_if_that_fails() -> None:
    m, agents = JobMachine(10, STEP), {"a": agent("a")}
    rec = pull("a")
    running(m, rec, agents)
    effects = m.cancel(rec, agents, True, at(1))
    assert commands(effects) == [Command(rec, "job.cancel", {"job_id": rec.job_id}, Purpose.CANCEL)]
    assert rec.cancel_requested and rec.phase == "cancel requested" and not rec.done
    m.send_failed(commands(effects)[0], "connection lost", at(2))
    assert rec.status is JobStatus.CANCELLED
    assert rec.error == "cancelled; the broker was unavailable (connection lost)"


def test_cancel_confirmed_by_the_agent_and_cancel_while_it_is_away() -> None:
    m, agents = JobMachine(10, STEP), {"a": agent("a", session="s1"), "b": agent("b")}
    rec, away = pull("a"), pull("b")
    running(m, rec, agents)
    running(m, away, agents)
    m.cancel(rec, agents, True, at(1))
    m.report("a", rec.job_id, {"seq": 2, "status": "cancelled", "error": "cancelled"}, agents, at(2))
    assert rec.status is JobStatus.CANCELLED and rec.error_code == "cancelled" and m.to_clear == [rec.key]
    agents["b"].state = "lost"
    assert commands(m.cancel(away, agents, True, at(3))) == []
    assert away.status is JobStatus.CANCELLED and "was unreachable" in (away.error or "")


def test_a_cancel_requested_before_the_agent_restarted_ends_the_job_when_it_returns() -> None:
    m, agents = JobMachine(10, STEP), {"a": agent("a", session="s1")}
    rec = pull("a")
    running(m, rec, agents)
    m.cancel(rec, agents, True, at(1))
    agents["a"].session = "s2"
    effects = m.agent_event("reconnected", "a", agents, at(2))
    assert commands(effects) == [] and rec.status is JobStatus.CANCELLED
    assert rec.error == "cancelled while the agent was away"


# ---- jobs the controller did not create ------------------------------------------------------------
def test_an_unknown_job_is_looked_up_then_learned_with_the_latest_document() -> None:
    m, agents = JobMachine(10, STEP), {"a": agent("a")}
    first = {"seq": 1, "status": "in_progress", "verb": "model.pull", "args": {"model": "gemma3:1b"},
             "origin": "script", "created_at": T0.wall - 5}
    assert m.report("a", "x1", first, agents, T0) == (None, [Lookup("a", "x1")])
    latest = {**first, "seq": 2, "progress": 0.25}
    assert m.report("a", "x1", latest, agents, at(1)) == (None, [])  # the lookup under way applies it
    effects = m.learned("a", "x1", None, False, agents, at(2))
    rec = m.by_task["x1"]
    assert (rec.verb, rec.model, rec.origin) == ("model.pull", "gemma3:1b", "script")
    assert rec.created_at == T0.wall - 5
    assert rec.seq == 2 and rec.progress == 0.25 and rec.status is JobStatus.IN_PROGRESS
    assert rec.dispatched_at == at(2).wall and not rec.held and m.counters["learned"] == 1
    assert notified(effects) == ["x1"] and any(isinstance(e, Log) for e in effects) and m.learning == {}


def test_a_learned_job_id_that_is_already_taken_gets_the_agent_in_its_task_id() -> None:
    m, agents = JobMachine(10, STEP), {"a": agent("a"), "b": agent("b")}
    doc = {"seq": 1, "status": "in_progress", "verb": "model.pull"}
    m.report("a", "same", doc, agents, T0)
    m.report("b", "same", doc, agents, T0)
    m.learned("a", "same", None, False, agents, at(1))
    m.learned("b", "same", None, False, agents, at(1))  # "same" is a's task now
    assert m.by_task["same"].node_id == "a" and m.by_task["same@b"].node_id == "b"
    m.report("a", "other", doc, agents, T0)
    m.learned("a", "other", None, True, agents, at(1))  # taken in the database
    assert "other@a" in m.by_task


def test_a_looked_up_row_that_already_ended_is_cleared_not_reopened() -> None:
    m, agents = JobMachine(10, STEP), {"a": agent("a")}
    done = pull("a")
    done.status, done.seq, done.finished_at = JobStatus.COMPLETED, 4, T0.wall
    m.report("a", done.job_id, {"seq": 4, "status": "completed"}, agents, at(1))
    effects = m.learned("a", done.job_id, done.row(), False, agents, at(2))
    assert effects == [] and m.by_task[done.task_id].status is JobStatus.COMPLETED
    assert m.to_clear == [done.key] and done.task_id in m.dirty
    m.report("a", "lost", {"seq": 1}, agents, T0)
    m.forget_lookup("a", "lost")  # the lookup failed: the next document looks it up again
    assert m.report("a", "lost", {"seq": 2}, agents, T0) == (None, [Lookup("a", "lost")])


# ---- records and the persistence outbox ------------------------------------------------------------
def test_a_record_is_one_row_of_the_job_table_and_back() -> None:
    rec = pull("a")
    rec.status = JobStatus.IN_PROGRESS
    assert ROW_FIELDS == set(COLUMNS)
    row = rec.row()
    assert set(row) == set(COLUMNS) and type(row["status"]) is str and row["status"] == "in_progress"
    back = JobRec.from_row({**row, "id": 7}, heard=42.0)
    assert back.row() == row and back.status is JobStatus.IN_PROGRESS and back.last_heard == 42.0
    assert rec.to_json()["id"] == rec.task_id and rec.to_json()["agent_id"] == "a"


def test_load_gives_unfinished_jobs_a_fresh_step_timeout() -> None:
    m, agents = JobMachine(10, STEP), {"a": agent("a")}
    rec = pull("a")
    rec.dispatched_at, rec.status = T0.wall, JobStatus.IN_PROGRESS
    m.load([rec.row()], at(STEP * 3))
    loaded = m.by_task[rec.task_id]
    assert loaded.key in m.active and loaded.last_heard == at(STEP * 3).mono
    assert m.timeouts(True, at(STEP * 3 + 1)) == [] and m.pump(agents, True, at(STEP * 3)) == []


def test_the_outbox_hands_out_changed_rows_and_takes_them_back_when_a_write_fails() -> None:
    m, agents = JobMachine(10, STEP), {"a": agent("a")}
    rec = pull("a")
    running(m, rec, agents)
    m.report("a", rec.job_id, {"seq": 2, "status": "completed"}, agents, at(1))
    outbox = m.drain()
    assert outbox.dirty == {rec.task_id} and outbox.rows == [rec.row()] and outbox.clear == [rec.key]
    assert m.dirty == set() and m.to_clear == []
    m.restore(outbox)
    assert m.dirty == {rec.task_id} and m.to_clear == [rec.key]
    m.drain()
    m.clear_again(rec.key)
    assert m.drain().clear == [rec.key] and m.drain().clear == []


def test_finished_records_are_forgotten_oldest_first_but_not_before_they_are_written() -> None:
    m, agents = JobMachine(10, STEP, recent_kept=2), {"a": agent("a", slots=10)}
    recs = [pull("a", f"m{i}", now=at(i)) for i in range(4)]
    submit(m, *recs)
    assert len(commands(m.pump(agents, True, T0))) == 4
    for i, rec in enumerate(recs[:2]):
        m.report("a", rec.job_id, {"seq": 1, "status": "completed"}, agents, at(i))
    m.drain()  # the first two are written
    for i, rec in enumerate(recs[2:]):
        m.report("a", rec.job_id, {"seq": 1, "status": "completed"}, agents, at(2 + i))
    assert list(m.recent.values()) == recs[2:]
    assert recs[0].task_id not in m.by_task and recs[1].task_id not in m.by_task
    last = pull("a", "m9", now=at(9))
    submit(m, last)
    assert commands(m.pump(agents, True, at(9)))[0].rec is last
    m.report("a", last.job_id, {"seq": 1, "status": "failed"}, agents, at(10))
    assert recs[2].task_id in m.by_task  # out of `recent`, but its row is not written yet
