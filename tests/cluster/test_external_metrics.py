"""external.metrics.k8s.io on the real API server: the operator registers itself with
the aggregator (local mode), serves queue lag and latency from JetStream and KV, HPAs act
on them, another provider's APIService is left alone, and the APIService goes with the
operator.

Test namespaces are labelled ``shoal.dev/standin=off``: no runtime consumes, so the
queue holds exactly what the test published."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import nats
import pytest

from shoal_api import nats_layout as nl
from shoal_api.envelope import Task
from shoal_api.runtime_state import PodStats
from shoal_testbed.fixtures import OperatorProcess, Testbed, eventually
from tests.helpers import agent, condition

APISERVICE = "v1beta1.external.metrics.k8s.io"
BASE = "/apis/external.metrics.k8s.io/v1beta1"


def quiet_namespace(testbed: Testbed, namespace: str) -> None:
    testbed.kubectl("label", "namespace", namespace, "shoal.dev/standin=off")


def policy(name: str, target: str, max_replicas: int = 3) -> dict[str, Any]:
    return {
        "apiVersion": "shoal.dev/v1alpha1",
        "kind": "ScalingPolicy",
        "metadata": {"name": name},
        "spec": {
            "targetRef": {"name": target},
            "minReplicas": 1,
            "maxReplicas": max_replicas,
            "metrics": [
                {"type": "QueueLag", "target": 10},
                {"type": "Latency", "targetMillis": 2000},
            ],
        },
    }


def raw(testbed: Testbed, path: str) -> dict[str, Any]:
    """GET through the API server (and so the aggregator); raises with its message."""
    proc = testbed.kubectl("get", "--raw", path, check=False)
    if proc.returncode != 0:
        raise AssertionError(proc.stderr.strip())
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def metric(testbed: Testbed, ns: str, name: str, agent_name: str) -> str:
    doc = raw(
        testbed, f"{BASE}/namespaces/{ns}/{name}?labelSelector=shoal.dev%2Fagent%3D{agent_name}"
    )
    [item] = doc["items"]
    assert item["metricName"] == name
    assert item["metricLabels"] == {"shoal.dev/agent": agent_name}
    value: str = item["value"]
    return value


def q(quantity: str) -> float:
    """A Kubernetes quantity as a number (the suffixes the HPA and we write)."""
    for suffix, factor in (("m", 1e-3), ("k", 1e3), ("M", 1e6)):
        if quantity.endswith(suffix):
            return float(quantity[: -len(suffix)]) * factor
    return float(quantity)


def nats_call(url: str, fn: Callable[[Any], Any]) -> Any:
    async def go() -> Any:
        nc = await nats.connect(url)
        try:
            return await fn(nc)
        finally:
            await nc.close()

    return asyncio.run(go())


def publish(testbed: Testbed, ns: str, agent_name: str, n: int) -> None:
    """``n`` tasks over all priorities: the queue is the sum of the priority bands."""

    async def go(nc: Any) -> None:
        js = nc.jetstream()
        for i in range(n):
            task = Task(id=uuid.uuid4().hex, input={"text": "hi"}, priority=i % 10)
            await js.publish(nl.task_subject(ns, agent_name, task.priority), task.to_json())

    nats_call(testbed.nats_url, go)


def queue_counts(testbed: Testbed, ns: str, agent_name: str) -> int:
    """Pending + in flight over the Agent's priority bands."""

    async def go(nc: Any) -> int:
        total = 0
        for name in nl.consumer_names(ns, agent_name):
            subject = f"$JS.API.CONSUMER.INFO.{nl.TASKS_STREAM}.{name}"
            info = json.loads((await nc.request(subject, b"", timeout=5)).data)
            total += int(info["num_pending"]) + int(info["num_ack_pending"])
        return total

    out: int = nats_call(testbed.nats_url, go)
    return out


def put_stats(testbed: Testbed, ns: str, agent_name: str, stats: list[PodStats]) -> None:
    async def go(nc: Any) -> None:
        kv = await nc.jetstream().key_value(nl.STATS_BUCKET)
        for s in stats:
            await kv.put(nl.stats_key(ns, agent_name, s.pod), s.to_json())

    nats_call(testbed.nats_url, go)


def metrics_available(testbed: Testbed, ns: str, name: str) -> dict[str, Any] | None:
    return condition(testbed.get("scalingpolicy", name, ns), "MetricsAvailable")


def status_condition(hpa: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    for cond in ((hpa or {}).get("status") or {}).get("conditions", []):
        if cond["type"] == type_:
            out: dict[str, Any] = cond
            return out
    return None


def test_queue_lag_and_latency_reach_the_hpa(
    testbed: Testbed, operator: Any, namespace: str
) -> None:
    quiet_namespace(testbed, namespace)
    testbed.apply(agent("lagging"), namespace)
    testbed.apply(policy("lagging", "lagging"), namespace)

    # Served through the aggregator as soon as the Agent's consumer exists.
    eventually(
        lambda: metric(testbed, namespace, "shoal_queue_lag", "lagging") == "0",
        30,
        what="shoal_queue_lag served",
    )
    cond = eventually(
        lambda: (
            (c := metrics_available(testbed, namespace, "lagging")) and c["status"] == "True" and c
        ),
        30,
        what="MetricsAvailable=True",
    )
    assert cond["reason"] == "Served"
    discovery = raw(testbed, BASE)
    assert sorted(r["name"] for r in discovery["resources"]) == [
        "shoal_arrival_rate",
        "shoal_latency_p95_ms",
        "shoal_queue_lag",
    ]

    # Fresh within a second of publishing (a value cached at most 0.5 s, no poll).
    published = time.monotonic()
    publish(testbed, namespace, "lagging", 25)
    eventually(
        lambda: metric(testbed, namespace, "shoal_queue_lag", "lagging") == "25",
        10,
        interval=0.05,
        what="queue lag 25",
    )
    freshness = time.monotonic() - published
    # KopfRunner swaps sys.stdout while the operator runs; pytest -s shows this one.
    print(
        f"\n[metrics] 25 tasks published -> shoal_queue_lag 25 via kubectl in {freshness:.2f}s",
        file=sys.__stdout__,
    )
    assert freshness < 3.0  # kubectl calls included; a 15 s or 30 s poll would not pass
    assert queue_counts(testbed, namespace, "lagging") == 25

    # Tasks arrived since the first sample: a positive rate.
    assert q(metric(testbed, namespace, "shoal_arrival_rate", "lagging")) > 0

    # p95 latency: the slowest pod's, from the runtimes' records in KV.
    stats = [
        PodStats(pod="lagging-a", p95_ms=1234.5, at=time.time()),
        PodStats(pod="lagging-b", p95_ms=800.0, at=time.time()),
    ]
    put_stats(testbed, namespace, "lagging", stats)
    eventually(
        lambda: metric(testbed, namespace, "shoal_latency_p95_ms", "lagging") == "1234500m",
        5,
        interval=0.1,
        what="p95 1234.5 ms",
    )

    # Errors as the API server shows them.
    no_selector = testbed.kubectl(
        "get", "--raw", f"{BASE}/namespaces/{namespace}/shoal_queue_lag", check=False
    )
    assert no_selector.returncode != 0
    assert "BadRequest" in no_selector.stderr
    assert "shoal.dev/agent=NAME" in no_selector.stderr
    with pytest.raises(AssertionError, match="NotFound"):
        metric(testbed, namespace, "shoal_queue_lag", "no-such-agent")

    # The HPA reads both (HPA sync: 15 s). Records expire after 30 s: keep reporting.
    def hpa_active() -> dict[str, Any] | None:
        put_stats(testbed, namespace, "lagging", stats)
        hpa = testbed.get("hpa", "lagging", namespace)
        active = status_condition(hpa, "ScalingActive")
        if hpa is None or active is None or active["status"] != "True":
            return None
        current = {
            m["external"]["metric"]["name"]: m["external"]["current"]
            for m in hpa["status"].get("currentMetrics") or []
            if m["type"] == "External"
        }
        if "shoal_queue_lag" not in current or hpa["status"].get("desiredReplicas") != 3:
            return None
        return hpa

    hpa = eventually(hpa_active, 90, interval=1, what="HPA ScalingActive on shoal metrics")
    current = {
        m["external"]["metric"]["name"]: m["external"]["current"]
        for m in hpa["status"]["currentMetrics"]
    }
    replicas = hpa["status"]["currentReplicas"]
    # AverageValue: the 25 tasks spread over the replicas counted in the same sync.
    assert abs(q(current["shoal_queue_lag"]["averageValue"]) * replicas - 25) < 0.01 * replicas
    assert q(current["shoal_latency_p95_ms"]["value"]) == 1234.5
    active = status_condition(hpa, "ScalingActive")
    assert active is not None
    assert active["reason"] == "ValidMetricFound"


@pytest.fixture
def foreign_apiservice(testbed: Testbed, crds: list[str]) -> Iterator[dict[str, Any]]:
    """Another provider's APIService (KEDA's, say) holding external.metrics.k8s.io,
    created before the operator starts; afterwards it must be exactly as it was."""
    left = testbed.get("apiservice", APISERVICE)
    assert left is None, f"an APIService {APISERVICE} was left behind: {left}"
    obj = {
        "apiVersion": "apiregistration.k8s.io/v1",
        "kind": "APIService",
        "metadata": {"name": APISERVICE, "labels": {"app": "keda-operator-metrics-apiserver"}},
        "spec": {
            "group": "external.metrics.k8s.io",
            "version": "v1beta1",
            "service": {
                "namespace": "other-metrics",
                "name": "keda-operator-metrics-apiserver",
                "port": 443,
            },
            "insecureSkipTLSVerify": True,
            "groupPriorityMinimum": 100,
            "versionPriority": 100,
        },
    }
    testbed.kubectl("create", "-f", "-", stdin=json.dumps(obj))
    created = testbed.get("apiservice", APISERVICE)
    assert created is not None
    try:
        yield created
        shown = testbed.kubectl(
            "get", "apiservice", APISERVICE, "-o", "json", "--show-managed-fields", check=False
        )
    finally:
        testbed.kubectl("delete", "apiservice", APISERVICE, "--ignore-not-found")
    # After the operator stopped too: not deleted, not re-pointed, not relabelled.
    assert shown.returncode == 0, f"the other provider's APIService is gone: {shown.stderr}"
    after = json.loads(shown.stdout)
    assert after["metadata"]["uid"] == created["metadata"]["uid"]
    assert after["spec"] == created["spec"]
    assert after["metadata"]["labels"] == created["metadata"]["labels"]
    managers = {m["manager"] for m in after["metadata"]["managedFields"]}
    assert "shoal-operator" not in managers, managers


def test_another_providers_apiservice_is_left_alone(
    testbed: Testbed, foreign_apiservice: dict[str, Any], operator: Any, namespace: str
) -> None:
    quiet_namespace(testbed, namespace)
    testbed.apply(agent("scaled"), namespace)
    testbed.apply(policy("scaled", "scaled"), namespace)
    cond = eventually(
        lambda: (
            (c := metrics_available(testbed, namespace, "scaled")) and c["status"] == "False" and c
        ),
        30,
        what="MetricsAvailable=False",
    )
    assert cond["reason"] == "ExternalMetricsProviderConflict"
    assert "other-metrics/keda-operator-metrics-apiserver" in cond["message"]
    # Nothing of ours was put in its way; the policy itself still works (HPA applied).
    assert testbed.get("service", "shoal-metrics-api", namespace) is None
    assert testbed.get("hpa", "scaled", namespace) is not None
    current = testbed.get("apiservice", APISERVICE)
    assert current is not None
    assert current["spec"] == foreign_apiservice["spec"]


def test_apiservice_goes_with_the_operator(
    testbed: Testbed,
    spawn_operator: Callable[..., OperatorProcess],
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SHOAL_REGISTER_APISERVICE", "local")
    op = spawn_operator()

    def registered() -> dict[str, Any] | None:
        api = testbed.get("apiservice", APISERVICE)
        if api is None or api["spec"]["service"]["namespace"] != namespace:
            return None
        available = status_condition(api, "Available")
        return api if available and available["status"] == "True" else None

    api = eventually(registered, 30, what="APIService registered and Available")
    svc = testbed.get("service", "shoal-metrics-api", namespace)
    assert svc is not None
    assert svc["spec"]["type"] == "ExternalName"
    assert svc["spec"]["externalName"] == "localhost"
    # Port "auto": the Service and the APIService carry the port the operator took.
    port = api["spec"]["service"]["port"]
    assert svc["spec"]["ports"][0]["port"] == port
    assert f"on https://127.0.0.1:{port}" in op.output()
    assert raw(testbed, BASE)["groupVersion"] == "external.metrics.k8s.io/v1beta1"

    op.stop()
    assert op.poll() == 0, op.output()[-3000:]
    # Gone before the process ended: nothing to wait for.
    assert testbed.get("apiservice", APISERVICE) is None
    assert testbed.get("service", "shoal-metrics-api", namespace) is None
    assert "Traceback" not in op.output(), op.output()[-3000:]
