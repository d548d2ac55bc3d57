"""The CRDs on the real API server: Established, explained, and validating at apply."""

from __future__ import annotations

import json
from typing import Any

import pytest

from shoal_testbed.fixtures import Testbed, eventually
from tests.helpers import EXAMPLES, example


def test_crds_are_established(testbed: Testbed, crds: list[str]) -> None:
    assert crds == [
        "agents.shoal.dev",
        "approvals.shoal.dev",
        "scalingpolicies.shoal.dev",
        "workflows.shoal.dev",
    ]
    for name in crds:
        crd = testbed.get("crd", name)
        assert crd is not None
        conds = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conds["Established"] == "True"
        assert conds["NamesAccepted"] == "True"


def test_kubectl_explain_prints_descriptions(testbed: Testbed, crds: list[str]) -> None:
    # The OpenAPI document is published a moment after the CRD is Established.
    out = eventually(
        lambda: testbed.kubectl("explain", "agent.spec.circuitBreaker", check=False).stdout,
        30,
        what="explain agent.spec.circuitBreaker",
    )
    assert "shared by all replicas" in out
    assert "failureRatePercent" in out
    assert "halfOpenProbes" in out
    assert "Successful probe calls in HalfOpen" in out


def test_api_md_examples_are_accepted_and_listed_by_category(
    testbed: Testbed, crds: list[str], namespace: str
) -> None:
    for path in sorted(EXAMPLES.glob("*.yaml")):
        testbed.kubectl("apply", "-n", namespace, "-f", str(path))
    listed = testbed.kubectl("get", "shoal", "-n", namespace, "-o", "name").stdout.split()
    assert sorted(listed) == [
        "agent.shoal.dev/triage",
        "scalingpolicy.shoal.dev/triage",
        "workflow.shoal.dev/customer-inquiry",
    ]
    for short, name in (("sagent", "triage"), ("ssp", "triage"), ("swf", "customer-inquiry")):
        assert testbed.get(short, name, namespace) is not None
    # Defaults are the models' business: the API server stores only what was written.
    stored = testbed.get("agent", "triage", namespace)
    assert stored is not None
    assert "minReplicas" in testbed.get("ssp", "triage", namespace)["spec"]  # type: ignore[index]
    agent = testbed.get("agent", "triage", namespace)
    assert agent is not None
    assert "description" in agent["spec"]


def rejected(testbed: Testbed, namespace: str, obj: dict[str, Any]) -> str:
    proc = testbed.apply(obj, namespace, check=False)
    assert proc.returncode != 0, f"accepted but should be rejected: {json.dumps(obj)}"
    return proc.stderr


def test_min_replicas_above_max_is_rejected(
    testbed: Testbed, crds: list[str], namespace: str
) -> None:
    obj = example("ScalingPolicy")
    obj["spec"].update(minReplicas=5, maxReplicas=2)
    err = rejected(testbed, namespace, obj)
    assert "spec.minReplicas" in err
    assert "minReplicas must be <= maxReplicas" in err


def test_duplicate_step_names_are_rejected(
    testbed: Testbed, crds: list[str], namespace: str
) -> None:
    obj = example("Workflow")
    obj["spec"]["steps"].append({"name": "classify", "agent": "triage"})
    err = rejected(testbed, namespace, obj)
    assert "spec.steps[4]" in err
    assert "Duplicate value" in err
    assert "classify" in err


def test_depends_on_unknown_step_is_rejected(
    testbed: Testbed, crds: list[str], namespace: str
) -> None:
    obj = example("Workflow")
    obj["spec"]["steps"][3]["dependsOn"] = ["classify", "nope"]
    err = rejected(testbed, namespace, obj)
    assert "spec.steps" in err
    assert "every dependsOn entry must name a step of this Workflow" in err


def test_self_dependency_is_rejected(testbed: Testbed, crds: list[str], namespace: str) -> None:
    obj = example("Workflow")
    obj["spec"]["steps"][1]["dependsOn"] = ["classify"]
    err = rejected(testbed, namespace, obj)
    assert "spec.steps[1].dependsOn" in err
    assert "a step cannot depend on itself" in err


@pytest.mark.parametrize("which", ["both", "neither"])
def test_handler_needs_exactly_one_kind(
    testbed: Testbed, crds: list[str], namespace: str, which: str
) -> None:
    obj = example("Agent")
    if which == "both":
        obj["spec"]["handler"]["llm"] = {"baseURL": "http://llm:8000/v1", "model": "m"}
    else:
        obj["spec"]["handler"] = {}
    err = rejected(testbed, namespace, obj)
    assert "spec.handler" in err
    assert "exactly one of handler.python or handler.llm must be set" in err


def test_step_needs_exactly_one_of_agent_or_selector(
    testbed: Testbed, crds: list[str], namespace: str
) -> None:
    obj = example("Workflow")
    obj["spec"]["steps"][0]["agentSelector"] = {"capability": "auth"}
    err = rejected(testbed, namespace, obj)
    assert "spec.steps[0]" in err
    assert "exactly one of agent or agentSelector must be set" in err


def test_agent_cannot_fall_back_to_itself(
    testbed: Testbed, crds: list[str], namespace: str
) -> None:
    obj = example("Agent")
    obj["spec"]["fallback"] = {"agent": obj["metadata"]["name"]}
    err = rejected(testbed, namespace, obj)
    assert "spec.fallback.agent" in err
    assert "must name another Agent" in err


@pytest.mark.parametrize(
    ("kind", "path", "field"),
    [
        ("Agent", ["spec"], "spec.bogus"),
        ("Agent", ["spec", "circuitBreaker"], "spec.circuitBreaker.bogus"),
        ("ScalingPolicy", ["spec"], "spec.bogus"),
        ("Workflow", ["spec", "steps", 0], "spec.steps[0].bogus"),
    ],
)
def test_unknown_fields_are_rejected(
    testbed: Testbed, crds: list[str], namespace: str, kind: str, path: list[Any], field: str
) -> None:
    obj = example(kind)
    node = obj
    for key in path:
        node = node[key]
    node["bogus"] = 1
    err = rejected(testbed, namespace, obj)
    assert f'unknown field "{field}"' in err


@pytest.mark.parametrize(
    ("kind", "path", "value", "field"),
    [
        (
            "Agent",
            ["spec", "circuitBreaker", "failureRatePercent"],
            101,
            "spec.circuitBreaker.failureRatePercent",
        ),
        ("Agent", ["spec", "concurrency"], 0, "spec.concurrency"),
        ("Agent", ["spec", "retry", "maxAttempts"], 0, "spec.retry.maxAttempts"),
        ("Agent", ["spec", "budget", "onExceeded"], "Panic", "spec.budget.onExceeded"),
        ("ScalingPolicy", ["spec", "maxReplicas"], 0, "spec.maxReplicas"),
        ("Workflow", ["spec", "priority"], 10, "spec.priority"),
    ],
)
def test_numbers_and_enums_in_range(
    testbed: Testbed,
    crds: list[str],
    namespace: str,
    kind: str,
    path: list[str],
    value: Any,
    field: str,
) -> None:
    obj = example(kind)
    node = obj
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    err = rejected(testbed, namespace, obj)
    assert field in err
