"""The one helper that sets status conditions (metav1.Condition semantics).

``lastTransitionTime`` changes only when ``status`` flips, so re-computing the same
state writes the same bytes and nothing flaps; output is sorted by type.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

Status = Literal["True", "False", "Unknown"]


@dataclass(frozen=True)
class Cond:
    """A condition to set: computed by a reconciler, merged by :func:`merge_conditions`."""

    type: str
    status: Status
    reason: str
    message: str = ""


def merge_conditions(
    current: Iterable[Mapping[str, Any]] | None,
    desired: Iterable[Cond],
    generation: int,
    now: str,
) -> list[dict[str, Any]]:
    """Current conditions updated with ``desired``; conditions not named are kept."""
    by_type = {c["type"]: dict(c) for c in current or ()}
    for cond in desired:
        old = by_type.get(cond.type, {})
        since = old.get("lastTransitionTime", now) if old.get("status") == cond.status else now
        by_type[cond.type] = {
            "type": cond.type,
            "status": cond.status,
            "reason": cond.reason,
            "message": cond.message,
            "observedGeneration": generation,
            "lastTransitionTime": since,
        }
    return [by_type[t] for t in sorted(by_type)]


def find(conditions: Iterable[Mapping[str, Any]] | None, type_: str) -> Mapping[str, Any] | None:
    """The condition of ``type_``, if present."""
    return next((c for c in conditions or () if c.get("type") == type_), None)


@dataclass(frozen=True)
class EventSpec:
    """A Kubernetes Event to post about the reconciled object."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


def transition_events(
    old: Iterable[Mapping[str, Any]] | None, new: Iterable[Mapping[str, Any]]
) -> list[EventSpec]:
    """Events for what changed: Ready flipping, a new Degraded reason."""
    events: list[EventSpec] = []
    before, after = find(old, "Ready"), find(new, "Ready")
    if after is not None and (before is None or before.get("status") != after["status"]):
        if after["status"] == "True":
            events.append(EventSpec("Normal", after["reason"], after["message"] or "Ready"))
        elif before is not None:
            # Losing Ready is news; a new object that is not Ready yet is not (the
            # Degraded rule below reports real problems).
            events.append(EventSpec("Warning", after["reason"], after["message"]))
    d_before, d_after = find(old, "Degraded"), find(new, "Degraded")
    if (
        d_after is not None
        and d_after["status"] == "True"
        and (
            d_before is None
            or (d_before.get("status"), d_before.get("reason")) != ("True", d_after["reason"])
        )
        and not any(e.reason == d_after["reason"] for e in events)
    ):
        events.append(EventSpec("Warning", d_after["reason"], d_after["message"]))
    return events
