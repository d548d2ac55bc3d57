"""The pure reconcilers: plan() and status() of Agent, ScalingPolicy and Workflow; and
how the operator feeds them the runtimes' state (queueing, its own status writes).

Statuses are checked as the API server gets them: serialized by ``status_patch``."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import pytest
import yaml

from shoal_api.agent import AgentSpec, AgentStatus
from shoal_api.base import ApiModel, Condition, status_patch
from shoal_api.runtime_state import CircuitRecord, HourUsage, UsageRecord
from shoal_api.scaling import ScalingPolicySpec, ScalingPolicyStatus
from shoal_api.workflow import WorkflowSpec, WorkflowStatus
from shoal_operator import writer as writer_mod
from shoal_operator.builders.common import Owner
from shoal_operator.builders.deployment import RuntimeDefaults
from shoal_operator.cache import Cache, Index, Indexes, Key
from shoal_operator.clients.kube import Kube
from shoal_operator.kinds.scaling import PolicyIO
from shoal_operator.reconcilers import agent as agent_rec
from shoal_operator.reconcilers import scaling as scaling_rec
from shoal_operator.reconcilers import workflow as workflow_rec
from shoal_operator.reconcilers.common import Problem, owned_by_manager, rollout
from shoal_operator.settings import FIELD_MANAGER, HANDOVER_MANAGER
from shoal_operator.status_conditions import EventSpec
from shoal_operator.triggers import Triggers
from shoal_operator.workqueue import WorkQueue

NS = "team-a"
AGENT = Owner("Agent", NS, "triage", "uid-agent")
POLICY = Owner("ScalingPolicy", NS, "triage", "uid-policy")
DEFAULTS = RuntimeDefaults(image="runtime:1", nats_url="nats://nats:4222")
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def agent_spec(**fields: Any) -> AgentSpec:
    return AgentSpec.model_validate({"handler": {"python": "m:f"}, **fields})


def policy_spec(**fields: Any) -> ScalingPolicySpec:
    return ScalingPolicySpec.model_validate(
        {"targetRef": {"name": "triage"}, "maxReplicas": 10, **fields}
    )


def workflow_spec(*steps: dict[str, Any], **fields: Any) -> WorkflowSpec:
    return WorkflowSpec.model_validate({"steps": list(steps), **fields})


def managed(manager: str, operation: str, fields: dict[str, Any]) -> dict[str, Any]:
    return {"manager": manager, "operation": operation, "fieldsV1": fields}


REPLICAS_FIELDS: dict[str, Any] = {"f:spec": {"f:replicas": {}, "f:template": {}}}
TEMPLATE_FIELDS: dict[str, Any] = {"f:spec": {"f:template": {}}}


def deployment(
    replicas: int = 2,
    *,
    ready: int | None = None,
    updated: int | None = None,
    available: int | None = None,
    total: int | None = None,
    generation: int = 3,
    observed_generation: int | None = None,
    managed_fields: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """An observed Deployment; by default fully rolled out."""
    return {
        "metadata": {
            "name": "triage",
            "namespace": NS,
            "generation": generation,
            "managedFields": managed_fields or [],
        },
        "spec": {"replicas": replicas},
        "status": {
            "observedGeneration": generation
            if observed_generation is None
            else observed_generation,
            "replicas": replicas if total is None else total,
            "readyReplicas": replicas if ready is None else ready,
            "updatedReplicas": replicas if updated is None else updated,
            "availableReplicas": replicas if available is None else available,
        },
    }


def observed(
    dep: dict[str, Any] | None = None,
    agents: frozenset[str] = frozenset({"triage"}),
    scaled_by: str | None = None,
    max_replicas: int = 1,
    circuit: CircuitRecord | None = None,
    usage: UsageRecord | None = None,
) -> agent_rec.AgentObserved:
    return agent_rec.AgentObserved(dep, agents, scaled_by, max_replicas, circuit, usage)


def cond(status: dict[str, Any], type_: str) -> dict[str, Any]:
    found = next((c for c in status["conditions"] if c["type"] == type_), None)
    assert found is not None, type_
    return dict(found)


def wire(status: ApiModel) -> dict[str, Any]:
    """A status as the status patch carries it."""
    out: dict[str, Any] = status_patch(status)["status"]
    return out


def test_wire_conditions_are_complete_metav1_conditions() -> None:
    status, _ = agent_status()
    for c in status["conditions"]:
        assert Condition.model_validate(c).to_wire() == c
        assert set(c) == {
            "type",
            "status",
            "reason",
            "message",
            "observedGeneration",
            "lastTransitionTime",
        }


# -- common --------------------------------------------------------------------------


def test_owned_by_manager_needs_apply_and_the_path() -> None:
    obj = {"metadata": {"managedFields": [managed("me", "Apply", REPLICAS_FIELDS)]}}
    assert owned_by_manager(obj, "me", ("spec", "replicas"))
    assert not owned_by_manager(obj, "me", ("spec", "paused"))
    assert not owned_by_manager(obj, "other", ("spec", "replicas"))
    updated = {"metadata": {"managedFields": [managed("me", "Update", REPLICAS_FIELDS)]}}
    assert not owned_by_manager(updated, "me", ("spec", "replicas"))
    assert not owned_by_manager({"metadata": {"managedFields": None}}, "me", ("spec",))
    assert not owned_by_manager({}, "me", ("spec",))


def test_rollout_of_a_missing_deployment() -> None:
    roll = rollout(None)
    assert not roll.complete
    assert (roll.replicas, roll.ready) == (0, 0)


def test_rollout_complete_needs_the_current_generation() -> None:
    assert rollout(deployment(2)).complete
    assert not rollout(deployment(2, observed_generation=2)).complete
    assert not rollout(deployment(2, available=1)).complete
    assert not rollout(deployment(2, total=3)).complete
    assert rollout(deployment(2, ready=1)).message == "1/2 replicas ready"


# -- agent plan ----------------------------------------------------------------------


def test_unscaled_agent_applies_sa_then_deployment_with_replicas() -> None:
    plan = agent_rec.plan(
        AGENT, agent_spec(runtime={"replicas": 3}), observed(), DEFAULTS, FIELD_MANAGER
    )
    assert [o["kind"] for o in plan.apply] == ["ServiceAccount", "Deployment"]
    assert plan.apply[1]["spec"]["replicas"] == 3
    assert plan.handover is None
    assert plan.delete == []


def test_unscaled_agent_never_hands_over_even_if_it_owns_replicas() -> None:
    dep = deployment(managed_fields=[managed(FIELD_MANAGER, "Apply", REPLICAS_FIELDS)])
    plan = agent_rec.plan(AGENT, agent_spec(), observed(dep), DEFAULTS, FIELD_MANAGER)
    assert plan.handover is None


def test_scaled_agent_leaves_replicas_to_the_hpa() -> None:
    plan = agent_rec.plan(
        AGENT, agent_spec(), observed(scaled_by="triage", max_replicas=5), DEFAULTS, FIELD_MANAGER
    )
    (deploy,) = [o for o in plan.apply if o["kind"] == "Deployment"]
    assert "replicas" not in deploy["spec"]
    assert plan.handover is None  # nothing observed yet: nothing to hand over


def test_scaled_agent_hands_over_replicas_it_still_owns() -> None:
    dep = deployment(4, managed_fields=[managed(FIELD_MANAGER, "Apply", REPLICAS_FIELDS)])
    plan = agent_rec.plan(
        AGENT, agent_spec(), observed(dep, scaled_by="p"), DEFAULTS, FIELD_MANAGER
    )
    assert plan.handover == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "triage", "namespace": NS},
        "spec": {"replicas": 4},
    }


@pytest.mark.parametrize(
    "fields",
    [
        [managed(FIELD_MANAGER, "Apply", TEMPLATE_FIELDS)],
        [managed(FIELD_MANAGER, "Update", REPLICAS_FIELDS)],
        [managed(HANDOVER_MANAGER, "Apply", REPLICAS_FIELDS)],
        [managed("kube-controller-manager", "Update", REPLICAS_FIELDS)],
        [],
    ],
    ids=["apply-without-replicas", "update-op", "handover-manager", "hpa", "none"],
)
def test_no_handover_unless_shoal_applied_replicas(fields: list[dict[str, Any]]) -> None:
    dep = deployment(4, managed_fields=fields)
    plan = agent_rec.plan(
        AGENT, agent_spec(), observed(dep, scaled_by="p"), DEFAULTS, FIELD_MANAGER
    )
    assert plan.handover is None


def test_handover_with_multiple_managed_field_entries() -> None:
    fields = [
        managed("kube-controller-manager", "Update", REPLICAS_FIELDS),
        managed(FIELD_MANAGER, "Apply", REPLICAS_FIELDS),
    ]
    obs = observed(deployment(2, managed_fields=fields), scaled_by="p")
    plan = agent_rec.plan(AGENT, agent_spec(), obs, DEFAULTS, FIELD_MANAGER)
    assert plan.handover is not None
    assert plan.handover["spec"]["replicas"] == 2


def test_custom_service_account_deletes_the_operators() -> None:
    spec = agent_spec(runtime={"serviceAccountName": "shared"})
    plan = agent_rec.plan(AGENT, spec, observed(), DEFAULTS, FIELD_MANAGER)
    assert [o["kind"] for o in plan.apply] == ["Deployment"]
    assert plan.delete == [("ServiceAccount", "triage")]


def test_consumer_bound_uses_spec_replicas_when_unscaled() -> None:
    spec = agent_spec(concurrency=4, runtime={"replicas": 3})
    plan = agent_rec.plan(AGENT, spec, observed(max_replicas=50), DEFAULTS, FIELD_MANAGER)
    assert {c["max_ack_pending"] for c in plan.consumers} == {12}
    assert plan.consumers[0]["durable_name"] == "team-a_triage"


def test_consumer_bound_uses_policy_max_when_scaled() -> None:
    spec = agent_spec(concurrency=4, runtime={"replicas": 3})
    plan = agent_rec.plan(
        AGENT, spec, observed(scaled_by="p", max_replicas=20), DEFAULTS, FIELD_MANAGER
    )
    assert {c["max_ack_pending"] for c in plan.consumers} == {80}


def test_zero_replicas_still_allows_in_flight_work() -> None:
    spec = agent_spec(concurrency=4, runtime={"replicas": 0})
    plan = agent_rec.plan(AGENT, spec, observed(), DEFAULTS, FIELD_MANAGER)
    assert plan.apply[-1]["spec"]["replicas"] == 0
    assert {c["max_ack_pending"] for c in plan.consumers} == {4}


# -- agent status --------------------------------------------------------------------


def agent_status(
    spec: AgentSpec | None = None,
    obs: agent_rec.AgentObserved | None = None,
    outcome: agent_rec.AgentOutcome | None = None,
    current: dict[str, Any] | None = None,
    generation: int = 3,
    now: str = "t1",
    unix_now: float = 0.0,
) -> tuple[dict[str, Any], list[EventSpec]]:
    status, events = agent_rec.status(
        generation,
        NS,
        spec or agent_spec(),
        obs or observed(deployment()),
        outcome or agent_rec.AgentOutcome(),
        AgentStatus.model_validate(current or {}),
        now,
        unix_now=unix_now,
    )
    return wire(status), events


def test_missing_fallback_makes_the_agent_not_ready() -> None:
    spec = agent_spec(fallback={"agent": "triage-small"})
    status, events = agent_status(spec)
    ready = cond(status, "Ready")
    assert ready["status"] == "False"
    assert ready["reason"] == "FallbackNotFound"
    assert "triage-small" in ready["message"]
    assert NS in ready["message"]
    assert cond(status, "Degraded")["status"] == "True"
    assert events == [EventSpec("Warning", "FallbackNotFound", ready["message"])]


def test_a_breaker_nobody_moved_yet_shows_closed_without_an_event() -> None:
    spec = agent_spec(circuitBreaker={})
    status, events = agent_status(spec)
    assert status["circuit"] == {"state": "Closed", "since": "", "failureRatePercent": 0.0}
    assert not [e for e in events if e.reason.startswith("Circuit")]
    status, _ = agent_status(agent_spec())
    assert "circuit" not in status


def test_an_invalid_contract_schema_degrades_the_agent() -> None:
    spec = agent_spec(contract={"input": {"type": "object", "properties": {"x": {"type": 5}}}})
    status, events = agent_status(spec)
    ready = cond(status, "Ready")
    assert ready["reason"] == "InvalidContract"
    assert "spec.contract.input is not a valid JSON Schema at properties/x/type" in ready["message"]
    assert cond(status, "Degraded")["status"] == "True"
    assert events[0].reason == "InvalidContract"


def test_existing_fallback_and_escalation_are_fine() -> None:
    spec = agent_spec(fallback={"agent": "small"}, escalation={"agent": "large"})
    obs = observed(deployment(), agents=frozenset({"triage", "small", "large"}))
    status, _ = agent_status(spec, obs)
    assert cond(status, "Ready")["status"] == "True"


def test_missing_escalation_is_reported() -> None:
    status, _ = agent_status(agent_spec(escalation={"agent": "large"}))
    assert cond(status, "Ready")["reason"] == "EscalationNotFound"
    assert "large" in cond(status, "Ready")["message"]


def test_all_problems_in_the_message_first_as_reason() -> None:
    spec = agent_spec(fallback={"agent": "small"}, escalation={"agent": "large"})
    outcome = agent_rec.AgentOutcome(problems=[Problem("ApplyFailed", "Deployment: boom")])
    status, _ = agent_status(spec, outcome=outcome)
    ready = cond(status, "Ready")
    assert ready["reason"] == "FallbackNotFound"
    parts = ready["message"].split("; ")
    assert len(parts) == 3
    assert parts[2] == "Deployment: boom"


def test_outcome_problem_alone_is_reported() -> None:
    outcome = agent_rec.AgentOutcome(problems=[Problem("JetStreamUnavailable", "no NATS")])
    status, _ = agent_status(outcome=outcome)
    assert cond(status, "Ready")["reason"] == "JetStreamUnavailable"
    assert cond(status, "Degraded")["reason"] == "JetStreamUnavailable"


def test_ready_when_rollout_complete() -> None:
    status, events = agent_status(obs=observed(deployment(2)))
    ready = cond(status, "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "Available")
    assert ready["message"] == "2/2 replicas ready"
    assert (cond(status, "Progressing")["status"], cond(status, "Progressing")["reason"]) == (
        "False",
        "RolloutComplete",
    )
    assert cond(status, "Degraded")["status"] == "False"
    assert status["replicas"] == 2
    assert status["readyReplicas"] == 2
    assert status["observedGeneration"] == 3
    assert events == [EventSpec("Normal", "Available", "2/2 replicas ready")]


def test_progressing_while_pods_are_being_updated() -> None:
    status, _ = agent_status(obs=observed(deployment(3, updated=1, ready=2)))
    progressing = cond(status, "Progressing")
    assert (progressing["status"], progressing["reason"]) == ("True", "RollingOut")
    ready = cond(status, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "RolloutInProgress")
    assert ready["message"] == "2/3 replicas ready"
    assert cond(status, "Degraded")["status"] == "False"


def test_not_ready_before_the_deployment_exists() -> None:
    status, _ = agent_status(obs=observed(None))
    assert cond(status, "Ready")["reason"] == "RolloutInProgress"
    assert cond(status, "Progressing")["status"] == "True"
    assert status["replicas"] == 0


def test_queue_counts_copied_from_the_outcome() -> None:
    status, _ = agent_status(outcome=agent_rec.AgentOutcome(pending=7, in_flight=2))
    assert status["queue"] == {"pending": 7, "inFlight": 2}


def test_queue_counts_kept_when_not_known() -> None:
    current = {"queue": {"pending": 1, "inFlight": 0}}
    status, _ = agent_status(current=current)
    assert status["queue"] == {"pending": 1, "inFlight": 0}
    fresh, _ = agent_status()
    assert "queue" not in fresh


def test_events_only_on_transitions() -> None:
    first, events = agent_status(now="t1")
    assert events
    second, events = agent_status(current=first, now="t2")
    assert events == []
    assert second["conditions"] == first["conditions"]


def test_problem_events_not_repeated() -> None:
    spec = agent_spec(fallback={"agent": "gone"})
    first, events = agent_status(spec)
    assert len(events) == 1  # Ready and Degraded share the reason: one Warning
    _, events = agent_status(spec, current=first)
    assert events == []


def test_new_degraded_reason_is_an_event() -> None:
    first, _ = agent_status(agent_spec(fallback={"agent": "gone"}))
    _, events = agent_status(agent_spec(escalation={"agent": "gone"}), current=first)
    assert [(e.type, e.reason) for e in events] == [("Warning", "EscalationNotFound")]


def test_recovery_is_a_normal_event() -> None:
    first, _ = agent_status(agent_spec(fallback={"agent": "gone"}), now="t1")
    second, events = agent_status(current=first, now="t2")
    assert [(e.type, e.reason) for e in events] == [("Normal", "Available")]
    assert cond(second, "Ready")["lastTransitionTime"] == "t2"


# -- agent status: the runtimes' circuit breaker and usage ---------------------------

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z
HOUR = int(T0 // 3600)


def circuit(state: Any, since: float = T0, rate: float = 0.0, reason: str = "") -> CircuitRecord:
    return CircuitRecord(state=state, since=since, failure_rate_percent=rate, reason=reason)


def with_circuit(
    record: CircuitRecord, current: dict[str, Any] | None = None
) -> tuple[dict[str, Any], list[EventSpec]]:
    return agent_status(obs=observed(deployment(), circuit=record), current=current)


def circuit_events(events: list[EventSpec]) -> list[tuple[str, str]]:
    return [(e.type, e.reason) for e in events if e.reason.startswith("Circuit")]


def test_circuit_mirrored_from_the_record() -> None:
    record = circuit("Open", T0 + 0.7, 62.5, "5 consecutive failures")
    status, events = with_circuit(record)
    assert status["circuit"] == {
        "state": "Open",
        "since": "2023-11-14T22:13:20Z",
        "failureRatePercent": 62.5,
    }
    opened = next(e for e in events if e.reason == "CircuitOpened")
    assert opened.type == "Warning"
    assert "62.5%" in opened.message
    assert "5 consecutive failures" in opened.message


def test_open_circuit_leaves_ready_and_degraded_alone() -> None:
    status, _ = with_circuit(circuit("Open", rate=100))
    assert cond(status, "Ready")["status"] == "True"
    assert cond(status, "Degraded")["status"] == "False"


def test_circuit_events_only_on_transitions() -> None:
    status, events = with_circuit(circuit("Closed", since=0))
    assert circuit_events(events) == []  # every Agent starts closed: not news
    steps = [
        (circuit("Closed", since=0), []),
        (circuit("Open", T0, 80), [("Warning", "CircuitOpened")]),
        (circuit("Open", T0, 85), []),  # same opening, newer rate
        (circuit("HalfOpen", T0 + 30), [("Normal", "CircuitHalfOpen")]),
        (circuit("HalfOpen", T0 + 30), []),
        (circuit("Closed", T0 + 40), [("Normal", "CircuitClosed")]),
        (circuit("Closed", T0 + 40), []),
    ]
    for record, expected in steps:
        status, events = with_circuit(record, status)
        assert circuit_events(events) == expected, record
        assert status["circuit"]["state"] == record.state


def test_reopened_between_two_reads_is_an_event() -> None:
    first, _ = with_circuit(circuit("Open", T0, 80))
    # HalfOpen and back to Open happened before the operator looked again.
    _, events = with_circuit(circuit("Open", T0 + 60, 100, "probe failed"), first)
    assert circuit_events(events) == [("Warning", "CircuitOpened")]


def test_closed_after_open_without_seeing_half_open() -> None:
    first, _ = with_circuit(circuit("Open", T0))
    _, events = with_circuit(circuit("Closed", T0 + 90, reason="3 probes succeeded"), first)
    assert [(e.type, e.reason, e.message) for e in events] == [
        ("Normal", "CircuitClosed", "circuit closed, calls flow again: 3 probes succeeded")
    ]


def test_bad_record_values_stay_within_the_schema() -> None:
    status, _ = with_circuit(circuit("Open", since=0, rate=150))
    assert status["circuit"] == {"state": "Open", "since": "", "failureRatePercent": 100.0}
    status, _ = with_circuit(circuit("Open", since=float("inf"), rate=float("nan")))
    assert status["circuit"] == {"state": "Open", "since": "", "failureRatePercent": 0.0}


def test_circuit_and_usage_kept_when_no_record_is_known() -> None:
    current = {
        "circuit": {"state": "Open", "since": "2023-11-14T22:13:20Z", "failureRatePercent": 90},
        "usage": {"tasksLastHour": 5, "tokensLastHour": 50, "costLastHour": "0.1"},
    }
    status, events = agent_status(current=current)
    assert status["circuit"] == current["circuit"]
    assert status["usage"] == current["usage"]
    assert circuit_events(events) == []
    fresh, _ = agent_status()
    assert "circuit" not in fresh
    assert "usage" not in fresh


def usage_record(
    current: tuple[int, int, int, str], previous: tuple[int, int, int, str] | None = None
) -> UsageRecord:
    def hour(h: tuple[int, int, int, str]) -> HourUsage:
        return HourUsage(hour=h[0], tasks=h[1], tokens=h[2], cost=Decimal(h[3]))

    return UsageRecord(current=hour(current), previous=hour(previous) if previous else HourUsage())


def with_usage(record: UsageRecord, unix_now: float) -> dict[str, Any]:
    status, _ = agent_status(obs=observed(deployment(), usage=record), unix_now=unix_now)
    usage: dict[str, Any] = status["usage"]
    return usage


def test_usage_weighs_the_previous_hour_by_what_is_left_of_it() -> None:
    record = usage_record((HOUR, 10, 1000, "0.5"), (HOUR - 1, 40, 4000, "2"))
    quarter = HOUR * 3600 + 900  # a quarter into the hour: 3/4 of the previous one counts
    assert with_usage(record, quarter) == {
        "tasksLastHour": 40,
        "tokensLastHour": 4000,
        "costLastHour": "2.0000",
    }


def test_usage_moves_in_whole_minutes() -> None:
    record = usage_record((HOUR, 0, 0, "0"), (HOUR - 1, 3600, 36000, "36"))
    minute = HOUR * 3600 + 600
    same = with_usage(record, minute)
    # Our own status write triggers a reconcile seconds later: it must compute the same.
    assert with_usage(record, minute + 59.9) == same
    assert same["tasksLastHour"] == 3000
    assert with_usage(record, minute + 60)["tasksLastHour"] == 2940


def test_usage_of_a_record_not_written_this_hour() -> None:
    # The last write was in the previous clock hour: that hour decays like any other.
    record = usage_record((HOUR - 1, 100, 0, "1"))
    assert with_usage(record, HOUR * 3600 + 1800) == {
        "tasksLastHour": 50,
        "tokensLastHour": 0,
        "costLastHour": "0.5000",
    }
    # Two hours on, nothing of it is left; the cost still has its key (one status shape).
    assert with_usage(record, (HOUR + 1) * 3600 + 1) == {
        "tasksLastHour": 0,
        "tokensLastHour": 0,
        "costLastHour": "0",
    }


def test_usage_change_alone_posts_no_event() -> None:
    first, _ = agent_status(obs=observed(deployment(), usage=usage_record((HOUR, 1, 1, "0"))))
    _, events = agent_status(
        obs=observed(deployment(), usage=usage_record((HOUR, 9, 9, "1"))),
        current=first,
        unix_now=T0,
    )
    assert events == []


# -- scaling -------------------------------------------------------------------------


def policy_observed(
    agents: frozenset[str] = frozenset({"triage"}),
    winner: str = "triage",
    hpa: dict[str, Any] | None = None,
    dep: dict[str, Any] | None = None,
) -> scaling_rec.PolicyObserved:
    return scaling_rec.PolicyObserved(agents, winner, hpa, dep)


def test_policy_target_not_found() -> None:
    plan = scaling_rec.plan(POLICY, policy_spec(), policy_observed(agents=frozenset({"x"})))
    assert plan.hpa is None
    assert [p.reason for p in plan.problems] == ["TargetNotFound"]
    assert "triage" in plan.problems[0].message


def test_policy_target_conflict_names_the_winner() -> None:
    plan = scaling_rec.plan(POLICY, policy_spec(), policy_observed(winner="aaa-first"))
    assert plan.hpa is None
    assert [p.reason for p in plan.problems] == ["TargetConflict"]
    assert "aaa-first" in plan.problems[0].message


def test_policy_winner_gets_an_hpa() -> None:
    plan = scaling_rec.plan(POLICY, policy_spec(), policy_observed())
    assert plan.problems == []
    assert plan.hpa is not None
    assert plan.hpa["kind"] == "HorizontalPodAutoscaler"
    assert plan.hpa["metadata"]["name"] == "triage"


def policy_status(
    obs: scaling_rec.PolicyObserved,
    extra: list[Problem] | None = None,
    current: dict[str, Any] | None = None,
    now: str = "t1",
) -> tuple[dict[str, Any], list[EventSpec]]:
    plan = scaling_rec.plan(POLICY, policy_spec(), obs)
    current_status = ScalingPolicyStatus.model_validate(current or {})
    status, events = scaling_rec.status(4, POLICY, obs, plan, extra or [], current_status, now)
    return wire(status), events


def test_policy_status_target_not_found() -> None:
    status, events = policy_status(policy_observed(agents=frozenset()))
    ready = cond(status, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "TargetNotFound")
    assert cond(status, "Degraded")["status"] == "True"
    assert status["hpaName"] == ""
    assert [(e.type, e.reason) for e in events] == [("Warning", "TargetNotFound")]


def test_policy_status_conflict() -> None:
    status, _ = policy_status(policy_observed(winner="other"))
    assert cond(status, "Ready")["reason"] == "TargetConflict"
    assert "other" in cond(status, "Ready")["message"]


def test_policy_status_waits_for_the_hpa() -> None:
    status, _ = policy_status(policy_observed())
    ready = cond(status, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "Creating")
    assert cond(status, "Degraded")["status"] == "False"
    assert status["hpaName"] == "triage"


def test_policy_status_ready_mirrors_the_hpa() -> None:
    hpa = {"status": {"desiredReplicas": 5, "lastScaleTime": "2024-01-01T00:00:00Z"}}
    status, _ = policy_status(policy_observed(hpa=hpa, dep=deployment(3)))
    ready = cond(status, "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "HPAReady")
    assert status["currentReplicas"] == 3
    assert status["desiredReplicas"] == 5
    assert status["lastScaleTime"] == "2024-01-01T00:00:00Z"
    assert status["observedGeneration"] == 4


def test_policy_active_from_deployment_status_replicas() -> None:
    hpa: dict[str, Any] = {"status": {}}
    active, _ = policy_status(policy_observed(hpa=hpa, dep=deployment(2)))
    assert (cond(active, "Active")["status"], cond(active, "Active")["reason"]) == (
        "True",
        "Scaled",
    )
    assert cond(active, "Active")["message"] == "2 replicas"
    # spec says 2, but no pod exists yet: not active
    idle, _ = policy_status(policy_observed(hpa=hpa, dep=deployment(2, total=0)))
    assert (cond(idle, "Active")["status"], cond(idle, "Active")["reason"]) == (
        "False",
        "NoReplicas",
    )
    assert idle["desiredReplicas"] == 2  # falls back to the Deployment's spec


def test_policy_without_deployment_has_zero_replicas() -> None:
    status, _ = policy_status(policy_observed(hpa={"status": {}}))
    assert status["currentReplicas"] == 0
    assert status["desiredReplicas"] == 0
    assert cond(status, "Active")["status"] == "False"


def test_policy_extra_problems_are_reported() -> None:
    status, _ = policy_status(
        policy_observed(hpa={"status": {}}), extra=[Problem("ApplyFailed", "HPA: denied")]
    )
    assert cond(status, "Ready")["reason"] == "ApplyFailed"
    assert cond(status, "Ready")["message"] == "HPA: denied"


def test_policy_last_decision_is_kept() -> None:
    status, _ = policy_status(policy_observed(), current={"lastDecision": "scaled to zero"})
    assert status["lastDecision"] == "scaled to zero"
    fresh, _ = policy_status(policy_observed())
    assert "lastDecision" not in fresh


def test_policy_events_only_on_transitions() -> None:
    obs = policy_observed(hpa={"status": {}}, dep=deployment(1))
    first, events = policy_status(obs, now="t1")
    assert [(e.type, e.reason) for e in events] == [("Normal", "HPAReady")]
    second, events = policy_status(obs, current=first, now="t2")
    assert events == []
    assert second == first


# -- workflow ------------------------------------------------------------------------

ALL_AGENTS: dict[str, frozenset[str]] = {
    "auth": frozenset(),
    "triage": frozenset({"classify"}),
    "checker": frozenset({"compliance-check"}),
    "support": frozenset(),
    "support-basic": frozenset(),
}


def reasons(problems: list[Problem]) -> list[str]:
    return [p.reason for p in problems]


def test_api_md_workflow_has_no_problems() -> None:
    (doc,) = [
        d
        for d in yaml.safe_load_all((EXAMPLES / "customer-inquiry.yaml").read_text())
        if d and d["kind"] == "Workflow"
    ]
    spec = WorkflowSpec.model_validate(doc["spec"])
    assert workflow_rec.problems(NS, spec, ALL_AGENTS) == []


def test_cycle_is_reported_alone() -> None:
    spec = workflow_spec(
        {"name": "x", "agent": "missing", "dependsOn": ["y"]},
        {"name": "y", "agent": "missing", "dependsOn": ["x"]},
    )
    problems = workflow_rec.problems(NS, spec, ALL_AGENTS)
    assert problems == [Problem("DependencyCycle", "steps form a cycle: x -> y -> x")]


def test_missing_agent() -> None:
    spec = workflow_spec({"name": "a", "agent": "ghost"})
    (problem,) = workflow_rec.problems(NS, spec, ALL_AGENTS)
    assert problem.reason == "AgentNotFound"
    assert "step a" in problem.message
    assert "ghost" in problem.message
    assert NS in problem.message


def test_missing_fallback_agent() -> None:
    spec = workflow_spec({"name": "a", "agent": "auth", "fallback": {"agent": "ghost"}})
    (problem,) = workflow_rec.problems(NS, spec, ALL_AGENTS)
    assert problem.reason == "AgentNotFound"
    assert "fallback Agent ghost" in problem.message


def test_capability_without_agent() -> None:
    spec = workflow_spec({"name": "a", "agentSelector": {"capability": "translate"}})
    (problem,) = workflow_rec.problems(NS, spec, ALL_AGENTS)
    assert problem.reason == "NoAgentWithCapability"
    assert "translate" in problem.message


def test_capability_with_an_agent() -> None:
    spec = workflow_spec({"name": "a", "agentSelector": {"capability": "classify"}})
    assert workflow_rec.problems(NS, spec, ALL_AGENTS) == []
    assert reasons(workflow_rec.problems(NS, spec, {})) == ["NoAgentWithCapability"]


def test_template_refers_to_unknown_step() -> None:
    spec = workflow_spec({"name": "a", "agent": "auth", "input": {"x": "${steps.nope.output}"}})
    (problem,) = workflow_rec.problems(NS, spec, ALL_AGENTS)
    assert problem == Problem("InvalidTemplate", "step a: input refers to unknown step nope")


def test_template_uses_a_step_it_does_not_depend_on() -> None:
    spec = workflow_spec(
        {"name": "a", "agent": "auth"},
        {"name": "b", "agent": "auth", "input": {"x": ["${steps.a.output}"]}},
    )
    (problem,) = workflow_rec.problems(NS, spec, ALL_AGENTS)
    assert problem.reason == "InvalidTemplate"
    assert problem.message == "step b: input uses step a, which it does not depend on"


def test_template_may_use_a_transitive_dependency() -> None:
    spec = workflow_spec(
        {"name": "a", "agent": "auth"},
        {"name": "b", "agent": "auth", "dependsOn": ["a"]},
        {"name": "c", "agent": "auth", "dependsOn": ["b"], "input": {"x": "${steps.a.output}"}},
    )
    assert workflow_rec.problems(NS, spec, ALL_AGENTS) == []


def test_template_may_not_use_itself() -> None:
    spec = workflow_spec({"name": "a", "agent": "auth", "input": {"x": "${steps.a.output}"}})
    assert reasons(workflow_rec.problems(NS, spec, ALL_AGENTS)) == ["InvalidTemplate"]


def test_output_refers_to_unknown_step() -> None:
    spec = workflow_spec({"name": "a", "agent": "auth"}, output={"r": "${steps.zzz.output}"})
    assert workflow_rec.problems(NS, spec, ALL_AGENTS) == [
        Problem("InvalidTemplate", "output refers to unknown step zzz")
    ]


def test_problems_are_collected_per_step_in_order() -> None:
    spec = workflow_spec(
        {"name": "a", "agent": "ghost"},
        {"name": "b", "agentSelector": {"capability": "nothing"}},
    )
    problems = workflow_rec.problems(NS, spec, ALL_AGENTS)
    assert reasons(problems) == ["AgentNotFound", "NoAgentWithCapability"]


def workflow_status(
    spec: WorkflowSpec,
    current: dict[str, Any],
    now: str,
    generation: int = 1,
    runs: workflow_rec.RunSummary | None = None,
) -> tuple[dict[str, Any], list[EventSpec]]:
    status, events = workflow_rec.status(
        generation, NS, spec, ALL_AGENTS, WorkflowStatus.model_validate(current), now, runs
    )
    return wire(status), events


def test_workflow_status_valid() -> None:
    spec = workflow_spec({"name": "a", "agent": "auth"}, {"name": "b", "agent": "auth"})
    status, events = workflow_status(spec, {}, "t1", generation=2)
    ready = cond(status, "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "Valid")
    assert status["stepCount"] == 2
    assert status["observedGeneration"] == 2
    assert [(e.type, e.reason) for e in events] == [("Normal", "Valid")]


def test_workflow_status_keeps_run_counts_and_is_quiet_when_unchanged() -> None:
    spec = workflow_spec({"name": "a", "agent": "ghost"})
    current = {"runs": {"active": 1, "succeeded": 2, "failed": 0}}
    first, events = workflow_status(spec, current, "t1")
    assert first["runs"] == current["runs"]
    assert cond(first, "Ready")["reason"] == "AgentNotFound"
    assert [(e.type, e.reason) for e in events] == [("Warning", "AgentNotFound")]
    second, events = workflow_status(spec, first, "t2")
    assert events == []
    assert second == first


def test_workflow_status_mirrors_the_dispatchers_figures() -> None:
    spec = workflow_spec({"name": "a", "agent": "auth"})
    runs = workflow_rec.RunSummary(3, 4, 1, p95_seconds=1.23456, last_run=1_700_000_000.5)
    status, _ = workflow_status(spec, {}, "t1", runs=runs)
    assert status["runs"] == {"active": 3, "succeeded": 4, "failed": 1}
    assert status["p95DurationSeconds"] == 1.235
    assert status["lastRunTime"] == "2023-11-14T22:13:20Z"
    # Not known yet: left out, so a merge patch keeps what the status shows.
    status, _ = workflow_status(
        spec, {"p95DurationSeconds": 2.0}, "t1", runs=workflow_rec.RunSummary(0, 0, 0)
    )
    assert status["p95DurationSeconds"] == 2.0
    assert "lastRunTime" not in status


def test_unknown_depends_on_is_named() -> None:
    # The CRD rejects this at apply time; objects that bypass it still get a reason.
    spec = workflow_spec({"name": "a", "agent": "x", "dependsOn": ["ghost"]})
    problems = workflow_rec.problems(NS, spec, {"x": frozenset()})
    assert problems == [Problem("UnknownStep", "step a: dependsOn unknown step ghost")]


# -- controller: queueing the runtimes' state, seeing its own status writes ------------


class RecordingKube:
    def __init__(self) -> None:
        self.patches: list[dict[str, Any]] = []
        self.events: list[str] = []

    async def merge_patch(
        self, kind: str, namespace: str, name: str, patch: dict[str, Any], sub: str = ""
    ) -> dict[str, Any]:
        self.patches.append(patch)
        return {}

    async def event(self, regarding: dict[str, Any], type_: str, reason: str, message: str) -> None:
        self.events.append(reason)


class Parts:
    """The operator's queue, cache, writer and triggers, wired as the app wires them."""

    def __init__(self, kube: RecordingKube | None = None) -> None:
        self.queue: WorkQueue[Key] = WorkQueue()
        self.cache = Cache()
        self.writer = writer_mod.Writer(
            cast(Kube, kube or RecordingKube()), lambda key, delay: self.queue.add_after(key, delay)
        )
        policies = PolicyIO(self.cache, self.writer, lambda namespace, name: None)
        self.triggers = Triggers(self.queue, self.cache, self.writer, policies)


def test_circuit_writes_go_before_the_replay() -> None:
    async def scenario() -> None:
        ops = Parts()
        ops.triggers.on_circuit(NS, "replayed", replay=True)
        ops.triggers.on_circuit(NS, "opened", replay=False)
        assert await ops.queue.get() == ("Agent", NS, "opened")
        assert await ops.queue.get() == ("Agent", NS, "replayed")

    asyncio.run(scenario())


def test_usage_writes_wait_for_the_end_of_the_throttle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer_mod, "STATUS_THROTTLE_SECONDS", 0.2)

    async def scenario() -> None:
        ops = Parts()
        key = ("Agent", NS, "busy")
        ops.triggers.on_usage(NS, "busy", replay=False)
        assert await asyncio.wait_for(ops.queue.get(), 1) == key  # nothing written lately
        ops.queue.done(key)
        ops.writer._status_written[key] = time.monotonic()
        for _ in range(5):
            ops.triggers.on_usage(NS, "busy", replay=False)
        assert len(ops.queue) == 0
        assert await asyncio.wait_for(ops.queue.get(), 1) == key
        ops.queue.done(key)
        assert len(ops.queue) == 0  # five merges, one reconcile
        ops.queue.close()

    asyncio.run(scenario())


def test_state_of_agents_not_watched_is_ignored() -> None:
    class Agents:
        def get(self, key: Any, default: Any = None) -> Any:
            return {"body"} if key == (NS, "mine") else None

        def __iter__(self) -> Any:
            return iter([(NS, "mine")])

    ops = Parts()
    ops.cache.indexes = Indexes(*(cast(Index, Agents()) for _ in range(9)))
    ops.triggers.on_circuit("elsewhere", "theirs", replay=False)
    ops.triggers.on_usage("elsewhere", "theirs", replay=False)
    assert len(ops.queue) == 0
    ops.triggers.on_circuit(NS, "mine", replay=False)
    assert len(ops.queue) == 1


def test_a_reconcile_before_the_cache_catches_up_sees_its_own_write() -> None:
    kube = RecordingKube()
    ops = Parts(kube)
    body: dict[str, Any] = {
        "apiVersion": "shoal.dev/v1alpha1",
        "kind": "Agent",
        "metadata": {"name": "triage", "namespace": NS, "uid": "u", "resourceVersion": "7"},
        "status": {"circuit": {"state": "Closed", "since": "", "failureRatePercent": 0}},
    }
    record = circuit("Open", rate=90)
    opened = AgentStatus(circuit=agent_rec.circuit_status(record))
    events = [EventSpec("Warning", "CircuitOpened", "circuit opened")]
    asyncio.run(ops.writer.write_status("Agent", body, opened, events))
    assert (len(kube.patches), kube.events) == (1, ["CircuitOpened"])

    # A KV update reconciles again while the cache still holds resourceVersion 7.
    assert ops.writer.current_status("Agent", body)["circuit"]["state"] == "Open"
    _, events = agent_status(
        obs=observed(deployment(), circuit=record),
        current=ops.writer.current_status("Agent", body),
    )
    assert circuit_events(events) == []

    # Once the cache has moved on, it is the truth again.
    body["metadata"]["resourceVersion"] = "8"
    body["status"] = {"circuit": {"state": "HalfOpen", "since": "t", "failureRatePercent": 0}}
    assert ops.writer.current_status("Agent", body)["circuit"]["state"] == "HalfOpen"


def test_an_unreadable_schedule_window_degrades_the_policy_but_keeps_the_hpa() -> None:
    from shoal_api.scaling import ScalingPolicySpec
    from shoal_operator.builders.common import Owner
    from shoal_operator.reconcilers import scaling as scaling_rec

    spec = ScalingPolicySpec.model_validate(
        {
            "targetRef": {"name": "a"},
            "maxReplicas": 3,
            "schedule": [
                {"cron": "0 8 * * 1-5", "durationMinutes": 60, "minReplicas": 2},
                {"cron": "0 8 * *", "durationMinutes": 60, "minReplicas": 2},
                {
                    "cron": "0 8 * * *",
                    "durationMinutes": 60,
                    "minReplicas": 2,
                    "timeZone": "Mars/Base",
                },
            ],
        }
    )
    owner = Owner("ScalingPolicy", "ns", "p", "uid")
    observed = scaling_rec.PolicyObserved(agents=frozenset({"a"}), winner="p", hpa=None)
    plan = scaling_rec.plan(owner, spec, observed)
    assert plan.hpa is not None
    assert [p.reason for p in plan.problems] == ["InvalidSchedule", "InvalidSchedule"]
    assert plan.problems[0].message.startswith("spec.schedule[1]: ")
    assert "Mars/Base" in plan.problems[1].message
