"""The HorizontalPodAutoscaler a ScalingPolicy becomes."""

from __future__ import annotations

from typing import Any

from shoal_api.scaling import Metric, ScalingPolicySpec
from shoal_operator.builders.common import AGENT_LABEL, MANAGED_BY, POLICY_LABEL, Owner

# External metrics the operator serves through external.metrics.k8s.io.
QUEUE_LAG_METRIC = "shoal_queue_lag"
LATENCY_METRIC = "shoal_latency_p95_ms"


def _metric(agent: str, metric: Metric) -> dict[str, Any]:
    selector = {"matchLabels": {AGENT_LABEL: agent}}
    if metric.type == "QueueLag":
        return {
            "type": "External",
            "external": {
                "metric": {"name": QUEUE_LAG_METRIC, "selector": selector},
                "target": {"type": "AverageValue", "averageValue": str(metric.target)},
            },
        }
    if metric.type == "Latency":
        return {
            "type": "External",
            "external": {
                "metric": {"name": LATENCY_METRIC, "selector": selector},
                "target": {"type": "Value", "value": str(metric.target_millis)},
            },
        }
    return {
        "type": "Resource",
        "resource": {
            "name": "cpu",
            "target": {
                "type": "Utilization",
                "averageUtilization": metric.target_utilization_percent,
            },
        },
    }


def hpa(
    owner: Owner, spec: ScalingPolicySpec, bounds: tuple[int, int] | None = None
) -> dict[str, Any]:
    """autoscaling/v2 HPA on the target Agent's Deployment.

    The HPA cannot hold 0 replicas; minReplicas 0 means 1 here and the operator does
    0 <-> 1 itself. ``bounds`` (min, max) are the operator's live ones: schedule windows
    and forecasts raise the minimum, provider quotas cap the maximum.
    """
    low, high = bounds if bounds is not None else (max(1, spec.min_replicas), spec.max_replicas)
    agent = spec.target_ref.name
    body: dict[str, Any] = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": owner.metadata(
            owner.name, {**MANAGED_BY, AGENT_LABEL: agent, POLICY_LABEL: owner.name}
        ),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": agent},
            "minReplicas": max(1, low),
            "maxReplicas": max(1, low, high),
            "metrics": [_metric(agent, m) for m in spec.metrics],
        },
    }
    if spec.behavior:
        body["spec"]["behavior"] = spec.behavior
    return body
