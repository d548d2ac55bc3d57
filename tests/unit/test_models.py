"""The models parse the API.md examples, apply defaults, and reject what the CRD rejects."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError

from shoal_api.agent import Agent, AgentSpec
from shoal_api.base import ApiModel
from shoal_api.scaling import ScalingPolicySpec
from shoal_api.workflow import WorkflowSpec
from tests.helpers import example_docs

SPEC_MODELS: dict[str, type[ApiModel]] = {
    "Agent": AgentSpec,
    "ScalingPolicy": ScalingPolicySpec,
    "Workflow": WorkflowSpec,
}


@pytest.mark.parametrize(
    "doc", example_docs(recursive=True), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}"
)
def test_examples_parse(doc: dict[str, Any]) -> None:
    SPEC_MODELS[doc["kind"]].model_validate(doc["spec"])


def test_agent_defaults_come_from_the_model() -> None:
    spec = AgentSpec.model_validate({"handler": {"python": "m:f"}})
    assert spec.concurrency == 8
    assert spec.timeout_seconds == 60
    assert spec.retry.max_attempts == 5
    assert spec.retry.backoff.multiplier == 2.0
    assert spec.runtime.replicas == 1
    assert spec.circuit_breaker is None


def test_wire_form_is_camel_case_and_round_trips() -> None:
    raw = {
        "handler": {
            "llm": {
                "baseURL": "http://x/v1",
                "model": "m",
                "pricing": {"inputPer1kTokens": "0.0005"},
            }
        },
        "budget": {"costPerHour": "5.00"},
        "timeoutSeconds": 5,
    }
    spec = AgentSpec.model_validate(raw)
    assert spec.budget is not None
    assert spec.budget.cost_per_hour == Decimal("5.00")
    wire = spec.to_wire()
    assert wire["handler"]["llm"]["baseURL"] == "http://x/v1"
    assert wire["handler"]["llm"]["pricing"]["inputPer1kTokens"] == "0.0005"
    assert wire["budget"]["costPerHour"] == "5.00"
    assert AgentSpec.model_validate(wire) == spec


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"handler": {"python": "m:f"}, "bogus": 1}, "bogus"),
        ({"handler": {"python": "m:f"}, "concurrency": 0}, "concurrency"),
        ({"handler": {"python": "m:f"}, "budget": {"costPerHour": "-1"}}, "costPerHour"),
        ({"handler": {"python": "not a callable"}}, "python"),
    ],
)
def test_agent_rejects(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as err:
        AgentSpec.model_validate(spec)
    assert field in str(err.value)


def test_models_are_immutable() -> None:
    agent = Agent.model_validate({"spec": {"handler": {"python": "m:f"}}})
    with pytest.raises(ValidationError):
        agent.spec.concurrency = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("metric", "needed"),
    [
        ({"type": "QueueLag"}, "target"),
        ({"type": "Latency"}, "targetMillis"),
        ({"type": "CPU"}, "targetUtilizationPercent"),
    ],
)
def test_metric_needs_its_target(metric: dict[str, Any], needed: str) -> None:
    with pytest.raises(ValidationError) as err:
        ScalingPolicySpec.model_validate(
            {"targetRef": {"name": "a"}, "maxReplicas": 2, "metrics": [metric]}
        )
    assert f"{metric['type']} needs {needed}" in str(err.value)
