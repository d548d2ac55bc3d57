"""The operator's autoscaling loop with fake metric sources and a fake clock: what it
scales, and when it rewrites pods' deletion costs."""

from __future__ import annotations

import asyncio
from typing import Any

from shoal_api.runtime_state import PodStats
from shoal_api.scaling import ScalingPolicySpec
from shoal_core.autoscale.policy import Plan
from shoal_operator.scaling.autoscaler import DELETION_COST, Autoscaler, PolicyView


class FakeMetrics:
    def __init__(self) -> None:
        self.pending = 0
        self.in_flight = 0
        self.stats: list[PodStats] = []

    async def lag(self, namespace: str, agent: str) -> tuple[int, int]:
        return self.pending, self.in_flight

    async def arrival_rate(self, namespace: str, agent: str) -> float:
        return 0.0

    async def pod_stats(self, namespace: str, agent: str) -> list[PodStats]:
        return self.stats


class Harness:
    def __init__(self) -> None:
        self.now = 1_000_000.0
        self.metrics = FakeMetrics()
        self.scaled: list[int] = []
        self.annotated: list[tuple[str, str]] = []
        self.plans: list[Plan] = []
        self.auto = Autoscaler(
            self.metrics, self._scale, self._annotate, self._on_plan, None, lambda: self.now
        )

    async def _scale(self, ns: str, name: str, replicas: int) -> None:
        self.scaled.append(replicas)

    async def _annotate(self, ns: str, pod: str, annotations: dict[str, str]) -> None:
        self.annotated.append((pod, annotations[DELETION_COST]))

    def _on_plan(self, view: PolicyView, new: Plan, old: Plan | None) -> None:
        self.plans.append(new)

    def tick(self, replicas: int, **spec: Any) -> Plan | None:
        parsed = ScalingPolicySpec.model_validate(
            {"targetRef": {"name": "a"}, "maxReplicas": 5, "minReplicas": 0, **spec}
        )
        return asyncio.run(self.auto.tick(PolicyView("ns", "p", parsed, replicas)))


def test_activation_then_cooldown_to_zero() -> None:
    h = Harness()
    h.metrics.pending = 3
    plan = h.tick(0, cooldownSeconds=30)
    assert plan is not None
    assert plan.scale_to == 1
    assert h.scaled == [1]
    assert "scaling to 1" in plan.decision
    h.metrics.pending = 0
    h.tick(1, cooldownSeconds=30)  # idle from now
    h.now += 29
    h.tick(1, cooldownSeconds=30)
    assert h.scaled == [1]
    h.now += 1
    plan = h.tick(1, cooldownSeconds=30)
    assert plan is not None
    assert plan.scale_to == 0
    assert h.scaled == [1, 0]


def test_deletion_costs_follow_in_flight_at_a_bounded_rate() -> None:
    h = Harness()
    h.metrics.pending = 1
    h.metrics.stats = [PodStats(pod="a-1", in_flight=2, at=h.now), PodStats(pod="a-2", at=h.now)]
    h.tick(2)
    assert sorted(h.annotated) == [("a-1", "2"), ("a-2", "0")]
    h.annotated.clear()
    # Busy -> busier within the refresh period: not rewritten yet.
    h.metrics.stats = [PodStats(pod="a-1", in_flight=3, at=h.now), PodStats(pod="a-2", at=h.now)]
    h.now += 1
    h.tick(2)
    assert h.annotated == []
    # Idle -> busy is what orders scale-in: rewritten at once.
    h.metrics.stats = [PodStats(pod="a-1", in_flight=3, at=h.now), PodStats(pod="a-2", in_flight=1)]
    h.now += 1
    h.tick(2)
    assert h.annotated == [("a-2", "1")]
    h.now += 5
    h.tick(2)
    assert ("a-1", "3") in h.annotated


def test_no_deployment_means_no_decision() -> None:
    h = Harness()
    spec = ScalingPolicySpec.model_validate({"targetRef": {"name": "a"}, "maxReplicas": 5})
    assert asyncio.run(h.auto.tick(PolicyView("ns", "p", spec, None))) is None
    assert h.scaled == []


def test_a_forecast_of_the_daily_burst_raises_the_floor_before_it_comes() -> None:
    from shoal_operator.scaling.autoscaler import _Track

    h = Harness()
    day = [60.0] * 1440
    for minute in range(600, 660):
        day[minute] = 600.0  # every day at 10:00, ten times the usual load
    minute = 2 * 1440 + 594  # day 3, 09:54 (fake time); history runs up to it
    h.now = minute * 60 + 30.0
    h.auto._tracks[("ns", "p")] = _Track(
        history=(day * 3)[:minute], minute=minute, per_replica_rate=2.0
    )
    spec = {"predictive": {"enabled": True, "horizonSeconds": 600}, "maxReplicas": 8}
    h.tick(1, **spec)  # learns the minute
    h.now += 60  # the next minute: refit, forecast
    plan = h.tick(1, **spec)
    assert plan is not None
    # 600 arrivals/min = 10 tasks/s at 2 tasks/s per replica: 5 replicas, before 10:00.
    assert plan.floor == 5
    assert plan.hpa_min == 5
    assert any("forecast" in r for r in plan.reasons)
    # Without prediction the same observation keeps the floor at the minimum.
    h2 = Harness()
    h2.now = h.now
    h2.auto._tracks[("ns", "p")] = _Track(
        history=(day * 3)[:minute], minute=minute, per_replica_rate=2.0
    )
    plan = h2.tick(1, maxReplicas=8)
    assert plan is not None
    assert plan.floor == 0
