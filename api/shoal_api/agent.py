"""The Agent resource: one kind of AI worker, its contract and its failure handling."""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field

from shoal_api.base import (
    LIST_SET,
    AgentRef,
    ApiModel,
    Conditions,
    IntOrString,
    JsonObject,
    Money,
    Name,
    Percent,
    SecretKeyRef,
    cel,
    validations,
)


class Pricing(ApiModel):
    """What the model provider charges, used for cost budgets and status.usage."""

    input_per_1k_tokens: Annotated[Money, Field(alias="inputPer1kTokens")] = Decimal("0")
    """Cost of 1,000 prompt tokens, as a decimal string."""
    output_per_1k_tokens: Annotated[Money, Field(alias="outputPer1kTokens")] = Decimal("0")
    """Cost of 1,000 completion tokens, as a decimal string."""


class LlmHandler(ApiModel):
    """A built-in handler that calls an OpenAI-compatible chat completions endpoint."""

    base_url: Annotated[str, Field(alias="baseURL", max_length=2048, pattern=r"^https?://")]
    """Base URL of the OpenAI-compatible API, e.g. http://vllm.models:8000/v1."""
    model: Annotated[str, Field(min_length=1, max_length=256)]
    """Model name sent in each request."""
    api_key_secret_ref: SecretKeyRef | None = None
    """Secret key holding the API key; sent as a Bearer token when set."""
    system_prompt: Annotated[str, Field(max_length=65536)] = ""
    """System prompt placed before each task's input."""
    temperature: Annotated[float, Field(ge=0, le=2)] = 0.0
    """Sampling temperature (0-2)."""
    max_tokens: Annotated[int, Field(ge=1, le=1_000_000)] = 1024
    """Upper bound of completion tokens per call."""
    pricing: Pricing | None = None
    """Provider prices per 1,000 tokens; enables cost accounting and cost budgets."""


class Handler(ApiModel):
    """What does the work. Exactly one of python or llm."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": validations(
            cel(
                "has(self.python) != has(self.llm)",
                "exactly one of handler.python or handler.llm must be set",
            )
        )
    }

    python: (
        Annotated[
            str,
            Field(max_length=512, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"),
        ]
        | None
    ) = None
    """A Python callable inside the image as module:callable (sync or async)."""
    llm: LlmHandler | None = None
    """An OpenAI-compatible chat model."""


class Contract(ApiModel):
    """JSON Schemas for a task's input and output; invalid input never reaches the handler."""

    input: JsonObject | None = None
    """JSON Schema a task's input must satisfy (violations are dead-lettered)."""
    output: JsonObject | None = None
    """JSON Schema the handler's output must satisfy (violations count as failures)."""


class ResourceRequirements(ApiModel):
    """Compute resources of the runtime container (core/v1 ResourceRequirements)."""

    limits: dict[str, IntOrString] | None = None
    """Maximum resources, e.g. {cpu: "1", memory: 512Mi}."""
    requests: dict[str, IntOrString] | None = None
    """Guaranteed resources, e.g. {cpu: 100m, memory: 128Mi}."""


class EnvVar(ApiModel):
    """An environment variable of the runtime container (core/v1 EnvVar)."""

    name: Annotated[str, Field(min_length=1, max_length=1024)]
    """Variable name."""
    value: str | None = None
    """Literal value."""
    value_from: JsonObject | None = None
    """core/v1 EnvVarSource: a Secret, ConfigMap, field or resource reference."""


class Runtime(ApiModel):
    """The Deployment that runs this Agent's workers, owned by the operator."""

    image: Annotated[str, Field(max_length=1024)] = ""
    """Container image; empty means the runtime image the operator was installed with."""
    replicas: Annotated[int, Field(ge=0, le=10000)] = 1
    """Replicas when no ScalingPolicy targets this Agent (ignored while one does)."""
    resources: ResourceRequirements | None = None
    """CPU and memory requests and limits of the runtime container."""
    env: Annotated[tuple[EnvVar, ...], Field(max_length=256)] = ()
    """Extra environment variables of the runtime container."""
    service_account_name: Annotated[str, Field(max_length=253)] = ""
    """ServiceAccount of the pods; empty means one the operator creates for this Agent."""


class Backoff(ApiModel):
    """Exponential backoff between attempts."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": validations(
            cel(
                "!has(self.initialSeconds) || !has(self.maxSeconds)"
                " || self.initialSeconds <= self.maxSeconds",
                "initialSeconds must be <= maxSeconds",
                field_path=".initialSeconds",
            )
        )
    }

    initial_seconds: Annotated[float, Field(ge=0, le=86400)] = 1.0
    """Delay before the second attempt."""
    max_seconds: Annotated[float, Field(ge=0, le=86400)] = 60.0
    """Upper bound of any delay."""
    multiplier: Annotated[float, Field(ge=1, le=100)] = 2.0
    """Factor applied to the delay after each attempt."""


class Retry(ApiModel):
    """How often a failed task is tried again (through JetStream redelivery)."""

    max_attempts: Annotated[int, Field(ge=1, le=100)] = 5
    """Attempts in total, the first included; then fallback, else dead letter."""
    backoff: Backoff = Field(default_factory=Backoff)
    """Delays between attempts."""

    def delays(self) -> list[float]:
        """Delay before attempt 2, 3, ... (capped exponential); one per attempt, so the
        consumer's redelivery schedule and the runtime's naks agree."""
        b = self.backoff
        return [
            min(b.initial_seconds * b.multiplier**i, b.max_seconds)
            for i in range(self.max_attempts)
        ]


class RateLimit(ApiModel):
    """Limits per Agent, shared by all its replicas."""

    tasks_per_second: Annotated[float, Field(ge=0)] | None = None
    """Tasks started per second across replicas; unset means unlimited."""
    tokens_per_minute: Annotated[int, Field(ge=0)] | None = None
    """LLM tokens per minute across replicas; unset means unlimited."""


class CircuitBreaker(ApiModel):
    """Stops calling a failing handler; state is shared by all replicas."""

    failure_rate_percent: Percent = 50
    """Opens when this share of calls in the window failed (with minimumRequests)."""
    minimum_requests: Annotated[int, Field(ge=1, le=1_000_000)] = 20
    """Calls in the window before the failure rate counts."""
    window_seconds: Annotated[int, Field(ge=1, le=86400)] = 60
    """Length of the sliding window for the failure rate."""
    consecutive_failures: Annotated[int, Field(ge=1, le=1_000_000)] = 5
    """Opens after this many failures in a row, whatever the rate."""
    open_seconds: Annotated[int, Field(ge=1, le=86400)] = 30
    """How long the circuit stays open before probing (HalfOpen)."""
    half_open_probes: Annotated[int, Field(ge=1, le=1000)] = 3
    """Successful probe calls in HalfOpen that close the circuit again."""


class Escalation(ApiModel):
    """Hands a low-confidence result to a stronger Agent."""

    agent: Name
    """Name of the Agent that gets the task when confidence is low."""
    confidence_below: Annotated[float, Field(ge=0, le=1)] = 0.5
    """A result whose reported confidence is below this is escalated."""


class Cache(ApiModel):
    """Result cache: same Agent and same input gives the cached output."""

    ttl_seconds: Annotated[int, Field(ge=1, le=31_536_000)] = 3600
    """How long a cached result is served."""


class Budget(ApiModel):
    """Token and cost limits per hour, across replicas."""

    tokens_per_hour: Annotated[int, Field(ge=0)] | None = None
    """Tokens per hour; unset means unlimited."""
    cost_per_hour: Money | None = None
    """Cost per hour as a decimal string (needs handler.llm.pricing); unset means unlimited."""
    on_exceeded: Literal["Throttle", "Downgrade", "Reject"] = "Throttle"
    """Throttle delays tasks, Downgrade sends them to the fallback, Reject dead-letters them."""


class Batching(ApiModel):
    """Gives the handler a list of inputs at once."""

    max_size: Annotated[int, Field(ge=1, le=1000)] = 16
    """Most tasks in one batch."""
    max_wait_millis: Annotated[int, Field(ge=0, le=60000)] = 50
    """Longest wait for a batch to fill."""


class CanaryRuntime(ApiModel):
    """Runtime fields of the canary that differ from the stable spec."""

    image: Annotated[str, Field(max_length=1024)] = ""
    """Container image of the canary; empty means the stable image."""


class Canary(ApiModel):
    """An incremental upgrade: a share of the tasks goes to a differing spec."""

    weight_percent: Percent = 10
    """Share of this Agent's tasks served by the canary."""
    runtime: CanaryRuntime | None = None
    """Runtime fields that differ from the stable spec."""
    handler: Handler | None = None
    """Handler that differs from the stable spec."""
    max_failure_rate_percent: Percent = 20
    """Above this failure rate the canary is stopped and an Event says why."""


class AgentSpec(ApiModel):
    """Desired state of an Agent."""

    description: Annotated[str, Field(max_length=4096)] = ""
    """What the Agent does, for humans."""
    handler: Handler
    """What does the work: exactly one of python or llm."""
    contract: Contract = Field(default_factory=Contract)
    """JSON Schemas of input and output."""
    runtime: Runtime = Field(default_factory=Runtime)
    """The Deployment that runs the workers."""
    concurrency: Annotated[int, Field(ge=1, le=10000)] = 8
    """Tasks in flight per replica."""
    timeout_seconds: Annotated[int, Field(ge=1, le=86400)] = 60
    """Time limit of one attempt."""
    retry: Retry = Field(default_factory=Retry)
    """Attempts and backoff for failed tasks."""
    rate_limit: RateLimit | None = None
    """Limits across all replicas."""
    circuit_breaker: CircuitBreaker | None = None
    """Circuit breaker shared by all replicas; unset means none."""
    fallback: AgentRef | None = None
    """Agent that gets the task while the circuit is open or retries are spent."""
    escalation: Escalation | None = None
    """Agent that gets the task when the handler reports low confidence."""
    cache: Cache | None = None
    """Result cache; unset means no caching."""
    budget: Budget | None = None
    """Token and cost limits per hour."""
    batching: Batching | None = None
    """Hand the handler a list of inputs at once; unset means one at a time."""
    capabilities: Annotated[
        tuple[Annotated[str, Field(min_length=1, max_length=63)], ...],
        Field(max_length=64, json_schema_extra=LIST_SET),
    ] = ()
    """Capabilities that Workflow steps can select this Agent by."""
    canary: Canary | None = None
    """Optional incremental upgrade."""


# Status figures mirrored from the runtimes' records in NATS KV. A record is written by
# another program (an older or newer runtime, a buggy one); a figure outside what the
# schema admits is shown as the nearest value it admits, decided here, once, so that one
# bad record can never get the whole status write rejected by the API server.


def _nearest_percent(value: object) -> object:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return min(100.0, max(0.0, float(value))) if math.isfinite(value) else 0.0
    return value


def _nearest_count(value: object) -> object:
    return max(0, value) if isinstance(value, int) and not isinstance(value, bool) else value


def _nearest_amount(value: object) -> object:
    return Decimal(0) if isinstance(value, Decimal) and not value > 0 else value


MirroredPercent = Annotated[float, Field(ge=0, le=100), BeforeValidator(_nearest_percent)]
"""A runtime's rate: not a finite number -> 0, outside 0-100 -> the nearer bound."""
MirroredCount = Annotated[int, Field(ge=0), BeforeValidator(_nearest_count)]
"""A runtime's count: negative -> 0."""
MirroredMoney = Annotated[Money, BeforeValidator(_nearest_amount)]
"""A runtime's amount: not positive -> 0."""


class QueueStatus(ApiModel):
    """Work waiting for this Agent."""

    pending: Annotated[int, Field(ge=0)] = 0
    """Tasks waiting in the queue."""
    in_flight: Annotated[int, Field(ge=0)] = 0
    """Tasks being worked on."""


class CircuitStatus(ApiModel):
    """State of the circuit breaker."""

    state: Literal["Closed", "Open", "HalfOpen"] = "Closed"
    """Closed (calls flow), Open (calls stopped) or HalfOpen (probing)."""
    since: str = ""
    """When the circuit entered this state (RFC 3339)."""
    failure_rate_percent: MirroredPercent = 0.0
    """Failure rate over the current window."""


class CanaryStatus(ApiModel):
    """State of the canary."""

    state: Literal["Running", "Stopped"] = "Running"
    """Running or Stopped (failure rate above the limit)."""
    replicas: Annotated[int, Field(ge=0)] = 0
    """Replicas of the canary Deployment."""
    failure_rate_percent: Annotated[float, Field(ge=0, le=100)] = 0.0
    """Failure rate of the canary."""


class UsageStatus(ApiModel):
    """Usage over the last hour, across replicas."""

    tasks_last_hour: MirroredCount = 0
    """Tasks completed."""
    tokens_last_hour: MirroredCount = 0
    """LLM tokens used."""
    cost_last_hour: MirroredMoney | None = None
    """Cost as a decimal string."""


class AgentStatus(ApiModel):
    """Observed state of an Agent, written by the operator."""

    observed_generation: Annotated[int, Field(ge=0)] = 0
    """The .metadata.generation the operator last acted on."""
    conditions: Conditions = ()
    """Ready, Progressing and Degraded."""
    replicas: Annotated[int, Field(ge=0)] = 0
    """Replicas of the Deployment."""
    ready_replicas: Annotated[int, Field(ge=0)] = 0
    """Ready replicas of the Deployment."""
    queue: QueueStatus | None = None
    """Queue depth."""
    circuit: CircuitStatus | None = None
    """Circuit breaker state."""
    canary: CanaryStatus | None = None
    """Canary state."""
    usage: UsageStatus | None = None
    """Usage over the last hour."""


class Agent(ApiModel):
    """An AI worker: a handler, its contract and its failure handling, run as a Deployment."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": validations(
            cel(
                "!has(self.spec.fallback) || self.spec.fallback.agent != self.metadata.name",
                "spec.fallback.agent must name another Agent, not this one",
                field_path=".spec.fallback.agent",
            ),
            cel(
                "!has(self.spec.escalation) || self.spec.escalation.agent != self.metadata.name",
                "spec.escalation.agent must name another Agent, not this one",
                field_path=".spec.escalation.agent",
            ),
        )
    }

    spec: AgentSpec
    status: AgentStatus | None = None
