"""The Workflow resource: a DAG of agent steps. Runs travel over NATS, not etcd."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from shoal_api.base import (
    LIST_SET,
    AgentRef,
    ApiModel,
    Conditions,
    JsonObject,
    Name,
    OptionalTime,
    cel,
    list_map,
    validations,
)

MAX_STEPS = 64
MAX_DEPENDS_ON = 16


class AgentSelector(ApiModel):
    """Picks an Agent by capability at dispatch time."""

    capability: Annotated[str, Field(min_length=1, max_length=63)]
    """A capability listed in the candidate Agents' spec.capabilities."""
    strategy: Literal["LeastLag", "BestSuccessRate", "RoundRobin"] = "LeastLag"
    """How one candidate is chosen per task."""


class StepRetry(ApiModel):
    """Attempts of a step, overriding its Agent's retry."""

    max_attempts: Annotated[int, Field(ge=1, le=100)] = 3
    """Attempts in total, the first included."""


class Approval(ApiModel):
    """A human gate before the step runs."""

    required: bool = False
    """The step waits for an Approval."""
    timeout_seconds: Annotated[int, Field(ge=1, le=2_592_000)] = 3600
    """How long to wait for a decision."""
    on_timeout: Literal["Fail", "Skip", "Approve"] = "Fail"
    """What happens when nobody decides in time."""


class Step(ApiModel):
    """One node of the DAG: a task for an Agent."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": validations(
            cel(
                "has(self.agent) != has(self.agentSelector)",
                "exactly one of agent or agentSelector must be set",
            ),
            cel(
                "!has(self.dependsOn) || !(self.name in self.dependsOn)",
                "a step cannot depend on itself",
                field_path=".dependsOn",
            ),
        )
    }

    name: Name
    """Unique name of the step within the Workflow."""
    agent: Name | None = None
    """The Agent that runs this step (or use agentSelector)."""
    agent_selector: AgentSelector | None = None
    """Pick the Agent by capability at dispatch time (instead of agent)."""
    depends_on: Annotated[
        tuple[Name, ...], Field(max_length=MAX_DEPENDS_ON, json_schema_extra=LIST_SET)
    ] = ()
    """Steps that must succeed (or be skipped) before this one starts."""
    when: Annotated[str, Field(max_length=4096)] = ""
    """CEL condition over input and steps; false skips the step."""
    input: JsonObject = Field(default_factory=dict)
    """The step's task input; strings may hold ${input.x} and ${steps.NAME.output.y}."""
    timeout_seconds: Annotated[int, Field(ge=1, le=86400)] | None = None
    """Per-attempt time limit (default: the Agent's)."""
    retry: StepRetry | None = None
    """Attempts (default: the Agent's)."""
    fallback: AgentRef | None = None
    """Agent that gets the step when its attempts are spent."""
    approval: Approval | None = None
    """Human approval gate."""


class WorkflowSpec(ApiModel):
    """Desired state of a Workflow."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": validations(
            cel(
                "self.steps.all(s, !has(s.dependsOn)"
                " || s.dependsOn.all(d, self.steps.exists(t, t.name == d)))",
                # A messageExpression naming the step does not fit the API server's
                # CEL cost budget for 64 steps; the operator's Ready=False names it.
                "every dependsOn entry must name a step of this Workflow",
                field_path=".steps",
            )
        )
    }

    input: JsonObject | None = None
    """JSON Schema a run's input must satisfy."""
    max_concurrent_runs: Annotated[int, Field(ge=1, le=1_000_000)] = 1000
    """Runs executing at once; more runs wait in the queue."""
    priority: Annotated[int, Field(ge=0, le=9)] = 5
    """Priority of runs, 0 (lowest) to 9; a run may override."""
    deadline_seconds: Annotated[int, Field(ge=1, le=2_592_000)] = 3600
    """A run not finished after this long fails."""
    steps: Annotated[
        tuple[Step, ...],
        Field(min_length=1, max_length=MAX_STEPS, json_schema_extra=list_map("name")),
    ]
    """The DAG's nodes; steps whose dependencies are met run in parallel."""
    output: JsonObject | None = None
    """The run's output, built from templates such as ${steps.answer.output}."""


class RunCounts(ApiModel):
    """Runs by outcome."""

    active: Annotated[int, Field(ge=0)] = 0
    """Runs in progress."""
    succeeded: Annotated[int, Field(ge=0)] = 0
    """Runs that succeeded."""
    failed: Annotated[int, Field(ge=0)] = 0
    """Runs that failed."""


class WorkflowStatus(ApiModel):
    """Observed state of a Workflow: a throttled summary of its runs."""

    observed_generation: Annotated[int, Field(ge=0)] = 0
    """The .metadata.generation the operator last acted on."""
    conditions: Conditions = ()
    """Ready (valid DAG, all Agents exist) and Degraded."""
    step_count: Annotated[int, Field(ge=0)] = 0
    """Number of steps."""
    runs: RunCounts | None = None
    """Runs by outcome."""
    p95_duration_seconds: Annotated[float, Field(ge=0)] | None = None
    """95th percentile run duration."""
    last_run_time: OptionalTime = None
    """When the last run started (RFC 3339)."""


class Workflow(ApiModel):
    """A DAG of Agent steps; runs are submitted over NATS with the SDK or the shoal CLI."""

    spec: WorkflowSpec
    status: WorkflowStatus | None = None
