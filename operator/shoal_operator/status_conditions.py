"""Status conditions (metav1.Condition), set by one helper for every kind.

Named apart from ``shoal_core.runs.when`` (a step's CEL condition): these are the
Ready/Degraded/... entries of a status. ``lastTransitionTime`` changes only when
``status`` flips, so re-computing the same state gives the same conditions and nothing
flaps; output is sorted by type. Events are derived from the same transitions.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from shoal_api.base import Condition

Status = Literal["True", "False", "Unknown"]


@dataclass(frozen=True)
class Cond:
    """A condition to set: computed by a reconciler, merged by :func:`merge_conditions`."""

    type: str
    status: Status
    reason: str
    message: str = ""


def merge_conditions(
    current: Iterable[Condition] | None,
    desired: Iterable[Cond],
    generation: int,
    now: str,
) -> tuple[Condition, ...]:
    """Current conditions updated with ``desired``; conditions not named are kept."""
    by_type = {c.type: c for c in current or ()}
    for cond in desired:
        old = by_type.get(cond.type)
        same = old is not None and old.status == cond.status
        by_type[cond.type] = Condition(
            type=cond.type,
            status=cond.status,
            reason=cond.reason,
            message=cond.message,
            observed_generation=generation,
            last_transition_time=old.last_transition_time if old is not None and same else now,
        )
    return tuple(by_type[t] for t in sorted(by_type))


def find(conditions: Iterable[Condition] | None, type_: str) -> Condition | None:
    """The condition of ``type_``, if present."""
    return next((c for c in conditions or () if c.type == type_), None)


@dataclass(frozen=True)
class EventSpec:
    """A Kubernetes Event to post about the reconciled object."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


def transition_events(old: Iterable[Condition] | None, new: Iterable[Condition]) -> list[EventSpec]:
    """Events for what changed: Ready flipping, a new Degraded reason."""
    events: list[EventSpec] = []
    before, after = find(old, "Ready"), find(new, "Ready")
    if after is not None and (before is None or before.status != after.status):
        if after.status == "True":
            events.append(EventSpec("Normal", after.reason, after.message or "Ready"))
        elif before is not None:
            # Losing Ready is news; a new object that is not Ready yet is not (the
            # Degraded rule below reports real problems).
            events.append(EventSpec("Warning", after.reason, after.message))
    d_before, d_after = find(old, "Degraded"), find(new, "Degraded")
    if (
        d_after is not None
        and d_after.status == "True"
        and (d_before is None or (d_before.status, d_before.reason) != ("True", d_after.reason))
        and not any(e.reason == d_after.reason for e in events)
    ):
        events.append(EventSpec("Warning", d_after.reason, d_after.message))
    return events
