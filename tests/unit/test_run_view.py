"""What ``shoal run --watch`` and ``shoal runs`` show for representative run states."""

from __future__ import annotations

import io
from typing import Any

import pytest
from rich.console import Console, RenderableType

from shoal_api.runs.model import RunState, StepApproval, StepState
from shoal_cli import run_view as rv

T0 = 1_767_600_000.0  # 2026-01-05T08:00:00Z


def render(renderable: RenderableType) -> str:
    console = Console(file=io.StringIO(), width=200, color_system=None, record=True)
    console.print(renderable)
    return console.export_text()


def run(phase: Any = "Running", **steps: StepState) -> RunState:
    return RunState(
        v=1,
        id="r1",
        workflow="inquiry",
        namespace="support",
        phase=phase,
        created=T0,
        started=T0 + 1,
        steps=steps,
    )


def waiting() -> StepState:
    return StepState()


def dispatched(agent: str, attempt: int = 1, started: float = T0 + 1, **kw: Any) -> StepState:
    return StepState(phase="Dispatched", agent=agent, attempt=attempt, started=started, **kw)


def succeeded(agent: str, started: float, finished: float, **kw: Any) -> StepState:
    return StepState(
        phase="Succeeded", agent=agent, attempt=1, started=started, finished=finished, **kw
    )


def awaiting(until: float) -> StepState:
    return StepState(phase="WaitingApproval", approval=StepApproval(requested=T0 + 2, until=until))


def row(text: str, step: str) -> str:
    [line] = [ln for ln in text.splitlines() if ln.startswith(step + " ")]
    return " ".join(line.split())


def test_steps_table_shows_every_step_in_order_with_its_phase_and_detail() -> None:
    state = run(
        authenticate=succeeded("auth", T0 + 1, T0 + 1.3),
        classify=dispatched("triage", attempt=2, reason="TaskFailed", message="model timeout"),
        answer=awaiting(until=T0 + 3602),
        notify=StepState(phase="Skipped", reason="ConditionFalse", message="when was false"),
        audit=StepState(phase="Failed", reason="DependencyFailed", message="classify failed"),
        report=waiting(),
    )
    text = render(rv.steps_table(state, now=T0 + 2))
    lines = text.splitlines()
    assert lines[0].split() == ["STEP", "PHASE", "AGENT", "ATTEMPT", "DURATION", "DETAIL"]
    assert [ln.split()[0] for ln in lines[1:] if ln.strip()] == list(state.steps)
    assert row(text, "authenticate") == "authenticate ✓ Succeeded auth 1 0.3s"
    # A running step's duration runs up to now; the detail says why the last attempt failed.
    assert row(text, "classify") == (
        "classify ▶ Dispatched triage 2 1.0s TaskFailed: model timeout"
    )
    assert row(text, "answer") == (
        "answer ⏸ WaitingApproval awaiting approval, times out in 1h 0m:"
        " shoal approve r1 answer --workflow inquiry -n support"
    )
    assert row(text, "notify") == "notify ↷ Skipped ConditionFalse: when was false"
    assert row(text, "audit") == "audit ✗ Failed DependencyFailed: classify failed"
    assert row(text, "report") == "report · Waiting"


def test_decided_approvals_and_fallbacks_are_named() -> None:
    decided = StepApproval(
        requested=T0, until=T0 + 60, decision="Approve", approver="jane@example.com", at=T0 + 5
    )
    timed_out = StepApproval(
        requested=T0, until=T0 + 60, decision="Reject", at=T0 + 60, timed_out=True
    )
    state = run(
        answer=succeeded("support", T0 + 6, T0 + 7, approval=decided),
        publish=StepState(
            phase="Failed",
            approval=timed_out,
            reason="ApprovalRejected",
            message="approval timed out",
        ),
        escalate=dispatched("support-basic", attempt=4, on_fallback=True),
    )
    text = render(rv.steps_table(state, now=T0 + 8))
    assert row(text, "answer").endswith("approved by jane@example.com")
    assert row(text, "publish").endswith(
        "rejected on timeout; ApprovalRejected: approval timed out"
    )
    assert row(text, "escalate").endswith("4 7.0s fallback")


def test_long_details_are_cut_to_one_line() -> None:
    state = run(a=StepState(phase="Failed", reason="TaskFailed", message="boom\n" * 100))
    detail = rv.step_detail(state, "a", state.steps["a"], T0)
    assert "\n" not in detail
    assert len(detail) == rv.DETAIL_WIDTH
    assert detail.endswith("…")


def test_live_view_titles_the_table_with_the_run() -> None:
    state = run(a=succeeded("x", T0 + 1, T0 + 2), b=dispatched("y"))
    first = render(rv.live_view(state, now=T0 + 13.5)).splitlines()[0]
    assert first.split() == ["run", "r1", "inquiry", "Running", "1/2", "steps", "12s"]


def test_change_lines_first_state_shows_only_what_has_started() -> None:
    state = run(a=succeeded("auth", T0 + 1, T0 + 1.25), b=dispatched("triage"), c=waiting())
    assert rv.change_lines(None, state, now=T0 + 2) == [
        "run r1: Running (1/3 steps done)",
        "step a: Succeeded on auth in 0.2s",
        "step b: Dispatched to triage",
    ]


def test_change_lines_name_only_the_steps_that_moved() -> None:
    before = run(a=dispatched("auth"), b=waiting(), c=waiting())
    after = run(
        a=succeeded("auth", T0 + 1, T0 + 1.5),
        b=dispatched("triage", started=T0 + 1.5),
        c=waiting(),
    )
    assert rv.change_lines(before, after, now=T0 + 2) == [
        "step a: Succeeded on auth in 0.5s",
        "step b: Dispatched to triage",
    ]
    assert rv.change_lines(after, after, now=T0 + 3) == []


def test_change_lines_show_retries_approvals_and_the_run_phase() -> None:
    pending = run("Pending", a=waiting())
    first = run(a=dispatched("triage"))
    retry = run(a=dispatched("triage", attempt=2, reason="TaskFailed", message="boom"))
    gate = run(a=awaiting(until=T0 + 62))
    assert rv.change_lines(pending, first, now=T0 + 2) == [
        "run r1: Running (0/1 steps done)",
        "step a: Dispatched to triage",
    ]
    assert rv.change_lines(first, retry, now=T0 + 2) == [
        "step a: Dispatched to triage (attempt 2): TaskFailed: boom"
    ]
    assert rv.change_lines(retry, gate, now=T0 + 2) == [
        "step a: WaitingApproval: awaiting approval, times out in 1m 0s:"
        " shoal approve r1 a --workflow inquiry -n support"
    ]


def test_change_lines_leave_a_finished_run_to_the_outcome_line() -> None:
    before = run(a=dispatched("triage"))
    after = run(
        "Failed",
        a=StepState(
            phase="Failed",
            agent="triage",
            attempt=3,
            started=T0 + 1,
            finished=T0 + 4,
            reason="TaskFailed",
            message="boom",
        ),
    ).model_copy(update={"finished": T0 + 4, "reason": "StepFailed", "message": "step a failed"})
    assert rv.change_lines(before, after, now=T0 + 5) == [
        "step a: Failed on triage after 3 attempts in 3.0s: TaskFailed: boom"
    ]
    assert rv.outcome_line(after, now=T0 + 5) == (
        "run r1 failed after 3.0s: StepFailed: step a failed"
    )


def test_outcome_lines() -> None:
    done = run("Succeeded").model_copy(update={"finished": T0 + 75})
    assert rv.outcome_line(done, now=T0 + 100) == "run r1 succeeded in 1m 14s"
    assert rv.outcome_line(run("Running"), now=T0 + 100) == "run r1 is Running"
    bare = run("Failed").model_copy(update={"finished": T0 + 2})
    assert rv.outcome_line(bare, now=T0 + 100) == "run r1 failed after 1.0s"


def test_header_lines_of_a_failed_run() -> None:
    state = run("Failed", a=succeeded("x", T0 + 1, T0 + 2), b=StepState(phase="Failed")).model_copy(
        update={
            "finished": T0 + 3,
            "reason": "DeadlineExceeded",
            "message": "the run took longer than 300s",
            "idempotency_key": "order-42",
        }
    )
    assert rv.header_lines(state, now=T0 + 180) == [
        "run:             r1",
        "workflow:        inquiry",
        "namespace:       support",
        "phase:           Failed",
        "idempotency key: order-42",
        "reason:          DeadlineExceeded: the run took longer than 300s",
        "priority:        5",
        "created:         2026-01-05T08:00:00Z (3m ago)",
        "duration:        2.0s",
        "steps:           2/2 done",
    ]


def test_header_lines_leave_out_what_a_pending_run_has_not_got() -> None:
    state = run("Pending", a=waiting()).model_copy(update={"started": None})
    keys = [line.split(":")[0] for line in rv.header_lines(state, now=T0 + 5)]
    assert keys == ["run", "workflow", "namespace", "phase", "priority", "created", "steps"]


def test_runs_table() -> None:
    older = run("Succeeded", a=succeeded("x", T0 + 1, T0 + 2)).model_copy(
        update={"finished": T0 + 2}
    )
    newer = run("Pending", a=waiting(), b=waiting()).model_copy(
        update={"id": "r2", "created": T0 + 7200, "started": None}
    )
    text = render(rv.runs_table([newer, older], now=T0 + 7260))
    assert [line.split() for line in text.splitlines() if line.strip()] == [
        ["RUN", "WORKFLOW", "PHASE", "STEPS", "AGE", "DURATION"],
        ["r2", "inquiry", "Pending", "0/2", "1m"],
        ["r1", "inquiry", "Succeeded", "1/1", "2h", "1.0s"],
    ]


@pytest.mark.parametrize(
    ("start", "end", "now", "shown"),
    [
        (None, None, T0, ""),
        (T0, T0 + 0.04, T0, "0.0s"),
        (T0, T0 + 9.94, T0, "9.9s"),
        (T0, T0 + 10, T0, "10s"),
        (T0, T0 + 125, T0, "2m 5s"),
        (T0, T0 + 7300, T0, "2h 1m"),
        (T0, None, T0 + 3.5, "3.5s"),
        (T0, None, T0 - 1, "0.0s"),  # clocks of the dispatcher and the CLI disagree
    ],
)
def test_elapsed(start: float | None, end: float | None, now: float, shown: str) -> None:
    assert rv.elapsed(start, end, now) == shown


@pytest.mark.parametrize(
    ("ago", "shown"), [(-5, "0s"), (59, "59s"), (60, "1m"), (7200, "2h"), (90000, "1d")]
)
def test_age(ago: float, shown: str) -> None:
    assert rv.age(T0 - ago, now=T0) == shown
