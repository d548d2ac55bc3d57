"""The pure builders: a parsed spec in, the Kubernetes / JetStream object out."""

from __future__ import annotations

import json
from typing import Any

import pytest

from shoal_api import nats_layout as nl
from shoal_api.agent import AgentSpec
from shoal_api.base import API_VERSION
from shoal_api.scaling import ScalingPolicySpec
from shoal_operator.builders import deployment as dep
from shoal_operator.builders import jetstream
from shoal_operator.builders.common import (
    AGENT_LABEL,
    POLICY_LABEL,
    Owner,
    agent_labels,
    agent_selector,
)
from shoal_operator.builders.hpa import LATENCY_METRIC, QUEUE_LAG_METRIC, hpa

AGENT = Owner("Agent", "team-a", "triage", "uid-agent")
POLICY = Owner("ScalingPolicy", "team-a", "triage-scaler", "uid-policy")
DEFAULTS = dep.RuntimeDefaults(image="ghcr.io/shoal/runtime:1.0", nats_url="nats://nats:4222")


def agent_spec(**fields: Any) -> AgentSpec:
    return AgentSpec.model_validate({"handler": {"python": "m:f"}, **fields})


def policy_spec(**fields: Any) -> ScalingPolicySpec:
    return ScalingPolicySpec.model_validate(
        {"targetRef": {"name": "triage"}, "maxReplicas": 10, **fields}
    )


def container(body: dict[str, Any]) -> dict[str, Any]:
    containers = body["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    c: dict[str, Any] = containers[0]
    return c


def env_of(body: dict[str, Any]) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = container(body)["env"]
    return env


def env_value(body: dict[str, Any], name: str) -> Any:
    matches = [e for e in env_of(body) if e["name"] == name]
    assert len(matches) == 1, name
    return matches[0].get("value", matches[0].get("valueFrom"))


def config_of(body: dict[str, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(env_value(body, dep.CONFIG_ENV))
    return doc


# -- common --------------------------------------------------------------------------


def test_owner_reference_makes_the_owner_the_controller() -> None:
    ref = AGENT.reference()
    assert ref == {
        "apiVersion": API_VERSION,
        "kind": "Agent",
        "name": "triage",
        "uid": "uid-agent",
        "controller": True,
        "blockOwnerDeletion": True,
    }


def test_owner_metadata_sorts_labels_and_sets_namespace() -> None:
    meta = AGENT.metadata("child", {"z": "1", "a": "2"})
    assert meta["name"] == "child"
    assert meta["namespace"] == "team-a"
    assert list(meta["labels"]) == ["a", "z"]
    assert meta["ownerReferences"] == [AGENT.reference()]


def test_agent_labels_contain_the_selector() -> None:
    labels = agent_labels("triage")
    assert agent_selector("triage").items() <= labels.items()
    assert labels[AGENT_LABEL] == "triage"
    assert labels["app.kubernetes.io/managed-by"] == "shoal"


# -- deployment ----------------------------------------------------------------------


def test_replicas_omitted_when_none() -> None:
    body = dep.deployment(AGENT, agent_spec(), DEFAULTS, None)
    assert "replicas" not in body["spec"]


@pytest.mark.parametrize("replicas", [0, 1, 7])
def test_replicas_present_when_given(replicas: int) -> None:
    body = dep.deployment(AGENT, agent_spec(), DEFAULTS, replicas)
    assert body["spec"]["replicas"] == replicas


def test_deployment_identity_selector_and_owner() -> None:
    body = dep.deployment(AGENT, agent_spec(), DEFAULTS, 1)
    assert body["apiVersion"] == "apps/v1"
    assert body["kind"] == "Deployment"
    assert body["metadata"]["name"] == "triage"
    assert body["metadata"]["namespace"] == "team-a"
    assert body["metadata"]["ownerReferences"] == [AGENT.reference()]
    selector = body["spec"]["selector"]["matchLabels"]
    assert selector == agent_selector("triage")
    # A Deployment whose template does not match its selector is rejected.
    assert selector.items() <= body["spec"]["template"]["metadata"]["labels"].items()


def test_rolling_update_never_drops_below_the_replica_count() -> None:
    strategy = dep.deployment(AGENT, agent_spec(), DEFAULTS, 1)["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0


def test_pod_and_container_security_context_are_hardened() -> None:
    body = dep.deployment(AGENT, agent_spec(), DEFAULTS, 1)
    pod = body["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container(body)["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsNonRoot"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    # A read-only root filesystem needs a writable /tmp.
    assert {"name": "tmp", "mountPath": "/tmp"} in container(body)["volumeMounts"]
    assert any(v["name"] == "tmp" and "emptyDir" in v for v in pod["volumes"])


@pytest.mark.parametrize("timeout", [1, 60, 3600])
def test_grace_period_is_timeout_plus_drain_margin(timeout: int) -> None:
    body = dep.deployment(AGENT, agent_spec(timeoutSeconds=timeout), DEFAULTS, 1)
    assert body["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == timeout + 30


def test_image_defaults_to_the_operator_runtime_image() -> None:
    assert container(dep.deployment(AGENT, agent_spec(), DEFAULTS, 1))["image"] == DEFAULTS.image
    custom = agent_spec(runtime={"image": "example.com/mine:2"})
    assert container(dep.deployment(AGENT, custom, DEFAULTS, 1))["image"] == "example.com/mine:2"


def test_image_pull_policy_comes_from_defaults() -> None:
    defaults = dep.RuntimeDefaults("img", "nats://x", image_pull_policy="Always")
    assert container(dep.deployment(AGENT, agent_spec(), defaults, 1))["imagePullPolicy"] == (
        "Always"
    )


def test_probes_use_the_named_health_port() -> None:
    c = container(dep.deployment(AGENT, agent_spec(), DEFAULTS, 1))
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"health": dep.HEALTH_PORT, "metrics": dep.METRICS_PORT}
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "health"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}


def test_shoal_env_identifies_the_agent() -> None:
    body = dep.deployment(AGENT, agent_spec(), DEFAULTS, 1)
    assert env_value(body, "SHOAL_NAMESPACE") == "team-a"
    assert env_value(body, "SHOAL_AGENT") == "triage"
    assert env_value(body, "SHOAL_NATS_URL") == "nats://nats:4222"
    assert env_value(body, "SHOAL_POD_NAME") == {"fieldRef": {"fieldPath": "metadata.name"}}


def test_runtime_config_is_the_spec_without_replicas() -> None:
    spec = agent_spec(runtime={"replicas": 4}, concurrency=3)
    doc = config_of(dep.deployment(AGENT, spec, DEFAULTS, 4))
    assert doc["namespace"] == "team-a"
    assert doc["name"] == "triage"
    assert doc["spec"]["concurrency"] == 3
    assert doc["spec"]["handler"] == {"python": "m:f"}
    assert "replicas" not in doc["spec"]["runtime"]


def test_runtime_config_does_not_mutate_the_spec() -> None:
    spec = agent_spec(runtime={"replicas": 4})
    dep.runtime_config(AGENT, spec)
    assert spec.runtime.replicas == 4
    assert spec.to_wire()["runtime"]["replicas"] == 4


def test_runtime_config_is_deterministic_for_equal_specs() -> None:
    raw_a = {"concurrency": 2, "timeoutSeconds": 10, "capabilities": ["x"]}
    raw_b = {"capabilities": ["x"], "timeoutSeconds": 10, "concurrency": 2}
    a = env_value(dep.deployment(AGENT, agent_spec(**raw_a), DEFAULTS, 1), dep.CONFIG_ENV)
    b = env_value(dep.deployment(AGENT, agent_spec(**raw_b), DEFAULTS, 1), dep.CONFIG_ENV)
    assert a == b
    assert a == json.dumps(json.loads(a), sort_keys=True, separators=(",", ":"))


def test_scaling_does_not_change_the_pod_template() -> None:
    one = dep.deployment(AGENT, agent_spec(runtime={"replicas": 1}), DEFAULTS, 1)
    many = dep.deployment(AGENT, agent_spec(runtime={"replicas": 9}), DEFAULTS, 9)
    assert one["spec"]["template"] == many["spec"]["template"]


def test_changing_concurrency_changes_the_config_env() -> None:
    a = env_value(dep.deployment(AGENT, agent_spec(concurrency=8), DEFAULTS, 1), dep.CONFIG_ENV)
    b = env_value(dep.deployment(AGENT, agent_spec(concurrency=9), DEFAULTS, 1), dep.CONFIG_ENV)
    assert a != b


def test_llm_api_key_becomes_a_secret_key_ref() -> None:
    spec = agent_spec(
        handler={
            "llm": {
                "baseURL": "http://llm:8000/v1",
                "model": "m",
                "apiKeySecretRef": {"name": "llm-creds", "key": "token"},
            }
        }
    )
    body = dep.deployment(AGENT, spec, DEFAULTS, 1)
    assert env_value(body, "SHOAL_LLM_API_KEY") == {
        "secretKeyRef": {"name": "llm-creds", "key": "token"}
    }
    names = [e["name"] for e in env_of(body)]
    assert names.index("SHOAL_LLM_API_KEY") > names.index(dep.CONFIG_ENV)


def test_no_api_key_env_without_a_secret_ref() -> None:
    spec = agent_spec(handler={"llm": {"baseURL": "http://llm:8000/v1", "model": "m"}})
    names = [e["name"] for e in env_of(dep.deployment(AGENT, spec, DEFAULTS, 1))]
    assert "SHOAL_LLM_API_KEY" not in names


def test_user_env_is_appended_after_shoals() -> None:
    spec = agent_spec(
        runtime={
            "env": [
                {"name": "A", "value": "1"},
                {"name": "B", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "k"}}},
            ]
        }
    )
    env = env_of(dep.deployment(AGENT, spec, DEFAULTS, 1))
    assert env[-2:] == [
        {"name": "A", "value": "1"},
        {"name": "B", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "k"}}},
    ]
    names = [e["name"] for e in env]
    assert names.index(dep.CONFIG_ENV) < names.index("A")


def test_resources_are_passed_through() -> None:
    resources = {"limits": {"cpu": "1", "memory": "512Mi"}, "requests": {"cpu": "100m"}}
    body = dep.deployment(AGENT, agent_spec(runtime={"resources": resources}), DEFAULTS, 1)
    assert container(body)["resources"] == resources


def test_no_resources_key_when_unset() -> None:
    assert "resources" not in container(dep.deployment(AGENT, agent_spec(), DEFAULTS, 1))


def test_service_account_defaults_to_the_agents_own() -> None:
    body = dep.deployment(AGENT, agent_spec(), DEFAULTS, 1)
    assert body["spec"]["template"]["spec"]["serviceAccountName"] == "triage"
    custom = agent_spec(runtime={"serviceAccountName": "shared"})
    body = dep.deployment(AGENT, custom, DEFAULTS, 1)
    assert body["spec"]["template"]["spec"]["serviceAccountName"] == "shared"


def test_service_account_object() -> None:
    sa = dep.service_account(AGENT)
    assert sa["kind"] == "ServiceAccount"
    assert sa["metadata"]["name"] == "triage"
    assert sa["metadata"]["ownerReferences"] == [AGENT.reference()]
    assert sa["automountServiceAccountToken"] is False


# -- hpa -----------------------------------------------------------------------------


@pytest.mark.parametrize(("min_replicas", "expected"), [(0, 1), (1, 1), (3, 3)])
def test_hpa_min_replicas_is_at_least_one(min_replicas: int, expected: int) -> None:
    body = hpa(POLICY, policy_spec(minReplicas=min_replicas))
    assert body["spec"]["minReplicas"] == expected
    assert body["spec"]["maxReplicas"] == 10


def test_hpa_targets_the_agents_deployment() -> None:
    body = hpa(POLICY, policy_spec())
    assert body["apiVersion"] == "autoscaling/v2"
    assert body["kind"] == "HorizontalPodAutoscaler"
    assert body["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "triage",
    }


def test_hpa_owner_and_labels() -> None:
    meta = hpa(POLICY, policy_spec())["metadata"]
    assert meta["name"] == "triage-scaler"
    assert meta["namespace"] == "team-a"
    assert meta["ownerReferences"] == [POLICY.reference()]
    assert meta["ownerReferences"][0]["kind"] == "ScalingPolicy"
    assert meta["labels"][AGENT_LABEL] == "triage"
    assert meta["labels"][POLICY_LABEL] == "triage-scaler"
    assert meta["labels"]["app.kubernetes.io/managed-by"] == "shoal"


def test_hpa_metrics_mapping() -> None:
    spec = policy_spec(
        metrics=[
            {"type": "QueueLag", "target": 10},
            {"type": "Latency", "targetMillis": 2000},
            {"type": "CPU", "targetUtilizationPercent": 70},
        ]
    )
    lag, latency, cpu = hpa(POLICY, spec)["spec"]["metrics"]
    selector = {"matchLabels": {AGENT_LABEL: "triage"}}
    assert lag == {
        "type": "External",
        "external": {
            "metric": {"name": QUEUE_LAG_METRIC, "selector": selector},
            "target": {"type": "AverageValue", "averageValue": "10"},
        },
    }
    assert latency == {
        "type": "External",
        "external": {
            "metric": {"name": LATENCY_METRIC, "selector": selector},
            "target": {"type": "Value", "value": "2000"},
        },
    }
    assert cpu == {
        "type": "Resource",
        "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}},
    }


def test_hpa_default_metric_is_queue_lag_ten() -> None:
    (metric,) = hpa(POLICY, policy_spec())["spec"]["metrics"]
    assert metric["external"]["metric"]["name"] == QUEUE_LAG_METRIC
    assert metric["external"]["target"]["averageValue"] == "10"


def test_hpa_behavior_passed_through_only_when_set() -> None:
    assert "behavior" not in hpa(POLICY, policy_spec())["spec"]
    behavior = {"scaleDown": {"stabilizationWindowSeconds": 120}}
    assert hpa(POLICY, policy_spec(behavior=behavior))["spec"]["behavior"] == behavior


# -- jetstream -----------------------------------------------------------------------


def test_streams_cover_every_subject_space() -> None:
    by_name = {s["name"]: s for s in jetstream.streams()}
    assert by_name[nl.TASKS_STREAM]["subjects"] == [nl.TASK_SUBJECTS]
    assert by_name[nl.TASKS_STREAM]["retention"] == "workqueue"
    assert by_name[nl.RESULTS_STREAM]["subjects"] == [nl.RESULT_SUBJECTS]
    assert by_name[nl.DLQ_STREAM]["subjects"] == [nl.DLQ_SUBJECTS]
    assert by_name[nl.RESULTS_STREAM]["max_age"] == 24 * 3600 * 10**9
    assert by_name[nl.TASKS_STREAM]["max_age"] == 7 * 24 * 3600 * 10**9


def test_retry_delays_are_capped_exponential() -> None:
    spec = agent_spec(
        retry={
            "maxAttempts": 6,
            "backoff": {"initialSeconds": 2, "maxSeconds": 20, "multiplier": 3},
        }
    )
    assert spec.retry.delays() == [2, 6, 18, 20, 20, 20]


def normal_band(namespace: str, agent: str, spec: AgentSpec, replicas: int) -> dict[str, Any]:
    (c,) = [
        c
        for c in jetstream.consumers(namespace, agent, spec, replicas)
        if c["durable_name"] == nl.consumer_name(namespace, agent)
    ]
    return c


def test_consumer_backoff_in_nanoseconds() -> None:
    spec = agent_spec(
        timeoutSeconds=10,
        retry={
            "maxAttempts": 4,
            "backoff": {"initialSeconds": 1, "maxSeconds": 5, "multiplier": 2},
        },
    )
    c = normal_band("team-a", "triage", spec, 1)
    delays = [1, 2, 4, 5]
    assert c["backoff"] == [(10 + 30 + d) * 10**9 for d in delays]
    assert all(isinstance(b, int) for b in c["backoff"])


@pytest.mark.parametrize("attempts", [1, 2, 5, 100])
def test_consumer_delivers_once_more_than_attempts(attempts: int) -> None:
    c = normal_band("ns", "a", agent_spec(retry={"maxAttempts": attempts}), 1)
    assert c["max_deliver"] == attempts + 1
    # JetStream rejects a backoff list longer than max_deliver.
    assert len(c["backoff"]) < c["max_deliver"]


def test_consumer_ack_wait_is_first_backoff() -> None:
    c = normal_band("ns", "a", agent_spec(timeoutSeconds=45), 1)
    assert c["ack_wait"] == c["backoff"][0]
    assert c["ack_wait"] == (45 + 30 + 1) * 10**9


def test_consumer_backoff_is_non_decreasing() -> None:
    c = normal_band("ns", "a", agent_spec(retry={"maxAttempts": 10}), 1)
    assert c["backoff"] == sorted(c["backoff"])


@pytest.mark.parametrize(("replicas", "expected"), [(0, 3), (1, 3), (4, 12)])
def test_consumer_max_ack_pending(replicas: int, expected: int) -> None:
    c = normal_band("ns", "a", agent_spec(concurrency=3), replicas)
    assert c["max_ack_pending"] == expected


def test_one_consumer_per_band_alike_but_for_name_and_filter() -> None:
    cs = jetstream.consumers("team-a", "triage", agent_spec(concurrency=3), 2)
    assert [c["durable_name"] for c in cs] == [
        "team-a_triage",
        "team-a_triage_high",
        "team-a_triage_low",
    ]
    assert [c["filter_subjects"] for c in cs] == [
        [f"shoal.task.team-a.triage.{p}" for p in (4, 5, 6)],
        [f"shoal.task.team-a.triage.{p}" for p in (7, 8, 9)],
        [f"shoal.task.team-a.triage.{p}" for p in (0, 1, 2, 3)],
    ]
    rest = [
        {k: v for k, v in c.items() if k not in ("durable_name", "filter_subjects")} for c in cs
    ]
    assert rest[0] == rest[1] == rest[2]
    assert rest[0]["ack_policy"] == "explicit"
    assert "filter_subject" not in rest[0]


def test_band_filters_cover_every_priority_once() -> None:
    # A work-queue stream refuses consumers whose filters overlap.
    subjects = [
        s for c in jetstream.consumers("ns", "a", agent_spec(), 1) for s in c["filter_subjects"]
    ]
    assert sorted(subjects) == sorted(nl.task_subject("ns", "a", p) for p in nl.PRIORITIES)
