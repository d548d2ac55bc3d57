"""The Kubernetes permissions the operator needs: written down once, here.

``python -m shoal_operator.rbac DIR`` renders them as the ClusterRole of the kustomize
manifests and as the rule list the Helm chart's ClusterRole includes; ``make verify``
fails when either copy drifts from this list.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from shoal_api.base import GROUP
from shoal_api.generated import write_or_check

READ = ["get", "list", "watch"]
WRITE = ["create", "patch", "update", "delete"]

RULES: list[dict[str, Any]] = [
    # The custom resources: watched, finalized (metadata), status written.
    {
        "apiGroups": [GROUP],
        "resources": ["agents", "scalingpolicies", "workflows"],
        "verbs": [*READ, "patch", "update"],
    },
    {
        "apiGroups": [GROUP],
        "resources": ["agents/status", "scalingpolicies/status", "workflows/status"],
        "verbs": ["get", "patch", "update"],
    },
    # Approvals: read and relayed to their runs; only their status is written (their
    # spec is the approver's word, and immutable).
    {"apiGroups": [GROUP], "resources": ["approvals"], "verbs": READ},
    {"apiGroups": [GROUP], "resources": ["approvals/status"], "verbs": ["get", "patch"]},
    # The children, applied server-side.
    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": [*READ, *WRITE]},
    # 0 <-> 1 activation (the HPA does 1..N), and ordering scale-in by in-flight work.
    {"apiGroups": ["apps"], "resources": ["deployments/scale"], "verbs": ["get", "patch"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "patch"]},
    {"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["get", *WRITE]},
    {
        "apiGroups": ["autoscaling"],
        "resources": ["horizontalpodautoscalers"],
        "verbs": [*READ, *WRITE],
    },
    # Events on transitions.
    {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
    # Leader election and the watch heartbeat.
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": [*READ, *WRITE]},
    # kopf discovers resources and namespaces as they come and go.
    {
        "apiGroups": ["apiextensions.k8s.io"],
        "resources": ["customresourcedefinitions"],
        "verbs": READ,
    },
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": READ},
    # The external metrics API: whose APIService v1beta1.external.metrics.k8s.io is
    # (reported on ScalingPolicies), and, with --register-apiservice local, registering
    # it with an ExternalName Service in the operator's namespace. (Reading external
    # metrics is the HPA controller's: its bootstrap role covers external.metrics.k8s.io.)
    {
        "apiGroups": ["apiregistration.k8s.io"],
        "resources": ["apiservices"],
        "verbs": ["get", "create", "patch", "delete"],
    },
    {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "create", "patch", "delete"]},
]


def cluster_role(name: str = "shoal-operator") -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "shoal"}},
        "rules": RULES,
    }


# Roles for people, bound per namespace with a RoleBinding. Deciding is a separate grant
# on purpose: it is not aggregated into edit or admin, so being able to change a
# namespace does not make one an approver of its runs.
APPROVER_ROLE = "shoal-approver"
APPROVAL_VIEWER_ROLE = "shoal-approval-viewer"
# A site's own aggregated ClusterRole (aggregationRule.clusterRoleSelectors) picks
# either role up by this label.
ROLE_LABEL = "shoal.dev/role"


def people_roles(prefix: str = "shoal") -> list[dict[str, Any]]:
    """``shoal-approver`` (decide on runs' steps) and ``shoal-approval-viewer`` (see the
    decisions; aggregated into the built-in view, edit and admin roles). The chart names
    them after the release (``prefix``)."""
    part_of = {"app.kubernetes.io/part-of": "shoal"}
    return [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {
                "name": APPROVER_ROLE.replace("shoal", prefix, 1),
                "labels": {**part_of, ROLE_LABEL: "approver"},
            },
            "rules": [
                {
                    "apiGroups": [GROUP],
                    "resources": ["approvals"],
                    "verbs": ["create", *READ],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {
                "name": APPROVAL_VIEWER_ROLE.replace("shoal", prefix, 1),
                "labels": {
                    **part_of,
                    ROLE_LABEL: "approval-viewer",
                    **{
                        f"rbac.authorization.k8s.io/aggregate-to-{role}": "true"
                        for role in ("view", "edit", "admin")
                    },
                },
            },
            "rules": [{"apiGroups": [GROUP], "resources": ["approvals"], "verbs": READ}],
        },
    ]


HEADER = "# Generated by `make manifests` from operator/shoal_operator/rbac.py. Do not edit.\n"


def rendered(root: Path) -> dict[Path, str]:
    """Every generated RBAC file and its content."""
    return {
        root / "manifests/base/clusterrole.yaml": HEADER
        + yaml.safe_dump(cluster_role(), sort_keys=False),
        root / "helm/shoal/files/rbac-rules.yaml": HEADER + yaml.safe_dump(RULES, sort_keys=False),
        root / "manifests/base/approver-roles.yaml": HEADER
        + yaml.safe_dump_all(people_roles(), sort_keys=False),
        # Cluster-scoped, so named after the release: "shoal-approver" for release shoal.
        root / "helm/shoal/templates/approver-roles.yaml": HEADER
        + yaml.safe_dump_all(people_roles("{{ .Release.Name }}"), sort_keys=False),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="repository root")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    return write_or_check(rendered(args.root), args.check, "make manifests")


if __name__ == "__main__":
    raise SystemExit(main())
