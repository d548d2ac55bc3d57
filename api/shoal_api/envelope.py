"""What travels over NATS: task envelopes, result records and dead letters (version 1).

One module for producers (SDK, CLI, runtime forwarding, workflow dispatch) and consumers
(runtime, CLI), so both ends parse the same schema. Messages are compact JSON; unknown
fields are rejected so that a producer's typo surfaces as a dead letter, not as a
silently ignored option.

Headers carry what NATS itself acts on: ``Nats-Msg-Id`` deduplicates publishes (task id
per hop, task id for results) within the stream's duplicate window.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

ENVELOPE_VERSION: Literal[1] = 1

MSG_ID_HEADER = "Nats-Msg-Id"
REASON_HEADER = "Shoal-Reason"

TaskId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_-]+$")]
"""Task ids end up in subjects and KV keys: no dots, spaces or wildcards."""
Priority = Annotated[int, Field(ge=0, le=9)]


class WireModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True, exclude_none=True).encode()


HopReason = Literal["fallback", "escalation", "downgrade"]


class Hop(WireModel):
    """One Agent that handled a task before it was passed on, and why it passed it on."""

    agent: str
    reason: HopReason
    detail: str = ""


class Task(WireModel):
    """A unit of work for one Agent."""

    v: Literal[1] = ENVELOPE_VERSION
    id: TaskId
    """Stable across retries, fallbacks and escalations: the idempotency key."""
    input: Any = None
    priority: Priority = 5
    deadline: float | None = None
    """Unix time after which the task is not worth starting (dead-lettered instead)."""
    attempt: Annotated[int, Field(ge=1)] = 1
    """Attempts already spent on this task by earlier hops, plus one."""
    run: Annotated[str, Field(max_length=128)] | None = None
    """Workflow run the task belongs to, if any."""
    step: Annotated[str, Field(max_length=63)] | None = None
    """Workflow step the task belongs to, if any."""
    timeout: Annotated[float, Field(gt=0, le=86400)] | None = None
    """Per-attempt time limit in seconds, instead of the Agent's (a workflow step's
    ``timeoutSeconds``)."""
    max_attempts: Annotated[int, Field(ge=1, le=100)] | None = None
    """Attempts the Agent may spend at most (fewer than its own retry allows): a workflow
    step with its own ``retry`` re-dispatches itself and sets 1 here, so retries do not
    multiply."""
    path: tuple[Hop, ...] = ()
    """Provenance: Agents that passed this task on (fallback-from, escalated-from)."""
    trace: dict[str, str] = Field(default_factory=dict)
    """W3C trace context (traceparent, tracestate) to continue the caller's trace."""
    submitted: float = Field(default_factory=time.time)
    replays: Annotated[int, Field(ge=0)] = 0
    """How often the task was replayed from the dead-letter stream: each replay may
    produce one more result record."""

    def msg_id(self) -> str:
        """``Nats-Msg-Id`` of this envelope on the tasks stream: a resubmission of the same
        hop within the duplicate window is dropped by JetStream."""
        hop = self.path[-1] if self.path else None
        suffix = f".{hop.reason}.{hop.agent}" if hop else ""
        return f"{self.id}.{self.replays}{suffix}"

    def result_msg_id(self) -> str:
        """``Nats-Msg-Id`` of the task's result: one record per task and replay."""
        return f"{self.id}.{self.replays}"


class EnvelopeError(ValueError):
    """A message that is not a valid task envelope."""


def parse_task(data: bytes) -> Task:
    """Parses a task envelope; every failure is an :class:`EnvelopeError` with a reason."""
    try:
        return Task.model_validate_json(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "message"
        raise EnvelopeError(
            f"malformed task envelope: {where}: {first['msg']}"
            + (f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else "")
        ) from None


def canonical_json(value: Any) -> str:
    """One JSON text per value (sorted keys, no spaces): cache keys and prompts of the
    same input are the same. Non-ASCII stays readable: escapes cost a model tokens."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def new_task_id() -> str:
    return uuid.uuid4().hex


Outcome = Literal["Succeeded", "DeadLettered"]


class Usage(WireModel):
    tokens: Annotated[int, Field(ge=0)] = 0
    input_tokens: Annotated[int, Field(ge=0, alias="inputTokens")] = 0
    output_tokens: Annotated[int, Field(ge=0, alias="outputTokens")] = 0
    cost: str = "0"


class Result(WireModel):
    """The final record of a task, published once to ``shoal.result.<ns>.<task id>``."""

    v: Literal[1] = ENVELOPE_VERSION
    id: TaskId
    agent: str
    """The Agent that produced this record."""
    status: Outcome
    output: Any = None
    reason: str | None = None
    """Why the task was dead-lettered (a short code, e.g. ContractViolation)."""
    message: str | None = None
    path: tuple[str, ...] = ()
    """Every Agent the task went through, in order, the producer last."""
    hops: tuple[Hop, ...] = ()
    """Why the task was passed on at each step of ``path`` before the producer."""
    attempts: int = 1
    confidence: float | None = None
    cached: bool = False
    usage: Usage | None = None
    run: str | None = None
    step: str | None = None
    replays: int = 0
    started: float | None = None
    finished: float = Field(default_factory=time.time)


DeadLetterReason = Literal[
    "MalformedEnvelope",
    "ContractViolation",
    "OutputContractViolation",
    "HandlerError",
    "Timeout",
    "RetriesExhausted",
    "DeadlineExceeded",
    "BudgetExceeded",
    "Unroutable",
]


class DeadLetter(WireModel):
    """A task that could not be done, with the reason, on ``shoal.dlq.<ns>.<agent>``."""

    v: Literal[1] = ENVELOPE_VERSION
    namespace: str
    agent: str
    reason: DeadLetterReason
    message: str
    task: Task | None = None
    """The envelope, when it could be parsed."""
    raw: str | None = None
    """The message body as text, when it could not be parsed."""
    attempts: int = 1
    at: float = Field(default_factory=time.time)


def dead_letter_for(
    namespace: str,
    agent: str,
    reason: DeadLetterReason,
    message: str,
    task: Task | None,
    raw: bytes | None = None,
    attempts: int = 1,
) -> DeadLetter:
    text = None
    if task is None and raw is not None:
        text = raw[:65536].decode("utf-8", errors="replace")
    return DeadLetter(
        namespace=namespace,
        agent=agent,
        reason=reason,
        message=message[:4096],
        task=task,
        raw=text,
        attempts=attempts,
    )


def to_dict(model: WireModel) -> dict[str, Any]:
    return model.model_dump(by_alias=True, exclude_none=True, mode="json")
