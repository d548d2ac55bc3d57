"""Observed-state helpers shared by the reconcilers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Problem:
    """Something that keeps an object from being Ready: a CamelCase reason and a sentence."""

    reason: str
    message: str


@dataclass(frozen=True)
class Rollout:
    complete: bool
    replicas: int
    ready: int
    message: str


def rollout(deployment: Mapping[str, Any] | None) -> Rollout:
    """Whether a Deployment has rolled out its current spec to every replica."""
    if deployment is None:
        return Rollout(False, 0, 0, "Deployment not created yet")
    want = deployment.get("spec", {}).get("replicas", 1)
    st = deployment.get("status", {})
    ready = st.get("readyReplicas", 0)
    updated = st.get("updatedReplicas", 0)
    available = st.get("availableReplicas", 0)
    current = st.get("observedGeneration", 0) >= deployment["metadata"].get("generation", 0)
    total = st.get("replicas", 0)
    complete = current and updated >= want and available >= want and total == want
    return Rollout(complete, total, ready, f"{ready}/{want} replicas ready")


def owned_by_manager(obj: Mapping[str, Any], manager: str, path: tuple[str, ...]) -> bool:
    """Whether ``manager`` (server-side apply) owns the field at ``path``."""
    for entry in obj.get("metadata", {}).get("managedFields", []) or []:
        if entry.get("manager") != manager or entry.get("operation") != "Apply":
            continue
        node = entry.get("fieldsV1", {})
        for part in path:
            node = node.get(f"f:{part}") if isinstance(node, dict) else None
            if node is None:
                break
        else:
            return True
    return False
