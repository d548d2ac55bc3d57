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
