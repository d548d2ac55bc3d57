"""What the dispatcher needs to know of the cluster, and nothing more.

The dispatcher never reads the Kubernetes API (the hot path is NATS only): it asks a
:class:`Catalog` held in memory by whoever watches Workflows and Agents. Keeping the
protocol this narrow (two lookups) is what lets the operator hand over a small watch
cache, the tests a static table and the benchmark a single Workflow, with the dispatcher
unchanged. A Workflow's spec is parsed into a :class:`WorkflowView` once per generation by
the catalog's owner, not once per event, because the view compiles a JSON Schema
validator and checks the DAG.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import jsonschema

from shoal_api.json_schema import schema_error, validator
from shoal_api.workflow import WorkflowSpec
from shoal_core.runs.engine import invalid_reason
from shoal_core.runs.when import compile_when


@dataclass(frozen=True)
class WorkflowView:
    """What the dispatcher needs of one Workflow (from the operator's cache)."""

    spec: WorkflowSpec
    input_validator: jsonschema.protocols.Validator | None
    problem: str | None = None
    """Why no run of it can start (a cycle, a ``when`` that does not compile, ...)."""


def view_of(spec: WorkflowSpec) -> WorkflowView:
    """The dispatcher's view of a spec: its input validator, and why it cannot run at
    all (what the operator also reports as Ready=False; missing Agents are not on the
    list: their tasks wait in the stream until the Agent exists)."""
    problem = invalid_reason(spec)
    if problem is None:
        problem = next(
            (f"step {s.name}: {why}" for s in spec.steps if (why := compile_when(s.when))),
            None,
        )
    if why := schema_error(spec.input):
        return WorkflowView(spec, None, problem or f"spec.input is not a valid JSON Schema {why}")
    return WorkflowView(spec, validator(spec.input), problem)


class Catalog(Protocol):
    """The Workflows and Agent capabilities the dispatcher routes by."""

    def workflow(self, namespace: str, name: str) -> WorkflowView | None:
        """The Workflow's view, or None when it does not exist (its runs are abandoned
        with reason WorkflowDeleted at their next event)."""
        ...

    def capable(self, namespace: str, capability: str) -> list[str]:
        """The Agents of ``namespace`` declaring ``capability``, sorted."""
        ...
