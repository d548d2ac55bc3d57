"""A model of the Kubernetes HorizontalPodAutoscaler controller, for ``shoal simulate``.

It follows kube-controller-manager's ``pkg/controller/podautoscaler`` (Kubernetes 1.33+):

- ``replica_calculator.go``: per metric, a proposal from the usage ratio, skipped while
  the ratio is within the tolerance (0.1, or ``behavior.scaleUp/scaleDown.tolerance``):
  QueueLag is an External metric with an ``AverageValue`` target
  (``GetExternalPerPodMetricReplicas``: ``ceil(lag / target)`` against
  ``status.replicas``), Latency an External metric with a ``Value`` target
  (``GetExternalMetricReplicas``: ``ceil(latency / target * readyPods)``), CPU a
  Resource metric with a ``Utilization`` target (``GetResourceReplicas``: integer
  utilisation of the ready pods; on a scale-up, pods not yet ready count as 0 % and a
  proposal that would change direction keeps the current count).
- ``horizontal.go``, ``computeReplicasForMetrics``: the largest proposal wins.
  ``reconcileAutoscaler``: at 0 replicas (with minReplicas > 0) the HPA does nothing;
  outside [min, max] it goes straight to the bound, without behavior or stabilisation.
- Without ``spec.behavior`` (the operator leaves it out when the policy's is empty):
  ``normalizeDesiredReplicas``: the largest recommendation of the last 300 s
  (``--horizontal-pod-autoscaler-downscale-stabilization``), then
  ``convertDesiredReplicasWithRules``: at most ``max(2 x current, 4)`` per sync.
- With it, defaulted as the API server does (``pkg/apis/autoscaling/v2/defaults.go``:
  scaleUp stabilisation 0 s, Pods 4 and Percent 100 per 15 s, selectPolicy Max;
  scaleDown stabilisation 300 s, Percent 100 per 15 s; a rule's ``policies`` replace
  the default list): ``normalizeDesiredReplicasWithBehaviors``:
  ``stabilizeRecommendationWithBehaviors`` (the current count, raised to the smallest
  recommendation of the scale-up window, lowered to the largest of the scale-down
  window), then ``convertDesiredReplicasWithBehaviorRate`` with
  ``calculateScaleUpLimitWithScalingRules`` / ``calculateScaleDownLimitWithBehaviors``
  (each policy's limit from the replicas at the start of its period, counting the HPA's
  own scale events; Max picks the largest change, Min the smallest, Disabled none).

Not modelled: metric collection delays, pods missing metrics, the CPU initialisation
period's finer rules, and milli-value rounding of external metrics.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeGuard

from shoal_api.scaling import Metric

SYNC_PERIOD_SECONDS = 15
"""``--horizontal-pod-autoscaler-sync-period``."""
TOLERANCE = 0.1
"""``--horizontal-pod-autoscaler-tolerance``."""
DOWNSCALE_STABILIZATION_SECONDS = 300
"""``--horizontal-pod-autoscaler-downscale-stabilization``."""
SCALE_UP_LIMIT_FACTOR = 2
SCALE_UP_LIMIT_MINIMUM = 4

SelectPolicy = Literal["Max", "Min", "Disabled"]


@dataclass(frozen=True, slots=True)
class HpaPolicy:
    """One ``HPAScalingPolicy``: at most ``value`` pods or percent per ``period_seconds``."""

    type: Literal["Pods", "Percent"]
    value: int
    period_seconds: int


@dataclass(frozen=True, slots=True)
class ScalingRules:
    """One direction of ``HorizontalPodAutoscalerBehavior``, defaults applied."""

    stabilization_window_seconds: int
    select_policy: SelectPolicy
    policies: tuple[HpaPolicy, ...]
    tolerance: float | None = None
    """None: the controller's ``--horizontal-pod-autoscaler-tolerance``."""


@dataclass(frozen=True, slots=True)
class Behavior:
    scale_up: ScalingRules
    scale_down: ScalingRules


DEFAULT_SCALE_UP = ScalingRules(
    stabilization_window_seconds=0,
    select_policy="Max",
    policies=(HpaPolicy("Pods", 4, 15), HpaPolicy("Percent", 100, 15)),
)
DEFAULT_SCALE_DOWN = ScalingRules(
    stabilization_window_seconds=DOWNSCALE_STABILIZATION_SECONDS,
    select_policy="Max",
    policies=(HpaPolicy("Percent", 100, 15),),
)


def parse_behavior(raw: Mapping[str, Any] | None) -> Behavior | None:
    """``spec.behavior`` with the API server's defaults; None when absent or empty (the
    operator then leaves it out of the HPA and the controller's legacy rules apply).

    Raises ValueError naming the field for what the API server would reject.
    """
    if not raw:
        return None
    unknown = set(raw) - {"scaleUp", "scaleDown"}
    if unknown:
        raise ValueError(f"behavior: unknown field(s) {', '.join(sorted(unknown))}")
    return Behavior(
        scale_up=_rules(raw.get("scaleUp"), DEFAULT_SCALE_UP, "behavior.scaleUp"),
        scale_down=_rules(raw.get("scaleDown"), DEFAULT_SCALE_DOWN, "behavior.scaleDown"),
    )


def _rules(raw: Any, default: ScalingRules, where: str) -> ScalingRules:
    if raw is None:
        return default
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where} must be an object")
    unknown = set(raw) - {"stabilizationWindowSeconds", "selectPolicy", "policies", "tolerance"}
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    window = raw.get("stabilizationWindowSeconds")
    if window is None:
        window = default.stabilization_window_seconds
    elif not _is_int(window) or not 0 <= window <= 3600:
        raise ValueError(f"{where}.stabilizationWindowSeconds must be an integer in 0..3600")
    select = raw.get("selectPolicy", default.select_policy)
    if select not in ("Max", "Min", "Disabled"):
        raise ValueError(f"{where}.selectPolicy must be Max, Min or Disabled")
    policies = default.policies
    if raw.get("policies") is not None:
        items = raw["policies"]
        if not isinstance(items, Sequence) or isinstance(items, str):
            raise ValueError(f"{where}.policies must be a list")
        policies = tuple(_policy(p, f"{where}.policies[{i}]") for i, p in enumerate(items))
        if not policies and select != "Disabled":
            raise ValueError(f"{where}.policies must not be empty unless selectPolicy is Disabled")
    tolerance = None if raw.get("tolerance") is None else _quantity(raw["tolerance"], where)
    return ScalingRules(int(window), select, policies, tolerance)


def _policy(raw: Any, where: str) -> HpaPolicy:
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where} must be an object")
    kind, value, period = raw.get("type"), raw.get("value"), raw.get("periodSeconds")
    if kind not in ("Pods", "Percent"):
        raise ValueError(f"{where}.type must be Pods or Percent")
    if not _is_int(value) or value < 1:
        raise ValueError(f"{where}.value must be an integer >= 1")
    if not _is_int(period) or not 1 <= period <= 1800:
        raise ValueError(f"{where}.periodSeconds must be an integer in 1..1800")
    return HpaPolicy(kind, int(value), int(period))


def _quantity(raw: Any, where: str) -> float:
    """A resource.Quantity such as ``0.05`` or ``50m``."""
    text = str(raw).strip()
    try:
        value = float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        raise ValueError(
            f"{where}.tolerance {raw!r} is not a quantity (e.g. 0.05 or 50m)"
        ) from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}.tolerance must be >= 0")
    return value


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class Readings:
    """The metric values the HPA would read at one sync."""

    queue_lag: float
    """``shoal_queue_lag`` of the Agent (pending + in flight)."""
    latency_ms: float | None = None
    """``shoal_latency_p95_ms``; None: no value (the metric is skipped)."""
    cpu_utilization: float | None = None
    """Average CPU use of the ready pods, percent of their request; None: no value."""


@dataclass(frozen=True, slots=True)
class HpaResult:
    replicas: int
    """What the HPA leaves in the Deployment's spec.replicas (the current count when it
    does not rescale)."""
    proposal: int
    """The metrics' proposal before stabilisation and rate limits (0: none)."""
    reason: str
    """Why, in words."""


@dataclass(slots=True)
class _Recommendation:
    at: float
    replicas: int


@dataclass(slots=True)
class _ScaleEvent:
    at: float
    change: int


class HpaModel:
    """One HPA's controller state (recommendations and scale events) across syncs.

    Call :meth:`reconcile` every :data:`SYNC_PERIOD_SECONDS` with the Deployment's state
    and the metric readings; it returns what the controller writes to spec.replicas.
    """

    def __init__(
        self,
        metrics: Sequence[Metric],
        behavior: Mapping[str, Any] | None = None,
        *,
        tolerance: float = TOLERANCE,
        downscale_stabilization_seconds: int = DOWNSCALE_STABILIZATION_SECONDS,
    ) -> None:
        if not metrics:
            raise ValueError("an HPA needs at least one metric")
        self.metrics = tuple(metrics)
        self.behavior = parse_behavior(behavior)
        self.tolerance = tolerance
        self.downscale_stabilization_seconds = downscale_stabilization_seconds
        self._recommendations: deque[_Recommendation] = deque()
        self._ups: deque[_ScaleEvent] = deque()
        self._downs: deque[_ScaleEvent] = deque()
        b = self.behavior
        self._event_horizon = (
            0
            if b is None
            else max(
                (p.period_seconds for p in b.scale_up.policies + b.scale_down.policies), default=0
            )
        )

    def reconcile(
        self,
        now: float,
        *,
        spec_replicas: int,
        min_replicas: int,
        max_replicas: int,
        readings: Readings,
        status_replicas: int | None = None,
        ready_replicas: int | None = None,
    ) -> HpaResult:
        """One sync at ``now`` (seconds). ``status_replicas`` (pods that exist) and
        ``ready_replicas`` default to ``spec_replicas``."""
        current = spec_replicas
        status = current if status_replicas is None else status_replicas
        ready = status if ready_replicas is None else ready_replicas
        if current == 0 and min_replicas != 0:
            return HpaResult(
                0, 0, "scaling is disabled since the replica count of the target is zero"
            )
        if current > max_replicas:
            desired, proposal, reason = (
                max_replicas,
                0,
                f"{current} replicas above max {max_replicas}",
            )
        elif current < min_replicas:
            desired, proposal, reason = (
                min_replicas,
                0,
                f"{current} replicas below min {min_replicas}",
            )
        else:
            proposal, why = self._proposal(current, status, ready, readings)
            if proposal == 0 and not why:
                return HpaResult(current, 0, "no metric could be computed; not scaling")
            if self.behavior is None:
                desired = self._normalize_legacy(now, current, proposal, min_replicas, max_replicas)
            else:
                desired = self._normalize_with_behavior(
                    now, self.behavior, current, proposal, min_replicas, max_replicas
                )
            reason = why
            if desired != proposal:
                limit = self._limit_name(proposal, desired, min_replicas, max_replicas)
                reason += f"; limited to {desired} by {limit}"
        if desired != current:
            self._store_event(now, current, desired)
        return HpaResult(desired, proposal, reason)

    # --- metrics (replica_calculator.go) ---

    def _tolerances(self) -> tuple[float, float]:
        """(scale-down, scale-up) tolerance."""
        b = self.behavior
        if b is None:
            return self.tolerance, self.tolerance
        down = self.tolerance if b.scale_down.tolerance is None else b.scale_down.tolerance
        up = self.tolerance if b.scale_up.tolerance is None else b.scale_up.tolerance
        return down, up

    def _within(self, ratio: float) -> bool:
        down, up = self._tolerances()
        return 1.0 - down <= ratio <= 1.0 + up

    def _proposal(self, current: int, status: int, ready: int, r: Readings) -> tuple[int, str]:
        best, why = 0, ""
        for metric in self.metrics:
            got = self._metric_proposal(metric, current, status, ready, r)
            if got is not None and (not why or got[0] > best):
                best, why = got
        return best, why

    def _metric_proposal(
        self, metric: Metric, current: int, status: int, ready: int, r: Readings
    ) -> tuple[int, str] | None:
        if metric.type == "QueueLag":
            target = float(metric.target or 1)
            lag = max(0.0, r.queue_lag)
            replicas = status
            # With no pods yet Go divides by zero into +Inf or NaN, outside any tolerance.
            if status <= 0 or not self._within(lag / (target * status)):
                replicas = math.ceil(lag / target)
            return replicas, f"queue lag {lag:.0f} / target {target:.0f} per replica -> {replicas}"
        if metric.type == "Latency":
            # getReadyPodsCount fails without pods; with pods but none ready it counts 0.
            if r.latency_ms is None or status <= 0:
                return None
            target = float(metric.target_millis or 1)
            ratio = max(0.0, r.latency_ms) / target
            replicas = current if self._within(ratio) else math.ceil(ratio * ready)
            return (
                replicas,
                f"p95 latency {r.latency_ms:.0f} ms / target {target:.0f} ms -> {replicas}",
            )
        return self._cpu_proposal(metric, current, status, ready, r)

    def _cpu_proposal(
        self, metric: Metric, current: int, status: int, ready: int, r: Readings
    ) -> tuple[int, str] | None:
        if r.cpu_utilization is None or ready <= 0:
            return None
        target = metric.target_utilization_percent or 1
        # metrics.GetResourceUtilizationRatio divides integers: 69.9 % is 69 %.
        utilization = int(max(0.0, r.cpu_utilization))
        ratio = utilization / target
        unready = max(0, status - ready)
        label = f"CPU {utilization}% / target {target}%"
        if not (unready > 0 and ratio > 1.0):
            replicas = current if self._within(ratio) else math.ceil(ratio * ready)
            return replicas, f"{label} -> {replicas}"
        # Scaling up while pods start: they count as using nothing, which may cancel it.
        new_ratio = (utilization * ready // (ready + unready)) / target
        if self._within(new_ratio) or new_ratio < 1.0:
            return current, f"{label} -> {current} (pods still starting)"
        replicas = math.ceil(new_ratio * (ready + unready))
        if replicas < current:
            return current, f"{label} -> {current} (pods still starting)"
        return replicas, f"{label} -> {replicas}"

    # --- without behavior (horizontal.go: normalizeDesiredReplicas) ---

    def _normalize_legacy(
        self, now: float, current: int, proposal: int, min_replicas: int, max_replicas: int
    ) -> int:
        cutoff = now - self.downscale_stabilization_seconds
        recs = self._recommendations
        while recs and recs[0].at < cutoff:
            recs.popleft()
        stabilized = max([proposal, *(rec.replicas for rec in recs)])
        recs.append(_Recommendation(now, proposal))
        scale_up_limit = max(SCALE_UP_LIMIT_FACTOR * current, SCALE_UP_LIMIT_MINIMUM)
        maximum = min(max_replicas, scale_up_limit)
        return max(min_replicas, min(stabilized, maximum))

    # --- with behavior (horizontal.go: normalizeDesiredReplicasWithBehaviors) ---

    def _normalize_with_behavior(
        self,
        now: float,
        b: Behavior,
        current: int,
        proposal: int,
        min_replicas: int,
        max_replicas: int,
    ) -> int:
        up_cutoff = now - b.scale_up.stabilization_window_seconds
        down_cutoff = now - b.scale_down.stabilization_window_seconds
        up_rec = down_rec = proposal
        recs = self._recommendations
        oldest = min(up_cutoff, down_cutoff)
        while recs and recs[0].at < oldest:
            recs.popleft()
        for rec in recs:
            # Go's time.After: a sample exactly at the cutoff is out of the window.
            if rec.at > up_cutoff:
                up_rec = min(up_rec, rec.replicas)
            if rec.at > down_cutoff:
                down_rec = max(down_rec, rec.replicas)
        recs.append(_Recommendation(now, proposal))
        stabilized = min(max(current, up_rec), down_rec)

        if stabilized > current:
            limit = max(current, self._scale_up_limit(now, current, b.scale_up))
            return min(stabilized, max_replicas, limit)
        if stabilized < current:
            limit = min(current, self._scale_down_limit(now, current, b.scale_down))
            return max(stabilized, min_replicas, limit)
        return stabilized

    def _period_start(self, now: float, current: int, period: int) -> int:
        cutoff = now - period
        added = sum(e.change for e in self._ups if e.at > cutoff)
        deleted = sum(e.change for e in self._downs if e.at > cutoff)
        return current - added + deleted

    def _scale_up_limit(self, now: float, current: int, rules: ScalingRules) -> int:
        if rules.select_policy == "Disabled":
            return current
        proposals = []
        for p in rules.policies:
            start = self._period_start(now, current, p.period_seconds)
            if p.type == "Pods":
                proposals.append(start + p.value)
            else:
                proposals.append(math.ceil(start * (1 + p.value / 100)))
        return min(proposals) if rules.select_policy == "Min" else max(proposals)

    def _scale_down_limit(self, now: float, current: int, rules: ScalingRules) -> int:
        if rules.select_policy == "Disabled":
            return current
        proposals = []
        for p in rules.policies:
            start = self._period_start(now, current, p.period_seconds)
            if p.type == "Pods":
                proposals.append(start - p.value)
            else:
                proposals.append(int(start * (1 - p.value / 100)))
        # The smallest change of a scale-down is the largest count, hence the swap.
        return max(proposals) if rules.select_policy == "Min" else min(proposals)

    def _store_event(self, now: float, before: int, after: int) -> None:
        if self.behavior is None:
            return
        events = self._ups if after > before else self._downs
        cutoff = now - self._event_horizon
        while events and events[0].at <= cutoff:
            events.popleft()
        events.append(_ScaleEvent(now, abs(after - before)))

    def _limit_name(self, proposal: int, desired: int, min_replicas: int, max_replicas: int) -> str:
        if desired == max_replicas and proposal > max_replicas:
            return f"max {max_replicas}"
        if desired == min_replicas and proposal < min_replicas:
            return f"min {min_replicas}"
        if self.behavior is None:
            if desired > proposal:
                return (
                    f"the {self.downscale_stabilization_seconds} s scale-down stabilisation window"
                )
            return "the scale-up limit (2x or 4 pods per sync)"
        rules = self.behavior.scale_up if proposal > desired else self.behavior.scale_down
        if rules.select_policy == "Disabled":
            return "selectPolicy Disabled"
        return "the stabilisation window or the rate policies"
