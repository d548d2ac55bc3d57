"""The operator on the real API server and nats-server: children, repairs, idempotence,
references, bad input."""

from __future__ import annotations

import asyncio
import json
import time
from functools import partial
from typing import Any

import nats
import pytest

from shoal_api import nats_layout as nl
from shoal_testbed.fixtures import OperatorProcess, Testbed, eventually
from tests.helpers import agent, condition, example, example_docs, is_ready, scaling_policy


def js_request(url: str, subject: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        nc = await nats.connect(url)
        try:
            payload = json.dumps(body).encode() if body is not None else b""
            msg = await nc.request(f"$JS.API.{subject}", payload, timeout=5)
            out: dict[str, Any] = json.loads(msg.data)
            return out
        finally:
            await nc.close()

    return asyncio.run(go())


def band_consumers(testbed: Testbed, ns: str, name: str) -> dict[str, dict[str, Any]]:
    """The Agent's priority band consumers that exist, by band."""
    infos = {
        b.name: js_request(
            testbed.nats_url,
            f"CONSUMER.INFO.{nl.TASKS_STREAM}.{nl.consumer_name(ns, name, b.name)}",
        )
        for b in nl.BANDS
    }
    return {band: info for band, info in infos.items() if "error" not in info}


def consumer(testbed: Testbed, ns: str, name: str) -> dict[str, Any] | None:
    """The normal band's consumer, once every band's is there (alike but for the filter)."""
    found = band_consumers(testbed, ns, name)
    return found[nl.NAMED_BAND] if len(found) == len(nl.BANDS) else None


def reconciled(testbed: Testbed, kind: str, name: str, ns: str) -> dict[str, Any] | None:
    obj = testbed.get(kind, name, ns)
    if obj and (obj.get("status") or {}).get("observedGeneration") == obj["metadata"]["generation"]:
        return obj
    return None


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = deployment["spec"]["template"]["spec"]["containers"][0]
    return out


def env_of(deployment: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(deployment)["env"]}


def test_examples_become_children_matching_the_spec(
    testbed: Testbed, operator: Any, namespace: str
) -> None:
    for doc in example_docs():
        testbed.apply(doc, namespace)
    dep = eventually(
        lambda: testbed.get("deployment", "triage", namespace), 30, what="Deployment triage"
    )
    sa = eventually(
        lambda: testbed.get("serviceaccount", "triage", namespace), 30, what="ServiceAccount triage"
    )
    hpa = eventually(lambda: testbed.get("hpa", "triage", namespace), 30, what="HPA triage")
    cons = eventually(lambda: consumer(testbed, namespace, "triage"), 30, what="consumer")
    spec = example("Agent")["spec"]

    # Deployment: owned by the Agent, hardened, probed, configured from the spec.
    agent_obj = testbed.get("agent", "triage", namespace)
    assert agent_obj is not None
    owner = dep["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
        "Agent",
        "triage",
        agent_obj["metadata"]["uid"],
        True,
    )
    pod = dep["spec"]["template"]["spec"]
    c = container(dep)
    assert pod["serviceAccountName"] == "triage"
    assert pod["terminationGracePeriodSeconds"] == spec["timeoutSeconds"] + 30
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["image"] == "ghcr.io/shoal-dev/shoal-runtime:0.1.0"  # runtime.image ""
    env = env_of(dep)
    assert env["SHOAL_AGENT"] == "triage"
    assert env["SHOAL_NAMESPACE"] == namespace
    assert env["SHOAL_NATS_URL"] == testbed.nats_url
    config = json.loads(env["SHOAL_AGENT_CONFIG"])
    assert config["spec"]["concurrency"] == spec["concurrency"]
    assert config["spec"]["circuitBreaker"] == spec["circuitBreaker"]
    assert config["spec"]["budget"]["costPerHour"] == "5.00"
    # A ScalingPolicy targets the Agent: the HPA owns replicas, the operator does not.
    full = json.loads(
        testbed.kubectl(
            "get", "deployment", "triage", "-n", namespace, "-o", "json", "--show-managed-fields"
        ).stdout
    )
    managers = {m["manager"]: m for m in full["metadata"]["managedFields"]}
    assert "f:replicas" not in json.dumps(managers["shoal-operator"]["fieldsV1"]["f:spec"])

    # ServiceAccount: owned, no token (runtimes never call the Kubernetes API).
    assert sa["metadata"]["ownerReferences"][0]["uid"] == agent_obj["metadata"]["uid"]
    assert sa["automountServiceAccountToken"] is False

    # HPA: the policy's metrics, min/max, target.
    pspec = example("ScalingPolicy")["spec"]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "triage",
    }
    assert hpa["spec"]["minReplicas"] == 1  # minReplicas 0: the operator does 0 <-> 1
    assert hpa["spec"]["maxReplicas"] == pspec["maxReplicas"]
    metrics = hpa["spec"]["metrics"]
    assert metrics[0]["external"]["metric"]["name"] == "shoal_queue_lag"
    assert metrics[0]["external"]["metric"]["selector"] == {
        "matchLabels": {"shoal.dev/agent": "triage"}
    }
    assert metrics[0]["external"]["target"] == {"type": "AverageValue", "averageValue": "10"}
    assert metrics[1]["external"]["metric"]["name"] == "shoal_latency_p95_ms"
    assert metrics[1]["external"]["target"] == {"type": "Value", "value": "2k"}
    assert metrics[2]["resource"] == {
        "name": "cpu",
        "target": {"type": "Utilization", "averageUtilization": 70},
    }

    # JetStream consumer: ack wait, attempts and backoff, in-flight bound.
    cfg = cons["config"]
    ns_per_s = 1_000_000_000
    assert cfg["filter_subjects"] == [f"shoal.task.{namespace}.triage.{p}" for p in (4, 5, 6)]
    assert cfg["ack_policy"] == "explicit"
    assert cfg["max_deliver"] == spec["retry"]["maxAttempts"] + 1
    assert cfg["backoff"] == [(60 + 30 + d) * ns_per_s for d in (1, 2, 4, 8, 16)]
    assert cfg["ack_wait"] == cfg["backoff"][0]
    assert cfg["max_ack_pending"] == spec["concurrency"] * pspec["maxReplicas"]

    # Status: the missing fallback is named; the policy mirrors the Deployment.
    got = eventually(
        lambda: reconciled(testbed, "agent", "triage", namespace), 30, what="Agent status"
    )
    ready = condition(got, "Ready")
    assert ready is not None
    assert ready["status"] == "False"
    assert ready["reason"] == "FallbackNotFound"
    assert "triage-small" in ready["message"]
    policy = eventually(
        lambda: reconciled(testbed, "ssp", "triage", namespace), 30, what="policy status"
    )
    assert policy["status"]["hpaName"] == "triage"
    assert condition(policy, "Ready")["status"] == "True"  # type: ignore[index]


def test_references_recover_when_the_agent_appears(
    testbed: Testbed, operator: Any, namespace: str
) -> None:
    testbed.apply(agent("main", fallback={"agent": "backup"}), namespace)
    testbed.apply(scaling_policy("scale-ghost", "ghost"), namespace)
    wf = example("Workflow")
    wf["spec"]["steps"] = [{"name": "only", "agent": "ghost", "input": {}}]
    wf["spec"].pop("output")
    testbed.apply(wf, namespace)

    def reason(kind: str, name: str) -> str | None:
        cond = condition(testbed.get(kind, name, namespace), "Ready")
        return f"{cond['status']}/{cond['reason']}" if cond else None

    eventually(
        lambda: reason("agent", "main") == "False/FallbackNotFound",
        30,
        what="main: FallbackNotFound",
    )
    eventually(
        lambda: reason("ssp", "scale-ghost") == "False/TargetNotFound",
        30,
        what="policy: TargetNotFound",
    )
    eventually(
        lambda: reason("swf", "customer-inquiry") == "False/AgentNotFound",
        30,
        what="workflow: AgentNotFound",
    )
    message = condition(testbed.get("swf", "customer-inquiry", namespace), "Ready")
    assert message is not None
    assert "step only: Agent ghost does not exist" in message["message"]
    assert testbed.get("hpa", "scale-ghost", namespace) is None
    events = testbed.kubectl("get", "events", "-n", namespace, "-o", "json").stdout
    assert "FallbackNotFound" in events

    testbed.apply(agent("backup"), namespace)
    testbed.apply(agent("ghost"), namespace)
    eventually(lambda: reason("agent", "main") == "True/Available", 30, what="main Ready")
    eventually(lambda: reason("ssp", "scale-ghost") == "True/HPAReady", 30, what="policy Ready")
    eventually(lambda: reason("swf", "customer-inquiry") == "True/Valid", 30, what="wf Ready")
    assert testbed.get("hpa", "scale-ghost", namespace) is not None


def test_workflow_cycle_is_named(testbed: Testbed, operator: Any, namespace: str) -> None:
    testbed.apply(agent("a"), namespace)
    testbed.apply(
        {
            "apiVersion": "shoal.dev/v1alpha1",
            "kind": "Workflow",
            "metadata": {"name": "loop"},
            "spec": {
                "steps": [
                    {"name": "x", "agent": "a", "dependsOn": ["y"]},
                    {"name": "y", "agent": "a", "dependsOn": ["x"]},
                ]
            },
        },
        namespace,
    )
    got = eventually(
        lambda: condition(reconciled(testbed, "swf", "loop", namespace), "Ready"),
        30,
        what="workflow reconciled",
    )
    assert got["reason"] == "DependencyCycle"
    assert "x -> y -> x" in got["message"]


def test_edits_reach_children_and_deletion_leaves_nothing(
    testbed: Testbed, operator: Any, namespace: str
) -> None:
    testbed.apply(agent("worker", concurrency=2, timeoutSeconds=10), namespace)
    eventually(lambda: consumer(testbed, namespace, "worker"), 30, what="consumer")
    testbed.apply(
        agent(
            "worker",
            concurrency=7,
            timeoutSeconds=40,
            runtime={"image": "example.com/worker:2", "env": [{"name": "MODE", "value": "fast"}]},
        ),
        namespace,
    )
    start = time.monotonic()

    def updated() -> bool:
        dep = testbed.get("deployment", "worker", namespace)
        cons = consumer(testbed, namespace, "worker")
        if dep is None or cons is None:
            return False
        env = env_of(dep)
        cfg = json.loads(env["SHOAL_AGENT_CONFIG"])["spec"]
        return (
            container(dep)["image"] == "example.com/worker:2"
            and env.get("MODE") == "fast"
            and cfg["concurrency"] == 7
            and dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 70
            and cons["config"]["max_ack_pending"] == 7
            and cons["config"]["ack_wait"] == 71 * 1_000_000_000
        )

    eventually(updated, 15, what="children updated")
    assert time.monotonic() - start < 15

    # Tasks and KV entries of the Agent exist, then go with it.
    js_request(testbed.nats_url, f"STREAM.INFO.{nl.TASKS_STREAM}")

    async def seed() -> None:
        nc = await nats.connect(testbed.nats_url)
        js = nc.jetstream()
        await js.publish(nl.task_subject(namespace, "worker", 5), b"{}")
        kv = await js.key_value(nl.CIRCUIT_BUCKET)
        await kv.put(nl.agent_key(namespace, "worker"), b"Closed")
        await nc.close()

    asyncio.run(seed())
    testbed.kubectl("delete", "agent", "worker", "-n", namespace)
    eventually(
        lambda: testbed.get("agent", "worker", namespace) is None,
        30,
        what="Agent gone (finalizer released)",
    )
    assert band_consumers(testbed, namespace, "worker") == {}
    left = js_request(
        testbed.nats_url,
        f"STREAM.INFO.{nl.TASKS_STREAM}",
        {"subjects_filter": f"shoal.task.{namespace}.worker.*"},
    )
    assert left["state"].get("subjects") in (None, {})
    kv_left = js_request(
        testbed.nats_url,
        f"STREAM.INFO.KV_{nl.CIRCUIT_BUCKET}",
        {"subjects_filter": f"$KV.{nl.CIRCUIT_BUCKET}.{namespace}.>"},
    )
    assert kv_left["state"].get("subjects") in (None, {})
    eventually(
        lambda: (
            testbed.get("deployment", "worker", namespace) is None
            and testbed.get("serviceaccount", "worker", namespace) is None
        ),
        60,
        what="Deployment and ServiceAccount garbage-collected",
    )


def test_deleted_or_edited_deployment_is_repaired(
    testbed: Testbed, operator: Any, namespace: str
) -> None:
    testbed.apply(agent("fixme", runtime={"image": "example.com/fixme:1"}), namespace)
    first = eventually(lambda: testbed.get("deployment", "fixme", namespace), 30, what="Deployment")
    testbed.kubectl(
        "patch",
        "deployment",
        "fixme",
        "-n",
        namespace,
        "--type=json",
        "-p",
        json.dumps(
            [
                {
                    "op": "replace",
                    "path": "/spec/template/spec/containers/0/image",
                    "value": "evil:latest",
                }
            ]
        ),
    )
    eventually(
        lambda: (
            container(
                testbed.get("deployment", "fixme", namespace)
                or {"spec": {"template": {"spec": {"containers": [{"image": ""}]}}}}
            )["image"]
            == "example.com/fixme:1"
        ),
        15,
        what="image repaired",
    )
    testbed.kubectl("delete", "deployment", "fixme", "-n", namespace)
    again = eventually(
        lambda: (
            (d := testbed.get("deployment", "fixme", namespace))
            and d["metadata"]["uid"] != first["metadata"]["uid"]
            and d
        ),
        15,
        what="Deployment recreated",
    )
    assert container(again)["image"] == "example.com/fixme:1"


def _versions(testbed: Testbed, namespace: str) -> dict[str, str]:
    out = {}
    for kind in (
        "agents",
        "scalingpolicies",
        "workflows",
        "deployments",
        "serviceaccounts",
        "horizontalpodautoscalers",
        "replicasets",
    ):
        items = json.loads(testbed.kubectl("get", kind, "-n", namespace, "-o", "json").stdout)
        for item in items["items"]:
            out[f"{kind}/{item['metadata']['name']}"] = item["metadata"]["resourceVersion"]
    return out


def test_second_apply_changes_no_resource_version(
    testbed: Testbed, operator: Any, namespace: str
) -> None:
    docs = [d for d in example_docs() if d["kind"] != "Workflow"]
    docs.append(agent("triage-small"))
    docs.append(agent("triage-large"))
    for doc in docs:
        testbed.apply(doc, namespace)
    eventually(
        lambda: (
            condition(reconciled(testbed, "agent", "triage", namespace), "Ready")
            == {
                **(condition(testbed.get("agent", "triage", namespace), "Ready") or {}),
                "status": "True",
            }
        ),
        60,
        what="triage Ready",
    )

    # The HPA controller writes status once, on its first sync (15 s period).
    eventually(
        lambda: ((testbed.get("hpa", "triage", namespace) or {}).get("status") or {}).get(
            "conditions"
        ),
        60,
        what="HPA synced once",
    )

    # Settled: nothing changes for two drift intervals.
    def settled() -> dict[str, str] | None:
        before = _versions(testbed, namespace)
        time.sleep(6)
        return before if _versions(testbed, namespace) == before else None

    before = eventually(settled, 60, interval=0, what="a settled namespace")
    for doc in docs:
        testbed.apply(doc, namespace)
    deadline = time.monotonic() + 12  # two drift checks (SHOAL_DRIFT_INTERVAL=5)
    while time.monotonic() < deadline:
        assert _versions(testbed, namespace) == before
        time.sleep(1)


def test_bad_objects_do_not_block_others(testbed: Testbed, operator: Any, namespace: str) -> None:
    # Accepted by the CRD schema (int-or-string), refused by the Deployment API.
    testbed.apply(agent("broken", runtime={"resources": {"limits": {"cpu": "lots"}}}), namespace)
    for i in range(3):
        testbed.apply(agent(f"fine-{i}"), namespace)
    for i in range(3):
        eventually(partial(is_ready, testbed, f"fine-{i}", namespace), 30, what=f"fine-{i}")
    cond = eventually(
        lambda: condition(testbed.get("agent", "broken", namespace), "Degraded"),
        30,
        what="broken Degraded",
    )
    assert cond["status"] == "True"
    assert cond["reason"] == "ApplyFailed"
    assert cond["message"].startswith("Deployment broken: ")
    assert "quantities must match" in cond["message"]


@pytest.mark.parametrize("victims", [8])
def test_operator_killed_midway_converges_without_duplicates(
    testbed: Testbed, operator_process: OperatorProcess, namespace: str, victims: int
) -> None:
    for i in range(victims):
        testbed.apply(agent(f"a{i}"), namespace)
    eventually(lambda: testbed.get("deployment", "a0", namespace), 30, what="first Deployment")
    operator_process.kill()
    operator_process.wait()
    operator_process.start()
    for i in range(victims):
        eventually(partial(is_ready, testbed, f"a{i}", namespace), 60, what=f"a{i} Ready")
    deps = json.loads(testbed.kubectl("get", "deployments", "-n", namespace, "-o", "json").stdout)[
        "items"
    ]
    assert sorted(d["metadata"]["name"] for d in deps) == sorted(f"a{i}" for i in range(victims))
    assert all(d["metadata"]["generation"] == 1 for d in deps), "needless Deployment updates"
    rs = json.loads(testbed.kubectl("get", "rs", "-n", namespace, "-o", "json").stdout)["items"]
    assert len(rs) == victims
    for i in range(victims):
        obj = testbed.get("agent", f"a{i}", namespace)
        assert obj is not None
        assert obj["metadata"]["finalizers"] == ["shoal.dev/cleanup"]
        assert consumer(testbed, namespace, f"a{i}") is not None


def test_liveness_endpoint_reports_the_watch(
    testbed: Testbed, operator_process: OperatorProcess, namespace: str
) -> None:
    import urllib.request

    def healthy() -> dict[str, Any] | None:
        with urllib.request.urlopen(operator_process.liveness_url, timeout=2) as resp:
            body: dict[str, Any] = json.loads(resp.read())
            return body if resp.status == 200 else None

    body = eventually(healthy, 30, what="liveness 200")
    assert body["watch"] == "ok"
