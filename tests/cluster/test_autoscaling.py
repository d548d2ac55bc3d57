"""Queue-driven autoscaling end to end on the local control plane: the real
kube-controller-manager HPA (15 s sync) reads the operator's external metrics, the
operator does 0 <-> 1, and runtime processes (the kubelet stand-in's) really consume."""

from __future__ import annotations

import asyncio
import collections
import json
from pathlib import Path
from typing import Any

import nats
import pytest

from shoal_api import envelope as env
from shoal_api import nats_layout as nl
from shoal_testbed.fixtures import Testbed, eventually
from tests.helpers import agent, runtimes, scaling_policy
from tests.runtime.support import stored

pytestmark = pytest.mark.cluster

FAST = {
    "scaleUp": {
        "stabilizationWindowSeconds": 0,
        "policies": [{"type": "Pods", "value": 4, "periodSeconds": 15}],
    },
    "scaleDown": {
        "stabilizationWindowSeconds": 0,
        "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15}],
    },
}


def replicas(testbed: Testbed, ns: str, name: str) -> int:
    dep = testbed.get("deployment", name, ns) or {}
    return int(dep.get("spec", {}).get("replicas", -1))


def publish(url: str, ns: str, agent_name: str, inputs: list[dict[str, Any]]) -> list[str]:
    async def go() -> list[str]:
        nc = await nats.connect(url)
        js = nc.jetstream()
        ids = []
        for i in inputs:
            task = env.Task(id=env.new_task_id(), input=i)
            await js.publish(
                nl.task_subject(ns, agent_name, 5),
                task.to_json(),
                headers={env.MSG_ID_HEADER: task.msg_id()},
            )
            ids.append(task.id)
        await nc.close()
        return ids

    return asyncio.run(go())


def stored_results(url: str, ns: str) -> list[dict[str, Any]]:
    async def go() -> list[dict[str, Any]]:
        nc = await nats.connect(url)
        try:
            return await stored(nc.jetstream(), nl.RESULTS_STREAM, f"shoal.result.{ns}.>")
        finally:
            await nc.close()

    return asyncio.run(go())


def test_burst_scales_out_through_the_hpa_then_to_zero_and_back(
    testbed: Testbed, operator: Any, namespace: str, tmp_path: Path
) -> None:
    work_log = tmp_path / "work.log"
    testbed.apply(
        agent(
            "worker",
            handler={"python": "shoal_examples.work:handle"},
            concurrency=2,
            timeoutSeconds=10,
            runtime={"env": [{"name": "SHOAL_WORK_LOG", "value": str(work_log)}]},
        ),
        namespace,
    )
    testbed.apply(
        scaling_policy(
            "worker",
            target="worker",
            minReplicas=0,
            max_replicas=4,
            metrics=[{"type": "QueueLag", "target": 5}],
            cooldownSeconds=10,
            behavior=FAST,
        ),
        namespace,
    )
    # Idle from the start: the operator takes it to zero after the cooldown.
    eventually(lambda: replicas(testbed, namespace, "worker") == 0, 90, what="scaled to 0")

    ids = publish(
        testbed.nats_url, namespace, "worker", [{"n": i, "seconds": 1.0} for i in range(200)]
    )
    seen: list[int] = []

    def drained() -> bool:
        seen.append(replicas(testbed, namespace, "worker"))
        done = {r["id"] for r in stored_results(testbed.nats_url, namespace)}
        return done >= set(ids)

    eventually(drained, 180, interval=1.0, what="the burst drained")
    statuses = collections.Counter(r["status"] for r in stored_results(testbed.nats_url, namespace))
    assert statuses == {"Succeeded": len(ids)}, statuses
    assert max(seen) >= 3, f"the HPA never scaled out: {seen}"
    policy = testbed.get("scalingpolicy", "worker", namespace) or {}
    assert policy["status"]["hpaName"] == "worker"

    eventually(lambda: replicas(testbed, namespace, "worker") == 0, 120, what="back to 0")
    events = testbed.kubectl(
        "get",
        "events",
        "-n",
        namespace,
        "--field-selector",
        "involvedObject.name=worker",
        "-o",
        "json",
    )
    reasons = {e["reason"] for e in json.loads(events.stdout)["items"]}
    assert {"Activated", "ScaledToZero"} <= reasons

    (late,) = publish(testbed.nats_url, namespace, "worker", [{"n": "late", "seconds": 0}])
    eventually(lambda: replicas(testbed, namespace, "worker") >= 1, 30, what="woken for new work")
    eventually(
        lambda: late in {r["id"] for r in stored_results(testbed.nats_url, namespace)},
        60,
        what="the late task done",
    )
    results = collections.Counter(r["id"] for r in stored_results(testbed.nats_url, namespace))
    assert set(results) == {*ids, late}
    assert max(results.values()) == 1, "a task has two results"
    runs = collections.Counter(work_log.read_text().split())
    assert set(runs) == {*ids, late}
    assert max(runs.values()) == 1, "a task ran twice"


def test_scale_in_removes_the_idle_pod_first(
    testbed: Testbed, operator: Any, namespace: str
) -> None:
    testbed.apply(
        agent(
            "keeper",
            handler={"python": "shoal_examples.work:handle"},
            concurrency=1,
            timeoutSeconds=90,
        ),
        namespace,
    )
    policy = scaling_policy("keeper", target="keeper", minReplicas=3, max_replicas=3, behavior=FAST)
    testbed.apply(policy, namespace)
    eventually(lambda: len(runtimes(testbed, namespace, "keeper")) == 3, 90, what="3 runtimes")
    ids = publish(
        testbed.nats_url, namespace, "keeper", [{"n": i, "seconds": 40} for i in range(2)]
    )

    def costs() -> dict[str, str] | None:
        pods = pod_costs(testbed, namespace, "keeper")
        busy = [p for p, c in pods.items() if c not in ("", "0")]
        return pods if len(pods) == 3 and len(busy) == 2 and "0" in pods.values() else None

    before = eventually(costs, 30, what="two busy pods, one idle, in deletion costs")
    idle = next(p for p, c in before.items() if c == "0")
    policy["spec"].update(minReplicas=2, maxReplicas=2)
    testbed.apply(policy, namespace)
    eventually(
        lambda: idle not in pod_costs(testbed, namespace, "keeper"), 60, what="idle pod gone"
    )
    assert len(pod_costs(testbed, namespace, "keeper")) == 2
    eventually(
        lambda: set(ids) <= {r["id"] for r in stored_results(testbed.nats_url, namespace)},
        90,
        what="both long tasks done",
    )
    done = stored_results(testbed.nats_url, namespace)
    assert {r["output"]["pod"] for r in done} <= set(before) - {idle}
    assert all(r["attempts"] == 1 for r in done), "a busy pod was interrupted"


def test_a_schedule_window_raises_the_hpa_minimum(
    testbed: Testbed, operator: Any, namespace: str
) -> None:
    testbed.kubectl("label", "namespace", namespace, "shoal.dev/standin=off")
    testbed.apply(agent("planned", handler={"python": "shoal_examples.echo:handle"}), namespace)
    testbed.apply(
        scaling_policy(
            "planned",
            target="planned",
            minReplicas=1,
            max_replicas=5,
            schedule=[{"cron": "* * * * *", "durationMinutes": 5, "minReplicas": 3}],
        ),
        namespace,
    )

    def raised() -> dict[str, Any] | None:
        hpa = testbed.get("hpa", "planned", namespace) or {}
        return hpa if hpa.get("spec", {}).get("minReplicas") == 3 else None

    eventually(raised, 30, what="HPA minReplicas 3 from the schedule")

    def decision() -> str:
        policy = testbed.get("scalingpolicy", "planned", namespace) or {}
        return str(policy.get("status", {}).get("lastDecision", ""))

    eventually(lambda: "schedule * * * * *" in decision(), 30, what="the decision names it")


def pod_costs(testbed: Testbed, ns: str, agent_name: str) -> dict[str, str]:
    out = testbed.kubectl(
        "get", "pods", "-n", ns, "-l", f"shoal.dev/agent={agent_name}", "-o", "json"
    )
    return {
        p["metadata"]["name"]: p["metadata"]
        .get("annotations", {})
        .get("controller.kubernetes.io/pod-deletion-cost", "")
        for p in json.loads(out.stdout)["items"]
        if not p["metadata"].get("deletionTimestamp")
    }
