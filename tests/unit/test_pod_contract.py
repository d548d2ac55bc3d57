"""The pod contract ties the operator's Deployment to the runtime inside it: the env the
builder writes is what the runtime's settings parse, and the ports, probe paths, command
and grace period on both sides come from ``shoal_api.pod_contract``."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from shoal_api import pod_contract as pod
from shoal_api.agent import AgentSpec
from shoal_operator.builders import deployment as dep
from shoal_operator.builders.common import Owner
from shoal_runtime import __main__ as runtime_main
from shoal_runtime import config

AGENT = Owner("Agent", "team-a", "triage", "uid-agent")
DEFAULTS = dep.RuntimeDefaults(image="img", nats_url="nats://nats:4222")


def _pod_spec(spec: AgentSpec) -> dict[str, Any]:
    body = dep.deployment(AGENT, spec, DEFAULTS, 1)
    pod_spec: dict[str, Any] = body["spec"]["template"]["spec"]
    return pod_spec


def _resolved_env(container: dict[str, Any], pod_name: str) -> dict[str, str]:
    """The container's env as the kubelet would resolve it (downward API: pod name)."""
    env: dict[str, str] = {}
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        elif item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[item["name"]] = pod_name
    return env


@pytest.mark.parametrize("timeout", [10, 300])
def test_the_runtime_reads_what_the_deployment_writes(timeout: int) -> None:
    spec = AgentSpec.model_validate({"handler": {"python": "m:f"}, "timeoutSeconds": timeout})
    pod_spec = _pod_spec(spec)
    (container,) = pod_spec["containers"]
    settings = config.Settings.from_env(_resolved_env(container, "triage-abc"))
    assert (settings.namespace, settings.agent) == ("team-a", "triage")
    assert settings.pod_name == "triage-abc"
    assert settings.nats_url == DEFAULTS.nats_url
    assert settings.spec.timeout_seconds == timeout
    # The grace period the runtime drains within is the one the pod really gets.
    assert settings.grace_seconds == pod_spec["terminationGracePeriodSeconds"]
    assert settings.drain_seconds == settings.grace_seconds - pod.DRAIN_RESERVE_SECONDS
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {
        pod.HEALTH_PORT_NAME: settings.health_port,
        pod.METRICS_PORT_NAME: settings.metrics_port,
    }


def test_probes_command_and_ports_are_the_contract() -> None:
    pod_spec = _pod_spec(AgentSpec.model_validate({"handler": {"python": "m:f"}}))
    (container,) = pod_spec["containers"]
    assert container["args"] == ["python", "-m", "shoal_runtime"] == list(pod.RUNTIME_COMMAND)
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert (pod.HEALTH_PORT, pod.METRICS_PORT) == (8080, 9090)
    assert (config.Settings.health_port, config.Settings.metrics_port) == (8080, 9090)
    assert dep.CONFIG_ENV == config.CONFIG_ENV == pod.CONFIG_ENV == "SHOAL_AGENT_CONFIG"
    assert pod.PORT_OVERRIDE_ENVS == ("SHOAL_HEALTH_PORT", "SHOAL_METRICS_PORT")


def test_the_runtime_serves_the_probe_paths_of_the_contract() -> None:
    worker = SimpleNamespace(alive=True, ready=True, stopping=False)
    health = runtime_main.health_routes(worker)  # type: ignore[arg-type]
    metrics = runtime_main.metrics_routes(worker)  # type: ignore[arg-type]
    assert set(health) == {"/livez", "/readyz"} == {pod.LIVENESS_PATH, pod.READINESS_PATH}
    assert set(metrics) == {"/metrics"} == {pod.METRICS_PATH}
    assert health[pod.READINESS_PATH]()[0] == 200
    worker.stopping = True
    assert health[pod.READINESS_PATH]()[0] == 503
