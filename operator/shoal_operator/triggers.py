"""Which keys a change queues: the object itself, and whatever depends on it.

The reconciles read each other's objects (an Agent's fallback, a policy's target, a
Workflow's Agents), so a change to one must queue the others. Kept in one place, next
to nothing else, so the dependency graph between kinds can be read at a glance.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shoal_api import nats_layout as nl
from shoal_operator.builders.apiservice import MetricsProvider
from shoal_operator.cache import Cache, Key
from shoal_operator.clients.jetstream import JetStreamLink
from shoal_operator.kinds.scaling import PolicyIO
from shoal_operator.workqueue import WorkQueue
from shoal_operator.writer import Writer


@dataclass
class Triggers:
    queue: WorkQueue[Key]
    cache: Cache
    writer: Writer
    policies: PolicyIO
    _policy_target: dict[tuple[str, str], tuple[str, Any, bool]] = field(default_factory=dict)
    """A policy's (target, generation, being deleted): what its target Agent reads of it."""
    _agent_generation: dict[tuple[str, str], Any] = field(default_factory=dict)

    def on_agent(self, namespace: str, name: str, body: Mapping[str, Any] | None) -> None:
        if body is None:
            self.writer.forget("Agent", namespace, name)
        if body is None or not self.writer.is_echo("Agent", body):
            # Not the echo of our own status or finalizer write: that reconcile saw it all.
            self.queue.add(("Agent", namespace, name))
        if self.cache.indexes is None:
            return
        # Dependents care about the Agent's existence and spec, not its status writes.
        generation = None if body is None else body.get("metadata", {}).get("generation")
        if body is not None and self._agent_generation.get((namespace, name)) == generation:
            return
        if body is None:
            self._agent_generation.pop((namespace, name), None)
        else:
            self._agent_generation[(namespace, name)] = generation
        # Whatever refers to this Agent may change Ready with it.
        for other in self.cache.referring_agents(namespace, name):
            self.queue.add(("Agent", namespace, other))
        for policy in self.cache.policies_targeting(namespace, name):
            self.queue.add(("ScalingPolicy", namespace, policy))
        for wf in self.cache.workflows_in(namespace):
            self.queue.add(("Workflow", namespace, wf))

    def on_policy(self, namespace: str, name: str, body: Mapping[str, Any] | None) -> None:
        if body is None:
            self.writer.forget("ScalingPolicy", namespace, name)
        if body is None or not self.writer.is_echo("ScalingPolicy", body):
            self.queue.add(("ScalingPolicy", namespace, name))
        target = ((body or {}).get("spec") or {}).get("targetRef", {}).get("name")
        meta = (body or {}).get("metadata") or {}
        seen = (target, meta.get("generation"), bool(meta.get("deletionTimestamp")))
        previous = self._policy_target.get((namespace, name))
        if body is not None and target is not None and previous == seen:
            return  # a status write: the target Agent (and rival policies) read none of it
        for agent in {target, previous[0] if previous else None} - {None}:
            assert agent is not None
            self.queue.add(("Agent", namespace, agent))
            for other in self.cache.policies_targeting(namespace, agent):
                self.queue.add(("ScalingPolicy", namespace, other))
        if body is None or target is None:
            self._policy_target.pop((namespace, name), None)
        else:
            self._policy_target[(namespace, name)] = seen

    def on_deployment(self, namespace: str, agent: str) -> None:
        """A child Deployment changed: its Agent (and the policy reporting its replicas)."""
        self.queue.add(("Agent", namespace, agent))
        for policy in self.cache.policies_targeting(namespace, agent):
            self.queue.add(("ScalingPolicy", namespace, policy))

    def on_hpa(self, namespace: str, policy: str) -> None:
        self.queue.add(("ScalingPolicy", namespace, policy))

    def on_metrics_provider(self, provider: MetricsProvider | None) -> None:
        """The APIService changed hands (or availability): every policy says so."""
        if provider == self.policies.metrics_provider:
            return
        self.policies.metrics_provider = provider
        for namespace, name in self.cache.policies():
            self.queue.add(("ScalingPolicy", namespace, name))

    def on_workflow(self, namespace: str, name: str) -> None:
        """The dispatcher's figures of a Workflow's runs changed (its status write is
        throttled by the writer; the queue deduplicates keys)."""
        self.queue.add(("Workflow", namespace, name))

    def on_workflow_event(self, namespace: str, name: str, body: Mapping[str, Any] | None) -> None:
        """A watch event of the Workflow (``body`` None: deleted)."""
        if body is None:
            self.writer.forget("Workflow", namespace, name)
        elif self.writer.is_echo("Workflow", body):
            return
        self.queue.add(("Workflow", namespace, name))

    def on_circuit(self, namespace: str, agent: str, replay: bool) -> None:
        """A runtime wrote the Agent's circuit record (``replay``: the watch (re)started and
        reports the records that exist, a catch-up that goes behind user edits)."""
        if self.cache.watches_agent(namespace, agent):
            self.queue.add(("Agent", namespace, agent), low=replay)

    def on_usage(self, namespace: str, agent: str, replay: bool) -> None:
        """A runtime merged the Agent's usage. Every replica merges about once a second
        and status.usage is throttled anyway: within the throttle interval of the last
        status write, the Agent is queued for when it ends (one reconcile, not five)."""
        if not self.cache.watches_agent(namespace, agent):
            return
        key = ("Agent", namespace, agent)
        wait = self.writer.throttle_left(key)
        if replay:
            self.queue.add(key, low=True)
        elif wait > 0:
            self.queue.add_after(key, wait)
        else:
            self.queue.add(key)

    async def watch_runtime_state(self, link: JetStreamLink) -> None:
        """The circuit and usage mirrors are event-driven: a KV write queues its Agent."""
        js = await link.connected()
        await asyncio.gather(
            js.watch_agents(nl.CIRCUIT_BUCKET, self.on_circuit),
            js.watch_agents(nl.USAGE_BUCKET, self.on_usage),
        )
