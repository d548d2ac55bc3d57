"""A ScalingPolicy's reconcile I/O: its HPA applied (or removed when the policy does not
own its target), status from the HPA, the target's Deployment, the metrics API's
provider and the autoscaler's latest plan."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from shoal_api.scaling import ScalingPolicySpec, ScalingPolicyStatus
from shoal_api.timestamps import now_rfc3339
from shoal_core.autoscale.policy import Plan
from shoal_operator.builders.apiservice import MetricsProvider
from shoal_operator.builders.common import Owner
from shoal_operator.cache import Cache
from shoal_operator.clients.kube import ApiError
from shoal_operator.reconcilers import scaling as scaling_rec
from shoal_operator.reconcilers.common import Problem
from shoal_operator.writer import Writer, api_reason


@dataclass
class PolicyIO:
    cache: Cache
    writer: Writer
    plans: Callable[[str, str], Plan | None]
    """The autoscaler's latest plan of a policy (None before its first, or no loop)."""
    clock: Callable[[], str] = now_rfc3339
    metrics_provider: MetricsProvider | None = None
    """Who serves external.metrics.k8s.io (every ScalingPolicy's MetricsAvailable)."""

    async def reconcile(self, namespace: str, name: str, force: bool) -> None:
        body = self.cache.policy(namespace, name)
        if body is None:
            return
        spec = await self.writer.parse("ScalingPolicy", body, ScalingPolicySpec)
        if spec is None:
            return
        meta = body["metadata"]
        owner = Owner("ScalingPolicy", namespace, name, meta["uid"])
        winner = self.cache.scaling_policy_for(namespace, spec.target_ref.name)
        observed = scaling_rec.PolicyObserved(
            agents=self.cache.agents(namespace),
            winner=winner[0] if winner else name,
            hpa=self.cache.hpa(namespace, name),
            deployment=self.cache.deployment(namespace, spec.target_ref.name),
            metrics=self.metrics_provider,
            autoscale=self.plans(namespace, name),
        )
        plan = scaling_rec.plan(owner, spec, observed)
        problems: list[Problem] = []
        hpa = observed.hpa
        if plan.hpa is not None:
            try:
                hpa = await self.writer.apply(plan.hpa, observed.hpa, force)
            except ApiError as exc:
                problems.append(
                    Problem("ApplyFailed", f"HorizontalPodAutoscaler {name}: {api_reason(exc)}")
                )
        elif observed.hpa is not None:
            await self.writer.delete("HorizontalPodAutoscaler", namespace, name)
            hpa = None
        observed = replace(observed, hpa=hpa)
        status, events = scaling_rec.status(
            int(meta.get("generation", 0)),
            owner,
            observed,
            plan,
            problems,
            self.writer.observed_status("ScalingPolicy", body, ScalingPolicyStatus),
            self.clock(),
        )
        await self.writer.write_status("ScalingPolicy", body, status, events)
