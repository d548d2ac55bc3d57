"""The circuit breaker as a pure state machine: outcomes and the clock in, decisions out.

No I/O here: :mod:`shoal_runtime.shared` publishes transitions to NATS KV (so all
replicas follow one state) and feeds other replicas' transitions back through
:meth:`Breaker.adopt`. Failure statistics are per replica (a sliding window of
one-second buckets); the state is shared. Counting every outcome of every replica in
KV would put a compare-and-set on the hot path of each task.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal

from shoal_api.agent import CircuitBreaker
from shoal_api.runtime_state import CircuitRecord, CircuitState

Decision = Literal["call", "probe", "reject"]


@dataclass(frozen=True)
class Transition:
    state: CircuitState
    since: float
    failure_rate_percent: float
    reason: str
    probes: int = 0

    def record(self, changed_by: str) -> CircuitRecord:
        return CircuitRecord(
            state=self.state,
            since=self.since,
            failure_rate_percent=self.failure_rate_percent,
            reason=self.reason,
            probes=self.probes,
            changed_by=changed_by,
        )


class Breaker:
    def __init__(self, config: CircuitBreaker) -> None:
        self.config = config
        self.state: CircuitState = "Closed"
        self.since = 0.0
        self.consecutive = 0
        self.probes_ok = 0
        self.probes_in_flight = 0
        # [second, calls, failures], oldest first.
        self._window: deque[list[int]] = deque()

    def failure_rate(self, now: float) -> tuple[int, float]:
        """(calls, failure rate in percent) over the window ending now."""
        self._trim(now)
        calls = sum(b[1] for b in self._window)
        failures = sum(b[2] for b in self._window)
        return calls, (100.0 * failures / calls if calls else 0.0)

    def allow(self, now: float) -> tuple[Decision, Transition | None]:
        """May a call start now? Open turns HalfOpen once ``openSeconds`` have passed."""
        transition = None
        if self.state == "Open":
            if now < self.since + self.config.open_seconds:
                return "reject", None
            transition = self._move("HalfOpen", now, "open period over; probing")
        if self.state == "HalfOpen":
            if self.probes_ok + self.probes_in_flight >= self.config.half_open_probes:
                return "reject", transition
            self.probes_in_flight += 1
            return "probe", transition
        return "call", transition

    def release_probe(self) -> None:
        """A probe admitted by :meth:`allow` ended without an outcome (handed back)."""
        self.probes_in_flight = max(0, self.probes_in_flight - 1)

    def reopen_at(self) -> float | None:
        """When an Open circuit starts probing (None unless Open)."""
        return self.since + self.config.open_seconds if self.state == "Open" else None

    def record(self, now: float, ok: bool, probe: bool = False) -> Transition | None:
        """Counts one outcome; returns the transition it caused, if any."""
        if probe:
            self.probes_in_flight = max(0, self.probes_in_flight - 1)
        self._count(now, ok)
        self.consecutive = 0 if ok else self.consecutive + 1
        if self.state == "HalfOpen":
            if not probe:
                return None
            if not ok:
                return self._move("Open", now, "a half-open probe failed")
            self.probes_ok += 1
            if self.probes_ok >= self.config.half_open_probes:
                return self._move("Closed", now, f"{self.probes_ok} probes succeeded")
            return None
        if self.state != "Closed" or ok:
            return None
        if self.consecutive >= self.config.consecutive_failures:
            return self._move("Open", now, f"{self.consecutive} consecutive failures")
        calls, rate = self.failure_rate(now)
        if calls >= self.config.minimum_requests and rate >= self.config.failure_rate_percent:
            return self._move(
                "Open",
                now,
                f"failure rate {rate:.0f}% >= {self.config.failure_rate_percent}% "
                f"over {calls} calls in {self.config.window_seconds}s",
            )
        return None

    def adopt(self, record: CircuitRecord) -> bool:
        """Follows another replica's transition; True when the state changed here."""
        if record.state == self.state and record.since == self.since:
            return False
        if record.since < self.since:
            return False  # older news than what this replica already knows
        self.state = record.state
        self.since = record.since
        self.probes_ok = record.probes if record.state == "HalfOpen" else 0
        self.probes_in_flight = 0
        self.consecutive = 0
        if record.state == "Closed":
            self._window.clear()
        return True

    def _move(self, state: CircuitState, now: float, reason: str) -> Transition:
        _, rate = self.failure_rate(now)
        self.state = state
        self.since = now
        self.probes_ok = 0
        self.probes_in_flight = 0
        self.consecutive = 0
        if state == "Closed":
            self._window.clear()
        return Transition(state, now, round(rate, 2), reason)

    def _count(self, now: float, ok: bool) -> None:
        second = int(now)
        if self._window and self._window[-1][0] == second:
            bucket = self._window[-1]
        else:
            bucket = [second, 0, 0]
            self._window.append(bucket)
        bucket[1] += 1
        if not ok:
            bucket[2] += 1

    def _trim(self, now: float) -> None:
        oldest = int(now) - self.config.window_seconds + 1
        while self._window and self._window[0][0] < oldest:
            self._window.popleft()
