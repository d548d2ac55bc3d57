"""Workflow: validation the API server cannot do (cycles, missing Agents, templates)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from shoal_api import dag
from shoal_api.json_schema import schema_error
from shoal_api.timestamps import rfc3339
from shoal_api.workflow import RunCounts, WorkflowSpec, WorkflowStatus
from shoal_core.runs.when import compile_when
from shoal_operator.reconcilers.common import Problem
from shoal_operator.status_conditions import Cond, EventSpec, merge_conditions, transition_events


def problems(
    namespace: str, spec: WorkflowSpec, capabilities: Mapping[str, frozenset[str]]
) -> list[Problem]:
    """What keeps the Workflow from running; ``capabilities`` maps Agent -> capabilities."""
    out: list[Problem] = []
    if cycle := dag.find_cycle(spec.steps):
        out.append(Problem("DependencyCycle", "steps form a cycle: " + " -> ".join(cycle)))
        return out
    names = {s.name for s in spec.steps}
    before = dag.ancestors(spec.steps)
    for step in spec.steps:
        for dep in step.depends_on:
            if dep not in names:
                out.append(
                    Problem("UnknownStep", f"step {step.name}: dependsOn unknown step {dep}")
                )
        if step.agent is not None and step.agent not in capabilities:
            out.append(
                Problem(
                    "AgentNotFound",
                    f"step {step.name}: Agent {step.agent} does not exist in namespace {namespace}",
                )
            )
        if step.agent_selector is not None:
            cap = step.agent_selector.capability
            if not any(cap in caps for caps in capabilities.values()):
                out.append(
                    Problem(
                        "NoAgentWithCapability",
                        f"step {step.name}: no Agent in namespace {namespace} has capability {cap}",
                    )
                )
        if step.fallback is not None and step.fallback.agent not in capabilities:
            out.append(
                Problem(
                    "AgentNotFound",
                    f"step {step.name}: fallback Agent {step.fallback.agent} does "
                    f"not exist in namespace {namespace}",
                )
            )
        for ref in sorted(dag.template_step_refs(step.input)):
            if ref not in names:
                out.append(
                    Problem(
                        "InvalidTemplate", f"step {step.name}: input refers to unknown step {ref}"
                    )
                )
            elif ref not in before[step.name]:
                out.append(
                    Problem(
                        "InvalidTemplate",
                        f"step {step.name}: input uses step {ref}, which it does not depend on",
                    )
                )
        if why := compile_when(step.when):
            out.append(Problem("InvalidCondition", f"step {step.name}: {why}"))
    if why := schema_error(spec.input):
        out.append(Problem("InvalidInputSchema", f"spec.input is not a valid JSON Schema {why}"))
    for ref in sorted(dag.template_step_refs(spec.output or {})):
        if ref not in names:
            out.append(Problem("InvalidTemplate", f"output refers to unknown step {ref}"))
    return out


@dataclass(frozen=True)
class RunSummary:
    """The dispatcher's figures of one Workflow's runs."""

    active: int
    succeeded: int
    failed: int
    p95_seconds: float | None = None
    """None until a run has finished."""
    last_run: float | None = None
    """When the last run started (Unix time); None before the first."""


def status(
    generation: int,
    namespace: str,
    spec: WorkflowSpec,
    capabilities: Mapping[str, frozenset[str]],
    current: WorkflowStatus,
    now: str,
    runs: RunSummary | None = None,
) -> tuple[WorkflowStatus, list[EventSpec]]:
    """``runs``: the dispatcher's summary, None where no dispatcher runs (the last
    mirrored figures stay)."""
    found = problems(namespace, spec, capabilities)
    if found:
        message = "; ".join(p.message for p in found)
        conds = [
            Cond("Ready", "False", found[0].reason, message),
            Cond("Degraded", "True", found[0].reason, message),
        ]
    else:
        conds = [
            Cond("Ready", "True", "Valid", f"{len(spec.steps)} steps, every Agent present"),
            Cond("Degraded", "False", "AsExpected", ""),
        ]
    conditions = merge_conditions(current.conditions, conds, generation, now)
    counts, p95, last_run = current.runs, current.p95_duration_seconds, current.last_run_time
    if runs is not None:
        counts = RunCounts(active=runs.active, succeeded=runs.succeeded, failed=runs.failed)
        if runs.p95_seconds is not None:
            p95 = round(runs.p95_seconds, 3)
        if runs.last_run is not None:
            last_run = rfc3339(runs.last_run)
    new = WorkflowStatus(
        observed_generation=generation,
        conditions=conditions,
        step_count=len(spec.steps),
        runs=counts,
        p95_duration_seconds=p95,
        last_run_time=last_run,
    )
    return new, transition_events(current.conditions, conditions)
