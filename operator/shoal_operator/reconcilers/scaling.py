"""ScalingPolicy: an HPA on the target Agent's Deployment; status mirrors the HPA."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shoal_api.scaling import ScalingPolicySpec, ScalingPolicyStatus
from shoal_core.autoscale.policy import Plan
from shoal_core.autoscale.schedule import validate_window
from shoal_operator.builders import hpa as hpa_builder
from shoal_operator.builders.apiservice import MetricsProvider
from shoal_operator.builders.common import Owner
from shoal_operator.reconcilers.common import Problem
from shoal_operator.status_conditions import Cond, EventSpec, merge_conditions, transition_events


@dataclass(frozen=True)
class PolicyObserved:
    agents: frozenset[str]
    """Names of the Agents in the namespace."""
    winner: str
    """The policy that scales the target when several name it (first by name)."""
    hpa: Mapping[str, Any] | None
    deployment: Mapping[str, Any] | None = None
    """The target Agent's Deployment: its replicas are the current ones."""
    metrics: MetricsProvider | None = None
    """Who serves external.metrics.k8s.io; None: not known (the metrics API is off)."""
    autoscale: Plan | None = None
    """The operator's latest autoscaling decision (None before the first one)."""


@dataclass(frozen=True)
class PolicyPlan:
    hpa: dict[str, Any] | None
    """None: the HPA must not exist (target missing or claimed by another policy)."""
    problems: list[Problem]


def plan(owner: Owner, spec: ScalingPolicySpec, observed: PolicyObserved) -> PolicyPlan:
    target = spec.target_ref.name
    if target not in observed.agents:
        return PolicyPlan(
            None,
            [
                Problem(
                    "TargetNotFound",
                    f"target Agent {target} does not exist in namespace {owner.namespace}",
                )
            ],
        )
    if observed.winner != owner.name:
        return PolicyPlan(
            None,
            [
                Problem(
                    "TargetConflict",
                    f"Agent {target} is already scaled by ScalingPolicy {observed.winner}",
                )
            ],
        )
    bounds = None
    if observed.autoscale is not None:
        bounds = (observed.autoscale.hpa_min, observed.autoscale.hpa_max)
    # The HPA still works without a window the operator cannot read; the policy says so.
    problems = [
        Problem("InvalidSchedule", f"spec.schedule[{i}]: {message}")
        for i, w in enumerate(spec.schedule)
        if (message := validate_window(w)) is not None
    ]
    return PolicyPlan(hpa_builder.hpa(owner, spec, bounds), problems)


def status(
    generation: int,
    owner: Owner,
    observed: PolicyObserved,
    plan_: PolicyPlan,
    extra_problems: list[Problem],
    current: ScalingPolicyStatus,
    now: str,
) -> tuple[ScalingPolicyStatus, list[EventSpec]]:
    problems = plan_.problems + extra_problems
    hpa_status = (observed.hpa or {}).get("status", {})
    dep = observed.deployment or {}
    current_replicas = int(dep.get("status", {}).get("replicas", 0))
    desired = hpa_status.get("desiredReplicas", dep.get("spec", {}).get("replicas", 0))
    conds: list[Cond] = []
    if problems:
        message = "; ".join(p.message for p in problems)
        conds += [
            Cond("Ready", "False", problems[0].reason, message),
            Cond("Degraded", "True", problems[0].reason, message),
        ]
    elif observed.hpa is None:
        conds += [
            Cond("Ready", "False", "Creating", "HorizontalPodAutoscaler not observed yet"),
            Cond("Degraded", "False", "AsExpected", ""),
        ]
    else:
        conds += [
            Cond(
                "Ready",
                "True",
                "HPAReady",
                f"HorizontalPodAutoscaler {owner.name} scales the target",
            ),
            Cond("Degraded", "False", "AsExpected", ""),
        ]
    conds.append(
        Cond("Active", "True", "Scaled", f"{current_replicas} replicas")
        if current_replicas > 0
        else Cond("Active", "False", "NoReplicas", "0 replicas")
    )
    if observed.metrics is not None:
        m = observed.metrics
        conds.append(Cond("MetricsAvailable", m.status, m.reason, m.message))
    conditions = merge_conditions(current.conditions, conds, generation, now)
    new = ScalingPolicyStatus(
        observed_generation=generation,
        conditions=conditions,
        current_replicas=current_replicas,
        desired_replicas=int(desired),
        hpa_name=owner.name if plan_.hpa is not None else "",
        # Not known (no HPA status yet): left out, so the status keeps what it shows.
        last_scale_time=hpa_status.get("lastScaleTime") or None,
        last_decision=(
            observed.autoscale.decision if observed.autoscale is not None else current.last_decision
        ),
    )
    return new, transition_events(current.conditions, conditions)
