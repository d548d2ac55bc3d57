"""State the runtimes share through NATS KV and the operator mirrors into Agent status.

- ``shoal-circuit`` / ``<ns>.<agent>``: :class:`CircuitRecord`, written by any replica
  with compare-and-set; the operator watches the bucket and mirrors it into
  ``status.circuit`` (with an Event per transition).
- ``shoal-usage`` / ``<ns>.<agent>``: :class:`UsageRecord`, per clock hour, merged by
  each replica about once a second with compare-and-set; mirrored into ``status.usage``.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict

CircuitState = Literal["Closed", "Open", "HalfOpen"]


class StateModel(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()


class CircuitRecord(StateModel):
    state: CircuitState = "Closed"
    since: float = 0.0
    """Unix time of the last transition."""
    failure_rate_percent: float = 0.0
    """Failure rate of the window that caused the last transition."""
    reason: str = ""
    """Why the circuit moved, in words (for the Event)."""
    probes: int = 0
    """Successful probes so far while HalfOpen."""
    changed_by: str = ""
    """Pod that wrote the transition."""


class HourUsage(StateModel):
    hour: int = 0
    """Start of the clock hour (Unix time // 3600)."""
    tasks: int = 0
    tokens: int = 0
    cost: Decimal = Decimal("0")


class UsageRecord(StateModel):
    current: HourUsage = HourUsage()
    previous: HourUsage = HourUsage()

    def add(self, hour: int, tasks: int, tokens: int, cost: Decimal) -> UsageRecord:
        cur, prev = self.current, self.previous
        if cur.hour != hour:
            prev = cur if cur.hour == hour - 1 else HourUsage(hour=hour - 1)
            cur = HourUsage(hour=hour)
        return UsageRecord(
            current=HourUsage(
                hour=hour,
                tasks=cur.tasks + tasks,
                tokens=cur.tokens + tokens,
                cost=cur.cost + cost,
            ),
            previous=prev,
        )

    def this_hour(self, hour: int) -> HourUsage:
        return self.current if self.current.hour == hour else HourUsage(hour=hour)

    def last_hour(self, now: float) -> HourUsage:
        """Usage over the sliding last hour, estimated from two clock hours."""
        hour = int(now // 3600)
        cur = self.this_hour(hour)
        prev = self.previous if self.previous.hour == hour - 1 else HourUsage()
        if self.current.hour == hour - 1:
            prev = self.current
        weight = Decimal(1) - Decimal(str((now % 3600) / 3600))
        return HourUsage(
            hour=hour,
            tasks=cur.tasks + int(prev.tasks * weight),
            tokens=cur.tokens + int(prev.tokens * weight),
            cost=(cur.cost + prev.cost * weight).quantize(Decimal("0.0001")),
        )


class PodStats(StateModel):
    """A runtime pod's live figures, put into ``shoal-stats`` / ``<ns>.<agent>.<pod>``
    about once a second; the operator serves them as external metrics and keeps the
    pod's deletion cost current from ``in_flight``."""

    pod: str
    in_flight: int = 0
    p95_ms: float = 0.0
    """p95 latency of the tasks finished in the last few seconds (0 when none)."""
    completed: int = 0
    """Tasks finished since the pod started (its rate is the pod's throughput)."""
    at: float = 0.0
    """Unix time of this report."""
