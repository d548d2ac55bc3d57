"""Helpers shared by the test tiers: the examples, small Agent manifests, conditions."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from shoal_testbed.fixtures import Testbed

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def example_docs(recursive: bool = False) -> list[dict[str, Any]]:
    """The documents of examples/*.yaml (the API reference's examples), in file order."""
    paths = EXAMPLES.rglob("*.yaml") if recursive else EXAMPLES.glob("*.yaml")
    docs: list[dict[str, Any]] = []
    for path in sorted(paths):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def example(kind: str) -> dict[str, Any]:
    """A fresh copy of the first top-level example of ``kind``."""
    return copy.deepcopy(next(d for d in example_docs() if d["kind"] == kind))


def agent(name: str, **spec: Any) -> dict[str, Any]:
    """A minimal Agent manifest; ``spec`` adds or overrides fields."""
    return {
        "apiVersion": "shoal.dev/v1alpha1",
        "kind": "Agent",
        "metadata": {"name": name},
        "spec": {"handler": {"python": "shoal_examples.echo:handle"}, **spec},
    }


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    for cond in ((obj or {}).get("status") or {}).get("conditions", []):
        if cond["type"] == type_:
            out: dict[str, Any] = cond
            return out
    return None


def is_ready(testbed: Testbed, name: str, ns: str, kind: str = "agent") -> bool:
    cond = condition(testbed.get(kind, name, ns), "Ready")
    return cond is not None and cond["status"] == "True"


def scaling_policy(name: str, target: str, max_replicas: int = 3, **spec: Any) -> dict[str, Any]:
    """A minimal ScalingPolicy manifest; ``spec`` adds or overrides fields."""
    return {
        "apiVersion": "shoal.dev/v1alpha1",
        "kind": "ScalingPolicy",
        "metadata": {"name": name},
        "spec": {"targetRef": {"name": target}, "maxReplicas": max_replicas, **spec},
    }


def runtimes(testbed: Testbed, namespace: str, agent_name: str) -> list[str]:
    """Pods of an Agent the kubelet stand-in runs as processes (not terminating)."""
    return [
        key.split("/", 1)[1]
        for key, p in testbed.standin_pods().items()
        if key.startswith(f"{namespace}/{agent_name}-") and not p.get("terminating")
    ]
