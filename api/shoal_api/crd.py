"""Generates the CustomResourceDefinitions from the pydantic models.

Pydantic emits JSON Schema 2020-12 with ``$ref``s and ``anyOf`` for optionals; the
API server wants a *structural* OpenAPI v3 schema: everything inlined, a type on every
node, no defaults (the operator's models apply them, so a changed default reaches
existing objects without a migration). This module does that translation.

Why not kube-custom-resource: it needs its own BaseModel and field types throughout
the models, while ours must also parse runtime config; the translation we need
(inline refs, drop nulls and defaults, keep CEL rules and list-map markers) is small
enough to own and test.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from shoal_api import approval
from shoal_api.agent import Agent
from shoal_api.base import GROUP, VERSION, ApiModel
from shoal_api.generated import write_or_check
from shoal_api.scaling import ScalingPolicy
from shoal_api.workflow import Workflow

_DROP = {"title", "default", "examples"}


def _ready_column() -> dict[str, Any]:
    return {
        "name": "Ready",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
        "description": "Whether the object is reconciled and usable",
    }


def _age_column() -> dict[str, Any]:
    return {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}


@dataclass(frozen=True)
class Kind:
    """A custom resource kind and how kubectl shows it."""

    model: type[ApiModel]
    kind: str
    plural: str
    short_names: tuple[str, ...]
    columns: tuple[dict[str, Any], ...] = field(default=())

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{GROUP}"


KINDS: tuple[Kind, ...] = (
    Kind(
        model=Agent,
        kind="Agent",
        plural="agents",
        short_names=("sagent",),
        columns=(
            _ready_column(),
            {
                "name": "Replicas",
                "type": "integer",
                "jsonPath": ".status.replicas",
                "description": "Replicas of the Agent's Deployment",
            },
            {
                "name": "Pending",
                "type": "integer",
                "jsonPath": ".status.queue.pending",
                "description": "Tasks waiting in the queue",
            },
            {
                "name": "Circuit",
                "type": "string",
                "jsonPath": ".status.circuit.state",
                "description": "Circuit breaker state",
            },
            _age_column(),
        ),
    ),
    Kind(
        model=ScalingPolicy,
        kind="ScalingPolicy",
        plural="scalingpolicies",
        short_names=("ssp",),
        columns=(
            {
                "name": "Target",
                "type": "string",
                "jsonPath": ".spec.targetRef.name",
                "description": "The Agent this policy scales",
            },
            {"name": "Min", "type": "integer", "jsonPath": ".spec.minReplicas"},
            {"name": "Max", "type": "integer", "jsonPath": ".spec.maxReplicas"},
            {"name": "Current", "type": "integer", "jsonPath": ".status.currentReplicas"},
            {"name": "Desired", "type": "integer", "jsonPath": ".status.desiredReplicas"},
            _age_column(),
        ),
    ),
    Kind(
        model=Workflow,
        kind="Workflow",
        plural="workflows",
        short_names=("swf",),
        columns=(
            {"name": "Steps", "type": "integer", "jsonPath": ".status.stepCount"},
            {"name": "Active", "type": "integer", "jsonPath": ".status.runs.active"},
            {"name": "Succeeded", "type": "integer", "jsonPath": ".status.runs.succeeded"},
            {"name": "Failed", "type": "integer", "jsonPath": ".status.runs.failed"},
            _age_column(),
        ),
    ),
    Kind(
        model=approval.Approval,
        kind="Approval",
        plural="approvals",
        short_names=("appr",),
        columns=(
            {"name": "Workflow", "type": "string", "jsonPath": ".spec.workflow"},
            {"name": "Run", "type": "string", "jsonPath": ".spec.run"},
            {"name": "Step", "type": "string", "jsonPath": ".spec.step"},
            {"name": "Decision", "type": "string", "jsonPath": ".spec.decision"},
            {"name": "Approver", "type": "string", "jsonPath": ".spec.approver"},
            {
                "name": "Phase",
                "type": "string",
                "jsonPath": ".status.phase",
                "description": "Whether the run took the decision",
            },
            _age_column(),
        ),
    ),
)

# The admission policy that binds an Approval's approver to its creator.
POLICY_FILE = "approval-policy.yaml"


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    """Translates one pydantic JSON Schema node into a structural OpenAPI v3 node."""
    if isinstance(node, list):
        return [_structural(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        node = {**copy.deepcopy(target), **node}  # the field's own description wins
    if "allOf" in node and len(node["allOf"]) == 1:
        inner = node.pop("allOf")[0]
        return _structural({**_structural(inner, defs), **node}, defs)
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o != {"type": "null"}]
        if len(options) == 1:
            del node["anyOf"]
            return _structural({**_structural(options[0], defs), **node}, defs)
    if "const" in node:
        node["enum"] = [node.pop("const")]
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "properties":
            out[key] = {k: _structural(v, defs) for k, v in value.items()}
        elif key == "additionalProperties":
            if isinstance(value, dict) and value:
                out[key] = _structural(value, defs)
            elif value is True and not node.get("x-kubernetes-preserve-unknown-fields"):
                out["x-kubernetes-preserve-unknown-fields"] = True
            # False (extra="forbid") is the API server's pruning already.
        elif key in ("items", "anyOf", "oneOf"):
            out[key] = _structural(value, defs)
        elif key == "exclusiveMinimum" and not isinstance(value, bool):
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum" and not isinstance(value, bool):
            out["maximum"], out["exclusiveMaximum"] = value, True
        else:
            out[key] = value
    if "properties" in out:
        out.setdefault("type", "object")
    return out


def openapi_schema(model: type[ApiModel]) -> dict[str, Any]:
    """The structural ``openAPIV3Schema`` of a resource whose model has spec and status."""
    raw = model.model_json_schema(by_alias=True)
    defs = raw.pop("$defs", {})
    body = _structural(raw, defs)
    props = body["properties"]
    return {
        "type": "object",
        "description": body.get("description", ""),
        "required": ["spec"],
        "properties": {
            "apiVersion": {
                "type": "string",
                "description": "APIVersion defines the versioned schema of this object.",
            },
            "kind": {"type": "string", "description": "Kind is the type of this object."},
            "metadata": {"type": "object"},
            "spec": props["spec"],
            "status": props["status"],
        },
        **({k: body[k] for k in ("x-kubernetes-validations",) if k in body}),
    }


def custom_resource_definition(kind: Kind) -> dict[str, Any]:
    """The CustomResourceDefinition of one kind."""
    version: dict[str, Any] = {
        "name": VERSION,
        "served": True,
        "storage": True,
        "schema": {"openAPIV3Schema": openapi_schema(kind.model)},
        "subresources": {"status": {}},
        "additionalPrinterColumns": list(kind.columns),
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": kind.crd_name,
            "labels": {"app.kubernetes.io/part-of": "shoal"},
        },
        "spec": {
            "group": GROUP,
            "names": {
                "kind": kind.kind,
                "listKind": f"{kind.kind}List",
                "plural": kind.plural,
                "singular": kind.kind.lower(),
                "shortNames": list(kind.short_names),
                "categories": ["shoal"],
            },
            "scope": "Namespaced",
            "versions": [version],
        },
    }


def render(kind: Kind) -> str:
    header = "# Generated by `make crds` from the pydantic models in api/shoal_api. Do not edit.\n"
    body = yaml.safe_dump(custom_resource_definition(kind), sort_keys=False, width=100)
    return header + body


# In a chart, cluster-scoped objects are named after the release, so that a release
# does not collide with another release or a kustomize install ("shoal-..." for a
# release named shoal, the name kustomize uses).
HELM_PREFIX = "{{ .Release.Name }}"


def render_policy(helm: bool = False) -> str:
    header = (
        "# Generated by `make crds` from api/shoal_api/approval.py. Do not edit.\n"
        "# Installed with the CRDs: without it anybody allowed to create an Approval could\n"
        "# decide in another person's name.\n"
    )
    name = approval.POLICY_NAME
    if helm:
        name = name.replace("shoal", HELM_PREFIX, 1)
    docs = approval.admission_policy(name)
    return header + yaml.safe_dump_all(docs, sort_keys=False, width=100)


def policy_file(outdir: Path) -> tuple[Path, str]:
    """The admission policy for a CRD directory: beside the CRDs, except in a Helm chart,
    whose crds/ holds CRDs only and is never upgraded: there, in templates/."""
    if (outdir.parent / "Chart.yaml").exists():
        return outdir.parent / "templates" / POLICY_FILE, render_policy(helm=True)
    return outdir / POLICY_FILE, render_policy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdirs", nargs="+", type=Path, help="directories to write into")
    parser.add_argument(
        "--check", action="store_true", help="fail if a file differs instead of writing it"
    )
    args = parser.parse_args(argv)
    files = {d / f"{k.crd_name}.yaml": render(k) for d in args.outdirs for k in KINDS}
    files |= dict(policy_file(d) for d in args.outdirs)
    return write_or_check(files, args.check, "make crds")


if __name__ == "__main__":
    raise SystemExit(main())
