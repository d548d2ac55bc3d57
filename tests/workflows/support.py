"""Workflow runs against a real nats-server without Kubernetes: a dispatcher fed by a
static catalog of Workflows, runtimes serving the step Agents in-process."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import nats

from shoal_api.runs.model import RunState
from shoal_api.workflow import WorkflowSpec
from shoal_cli.client import ShoalClient
from shoal_operator.runs import Dispatcher, WorkflowView, view_of
from tests.runtime.support import NS, declare, running, until

HANDLERS = "tests.workflows.handlers"


def agent_spec(handler: str = "work", **extra: Any) -> dict[str, Any]:
    return {"handler": {"python": f"{HANDLERS}:{handler}"}, "concurrency": 16, **extra}


class StaticCatalog:
    """Workflows and Agent capabilities as the operator's watch cache would hold them."""

    def __init__(
        self,
        workflows: Mapping[str, Mapping[str, Any]],
        capabilities: Mapping[str, list[str]] | None = None,
    ) -> None:
        self.views = {
            name: view_of(WorkflowSpec.model_validate(s)) for name, s in workflows.items()
        }
        self.capabilities = dict(capabilities or {})

    def workflow(self, namespace: str, name: str) -> WorkflowView | None:
        return self.views.get(name) if namespace == NS else None

    def capable(self, namespace: str, capability: str) -> list[str]:
        return sorted(a for a, caps in self.capabilities.items() if capability in caps)


@contextlib.asynccontextmanager
async def dispatcher(url: str, catalog: StaticCatalog) -> AsyncIterator[Dispatcher]:
    nc = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.5)
    d = Dispatcher(nc, catalog)
    await d.start()
    try:
        yield d
    finally:
        await d.stop()
        await nc.close()


@contextlib.asynccontextmanager
async def agents(url: str, specs: Mapping[str, dict[str, Any]]) -> AsyncIterator[None]:
    """Declares the Agents and serves each with one in-process runtime."""
    for name, spec in specs.items():
        await declare(url, name, spec)
    async with contextlib.AsyncExitStack() as stack:
        for name, spec in specs.items():
            await stack.enter_async_context(running(url, name, spec))
        yield


async def finished(client: ShoalClient, run: str, within: float = 30) -> RunState:
    async def check() -> RunState | None:
        state = await client.get_run(NS, run)
        return state if state is not None and state.terminal else None

    return await until(check, within, f"run {run} finished")


def timeline(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]
