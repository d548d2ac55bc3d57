"""How the ``shoal`` CLI shows workflow runs: rich tables for a terminal, one plain line
per change for logs and pipes, and the small formatters (age, duration) its other
commands share.

Everything here is a pure function of a :class:`RunState` and ``now``, so that what a
user sees can be tested without NATS, a dispatcher or a terminal.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

from rich.table import Table
from rich.text import Text

from shoal_api.runs.model import RunPhase, RunState, StepPhase, StepState
from shoal_api.timestamps import rfc3339

STEP_LOOK: dict[StepPhase, tuple[str, str]] = {
    "Waiting": ("·", "dim"),
    "Ready": ("○", "cyan"),
    "Dispatched": ("▶", "yellow"),
    "WaitingApproval": ("⏸", "magenta"),
    "Succeeded": ("✓", "green"),
    "Failed": ("✗", "red"),
    "Skipped": ("↷", "dim"),
}
"""Symbol and colour of each step phase: the symbol carries the phase where colour does
not (a colour-blind reader, a terminal without colour)."""

RUN_STYLE: dict[RunPhase, str] = {
    "Pending": "dim",
    "Running": "yellow",
    "Succeeded": "green",
    "Failed": "red",
}

DETAIL_WIDTH = 80


def age(at: float, now: float | None = None) -> str:
    """How long ago ``at`` was, kubectl-style: the largest whole unit."""
    seconds = max(0, int((time.time() if now is None else now) - at))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def truncate(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def to_json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


def duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s" if minutes else f"{secs}s"


def elapsed(start: float | None, end: float | None, now: float) -> str:
    """From ``start`` to ``end`` (or to ``now`` while it lasts); "" before it started.

    Steps often take well under a second, so short spans keep a tenth: "0.4s" says more
    than "0s"."""
    if start is None:
        return ""
    seconds = max(0.0, (now if end is None else end) - start)
    return f"{seconds:.1f}s" if seconds < 10 else duration(seconds)


def steps_done(state: RunState) -> tuple[int, int]:
    """Steps that reached a terminal phase, and all steps."""
    return sum(s.terminal for s in state.steps.values()), len(state.steps)


def reason_text(reason: str, message: str) -> str:
    return ": ".join(part for part in (reason, message) if part)


def step_detail(run: RunState, name: str, step: StepState, now: float) -> str:
    """The one thing worth knowing about a step beyond its phase."""
    approval = step.approval
    if step.phase == "WaitingApproval" and approval is not None:
        left = duration(max(0.0, approval.until - now))
        return f"awaiting approval, times out in {left}: {approve_command(run, name)}"
    parts = []
    if step.on_fallback:
        parts.append("fallback")
    if approval is not None and approval.decision is not None:
        if approval.timed_out:
            by = "on timeout"
        else:
            by = f"by {approval.approver}" if approval.approver else ""
        decided = "approved" if approval.decision == "Approve" else "rejected"
        parts.append(" ".join(filter(None, (decided, by))))
    # While a retry is in flight the reason is why the previous attempt failed. Only the
    # message is cut: it is the Agent's text, of any length.
    if text := reason_text(step.reason, step.message):
        parts.append(truncate(text, DETAIL_WIDTH))
    return "; ".join(parts)


def approve_command(run: RunState, step: str) -> str:
    """What a reader who may approve types next."""
    return f"shoal approve {run.id} {step} --workflow {run.workflow} -n {run.namespace}"


def phase_text(phase: StepPhase) -> Text:
    symbol, style = STEP_LOOK[phase]
    return Text(f"{symbol} {phase}", style=style)


def run_phase_text(phase: RunPhase) -> Text:
    return Text(phase, style=RUN_STYLE[phase])


def steps_table(state: RunState, now: float) -> Table:
    """One row per step in the Workflow's order: STEP, PHASE, AGENT, ATTEMPT, DURATION,
    DETAIL."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("STEP", "PHASE", "AGENT", "ATTEMPT", "DURATION", "DETAIL"):
        table.add_column(
            column,
            no_wrap=column != "DETAIL",
            overflow="fold",
            justify="right" if column in ("ATTEMPT", "DURATION") else "left",
        )
    for name, step in state.steps.items():
        table.add_row(
            Text(name),
            phase_text(step.phase),
            Text(step.agent or ""),
            Text(str(step.attempt) if step.attempt else ""),
            Text(elapsed(step.started, step.finished, now)),
            Text(step_detail(state, name, step, now)),
        )
    return table


def run_title(state: RunState, now: float) -> Text:
    done, total = steps_done(state)
    title = Text(f"run {state.id}  {state.workflow}  ")
    title.append_text(run_phase_text(state.phase))
    title.append(f"  {done}/{total} steps")
    if took := elapsed(state.started, state.finished, now):
        title.append(f"  {took}")
    return title


def live_view(state: RunState, now: float) -> Table:
    """What ``--watch`` redraws on a terminal: the step table under a one-line summary."""
    table = steps_table(state, now)
    table.title = run_title(state, now)
    table.title_justify = "left"
    return table


def header_lines(state: RunState, now: float) -> list[str]:
    """``shoal runs get``'s summary above the step table."""
    done, total = steps_done(state)
    rows = [
        ("run", state.id),
        ("workflow", state.workflow),
        ("namespace", state.namespace),
        ("phase", state.phase),
        ("reason", reason_text(state.reason, state.message)),
        ("priority", str(state.priority)),
        ("created", f"{rfc3339(state.created)} ({age(state.created, now)} ago)"),
        ("duration", elapsed(state.started, state.finished, now)),
        ("steps", f"{done}/{total} done"),
    ]
    if state.idempotency_key:
        rows.insert(4, ("idempotency key", state.idempotency_key))
    width = max(len(key) for key, _ in rows) + 2
    return [f"{key + ':':<{width}}{value}" for key, value in rows if value]


def runs_table(states: Iterable[RunState], now: float) -> Table:
    """``shoal runs list``: RUN, WORKFLOW, PHASE, STEPS (done/total), AGE, DURATION."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("RUN", "WORKFLOW", "PHASE", "STEPS", "AGE", "DURATION"):
        table.add_column(column, no_wrap=True)
    for state in states:
        done, total = steps_done(state)
        table.add_row(
            Text(state.id),
            Text(state.workflow),
            run_phase_text(state.phase),
            Text(f"{done}/{total}"),
            Text(age(state.created, now)),
            Text(elapsed(state.started, state.finished, now)),
        )
    return table


def step_line(run: RunState, name: str, step: StepState, now: float) -> str:
    """A step's new phase as a sentence, for logs."""
    line = f"step {name}: {step.phase}"
    if step.phase == "Dispatched":
        line += f" to {step.agent}" if step.agent else ""
        if step.attempt > 1:
            line += f" (attempt {step.attempt})"
    elif step.phase in ("Succeeded", "Failed") and step.agent:
        line += f" on {step.agent}"
        if step.attempt > 1:
            line += f" after {step.attempt} attempts"
    if step.terminal and (took := elapsed(step.started, step.finished, now)):
        line += f" in {took}"
    detail = step_detail(run, name, step, now)
    return f"{line}: {detail}" if detail else line


def _moved(before: StepState, after: StepState) -> bool:
    return (before.phase, before.attempt, before.agent, before.approval) != (
        after.phase,
        after.attempt,
        after.agent,
        after.approval,
    )


def change_lines(prev: RunState | None, cur: RunState, now: float) -> list[str]:
    """What changed from ``prev`` to ``cur``, one line each, for ``--watch`` when nobody
    sees a redrawn table (a pipe, a CI log). The first state (``prev`` None) shows the
    steps that have started, so that re-attaching to a run shows where it is. A finished
    run's outcome is left to :func:`outcome_line`."""
    lines = []
    if not cur.terminal and (prev is None or prev.phase != cur.phase):
        done, total = steps_done(cur)
        lines.append(f"run {cur.id}: {cur.phase} ({done}/{total} steps done)")
    for name, step in cur.steps.items():
        before = prev.steps.get(name) if prev is not None else None
        if before is None and step.phase == "Waiting":
            continue
        if before is not None and not _moved(before, step):
            continue
        lines.append(step_line(cur, name, step, now))
    return lines


def outcome_line(state: RunState, now: float) -> str:
    took = elapsed(state.started or state.created, state.finished, now)
    if state.phase == "Succeeded":
        return f"run {state.id} succeeded in {took}"
    if state.phase == "Failed":
        why = reason_text(state.reason, state.message)
        return f"run {state.id} failed after {took}" + (f": {why}" if why else "")
    return f"run {state.id} is {state.phase}"
