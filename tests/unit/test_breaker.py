"""The circuit breaker state machine, by example and by hypothesis' stateful testing."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from shoal_api.agent import CircuitBreaker
from shoal_api.runtime_state import CircuitRecord
from shoal_runtime.breaker import Breaker

CONFIG = CircuitBreaker(
    failure_rate_percent=50,
    minimum_requests=4,
    window_seconds=10,
    consecutive_failures=3,
    open_seconds=5,
    half_open_probes=2,
)


def test_consecutive_failures_open_then_probes_close() -> None:
    b = Breaker(CONFIG)
    for t in range(2):
        assert b.allow(t)[0] == "call"
        assert b.record(t, ok=False) is None
    tr = b.record(2.0, ok=False)
    assert tr is not None
    assert tr.state == "Open"
    assert "3 consecutive" in tr.reason
    assert b.allow(4.9) == ("reject", None)
    decision, tr = b.allow(7.0)
    assert decision == "probe"
    assert tr is not None
    assert tr.state == "HalfOpen"
    assert b.allow(7.0)[0] == "probe"
    assert b.allow(7.0)[0] == "reject"  # only two probes at a time
    assert b.record(7.5, ok=True, probe=True) is None
    tr = b.record(7.6, ok=True, probe=True)
    assert tr is not None
    assert tr.state == "Closed"


def test_failure_rate_needs_minimum_requests_within_the_window() -> None:
    b = Breaker(CONFIG)
    # Alternating outcomes never make 3 in a row; the rate reaches 50% at 4 calls.
    assert b.record(0, ok=False) is None
    assert b.record(1, ok=True) is None
    assert b.record(2, ok=False) is None
    tr = b.record(3, ok=True) or b.record(4, ok=False)
    assert tr is not None
    assert tr.state == "Open"
    assert "failure rate" in tr.reason
    # Old failures leave the window.
    b2 = Breaker(CONFIG)
    b2.record(0, ok=False)
    b2.record(1, ok=False)
    assert b2.record(20, ok=True) is None
    assert b2.record(21, ok=False) is None
    assert b2.failure_rate(21) == (2, 50.0)


def test_a_failed_probe_reopens() -> None:
    b = Breaker(CONFIG)
    for t in range(3):
        b.record(t, ok=False)
    assert b.allow(10)[0] == "probe"
    tr = b.record(10, ok=False, probe=True)
    assert tr is not None
    assert tr.state == "Open"
    assert b.since == 10


def test_adopting_shared_state_ignores_older_news() -> None:
    b = Breaker(CONFIG)
    assert b.adopt(CircuitRecord(state="Open", since=100.0))
    assert b.allow(101)[0] == "reject"
    assert not b.adopt(CircuitRecord(state="Closed", since=50.0))
    assert b.state == "Open"
    assert not b.adopt(CircuitRecord(state="Open", since=100.0))
    assert b.adopt(CircuitRecord(state="Closed", since=200.0))
    assert b.allow(201)[0] == "call"


class BreakerMachine(RuleBasedStateMachine):
    """Random interleavings of time, admissions and outcomes against a simple model."""

    def __init__(self) -> None:
        super().__init__()
        self.b = Breaker(CONFIG)
        self.now = 1000.0
        self.probes: int = 0
        self.streak = 0

    @rule(dt=st.floats(0, 3))
    def tick(self, dt: float) -> None:
        self.now += dt

    @rule(ok=st.booleans())
    def call(self, ok: bool) -> None:
        before, since = self.b.state, self.b.since
        decision, _ = self.b.allow(self.now)
        if before == "Open" and self.now < since + CONFIG.open_seconds:
            assert decision == "reject"
        if decision == "probe":
            self.probes += 1
        if decision == "call":
            assert self.b.state == "Closed"
            self.streak = 0 if ok else self.streak + 1
            tr = self.b.record(self.now, ok)
            if not ok and self.streak >= CONFIG.consecutive_failures:
                assert tr is not None
                assert tr.state == "Open"
            if ok:
                assert tr is None
            if tr is not None:
                self.streak = 0

    @precondition(lambda self: self.probes > 0)
    @rule(ok=st.booleans())
    def finish_probe(self, ok: bool) -> None:
        self.probes -= 1
        state = self.b.state
        tr = self.b.record(self.now, ok, probe=True)
        if state == "HalfOpen" and not ok:
            assert tr is not None
            assert tr.state == "Open"
        self.streak = 0
        if state != "HalfOpen":  # the probe outlived its HalfOpen period
            self.probes = 0

    @invariant()
    def probes_are_bounded(self) -> None:
        assert self.b.probes_in_flight <= CONFIG.half_open_probes
        assert self.b.probes_ok < CONFIG.half_open_probes or self.b.state != "HalfOpen"

    @invariant()
    def state_is_known(self) -> None:
        assert self.b.state in ("Closed", "Open", "HalfOpen")


BreakerMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)
test_breaker_state_machine = BreakerMachine.TestCase
