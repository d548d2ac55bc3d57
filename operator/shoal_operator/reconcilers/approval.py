"""Approval: the person's decision as a run event, and the status saying what the run did
with it. An Approval is relayed once: a status with a final phase is never revisited."""

from __future__ import annotations

from typing import Literal

from shoal_api.approval import ApprovalSpec, ApprovalStatus
from shoal_api.runs.model import ApprovalDecided
from shoal_api.timestamps import unix_time
from shoal_operator.status_conditions import Cond, EventSpec, merge_conditions

Outcome = Literal["Applied", "NotWaiting", "RunNotFound", "InvalidSpec"]
"""What the run gate answered, or InvalidSpec when the object never reached it."""

FINAL_PHASES = frozenset({"Applied", "Ignored"})
CONDITION = "Applied"
WAITING_REASON = "DispatcherNotRunning"
WAITING_MESSAGE = "waiting for the workflow run dispatcher; relayed as soon as it runs"


def relayed(status: ApprovalStatus | None) -> bool:
    return status is not None and status.phase in FINAL_PHASES


def decision_event(spec: ApprovalSpec, created: str) -> ApprovalDecided:
    """The run event of an Approval. ``at`` is when the API server admitted the decision
    (its creationTimestamp), not when the operator got round to relaying it: the run
    records when the person decided, and a relay repeated later carries the same time."""
    return ApprovalDecided(
        step=spec.step,
        decision=spec.decision,
        approver=spec.approver,
        at=unix_time(created),
        comment=spec.comment,
    )


def waiting_status(generation: int, current: ApprovalStatus, now: str) -> ApprovalStatus:
    """Pending, while nobody can take the decision yet."""
    conds = merge_conditions(
        current.conditions,
        [Cond(CONDITION, "Unknown", WAITING_REASON, WAITING_MESSAGE)],
        generation,
        now,
    )
    return ApprovalStatus(
        observed_generation=generation,
        conditions=conds,
        phase="Pending",
        message=WAITING_MESSAGE,
    )


def status(
    generation: int,
    spec: ApprovalSpec | None,
    outcome: Outcome,
    message: str,
    current: ApprovalStatus,
    now: str,
) -> tuple[ApprovalStatus, list[EventSpec]]:
    """The final status after relaying, and the Event that tells the story."""
    applied = outcome == "Applied"
    conds = merge_conditions(
        current.conditions,
        [Cond(CONDITION, "True" if applied else "False", outcome, message)],
        generation,
        now,
    )
    out = ApprovalStatus(
        observed_generation=generation,
        conditions=conds,
        phase="Applied" if applied else "Ignored",
        message=message,
        applied_at=now,
    )
    what = (
        f"{spec.decision} of step {spec.step} in run {spec.run} by {spec.approver}"
        if spec is not None
        else "the decision"
    )
    if applied:
        event = EventSpec("Normal", outcome, f"{what} applied: {message}")
    else:
        event = EventSpec("Warning", outcome, f"{what} ignored: {message}")
    return out, [event]
