"""Agent: a Deployment, a ServiceAccount and a JetStream consumer; status from them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shoal_api.agent import AgentSpec
from shoal_operator.builders import deployment as dep
from shoal_operator.builders import jetstream
from shoal_operator.builders.common import Owner
from shoal_operator.conditions import Cond, EventSpec, merge_conditions, transition_events
from shoal_operator.reconcilers.common import Problem, owned_by_manager, rollout


@dataclass(frozen=True)
class AgentObserved:
    """What the reconcile needs to know besides the Agent itself."""

    deployment: Mapping[str, Any] | None
    agents: frozenset[str]
    """Names of the Agents in the namespace (for fallback / escalation)."""
    scaled_by: str | None = None
    """The ScalingPolicy that scales this Agent, if any: it then owns the replicas."""
    max_replicas: int = 1


@dataclass(frozen=True)
class AgentPlan:
    apply: list[dict[str, Any]]
    consumer: dict[str, Any]
    handover: dict[str, Any] | None = None
    """Applied under a separate manager first, so dropping replicas keeps the value."""
    delete: list[tuple[str, str]] = field(default_factory=list)


def references(namespace: str, spec: AgentSpec, agents: frozenset[str]) -> list[Problem]:
    out = []
    if spec.fallback is not None and spec.fallback.agent not in agents:
        out.append(
            Problem(
                "FallbackNotFound",
                f"fallback Agent {spec.fallback.agent} does not exist in namespace {namespace}",
            )
        )
    if spec.escalation is not None and spec.escalation.agent not in agents:
        out.append(
            Problem(
                "EscalationNotFound",
                f"escalation Agent {spec.escalation.agent} does not exist in namespace {namespace}",
            )
        )
    return out


def plan(
    owner: Owner,
    spec: AgentSpec,
    observed: AgentObserved,
    defaults: dep.RuntimeDefaults,
    field_manager: str,
) -> AgentPlan:
    replicas = None if observed.scaled_by else spec.runtime.replicas
    deployment = dep.deployment(owner, spec, defaults, replicas)
    handover = None
    current = observed.deployment
    if (
        replicas is None
        and current is not None
        and owned_by_manager(current, field_manager, ("spec", "replicas"))
    ):
        handover = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": owner.name, "namespace": owner.namespace},
            "spec": {"replicas": current.get("spec", {}).get("replicas", 1)},
        }
    apply = [deployment]
    delete: list[tuple[str, str]] = []
    if spec.runtime.service_account_name:
        delete.append(("ServiceAccount", owner.name))
    else:
        apply.insert(0, dep.service_account(owner))
    replicas_bound = observed.max_replicas if observed.scaled_by else spec.runtime.replicas
    return AgentPlan(
        apply=apply,
        consumer=jetstream.consumer(owner.namespace, owner.name, spec, replicas_bound),
        handover=handover,
        delete=delete,
    )


@dataclass(frozen=True)
class AgentOutcome:
    """What happened applying the plan (filled in by the controller)."""

    problems: list[Problem] = field(default_factory=list)
    pending: int | None = None
    in_flight: int | None = None


def status(
    generation: int,
    namespace: str,
    spec: AgentSpec,
    observed: AgentObserved,
    outcome: AgentOutcome,
    current: Mapping[str, Any],
    now: str,
) -> tuple[dict[str, Any], list[EventSpec]]:
    problems = references(namespace, spec, observed.agents) + outcome.problems
    roll = rollout(observed.deployment)
    conds: list[Cond] = []
    if problems:
        first = problems[0]
        message = "; ".join(p.message for p in problems)
        conds += [
            Cond("Ready", "False", first.reason, message),
            Cond("Degraded", "True", first.reason, message),
        ]
    else:
        conds.append(Cond("Degraded", "False", "AsExpected", ""))
        if roll.complete:
            conds.append(Cond("Ready", "True", "Available", roll.message))
        else:
            conds.append(Cond("Ready", "False", "RolloutInProgress", roll.message))
    conds.append(
        Cond("Progressing", "False", "RolloutComplete", roll.message)
        if roll.complete
        else Cond("Progressing", "True", "RollingOut", roll.message)
    )
    conditions = merge_conditions(current.get("conditions"), conds, generation, now)
    new: dict[str, Any] = {
        "observedGeneration": generation,
        "conditions": conditions,
        "replicas": roll.replicas,
        "readyReplicas": roll.ready,
    }
    if outcome.pending is not None and outcome.in_flight is not None:
        new["queue"] = {"pending": outcome.pending, "inFlight": outcome.in_flight}
    elif "queue" in current:
        new["queue"] = current["queue"]
    return new, transition_events(current.get("conditions"), conditions)
