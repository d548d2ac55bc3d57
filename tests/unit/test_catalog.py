"""The dispatcher's catalog over the watch cache: Workflows parsed once per generation,
capable Agents sorted."""

from __future__ import annotations

from typing import Any

from shoal_operator.cache import Cache, Indexes
from shoal_operator.catalog import WatchCatalog

NS = "support"


class Store:
    """A kopf index: key -> the stored values."""

    def __init__(self, items: dict[Any, list[Any]]) -> None:
        self.items = items

    def get(self, key: Any, default: Any = None) -> Any:
        return self.items.get(key, default)

    def __iter__(self) -> Any:
        return iter(list(self.items))


def agent(name: str, *capabilities: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"capabilities": list(capabilities)}}


def cache(workflow: dict[str, Any]) -> Cache:
    agents = {
        (NS, "b"): [agent("b", "x")],
        (NS, "a"): [agent("a", "x", "y")],
        (NS, "c"): [agent("c")],
    }
    empty = Store({})
    return Cache(
        Indexes(
            agents=Store(agents),
            policies=empty,
            workflows=Store({(NS, "wf"): [workflow]}),
            deployments=empty,
            hpas=empty,
            agents_by_ns=Store({NS: ["a", "b", "c"]}),
            agents_by_reference=empty,
            policies_by_target=empty,
            workflows_by_ns=Store({NS: ["wf"]}),
        )
    )


def workflow(generation: int, steps: list[dict[str, Any]]) -> dict[str, Any]:
    return {"metadata": {"name": "wf", "generation": generation}, "spec": {"steps": steps}}


def test_capable_agents_are_sorted() -> None:
    catalog = WatchCatalog(cache(workflow(1, [{"name": "s", "agent": "a"}])))
    assert catalog.capable(NS, "x") == ["a", "b"]
    assert catalog.capable(NS, "y") == ["a"]
    assert catalog.capable(NS, "z") == []
    assert catalog.capable("elsewhere", "x") == []


def test_a_workflow_is_parsed_once_per_generation() -> None:
    body = workflow(1, [{"name": "s", "agent": "a"}])
    catalog = WatchCatalog(cache(body))
    first = catalog.workflow(NS, "wf")
    assert first is not None
    assert [s.name for s in first.spec.steps] == ["s"]
    assert catalog.workflow(NS, "wf") is first
    body["spec"] = {"steps": [{"name": "t", "agent": "b"}]}
    assert catalog.workflow(NS, "wf") is first  # same generation: the cached view
    body["metadata"]["generation"] = 2
    second = catalog.workflow(NS, "wf")
    assert second is not None
    assert [s.name for s in second.spec.steps] == ["t"]
    assert catalog.workflow(NS, "missing") is None


def test_an_invalid_workflow_has_no_view() -> None:
    catalog = WatchCatalog(cache(workflow(1, [{"name": "Not A Name", "agent": "a"}])))
    assert catalog.workflow(NS, "wf") is None
