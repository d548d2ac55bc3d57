"""A workflow run's state, the events that move it and the effects it asks for.

The state is one record in NATS KV, rewritten with compare-and-set on every event, so it
is kept compact (defaults are not written) and self-contained: everything a dispatcher
needs to continue a run after a restart is in it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter

from shoal_api.envelope import Outcome, Priority, WireModel
from shoal_api.workflow import AgentSelector, StepRetry, WorkflowSpec

RUN_VERSION: Literal[1] = 1

RunId = Annotated[str, Field(min_length=1, max_length=128)]
RunPhase = Literal["Pending", "Running", "Succeeded", "Failed"]
StepPhase = Literal[
    "Waiting", "Ready", "Dispatched", "WaitingApproval", "Succeeded", "Failed", "Skipped"
]
"""Ready never outlives an advance: within it, a Ready step is dispatched, sent for
approval, skipped (its ``when`` is false) or failed (its templates do not render)."""
Decision = Literal["Approve", "Reject"]

TERMINAL_STEP_PHASES: frozenset[StepPhase] = frozenset({"Succeeded", "Failed", "Skipped"})
TERMINAL_RUN_PHASES: frozenset[RunPhase] = frozenset({"Succeeded", "Failed"})


class RunModel(WireModel):
    """A part of the stored state, written without its defaults. (Events keep WireModel's
    ``to_json``: their ``type`` is a default, and it must be written.)"""

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True, exclude_defaults=True).encode()


class StepApproval(RunModel):
    """The human gate of one step: when it opened, until when, and how it closed."""

    requested: float
    until: float
    """Unix time at which the step's ``approval.onTimeout`` applies."""
    decision: Decision | None = None
    approver: str = ""
    """Who decided; empty when the timeout decided."""
    at: float | None = None
    comment: str = ""
    timed_out: bool = False


class StepState(RunModel):
    phase: StepPhase = "Waiting"
    attempt: Annotated[int, Field(ge=0)] = 0
    """Dispatches so far; the current task is attempt number ``attempt``."""
    on_fallback: bool = False
    """The current attempt went to the step's fallback Agent (its last chance)."""
    agent: str | None = None
    """The Agent the current attempt was sent to, or that produced the result."""
    task_id: str | None = None
    """The current attempt's task; results of any other task are stale."""
    output: Any = None
    reason: str = ""
    """Why the step Failed or was Skipped (a CamelCase code, e.g. DependencyFailed)."""
    message: str = ""
    started: float | None = None
    finished: float | None = None
    approval: StepApproval | None = None

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL_STEP_PHASES


class RunState(RunModel):
    # No default: exclude_defaults would otherwise drop the version from every record.
    v: Literal[1]
    id: RunId
    workflow: str
    namespace: str
    input: Any = None
    priority: Priority = 5
    idempotency_key: str | None = None
    phase: RunPhase = "Pending"
    reason: str = ""
    message: str = ""
    created: float
    started: float | None = None
    finished: float | None = None
    deadline: float | None = None
    """Unix time at which the run fails; set when it starts."""
    steps: dict[str, StepState] = Field(default_factory=dict)
    context: dict[str, Any] = Field(default_factory=dict)
    """Run-scoped key-value context that templates and conditions read."""
    context_version: Annotated[int, Field(ge=0)] = 0
    output: Any = None

    @classmethod
    def new(
        cls,
        spec: WorkflowSpec,
        *,
        run_id: str,
        workflow: str,
        namespace: str,
        input: Any,
        now: float,
        priority: int | None = None,
        idempotency_key: str | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> RunState:
        """A Pending run of ``spec``; a :class:`Started` event starts it."""
        return cls(
            v=RUN_VERSION,
            id=run_id,
            workflow=workflow,
            namespace=namespace,
            input=input,
            priority=spec.priority if priority is None else priority,
            idempotency_key=idempotency_key,
            created=now,
            steps={s.name: StepState() for s in spec.steps},
            context=dict(context or {}),
        )

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL_RUN_PHASES

    def with_context(self, updates: Mapping[str, Any]) -> RunState:
        """The run with ``updates`` merged into its context; the version moves only when a
        value changes, so replaying the same write is not a new version."""
        merged = {**self.context, **updates}
        if merged == self.context:
            return self
        return self.model_copy(
            update={"context": merged, "context_version": self.context_version + 1}
        )


# Events: what happened to a run. Each is applied at most once in effect: a duplicate
# finds the run already moved on and changes nothing.


class Started(WireModel):
    """The run leaves the queue (within the Workflow's maxConcurrentRuns)."""

    type: Literal["Started"] = "Started"


class StepResult(WireModel):
    """The result record of a step's task."""

    type: Literal["StepResult"] = "StepResult"
    step: str
    task_id: str
    status: Outcome
    output: Any = None
    reason: str | None = None
    message: str | None = None
    path: tuple[str, ...] = ()
    """Agents the task went through, the producer last."""


class ApprovalDecided(WireModel):
    type: Literal["ApprovalDecided"] = "ApprovalDecided"
    step: str
    decision: Decision
    approver: str
    at: float
    comment: str = ""


class Tick(WireModel):
    """Time passed: the run deadline and approval timeouts are due at ``now``."""

    type: Literal["Tick"] = "Tick"


class Cancel(WireModel):
    type: Literal["Cancel"] = "Cancel"
    message: str = ""


Event = Annotated[
    Started | StepResult | ApprovalDecided | Tick | Cancel, Field(discriminator="type")
]
_EVENT: TypeAdapter[Event] = TypeAdapter(Event)


def parse_event(data: bytes | str) -> Event:
    """An event from its JSON (the ``type`` field picks the kind)."""
    return _EVENT.validate_json(data)


# Effects: what the dispatcher must do after it has stored the new state. Every effect is
# safe to repeat: task ids are deterministic, so a re-run of the same advance publishes
# the same message ids and JetStream drops the duplicates.


@dataclass(frozen=True)
class DispatchTask:
    run: str
    step: str
    task_id: str
    attempt: int
    """The step's attempt (the envelope's own ``attempt`` counts hops of one task)."""
    agent: str | None
    selector: AgentSelector | None
    """Set instead of ``agent``: the dispatcher picks an Agent by capability."""
    input: Any
    priority: int
    deadline: float | None
    timeout_seconds: int | None
    retry: StepRetry | None
    """The step's retry override. The engine already re-dispatches a dead-lettered step
    up to ``retry.maxAttempts`` times; forwarding it as a per-task retry multiplies."""
    fallback: str | None
    """The step's fallback Agent, None on the fallback attempt itself."""


@dataclass(frozen=True)
class AwaitApproval:
    run: str
    step: str
    until: float
    input: Any
    """The input the step will be dispatched with, for the approver to see."""


@dataclass(frozen=True)
class RunFinished:
    run: str
    phase: Literal["Succeeded", "Failed"]
    output: Any
    reason: str
    message: str


Effect = DispatchTask | AwaitApproval | RunFinished
