"""The leader's two long-running engines, started and stopped with leadership: the
workflow run dispatcher and the autoscaling loop.

The engines themselves live in ``dispatcher`` and ``autoscaler``; this module gives
them what they read (the watch cache, through narrow views) and what they do to the
cluster (scale a Deployment, annotate a pod, queue a reconcile), so that neither
knows about the controller, and the controller knows them only by their figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from shoal_api import nats_layout as nl
from shoal_core.autoscale.policy import Plan
from shoal_operator.cache import Cache, Key
from shoal_operator.catalog import WatchCatalog
from shoal_operator.clients.jetstream import JetStreamLink
from shoal_operator.clients.kube import Kube
from shoal_operator.kinds.approval import ApprovalRelay
from shoal_operator.leadership import Charge
from shoal_operator.reconcilers.workflow import RunSummary
from shoal_operator.runs import Dispatcher, LagSource, RunMetrics
from shoal_operator.scaling import Autoscaler, MetricSource, PolicyView
from shoal_operator.workqueue import WorkQueue

log = logging.getLogger(__name__)

# A changed autoscaling decision sentence (e.g. the idle countdown) at most this often.
DECISION_EVERY = 10.0


@dataclass
class RunSupervisor:
    """Runs the dispatcher while this replica leads (and NATS is there); between
    leaderships there is none, and the figures it kept are not reported."""

    link: JetStreamLink
    catalog: WatchCatalog
    charge: Charge
    relay: ApprovalRelay
    """Gets the dispatcher as its run gate while one runs."""
    on_tally: Callable[[str, str], None]
    """A Workflow's run figures changed."""
    metrics: RunMetrics = field(default_factory=RunMetrics)
    """One registry however often leadership changes."""
    dispatcher: Dispatcher | None = None

    async def run(self, lag: LagSource) -> None:
        js = await self.link.connected()
        while True:
            await self.charge.wait()
            dispatcher = Dispatcher(
                js.nc, self.catalog, lag=lag, on_tally=self.on_tally, metrics=self.metrics
            )
            try:
                await dispatcher.start()
            except Exception as exc:
                log.warning("workflow dispatcher not started (%s); retrying", exc)
                await dispatcher.stop()
                await asyncio.sleep(2.0)
                continue
            self.dispatcher = self.relay.runs = dispatcher
            try:
                # The elector has an event for leading, none for losing it.
                while self.charge.leading():  # noqa: ASYNC110
                    await asyncio.sleep(1.0)
                log.info("no longer leading: workflow dispatcher stops")
            finally:
                self.dispatcher = self.relay.runs = None
                await dispatcher.stop()

    def summary(self, namespace: str, workflow: str) -> RunSummary | None:
        """A Workflow's run figures (``kinds.workflow.RunTallies``)."""
        tally = self.dispatcher.tally(namespace, workflow) if self.dispatcher else None
        if tally is None:
            return None
        return RunSummary(
            active=tally.active,
            succeeded=tally.succeeded,
            failed=tally.failed,
            p95_seconds=tally.p95(),
            last_run=tally.last_run,
        )

    def queues(self) -> dict[tuple[str, str], tuple[int, int]]:
        return self.dispatcher.queues() if self.dispatcher else {}


@dataclass
class AutoscaleSupervisor:
    """The per-second autoscaling loop, once NATS is there; idle unless leading."""

    link: JetStreamLink
    cache: Cache
    kube: Kube
    charge: Charge
    queue: WorkQueue[Key]
    autoscaler: Autoscaler | None = None
    _decision_shown: dict[tuple[str, str], float] = field(default_factory=dict)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def run(self, metrics: MetricSource) -> None:
        js = await self.link.connected()
        usage = await js.js.key_value(nl.USAGE_BUCKET)
        self.autoscaler = Autoscaler(metrics, self._scale, self._annotate_pod, self._on_plan, usage)
        await self.autoscaler.run(self._policy_views)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def plan(self, namespace: str, name: str) -> Plan | None:
        """The latest plan of a policy (None before its first, or while no loop runs)."""
        return self.autoscaler.plans.get((namespace, name)) if self.autoscaler else None

    def _policy_views(self) -> list[PolicyView]:
        if self.cache.indexes is None or not self.charge.leading():
            return []
        views = []
        for ns, name in self.cache.policies():
            body = self.cache.policy(ns, name)
            if body is None:
                continue
            spec = self.cache.policy_spec(ns, name, body)
            if spec is None:
                continue
            winner = self.cache.scaling_policy_for(ns, spec.target_ref.name)
            if winner is None or winner[0] != name:
                continue
            dep = self.cache.deployment(ns, spec.target_ref.name)
            replicas = None if dep is None else int(dep.get("spec", {}).get("replicas", 1))
            views.append(PolicyView(ns, name, spec, replicas))
        return views

    async def _scale(self, namespace: str, deployment: str, replicas: int) -> None:
        await self.kube.merge_patch(
            "Deployment", namespace, deployment, {"spec": {"replicas": replicas}}, sub="scale"
        )

    async def _annotate_pod(self, namespace: str, pod: str, annotations: dict[str, str]) -> None:
        await self.kube.merge_patch(
            "Pod", namespace, pod, {"metadata": {"annotations": annotations}}
        )

    def _on_plan(self, view: PolicyView, new: Plan, old: Plan | None) -> None:
        """Reconciles the policy (HPA bounds, status) when the plan changed in substance,
        and shows a changed decision sentence at most every few seconds."""
        key = ("ScalingPolicy", view.namespace, view.name)
        acted = new.scale_to is not None and new.scale_to != view.replicas
        if acted and self.cache.indexes is not None:
            body = self.cache.policy(view.namespace, view.name)
            if body is not None:
                reason = "ScaledToZero" if new.scale_to == 0 else "Activated"
                task = asyncio.create_task(self.kube.event(body, "Normal", reason, new.decision))
                self._tasks.add(task)
                task.add_done_callback(self._forget)
        bounds_changed = old is None or (old.hpa_min, old.hpa_max) != (new.hpa_min, new.hpa_max)
        now = time.monotonic()
        shown = self._decision_shown.get((view.namespace, view.name), 0.0)
        if acted or bounds_changed:
            self._decision_shown[(view.namespace, view.name)] = now
            self.queue.add(key)
        elif (old is None or old.decision != new.decision) and now - shown >= DECISION_EVERY:
            self._decision_shown[(view.namespace, view.name)] = now
            self.queue.add(key, low=True)

    def _forget(self, task: asyncio.Task[None]) -> None:
        with contextlib.suppress(KeyError):
            self._tasks.remove(task)
