"""The generated CRDs are structural, documented everywhere and current."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shoal_api.crd import KINDS, Kind, custom_resource_definition, render

CRD_DIR = Path(__file__).resolve().parents[2] / "crds"


def walk(node: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}")
    if "items" in node:
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def schema(kind: Kind) -> dict[str, Any]:
    crd = custom_resource_definition(kind)
    out: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return out


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.kind)
def test_every_field_is_described(kind: Kind) -> None:
    root = schema(kind)
    undocumented = [
        path
        for path, node in walk(root["properties"]["spec"], "spec")
        if not node.get("description") and not path.endswith(("[]", "{}"))
    ]
    undocumented += [
        path
        for path, node in walk(root["properties"]["status"], "status")
        if not node.get("description") and not path.endswith(("[]", "{}"))
    ]
    assert undocumented == []


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.kind)
def test_schema_is_structural(kind: Kind) -> None:
    for path, node in walk(schema(kind), ""):
        assert "$ref" not in node, path
        assert "default" not in node, f"{path}: defaults belong to the models"
        assert "title" not in node, path
        typed = (
            "type" in node
            or node.get("x-kubernetes-preserve-unknown-fields")
            or node.get("x-kubernetes-int-or-string")
        )
        assert typed, f"{path} has no type"
        assert "anyOf" not in node or node.get("x-kubernetes-int-or-string"), path


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.kind)
def test_checked_in_crd_is_current(kind: Kind) -> None:
    path = CRD_DIR / f"{kind.crd_name}.yaml"
    assert path.read_text() == render(kind), "run `make crds`"


def test_names_follow_the_contract() -> None:
    names = {k.kind: custom_resource_definition(k)["spec"]["names"] for k in KINDS}
    assert {k: v["shortNames"] for k, v in names.items()} == {
        "Agent": ["sagent"],
        "ScalingPolicy": ["ssp"],
        "Workflow": ["swf"],
        "Approval": ["appr"],
    }
    assert all(v["categories"] == ["shoal"] for v in names.values())
