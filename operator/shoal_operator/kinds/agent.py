"""An Agent's reconcile I/O: children applied, JetStream consumers declared, runtime
records read, status written; on deletion the JetStream resources are removed first."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from shoal_api.agent import AgentSpec, AgentStatus
from shoal_api.runtime_state import CircuitRecord, UsageRecord
from shoal_api.timestamps import now_rfc3339
from shoal_operator.builders.common import Owner
from shoal_operator.builders.deployment import RuntimeDefaults
from shoal_operator.cache import Cache
from shoal_operator.clients.jetstream import JetStreamAdmin, queue_counts
from shoal_operator.clients.kube import ApiError, Kube
from shoal_operator.reconcilers import agent as agent_rec
from shoal_operator.reconcilers.common import Problem
from shoal_operator.settings import FIELD_MANAGER, HANDOVER_MANAGER
from shoal_operator.writer import RetryLater, Writer, api_reason

log = logging.getLogger(__name__)


@dataclass
class AgentIO:
    kube: Kube
    cache: Cache
    writer: Writer
    runtime: RuntimeDefaults
    nats: Callable[[], JetStreamAdmin | None]
    """The JetStream connection, None until it is made."""
    clock: Callable[[], str] = now_rfc3339

    async def reconcile(self, namespace: str, name: str, force: bool) -> None:
        body = self.cache.agent(namespace, name)
        if body is None:
            return
        js = self.nats()

        async def cleanup() -> None:
            if js is None:
                raise RuntimeError("NATS is not connected; JetStream cleanup must wait")
            await js.remove_agent(namespace, name)

        if await self.writer.release_if_deleted("Agent", body, cleanup):
            return
        spec = await self.writer.parse("Agent", body, AgentSpec)
        if spec is None:
            return
        meta = body["metadata"]
        owner = Owner("Agent", namespace, name, meta["uid"])
        policy = self.cache.scaling_policy_for(namespace, name)
        observed = agent_rec.AgentObserved(
            deployment=self.cache.deployment(namespace, name),
            agents=self.cache.agents(namespace),
            scaled_by=policy[0] if policy else None,
            max_replicas=policy[1] if policy else 1,
        )
        plan = agent_rec.plan(owner, spec, observed, self.runtime, FIELD_MANAGER)
        problems: list[Problem] = []
        if plan.handover is not None:
            await self.kube.apply(plan.handover, manager=HANDOVER_MANAGER)

        async def apply_child(obj: dict[str, Any]) -> dict[str, Any] | None:
            try:
                if obj["kind"] == "Deployment":
                    return await self.writer.apply(obj, observed.deployment, force)
                await self.writer.apply(obj, None, force, watched=False)
            except ApiError as exc:
                problems.append(Problem("ApplyFailed", f"{obj['kind']} {name}: {api_reason(exc)}"))
            return None

        async def delete_child(kind: str, child: str) -> None:
            existing = await self.kube.get(kind, namespace, child)
            owners = (existing or {}).get("metadata", {}).get("ownerReferences", [])
            if any(r.get("uid") == meta["uid"] for r in owners):
                await self.kube.delete(kind, namespace, child)

        async def records() -> tuple[CircuitRecord | None, UsageRecord | None]:
            if js is None:
                return None, None
            try:
                circuit, usage = await asyncio.gather(
                    js.circuit_record(namespace, name), js.usage_record(namespace, name)
                )
            except Exception as exc:
                # The status keeps the last mirrored values; the consumer reports NATS.
                log.debug("reading runtime state of %s/%s: %s", namespace, name, exc)
                return None, None
            return circuit, usage

        async def consumer() -> tuple[int, int] | None:
            if js is None:
                problems.append(Problem("JetStreamUnavailable", "not connected to NATS yet"))
                return None
            try:
                return queue_counts(await js.ensure_consumers(plan.consumers))
            except Exception as exc:
                problems.append(
                    Problem("JetStreamUnavailable", f"consumers of {namespace}/{name}: {exc}")
                )
                return None

        # Independent writes go out together: one round trip of latency, not five.
        state, results = await asyncio.gather(
            records(),
            asyncio.gather(
                consumer(),
                self.writer.ensure_finalizer("Agent", body),
                *(delete_child(kind, child) for kind, child in plan.delete),
                *(apply_child(obj) for obj in plan.apply),
            ),
        )
        counts = results[0] if isinstance(results[0], tuple) else None
        applied = [r for r in results[2 + len(plan.delete) :] if isinstance(r, Mapping)]
        deployment = applied[0] if applied else observed.deployment
        outcome = agent_rec.AgentOutcome(problems, *(counts or (None, None)))
        observed = replace(observed, deployment=deployment, circuit=state[0], usage=state[1])
        status, events = agent_rec.status(
            int(meta.get("generation", 0)),
            namespace,
            spec,
            observed,
            outcome,
            self.writer.observed_status("Agent", body, AgentStatus),
            self.clock(),
            unix_now=time.time(),
        )
        await self.writer.write_status("Agent", body, status, events)
        if any(p.reason == "JetStreamUnavailable" for p in problems):
            raise RetryLater("JetStream unavailable")
