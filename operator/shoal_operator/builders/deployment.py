"""The Deployment and ServiceAccount that run an Agent's runtime pods."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from shoal_api import pod_contract as pod
from shoal_api.agent import AgentSpec
from shoal_api.pod_contract import CONFIG_ENV, DRAIN_MARGIN_SECONDS, HEALTH_PORT, METRICS_PORT
from shoal_operator.builders.common import Owner, agent_labels, agent_selector

# The ports, probe paths, env names and drain margin are the pod contract
# (shoal_api.pod_contract) that the runtime reads too; re-exported here for callers.
__all__ = [
    "CONFIG_ENV",
    "DRAIN_MARGIN_SECONDS",
    "HEALTH_PORT",
    "METRICS_PORT",
    "RUNTIME_CONTAINER",
    "RUNTIME_UID",
    "RuntimeDefaults",
    "deployment",
    "runtime_config",
    "service_account",
    "service_account_name",
]

RUNTIME_CONTAINER = "runtime"
RUNTIME_UID = 65532


@dataclass(frozen=True)
class RuntimeDefaults:
    """What the operator was installed with and passes to every runtime pod."""

    image: str
    nats_url: str
    image_pull_policy: str = "IfNotPresent"


def runtime_config(owner: Owner, spec: AgentSpec) -> str:
    """The runtime's configuration: the Agent spec with defaults applied, as canonical JSON.

    It travels in an env var, so any spec change rolls the pods. ``runtime.replicas``
    is left out: scaling must not restart pods.
    """
    wire = spec.to_wire()
    wire.get("runtime", {}).pop("replicas", None)
    doc = {"namespace": owner.namespace, "name": owner.name, "spec": wire}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def service_account_name(owner: Owner, spec: AgentSpec) -> str:
    return spec.runtime.service_account_name or owner.name


def service_account(owner: Owner) -> dict[str, Any]:
    """The Agent's own ServiceAccount; runtimes never call the Kubernetes API."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": owner.metadata(owner.name, agent_labels(owner.name)),
        "automountServiceAccountToken": False,
    }


def _env(owner: Owner, spec: AgentSpec, defaults: RuntimeDefaults) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": pod.NAMESPACE_ENV, "value": owner.namespace},
        {"name": pod.AGENT_ENV, "value": owner.name},
        {"name": pod.NATS_URL_ENV, "value": defaults.nats_url},
        {"name": CONFIG_ENV, "value": runtime_config(owner, spec)},
        {"name": pod.POD_NAME_ENV, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ]
    llm = spec.handler.llm
    if llm is not None and llm.api_key_secret_ref is not None:
        ref = llm.api_key_secret_ref
        env.append(
            {
                "name": pod.LLM_API_KEY_ENV,
                "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}},
            }
        )
    env.extend(e.to_wire() for e in spec.runtime.env)
    return env


def deployment(
    owner: Owner, spec: AgentSpec, defaults: RuntimeDefaults, replicas: int | None
) -> dict[str, Any]:
    """The Agent's Deployment. ``replicas`` None leaves the field to the HPA."""
    labels = agent_labels(owner.name)
    probe = {"periodSeconds": 10, "timeoutSeconds": 2, "failureThreshold": 3}
    container: dict[str, Any] = {
        "name": RUNTIME_CONTAINER,
        "image": spec.runtime.image or defaults.image,
        "imagePullPolicy": defaults.image_pull_policy,
        "args": list(pod.RUNTIME_COMMAND),
        "env": _env(owner, spec, defaults),
        "ports": [
            {"name": pod.HEALTH_PORT_NAME, "containerPort": HEALTH_PORT, "protocol": "TCP"},
            {"name": pod.METRICS_PORT_NAME, "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        "livenessProbe": {
            "httpGet": {"path": pod.LIVENESS_PATH, "port": pod.HEALTH_PORT_NAME},
            **probe,
        },
        "readinessProbe": {
            "httpGet": {"path": pod.READINESS_PATH, "port": pod.HEALTH_PORT_NAME},
            **probe,
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    if spec.runtime.resources is not None:
        container["resources"] = spec.runtime.resources.to_wire()
    body: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": owner.metadata(owner.name, labels),
        "spec": {
            "selector": {"matchLabels": agent_selector(owner.name)},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": "25%"},
            },
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(METRICS_PORT),
                    },
                },
                "spec": {
                    "serviceAccountName": service_account_name(owner, spec),
                    "automountServiceAccountToken": False,
                    "terminationGracePeriodSeconds": pod.grace_period_seconds(spec.timeout_seconds),
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": RUNTIME_UID,
                        "runAsGroup": RUNTIME_UID,
                        "fsGroup": RUNTIME_UID,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [container],
                    "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}}],
                },
            },
        },
    }
    if replicas is not None:
        body["spec"]["replicas"] = replicas
    return body
