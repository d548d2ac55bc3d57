"""Agent: a Deployment, a ServiceAccount and a JetStream consumer; status from them and
from the runtimes' shared state (circuit breaker, usage)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shoal_api.agent import AgentSpec, AgentStatus, CircuitStatus, QueueStatus, UsageStatus
from shoal_api.json_schema import schema_error
from shoal_api.runtime_state import CircuitRecord, UsageRecord
from shoal_api.timestamps import rfc3339
from shoal_operator.builders import deployment as dep
from shoal_operator.builders import jetstream
from shoal_operator.builders.common import Owner
from shoal_operator.reconcilers.common import Problem, owned_by_manager, rollout
from shoal_operator.status_conditions import Cond, EventSpec, merge_conditions, transition_events

DEFAULT_REPLICAS = 1
"""What the API server sets a Deployment's spec.replicas to when nobody owns it."""


@dataclass(frozen=True)
class AgentObserved:
    """What the reconcile needs to know besides the Agent itself."""

    deployment: Mapping[str, Any] | None
    agents: frozenset[str]
    """Names of the Agents in the namespace (for fallback / escalation)."""
    scaled_by: str | None = None
    """The ScalingPolicy that scales this Agent, if any: it then owns the replicas."""
    max_replicas: int = 1
    circuit: CircuitRecord | None = None
    """The runtimes' circuit breaker record; None when unknown (not written, unreadable)."""
    usage: UsageRecord | None = None
    """The runtimes' usage record; None when unknown."""


@dataclass(frozen=True)
class AgentPlan:
    apply: list[dict[str, Any]]
    consumers: list[dict[str, Any]]
    """One per priority band, in the order to declare them."""
    handover: dict[str, Any] | None = None
    """Applied under a separate manager first, so dropping replicas keeps the value."""
    delete: list[tuple[str, str]] = field(default_factory=list)


def contract_problems(spec: AgentSpec) -> list[Problem]:
    """JSON Schemas the runtime could not compile (it would crash-loop on them)."""
    out = []
    for side, schema in (("input", spec.contract.input), ("output", spec.contract.output)):
        if schema is None:
            continue
        if why := schema_error(schema):
            out.append(
                Problem("InvalidContract", f"spec.contract.{side} is not a valid JSON Schema {why}")
            )
    return out


def references(namespace: str, spec: AgentSpec, agents: frozenset[str]) -> list[Problem]:
    out = contract_problems(spec)
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
    current_replicas = (current or {}).get("spec", {}).get("replicas", 1)
    if (
        replicas is None
        and current is not None
        # Dropped by its last owner, spec.replicas goes back to its default, 1: only
        # another count needs a new owner to keep it (one write fewer per new Agent).
        and current_replicas != DEFAULT_REPLICAS
        and owned_by_manager(current, field_manager, ("spec", "replicas"))
    ):
        handover = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": owner.name, "namespace": owner.namespace},
            "spec": {"replicas": current_replicas},
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
        consumers=jetstream.consumers(owner.namespace, owner.name, spec, replicas_bound),
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
    current: AgentStatus,
    now: str,
    *,
    unix_now: float,
) -> tuple[AgentStatus, list[EventSpec]]:
    """``now`` stamps conditions; ``unix_now`` ends the usage window."""
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
    conditions = merge_conditions(current.conditions, conds, generation, now)
    queue = current.queue
    if outcome.pending is not None and outcome.in_flight is not None:
        queue = QueueStatus(pending=outcome.pending, in_flight=outcome.in_flight)
    events = transition_events(current.conditions, conditions)
    # The circuit is not a condition: while it is open a fallback may be serving, so
    # Ready stays about the Deployment and Degraded about the configuration.
    circuit = current.circuit
    if observed.circuit is not None:
        circuit = circuit_status(observed.circuit)
        events += circuit_events(current.circuit, circuit, observed.circuit)
    elif circuit is None and spec.circuit_breaker is not None:
        # No runtime has moved the circuit yet: it is closed (and the column says so).
        circuit = circuit_status(CircuitRecord())
    usage = current.usage
    if observed.usage is not None:
        usage = usage_status(observed.usage, unix_now)
    new = AgentStatus(
        observed_generation=generation,
        conditions=conditions,
        replicas=roll.replicas,
        ready_replicas=roll.ready,
        queue=queue,
        circuit=circuit,
        usage=usage,
    )
    return new, events


MAX_UNIX_TIME = 253_402_300_800  # year 10000: beyond it no RFC 3339 time exists
# The sliding hour advances in whole minutes: a reconcile caused by our own status
# write then computes the same usage, instead of a slightly decayed value that asks for
# yet another write (a loop for every Agent with traffic in the previous hour).
USAGE_STEP_SECONDS = 60


def _since(unix: float) -> str:
    """When a runtime says the circuit moved; "" (unknown) for a value that is no
    plausible time (a record written by a runtime with a broken clock)."""
    return rfc3339(unix) if math.isfinite(unix) and 0 < unix < MAX_UNIX_TIME else ""


def circuit_status(record: CircuitRecord) -> CircuitStatus:
    # Every field always set: a merge patch keeps a key that is merely left out.
    return CircuitStatus(
        state=record.state,
        since=_since(record.since),
        failure_rate_percent=round(record.failure_rate_percent, 1),
    )


def circuit_events(
    before: CircuitStatus | None, after: CircuitStatus, record: CircuitRecord
) -> list[EventSpec]:
    """One Event per transition the status did not show yet. A changed ``since`` with the
    same state is a transition too: the circuit left and came back between two reads
    (it re-opened after a failed probe, say)."""
    if before is not None and (before.state, before.since) == (after.state, after.since):
        return []
    reason = f": {record.reason}" if record.reason else ""
    if after.state == "Open":
        rate = f"{after.failure_rate_percent:g}"
        return [
            EventSpec("Warning", "CircuitOpened", f"circuit opened at {rate}% failures{reason}")
        ]
    if after.state == "HalfOpen":
        return [EventSpec("Normal", "CircuitHalfOpen", f"circuit half-open, probing{reason}")]
    if before is None:
        return []  # a circuit first seen closed is how every Agent starts, not news
    return [EventSpec("Normal", "CircuitClosed", f"circuit closed, calls flow again{reason}")]


def usage_status(record: UsageRecord, unix_now: float) -> UsageStatus:
    """Usage over the sliding last hour. ``costLastHour`` is always written (``"0"``
    without pricing): one shape, because a merge patch cannot drop a key left out."""
    hour = record.last_hour(unix_now - unix_now % USAGE_STEP_SECONDS)
    return UsageStatus(
        tasks_last_hour=hour.tasks, tokens_last_hour=hour.tokens, cost_last_hour=hour.cost
    )
