"""What the operator does about a ScalingPolicy each second, and why, in words.

The HorizontalPodAutoscaler scales 1..N on the metrics; it cannot hold 0 replicas, nor
see a calendar, a forecast or a provider's quota. The operator therefore:

- sets the HPA's ``minReplicas`` to the floor: the highest of ``spec.minReplicas``, the
  schedule's floor and the predictive floor (replicas the forecast arrival rate needs);
- sets its ``maxReplicas`` to ``spec.maxReplicas``, capped by what the quota allows;
- scales the Deployment 0 -> 1 when the queue lag reaches the activation threshold or the
  floor is above 0, and 1+ -> 0 when ``spec.minReplicas`` is 0, nothing raises the floor
  and the Agent has been idle for ``cooldownSeconds``.

:func:`plan` is that decision for one observation; it reads no clock and keeps no state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime

from shoal_api.scaling import ScalingPolicySpec

MAX_DECISION = 1024
"""Length limit of ``status.lastDecision``."""

# Rates are floats: 0.3 / 0.1 must need 3 replicas, not 4.
_EPSILON = 1e-9


@dataclass(frozen=True, slots=True)
class Observation:
    """What the operator saw of the target Agent at ``now``."""

    now: float
    """Unix time."""
    replicas: int
    """The Deployment's spec.replicas now."""
    lag: int
    """Pending + in flight."""
    in_flight: int
    idle_since: float | None
    """Since when lag == 0 and in_flight == 0 (None: not idle)."""
    arrival_rate: float = 0.0
    """Tasks/s arriving now."""
    forecast_rate: float | None = None
    """Tasks/s expected ``predictive.horizonSeconds`` ahead."""
    per_replica_rate: float | None = None
    """Tasks/s one replica completes (None: unknown)."""
    tokens_per_task: float | None = None
    """Tokens one task uses on average (None: unknown)."""


@dataclass(frozen=True, slots=True)
class Plan:
    """What the operator should do now."""

    hpa_min: int
    """>= 1: the HPA's minReplicas."""
    hpa_max: int
    """>= hpa_min: the HPA's maxReplicas, quota-capped."""
    scale_to: int | None
    """1 (activate), 0 (cool down) or None (leave it to the HPA)."""
    floor: int
    """max(spec.minReplicas, schedule floor, predictive floor), capped by hpa_max."""
    decision: str
    """One sentence for status.lastDecision."""
    reasons: tuple[str, ...]
    """What raised the floor or capped the max."""


def predictive_floor(spec: ScalingPolicySpec, obs: Observation) -> int | None:
    """Replicas the forecast rate needs; None when prediction is off or a rate is unknown."""
    rate, per_replica = obs.forecast_rate, obs.per_replica_rate
    if not spec.predictive.enabled or rate is None or per_replica is None or per_replica <= 0:
        return None
    return _ceil(max(0.0, rate) / per_replica)


def quota_caps(spec: ScalingPolicySpec, obs: Observation) -> list[tuple[int, str]]:
    """Replica caps from the quota with the reason for each; a cap is never below 1 and
    an unset limit (0) or an unknown rate gives none."""
    caps: list[tuple[int, str]] = []
    per_replica, quota = obs.per_replica_rate, spec.quota
    if per_replica is None or per_replica <= 0:
        return caps
    if quota.requests_per_minute > 0:
        cap = max(1, _floor(quota.requests_per_minute / (60 * per_replica)))
        caps.append((cap, f"quota {quota.requests_per_minute} req/min caps at {cap}"))
    tokens = obs.tokens_per_task
    if quota.tokens_per_minute > 0 and tokens is not None and tokens > 0:
        cap = max(1, _floor(quota.tokens_per_minute / (60 * per_replica * tokens)))
        caps.append((cap, f"quota {quota.tokens_per_minute} tokens/min caps at {cap}"))
    return caps


def plan(
    spec: ScalingPolicySpec, obs: Observation, schedule_min: int = 0, schedule_why: str = ""
) -> Plan:
    """The HPA's bounds and the 0 <-> 1 step for ``obs``.

    ``schedule_min`` and ``schedule_why`` come from
    :func:`~shoal_core.autoscale.schedule.schedule_floor` (and
    :func:`~shoal_core.autoscale.schedule.describe_window` of its window).
    """
    reasons: list[str] = []

    floor = spec.min_replicas
    if schedule_min > floor:
        floor = schedule_min
        reasons.append(schedule_why or f"schedule minReplicas {schedule_min}")
    predicted = predictive_floor(spec, obs)
    if predicted is not None and predicted > floor:
        floor = predicted
        reasons.append(f"forecast {obs.forecast_rate:.1f} tasks/s needs {predicted}")

    hpa_max = spec.max_replicas
    for cap, why in quota_caps(spec, obs):
        if cap < spec.max_replicas:
            reasons.append(why)
            hpa_max = min(hpa_max, cap)
    hpa_max = max(1, hpa_max)
    if floor > hpa_max:
        reasons.append(f"floor {floor} capped at max {hpa_max}")
        floor = hpa_max
    hpa_min = max(1, floor)
    bounds = f"[{hpa_min}, {hpa_max}]"

    scale_to: int | None = None
    if obs.replicas <= 0:
        activation = spec.activation.queue_lag
        if obs.lag >= activation:
            scale_to = 1
            decision = f"queue lag {obs.lag} >= activation {activation} at 0 replicas; scaling to 1"
        elif floor > 0:
            scale_to = 1
            decision = f"floor {floor} at 0 replicas; scaling to 1, the HPA takes it to {hpa_min}"
        else:
            decision = (
                f"0 replicas, queue lag {obs.lag} below activation {activation}; staying at 0"
            )
    elif spec.min_replicas == 0 and floor == 0 and obs.idle_since is not None:
        idle = max(0.0, obs.now - obs.idle_since)
        if idle >= spec.cooldown_seconds:
            scale_to = 0
            decision = (
                f"idle for {idle:.0f} s >= cooldown {spec.cooldown_seconds} s"
                f" at {obs.replicas} replicas; scaling to 0"
            )
        else:
            # Absolute times, not a countdown: the sentence (and so the status) stays
            # the same from one second to the next.
            at = _clock(obs.idle_since + spec.cooldown_seconds)
            decision = (
                f"{obs.replicas} replicas, idle since {_clock(obs.idle_since)};"
                f" scaling to 0 at {at} (cooldown {spec.cooldown_seconds} s) unless work"
                f" arrives; the HPA decides within {bounds}"
            )
    else:
        decision = f"{obs.replicas} replicas, queue lag {obs.lag}; the HPA decides within {bounds}"

    if reasons and scale_to != 0:
        decision += f" ({'; '.join(reasons)})"
    return Plan(
        hpa_min=hpa_min,
        hpa_max=hpa_max,
        scale_to=scale_to,
        floor=floor,
        decision=_clip(decision),
        reasons=tuple(reasons),
    )


def _ceil(x: float) -> int:
    return math.ceil(x - _EPSILON)


def _floor(x: float) -> int:
    return math.floor(x + _EPSILON)


def _clip(text: str) -> str:
    return text if len(text) <= MAX_DECISION else text[: MAX_DECISION - 1] + "…"


def _clock(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%H:%M:%S UTC")
