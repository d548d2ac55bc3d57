"""The operator runs against the real API server, in-process and as a subprocess."""

from __future__ import annotations

from typing import Any

from shoal_testbed.fixtures import OperatorProcess, Testbed, eventually

AGENT = {
    "apiVersion": "shoal.dev/v1alpha1",
    "kind": "Agent",
    "metadata": {"name": "echo"},
    "spec": {"handler": {"python": "shoal_examples.echo:handle"}},
}


def observed(testbed: Testbed, namespace: str) -> dict[str, Any] | None:
    obj = testbed.get("agent", "echo", namespace)
    if obj and obj.get("status", {}).get("observedGeneration") == obj["metadata"]["generation"]:
        return obj
    return None


def test_operator_in_process_observes_agents(
    testbed: Testbed, operator: Any, namespace: str
) -> None:
    testbed.apply(AGENT, namespace)
    obj = eventually(lambda: observed(testbed, namespace), 30, what="status.observedGeneration")
    assert obj["status"]["observedGeneration"] == 1


def test_operator_as_subprocess_observes_agents(
    testbed: Testbed, operator_process: OperatorProcess, namespace: str
) -> None:
    testbed.apply(AGENT, namespace)
    eventually(lambda: observed(testbed, namespace), 30, what="status.observedGeneration")
    assert operator_process.poll() is None
