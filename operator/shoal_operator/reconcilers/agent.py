"""Agent: a Deployment, a ServiceAccount and a JetStream consumer; status from them and
from the runtimes' shared state (circuit breaker, usage)."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from shoal_api.agent import AgentSpec
from shoal_api.json_schema import schema_error
from shoal_api.runtime_state import CircuitRecord, UsageRecord
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
    current: Mapping[str, Any],
    now: str,
    *,
    unix_now: float,
) -> tuple[dict[str, Any], list[EventSpec]]:
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
    events = transition_events(current.get("conditions"), conditions)
    # The circuit is not a condition: while it is open a fallback may be serving, so
    # Ready stays about the Deployment and Degraded about the configuration.
    if observed.circuit is not None:
        new["circuit"] = circuit_status(observed.circuit)
        events += circuit_events(current.get("circuit"), new["circuit"], observed.circuit)
    elif "circuit" in current:
        new["circuit"] = current["circuit"]
    elif spec.circuit_breaker is not None:
        # No runtime has moved the circuit yet: it is closed (and the column says so).
        new["circuit"] = circuit_status(CircuitRecord())
    if observed.usage is not None:
        new["usage"] = usage_status(observed.usage, unix_now)
    elif "usage" in current:
        new["usage"] = current["usage"]
    return new, events


def rfc3339(unix: float) -> str:
    """A Unix time as RFC 3339 UTC to the second ("" when it is no plausible time)."""
    if not math.isfinite(unix) or not 0 < unix < MAX_UNIX_TIME:
        return ""
    return dt.datetime.fromtimestamp(unix, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


MAX_UNIX_TIME = 253_402_300_800  # year 10000: beyond it datetime cannot format
# The sliding hour advances in whole minutes: a reconcile caused by our own status
# write then computes the same usage, instead of a slightly decayed value that asks for
# yet another write (a loop for every Agent with traffic in the previous hour).
USAGE_STEP_SECONDS = 60


def _percent(value: float) -> float:
    """Within the schema's 0-100, so a bad record cannot get the status write rejected."""
    return round(min(100.0, max(0.0, value)), 1) if math.isfinite(value) else 0.0


def circuit_status(record: CircuitRecord) -> dict[str, Any]:
    # Every key always present: a merge patch keeps a key that is merely left out.
    return {
        "state": record.state,
        "since": rfc3339(record.since),
        "failureRatePercent": _percent(record.failure_rate_percent),
    }


def circuit_events(
    before: Mapping[str, Any] | None, after: Mapping[str, Any], record: CircuitRecord
) -> list[EventSpec]:
    """One Event per transition the status did not show yet. A changed ``since`` with the
    same state is a transition too: the circuit left and came back between two reads
    (it re-opened after a failed probe, say)."""
    if before is not None and (before.get("state"), before.get("since")) == (
        after["state"],
        after["since"],
    ):
        return []
    reason = f": {record.reason}" if record.reason else ""
    if after["state"] == "Open":
        rate = f"{after['failureRatePercent']:g}"
        return [
            EventSpec("Warning", "CircuitOpened", f"circuit opened at {rate}% failures{reason}")
        ]
    if after["state"] == "HalfOpen":
        return [EventSpec("Normal", "CircuitHalfOpen", f"circuit half-open, probing{reason}")]
    if before is None:
        return []  # a circuit first seen closed is how every Agent starts, not news
    return [EventSpec("Normal", "CircuitClosed", f"circuit closed, calls flow again{reason}")]


def usage_status(record: UsageRecord, unix_now: float) -> dict[str, Any]:
    """Usage over the sliding last hour. ``costLastHour`` is always written (``"0"``
    without pricing): one shape, because a merge patch cannot drop a key left out."""
    hour = record.last_hour(unix_now - unix_now % USAGE_STEP_SECONDS)
    return {
        "tasksLastHour": max(0, hour.tasks),
        "tokensLastHour": max(0, hour.tokens),
        "costLastHour": format(hour.cost if hour.cost > 0 else Decimal(0), "f"),
    }
