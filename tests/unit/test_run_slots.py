"""The dispatcher's slot bookkeeping without NATS: maxConcurrentRuns, priorities, and
tallies rebuilt from records."""

from __future__ import annotations

from typing import Any

from shoal_api.runs.model import RunState
from shoal_api.workflow import WorkflowSpec
from shoal_operator.runs.slots import RunSlots

SPEC = WorkflowSpec.model_validate({"steps": [{"name": "a", "agent": "x", "input": {}}]})


def pending(run: str, created: float, priority: int = 0) -> RunState:
    return RunState.new(
        SPEC, run_id=run, workflow="wf", namespace="ns", input={}, now=created, priority=priority
    )


def moved(state: RunState, **fields: Any) -> RunState:
    return state.model_copy(update=fields)


def test_slots_go_by_priority_then_age_and_never_overfill() -> None:
    told: list[tuple[str, str]] = []
    slots = RunSlots(lambda ns, wf: told.append((ns, wf)))
    runs = [pending("old", 1.0), pending("new", 2.0), pending("urgent", 3.0, priority=5)]
    for r in runs:
        slots.account(None, r)
    assert slots.take("ns", "wf", 2) == ["urgent", "old"]
    assert slots.take("ns", "wf", 2) == []  # both slots held until the runs start or end
    tally = slots.tally("ns", "wf")
    assert tally is not None
    assert (tally.queued, told[-1]) == (1, ("ns", "wf"))
    slots.release("ns", "wf", "old")  # cancelled while queued: its slot goes on
    assert slots.take("ns", "wf", 2) == ["new"]


def test_tallies_follow_phases() -> None:
    slots = RunSlots()
    run = pending("r", 10.0)
    slots.account(None, run)
    running = moved(run, phase="Running", started=11.0)
    slots.account(run, running)
    assert slots.queues() == {("ns", "wf"): (1, 0)}
    done = moved(running, phase="Succeeded", finished=15.0)
    slots.account(running, done)
    slots.account(done, done)  # the same phase again counts once
    tally = slots.tally("ns", "wf")
    assert tally is not None
    assert (tally.active, tally.succeeded, tally.failed) == (0, 1, 0)
    assert (tally.p95(), tally.last_run) == (4.0, 11.0)
    assert slots.tally("ns", "other") is None
