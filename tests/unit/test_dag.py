"""Workflow DAG analysis: cycles, template references, transitive dependencies."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from shoal_api import dag
from shoal_api.workflow import Step


def steps(graph: dict[str, list[str]]) -> list[Step]:
    """Steps named by ``graph``'s keys, each depending on its value."""
    return [
        Step.model_validate({"name": name, "agent": "a", "dependsOn": deps})
        for name, deps in graph.items()
    ]


def test_no_cycle_in_a_dag() -> None:
    graph = {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]}
    assert dag.find_cycle(steps(graph)) is None


def test_no_cycle_without_steps() -> None:
    assert dag.find_cycle([]) is None


def test_two_step_cycle() -> None:
    assert dag.find_cycle(steps({"x": ["y"], "y": ["x"]})) == ["x", "y", "x"]


def test_self_dependency_is_a_cycle() -> None:
    # The CRD rejects it; the analysis must not loop or miss it either.
    assert dag.find_cycle(steps({"a": ["a"]})) == ["a", "a"]


def test_cycle_excludes_the_path_leading_into_it() -> None:
    graph = {"a": ["b"], "b": ["c"], "c": ["d"], "d": ["b"]}
    assert dag.find_cycle(steps(graph)) == ["b", "c", "d", "b"]


def test_cycle_is_closed_and_follows_dependencies() -> None:
    graph = {"a": ["c"], "b": ["a"], "c": ["b"], "e": []}
    cycle = dag.find_cycle(steps(graph))
    assert cycle is not None
    assert cycle[0] == cycle[-1]
    for step, dep in itertools.pairwise(cycle):
        assert dep in graph[step]


def test_unknown_dependencies_are_ignored() -> None:
    assert dag.find_cycle(steps({"a": ["ghost"], "b": ["a"]})) is None


@pytest.mark.parametrize(
    "graph",
    [
        {"a": ["b"], "b": ["c"], "c": ["a"], "p": ["q"], "q": ["p"]},
        {"m": ["n", "o"], "n": ["o"], "o": ["m"], "z": ["m"]},
    ],
)
def test_find_cycle_does_not_depend_on_step_order(graph: dict[str, list[str]]) -> None:
    results = set()
    for order in itertools.permutations(graph):
        ordered = {name: graph[name] for name in order}
        reordered = {name: list(reversed(deps)) for name, deps in ordered.items()}
        for g in (ordered, reordered):
            cycle = dag.find_cycle(steps(g))
            assert cycle is not None
            results.add(tuple(cycle))
    assert len(results) == 1


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("${steps.a.output}", {"a"}),
        ("${ steps.my-step.output.x }", {"my-step"}),
        ("pre ${steps.a.output} mid ${steps.b2.output.y} post", {"a", "b2"}),
        ("${input.x}", set()),
        ("steps.a.output", set()),
        ("$steps.a", set()),
        ({"k": {"deep": ["${steps.a.output}", {"x": "${steps.c.output}"}]}}, {"a", "c"}),
        (("${steps.t.output}",), {"t"}),
        ([], set()),
        ({}, set()),
        (42, set()),
        (None, set()),
    ],
)
def test_template_step_refs(value: Any, expected: set[str]) -> None:
    assert dag.template_step_refs(value) == expected


def test_template_ref_takes_the_whole_name() -> None:
    assert dag.template_step_refs("${steps.classify2.output}") == {"classify2"}
    assert dag.template_step_refs("${steps.a-b.output}") == {"a-b"}


def test_template_refs_do_not_look_at_keys() -> None:
    assert dag.template_step_refs({"${steps.a.output}": "x"}) == set()


def test_ancestors_are_transitive() -> None:
    graph = {"a": [], "b": ["a"], "c": ["b"], "d": ["c", "a"], "e": []}
    assert dag.ancestors(steps(graph)) == {
        "a": set(),
        "b": {"a"},
        "c": {"a", "b"},
        "d": {"a", "b", "c"},
        "e": set(),
    }


def test_ancestors_of_a_diamond() -> None:
    graph = {"top": [], "left": ["top"], "right": ["top"], "bottom": ["left", "right"]}
    assert dag.ancestors(steps(graph))["bottom"] == {"top", "left", "right"}


def test_ancestors_do_not_depend_on_step_order() -> None:
    graph = {"a": [], "b": ["a"], "c": ["b"]}
    forward = dag.ancestors(steps(graph))
    backward = dag.ancestors(steps(dict(reversed(graph.items()))))
    assert forward == backward


def test_ancestors_tolerate_unknown_dependencies() -> None:
    assert dag.ancestors(steps({"a": ["ghost"]})) == {"a": {"ghost"}}
