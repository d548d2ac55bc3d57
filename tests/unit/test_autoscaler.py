"""The operator's autoscaling loop with fake metric sources and a fake clock: what it
scales, and when it rewrites pods' deletion costs."""

from __future__ import annotations

import asyncio
from typing import Any

from shoal_api.autoscale.policy import Plan
from shoal_api.runtime_state import PodStats
from shoal_api.scaling import ScalingPolicySpec
from shoal_operator.autoscaler import DELETION_COST, Autoscaler, PolicyView


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
