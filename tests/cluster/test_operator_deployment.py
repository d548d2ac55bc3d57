"""How the operator is deployed: its RBAC suffices, two replicas share the work safely,
and the kustomize manifests are valid on a real API server."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable

from shoal_testbed.fixtures import OperatorProcess, Testbed, eventually
from tests.helpers import REPO, agent, is_ready, scaling_policy


def test_operator_works_with_exactly_its_cluster_role(
    testbed: Testbed, spawn_operator: Callable[..., OperatorProcess], namespace: str
) -> None:
    user = f"rbac-{namespace}"[:60]
    testbed.kubectl("apply", "-f", str(REPO / "manifests/base/clusterrole.yaml"))
    testbed.kubectl(
        "create", "clusterrolebinding", user, "--clusterrole=shoal-operator", f"--user={user}"
    )
    try:
        op = spawn_operator(testbed.user_kubeconfig(user))
        testbed.apply(agent("limited"), namespace)
        testbed.apply(scaling_policy("limited", "limited", 2), namespace)
        eventually(lambda: is_ready(testbed, "limited", namespace), 60, what="Agent Ready")
        eventually(lambda: testbed.get("hpa", "limited", namespace), 30, what="HPA")
        events = json.loads(testbed.kubectl("get", "events", "-n", namespace, "-o", "json").stdout)[
            "items"
        ]
        assert any(
            e["reason"] == "Available" and e["involvedObject"]["name"] == "limited" for e in events
        )
        testbed.kubectl("delete", "agent", "limited", "-n", namespace)
        eventually(
            lambda: testbed.get("agent", "limited", namespace) is None,
            30,
            what="finalizer released",
        )
        assert "Forbidden" not in op.output(), op.output()[-3000:]
        assert "forbidden" not in op.output(), op.output()[-3000:]
    finally:
        testbed.kubectl("delete", "clusterrolebinding", user, check=False)


def leader(testbed: Testbed, namespace: str) -> str | None:
    lease = testbed.get("lease", "shoal-operator-leader", namespace)
    holder: str | None = ((lease or {}).get("spec") or {}).get("holderIdentity")
    return holder


def test_two_replicas_one_leader_and_a_takeover(
    testbed: Testbed, spawn_operator: Callable[..., OperatorProcess], namespace: str
) -> None:
    first, second = spawn_operator(), spawn_operator()
    testbed.apply(agent("one"), namespace)
    eventually(lambda: is_ready(testbed, "one", namespace), 60, what="one Ready")
    holder = eventually(lambda: leader(testbed, namespace), 30, what="a leader")
    pids = {first.proc.pid: first, second.proc.pid: second}  # type: ignore[union-attr]
    active = next(op for pid, op in pids.items() if holder.endswith(f"-{pid}"))
    standby = first if active is second else second
    # The standby never reconciles: no field-manager writes, no Events from it.
    assert "became the leader" in active.output()
    assert "became the leader" not in standby.output()

    active.kill()  # no chance to hand the Lease back: the standby must notice
    active.wait()
    started = time.monotonic()
    testbed.apply(agent("two"), namespace)
    eventually(lambda: is_ready(testbed, "two", namespace), 60, what="two Ready after takeover")
    assert "became the leader" in standby.output()
    assert leader(testbed, namespace) != holder
    # Lease duration 15 s, renew every 5 s (half that while standing by).
    assert time.monotonic() - started < 40


def test_kustomize_manifests_are_accepted(testbed: Testbed, crds: list[str]) -> None:
    rendered = testbed.kubectl("kustomize", str(REPO / "manifests/base")).stdout
    kinds = sorted(
        doc.split("\nkind: ")[1].split("\n")[0]
        for doc in ("\n" + rendered).split("\n---\n")
        if "\nkind: " in doc
    )
    assert kinds == [
        "APIService",
        "ClusterRole",
        "ClusterRole",
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "CustomResourceDefinition",
        "CustomResourceDefinition",
        "CustomResourceDefinition",
        "Deployment",
        "Namespace",
        "Service",
        "ServiceAccount",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ]
    out = testbed.kubectl(
        "apply",
        "--dry-run=server",
        "-f",
        "-",
        stdin=rendered.replace("namespace: shoal\n", "namespace: default\n"),
    )
    assert "deployment.apps/shoal-operator created (server dry run)" in out.stdout


def test_helm_chart_installs_with_the_generated_rbac(
    testbed: Testbed, crds: list[str], namespace: str
) -> None:
    from shoal_operator.rbac import RULES
    from shoal_testbed.binaries import control_plane_bin

    helm = str(control_plane_bin() / "helm")
    chart = str(REPO / "helm/shoal")
    env = ["--kubeconfig", str(testbed.kubeconfig)]
    lint = subprocess.run([helm, "lint", chart], capture_output=True, text=True, check=False)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    release = f"r{namespace[-6:]}"
    install = subprocess.run(
        [
            helm,
            "install",
            release,
            chart,
            "-n",
            namespace,
            "--wait",
            "--timeout",
            "90s",
            "--set",
            f"watchNamespaces={{{namespace}}}",
            *env,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        assert install.returncode == 0, install.stdout + install.stderr
        role = testbed.get("clusterrole", f"{release}-operator")
        assert role is not None
        assert role["rules"] == RULES
        dep = testbed.get("deployment", f"{release}-operator", namespace)
        assert dep is not None
        assert dep["status"]["readyReplicas"] == 2  # kwok plays the kubelet
        args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[-2:] == ["--namespace", namespace]
    finally:
        subprocess.run(
            [helm, "uninstall", release, "-n", namespace, *env], capture_output=True, check=False
        )
