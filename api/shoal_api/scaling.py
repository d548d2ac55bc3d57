"""The ScalingPolicy resource: queue-driven autoscaling of one Agent."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from shoal_api.base import (
    ApiModel,
    Conditions,
    JsonObject,
    Name,
    OptionalTime,
    cel,
    unless_known,
    validations,
)


class TargetRef(ApiModel):
    """The object this policy scales."""

    kind: Literal["Agent"] = "Agent"
    """Kind of the target; only Agent."""
    name: Name
    """Name of the Agent in the same namespace."""


class Metric(ApiModel):
    """One signal the HPA scales on; the largest proposal wins."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": validations(
            cel(
                "self.type != 'QueueLag' || has(self.target)",
                "QueueLag needs target",
                field_path=".target",
            ),
            cel(
                "self.type != 'Latency' || has(self.targetMillis)",
                "Latency needs targetMillis",
                field_path=".targetMillis",
            ),
            cel(
                "self.type != 'CPU' || has(self.targetUtilizationPercent)",
                "CPU needs targetUtilizationPercent",
                field_path=".targetUtilizationPercent",
            ),
        )
    }

    type: Literal["QueueLag", "Latency", "CPU"]
    """QueueLag: (pending + in flight) per replica. Latency: p95 task latency. CPU: utilisation."""
    target: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    """QueueLag: tasks per replica to aim for."""
    target_millis: Annotated[int, Field(ge=1, le=86_400_000)] | None = None
    """Latency: p95 latency in milliseconds to aim for."""
    target_utilization_percent: Annotated[int, Field(ge=1, le=100)] | None = None
    """CPU: average utilisation of the requests to aim for."""

    @model_validator(mode="after")
    def _target_for_type(self) -> Metric:
        # The same rule as the CEL validations above, for objects that bypass the API.
        needed = {
            "QueueLag": ("target", self.target),
            "Latency": ("targetMillis", self.target_millis),
            "CPU": ("targetUtilizationPercent", self.target_utilization_percent),
        }
        field_name, value = needed[self.type]
        if value is None:
            raise ValueError(f"{self.type} needs {field_name}")
        return self


class Activation(ApiModel):
    """When a policy with minReplicas 0 wakes its Agent."""

    queue_lag: Annotated[int, Field(ge=1, le=1_000_000)] = 1
    """Scale 0 -> 1 when the queue lag reaches this."""


class ScheduleWindow(ApiModel):
    """A pre-warm window that raises the minimum."""

    cron: Annotated[str, Field(min_length=1, max_length=256)]
    """Start of the window, a 5-field cron expression."""
    duration_minutes: Annotated[int, Field(ge=1, le=525_600)]
    """Length of the window."""
    min_replicas: Annotated[int, Field(ge=0, le=10000)]
    """Minimum replicas inside the window."""
    time_zone: Annotated[str, Field(max_length=64)] = "UTC"
    """IANA time zone of the cron expression."""


class Predictive(ApiModel):
    """Pre-warming from a forecast of the arrival rate."""

    enabled: bool = False
    """Feed max(current, forecast) to the HPA."""
    horizon_seconds: Annotated[int, Field(ge=1, le=86400)] = 300
    """How far ahead to forecast."""
    lookback_hours: Annotated[int, Field(ge=1, le=8760)] = 168
    """History the forecast learns from."""


class Quota(ApiModel):
    """Provider limits that cap the fleet (0 means no cap)."""

    requests_per_minute: Annotated[int, Field(ge=0)] = 0
    """Requests per minute the provider allows."""
    tokens_per_minute: Annotated[int, Field(ge=0)] = 0
    """Tokens per minute the provider allows."""


class ScalingPolicySpec(ApiModel):
    """Desired scaling of one Agent."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": validations(
            cel(
                "!has(self.minReplicas) || self.minReplicas <= self.maxReplicas",
                "minReplicas must be <= maxReplicas",
                field_path=".minReplicas",
            )
        )
    }

    target_ref: TargetRef
    """The Agent to scale."""
    min_replicas: Annotated[int, Field(ge=0, le=10000)] = 1
    """Fewest replicas; 0 lets the operator scale to zero when idle."""
    max_replicas: Annotated[int, Field(ge=1, le=10000)]
    """Most replicas."""
    metrics: Annotated[tuple[Metric, ...], Field(min_length=1, max_length=8)] = Field(
        default_factory=lambda: (Metric(type="QueueLag", target=10),)
    )
    """Signals to scale on; default is QueueLag with target 10."""
    activation: Activation = Field(default_factory=Activation)
    """0 -> 1 activation threshold."""
    cooldown_seconds: Annotated[int, Field(ge=0, le=86400)] = 300
    """1 -> 0 after this long idle."""
    behavior: JsonObject | None = None
    """autoscaling/v2 HorizontalPodAutoscalerBehavior, passed through to the HPA."""
    schedule: Annotated[tuple[ScheduleWindow, ...], Field(max_length=32)] = ()
    """Pre-warm windows that raise the minimum."""
    predictive: Predictive = Field(default_factory=Predictive)
    """Forecast-driven pre-warming."""
    quota: Quota = Field(default_factory=Quota)
    """Provider limits that cap replicas."""


class ScalingPolicyStatus(ApiModel):
    """Observed state of a ScalingPolicy, written by the operator."""

    observed_generation: Annotated[int, Field(ge=0)] = 0
    """The .metadata.generation the operator last acted on."""
    conditions: Conditions = ()
    """Ready, Active (replicas > 0) and Degraded."""
    current_replicas: Annotated[int, Field(ge=0)] = 0
    """Replicas now."""
    desired_replicas: Annotated[int, Field(ge=0)] = 0
    """Replicas the autoscaler wants."""
    last_scale_time: OptionalTime = None
    """When replicas last changed (RFC 3339)."""
    hpa_name: str = ""
    """Name of the HorizontalPodAutoscaler the operator owns."""
    last_decision: Annotated[
        str | None, Field(max_length=1024), unless_known({"maxLength": 1024, "type": "string"})
    ] = None
    """The last scaling decision and why, in words."""


class ScalingPolicy(ApiModel):
    """Queue-driven autoscaling of an Agent, enforced by a HorizontalPodAutoscaler."""

    spec: ScalingPolicySpec
    status: ScalingPolicyStatus | None = None
