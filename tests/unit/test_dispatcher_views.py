"""The dispatcher's pure parts: what a Workflow spec allows, and run tallies."""

from __future__ import annotations

from typing import Any

from shoal_api.workflow import WorkflowSpec
from shoal_operator.runs import Tally, view_of


def spec(**fields: Any) -> WorkflowSpec:
    return WorkflowSpec.model_validate(
        {"steps": [{"name": "a", "agent": "x", "input": {}}], **fields}
    )


def test_a_valid_spec_can_run_and_validates_input() -> None:
    view = view_of(spec(input={"type": "object", "required": ["id"]}))
    assert view.problem is None
    assert view.input_validator is not None
    assert not view.input_validator.is_valid({})


def test_why_a_spec_cannot_run() -> None:
    bad_when = WorkflowSpec.model_validate(
        {"steps": [{"name": "a", "agent": "x", "when": "input.(", "input": {}}]}
    )
    assert "step a: invalid CEL" in (view_of(bad_when).problem or "")
    bad_schema = view_of(spec(input={"type": "nonsense"}))
    assert "spec.input is not a valid JSON Schema" in (bad_schema.problem or "")
    cycle = WorkflowSpec.model_validate(
        {
            "steps": [
                {"name": "a", "agent": "x", "dependsOn": ["b"]},
                {"name": "b", "agent": "x", "dependsOn": ["a"]},
            ]
        }
    )
    assert "cycle" in (view_of(cycle).problem or "")


def test_tally_p95() -> None:
    tally = Tally()
    assert tally.p95() is None
    tally.durations.extend(float(i) for i in range(1, 101))
    assert tally.p95() == 95.0
