"""status_patch: the one serializer from status models to the status subresource."""

from __future__ import annotations

import json
from decimal import Decimal

from shoal_api.agent import AgentStatus, CircuitStatus, QueueStatus, UsageStatus
from shoal_api.approval import ApprovalStatus
from shoal_api.base import Condition, ObjectStatus, status_patch
from shoal_api.scaling import ScalingPolicyStatus
from shoal_api.workflow import RunCounts, WorkflowStatus

READY = Condition(
    type="Ready",
    status="True",
    reason="Available",
    message="1/1",
    observed_generation=2,
    last_transition_time="2026-01-05T07:00:00Z",
)


def test_camel_case_under_status() -> None:
    patch = status_patch(
        AgentStatus(
            observed_generation=2,
            conditions=(READY,),
            replicas=1,
            ready_replicas=1,
            queue=QueueStatus(pending=3, in_flight=1),
        )
    )
    assert patch == {
        "status": {
            "conditions": [
                {
                    "lastTransitionTime": "2026-01-05T07:00:00Z",
                    "message": "1/1",
                    "observedGeneration": 2,
                    "reason": "Available",
                    "status": "True",
                    "type": "Ready",
                }
            ],
            "observedGeneration": 2,
            "queue": {"inFlight": 1, "pending": 3},
            "readyReplicas": 1,
            "replicas": 1,
        }
    }


def test_keys_are_sorted_at_every_depth() -> None:
    patch = status_patch(AgentStatus(conditions=(READY,), circuit=CircuitStatus()))
    text = json.dumps(patch)
    assert text == json.dumps(patch, sort_keys=True)


def test_none_is_left_out_so_the_merge_patch_keeps_it() -> None:
    status = status_patch(ScalingPolicyStatus(hpa_name="p"))["status"]
    assert "lastScaleTime" not in status
    assert "lastDecision" not in status
    assert status["hpaName"] == "p"
    assert "appliedAt" not in status_patch(ApprovalStatus(phase="Pending"))["status"]
    wf = status_patch(WorkflowStatus(step_count=2, runs=RunCounts(active=1)))["status"]
    assert wf == {
        "conditions": [],
        "observedGeneration": 0,
        "runs": {"active": 1, "failed": 0, "succeeded": 0},
        "stepCount": 2,
    }


def test_defaults_are_written() -> None:
    # A merge patch keeps a key that is left out: a known value is always spelled out.
    assert status_patch(CircuitStatus())["status"] == {
        "failureRatePercent": 0.0,
        "since": "",
        "state": "Closed",
    }


def test_money_is_a_decimal_string() -> None:
    usage = UsageStatus(tasks_last_hour=1, tokens_last_hour=2, cost_last_hour=Decimal("0.50"))
    assert status_patch(usage)["status"]["costLastHour"] == "0.50"


def test_mirrored_figures_stay_within_the_schema() -> None:
    assert CircuitStatus(failure_rate_percent=150).failure_rate_percent == 100.0
    assert CircuitStatus(failure_rate_percent=-1).failure_rate_percent == 0.0
    assert CircuitStatus(failure_rate_percent=float("nan")).failure_rate_percent == 0.0
    usage = UsageStatus(tasks_last_hour=-1, tokens_last_hour=-5, cost_last_hour=Decimal(-1))
    assert status_patch(usage)["status"] == {
        "costLastHour": "0",
        "tasksLastHour": 0,
        "tokensLastHour": 0,
    }


def test_the_shared_part_is_what_an_invalid_spec_writes() -> None:
    assert status_patch(ObjectStatus(observed_generation=3, conditions=(READY,)))["status"] == {
        "conditions": [READY.to_wire()],
        "observedGeneration": 3,
    }


def test_equal_statuses_give_equal_patches() -> None:
    a = WorkflowStatus(step_count=1, p95_duration_seconds=0.5, last_run_time="t")
    b = WorkflowStatus.model_validate(status_patch(a)["status"])
    assert status_patch(a) == status_patch(b)
