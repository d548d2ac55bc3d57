"""The local control plane is a real one: versioned server, Ready nodes, working
controllers, scheduler and garbage collector."""

from __future__ import annotations

import json

from shoal_testbed.fixtures import Testbed, eventually


def test_server_reports_v1_36(testbed: Testbed) -> None:
    version = json.loads(testbed.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"].startswith("v1.36."), version
    assert version["serverVersion"]["minor"] == "36"


def test_kwok_nodes_are_ready(testbed: Testbed) -> None:
    nodes = json.loads(testbed.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    ready = [
        n["metadata"]["name"]
        for n in nodes
        if any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"]["conditions"])
    ]
    assert len(ready) >= 2, ready


def test_deployment_gets_pods_on_fake_nodes_and_is_garbage_collected(
    testbed: Testbed, namespace: str
) -> None:
    testbed.apply(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 3,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {"containers": [{"name": "web", "image": "nginx"}]},
                },
            },
        },
        namespace,
    )

    def pods() -> list[dict[str, object]]:
        out = testbed.kubectl("get", "pods", "-n", namespace, "-l", "app=web", "-o", "json")
        items: list[dict[str, object]] = json.loads(out.stdout)["items"]
        return items

    def running_on_fake_nodes() -> bool:
        items = pods()
        return len(items) == 3 and all(
            p["spec"]["nodeName"].startswith("kwok-node-")  # type: ignore[index]
            and p["status"]["phase"] == "Running"  # type: ignore[index]
            for p in items
        )

    eventually(running_on_fake_nodes, 60, what="3 Running pods on kwok nodes")
    rs = json.loads(testbed.kubectl("get", "rs", "-n", namespace, "-o", "json").stdout)["items"]
    assert len(rs) == 1
    assert rs[0]["metadata"]["ownerReferences"][0]["kind"] == "Deployment"
    eventually(
        lambda: (
            (d := testbed.get("deployment", "web", namespace)) is not None
            and d["status"].get("readyReplicas") == 3
        ),
        60,
        what="Deployment ready",
    )

    testbed.kubectl("delete", "deployment", "web", "-n", namespace, "--wait=false")
    eventually(
        lambda: (
            not pods()
            and not json.loads(testbed.kubectl("get", "rs", "-n", namespace, "-o", "json").stdout)[
                "items"
            ]
        ),
        60,
        what="ReplicaSet and pods garbage-collected",
    )


def test_rbac_is_enforced_for_other_users(testbed: Testbed, namespace: str) -> None:
    nobody = testbed.user_kubeconfig("nobody@example.com")
    denied = testbed.kubectl("get", "pods", "-n", namespace, kubeconfig=nobody, check=False)
    assert denied.returncode != 0
    assert "forbidden" in denied.stderr.lower()
    assert 'User "nobody@example.com"' in denied.stderr
