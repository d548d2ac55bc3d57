"""Workflow DAG analysis shared by the operator (validation) and the dispatcher."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from shoal_api.workflow import Step

_STEP_REF = re.compile(r"\$\{\s*steps\.([a-z0-9]([-a-z0-9]*[a-z0-9])?)\b")


def find_cycle(steps: Iterable[Step]) -> list[str] | None:
    """A dependency cycle as [a, b, ..., a], or None. Deterministic (sorted walk)."""
    deps = {s.name: sorted(s.depends_on) for s in steps}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for dep in deps.get(name, []):
            if dep not in deps:
                continue
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[name] = 2
        return None

    for name in sorted(deps):
        if name not in state and (found := visit(name)):
            return found
    return None


def template_step_refs(value: Any) -> set[str]:
    """Step names referenced by ``${steps.NAME...}`` anywhere inside a template value."""
    if isinstance(value, str):
        return {m.group(1) for m in _STEP_REF.finditer(value)}
    if isinstance(value, Mapping):
        return set().union(*(template_step_refs(v) for v in value.values()))
    if isinstance(value, list | tuple):
        return set().union(*(template_step_refs(v) for v in value))
    return set()


def ancestors(steps: Iterable[Step]) -> dict[str, set[str]]:
    """Every step's transitive dependencies (assumes no cycle)."""
    deps = {s.name: set(s.depends_on) for s in steps}
    memo: dict[str, set[str]] = {}

    def walk(name: str) -> set[str]:
        if name not in memo:
            memo[name] = set()
            for d in deps.get(name, ()):
                memo[name] |= {d} | walk(d)
        return memo[name]

    return {name: walk(name) for name in deps}
