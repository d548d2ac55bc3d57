"""Labels, names and owner references shared by the builders."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shoal_api.base import API_VERSION

MANAGED_BY = {"app.kubernetes.io/managed-by": "shoal"}
AGENT_LABEL = "shoal.dev/agent"
POLICY_LABEL = "shoal.dev/scalingpolicy"


@dataclass(frozen=True)
class Owner:
    """The custom resource that owns the built objects (garbage collection follows it)."""

    kind: str
    namespace: str
    name: str
    uid: str

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": self.kind,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }

    def metadata(self, name: str, labels: dict[str, str]) -> dict[str, Any]:
        return {
            "name": name,
            "namespace": self.namespace,
            "labels": dict(sorted(labels.items())),
            "ownerReferences": [self.reference()],
        }


def agent_selector(agent: str) -> dict[str, str]:
    """Pod selector of an Agent's Deployment (immutable once created: keep it small)."""
    return {"app.kubernetes.io/name": "shoal-agent", AGENT_LABEL: agent}


def agent_labels(agent: str) -> dict[str, str]:
    return {**agent_selector(agent), **MANAGED_BY, "app.kubernetes.io/instance": agent}
