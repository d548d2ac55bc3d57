"""A Workflow's reconcile I/O: validation against the namespace's Agents, and the run
figures the dispatcher keeps (read through :class:`RunTallies`, not the dispatcher)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from shoal_api.timestamps import now_rfc3339
from shoal_api.workflow import WorkflowSpec, WorkflowStatus
from shoal_operator.cache import Cache
from shoal_operator.reconcilers import workflow as workflow_rec
from shoal_operator.writer import Writer


class RunTallies(Protocol):
    """Where a Workflow's run figures come from (the dispatcher, while this replica
    leads): None when nobody counts them here."""

    def summary(self, namespace: str, workflow: str) -> workflow_rec.RunSummary | None: ...


@dataclass
class WorkflowIO:
    cache: Cache
    writer: Writer
    runs: RunTallies
    clock: Callable[[], str] = now_rfc3339

    async def reconcile(self, namespace: str, name: str) -> None:
        body = self.cache.workflow(namespace, name)
        if body is None:
            return
        spec = await self.writer.parse("Workflow", body, WorkflowSpec)
        if spec is None:
            return
        status, events = workflow_rec.status(
            int(body["metadata"].get("generation", 0)),
            namespace,
            spec,
            self.cache.capabilities(namespace),
            self.writer.observed_status("Workflow", body, WorkflowStatus),
            self.clock(),
            self.runs.summary(namespace, name),
        )
        await self.writer.write_status("Workflow", body, status, events)
