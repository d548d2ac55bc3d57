"""How clients talk to the dispatcher: run submissions and their replies.

A submission is a NATS request on ``shoal.run.<ns>.<workflow>`` (a queue group, so one
dispatcher answers). The dispatcher validates the input against the Workflow's
``spec.input``, stores the run record in KV (``shoal-runs``, key ``<ns>.<run>``) and only
then replies: a reply with a run id means the run is durable. Clients read and watch
the record directly in KV; nothing about a run goes through the Kubernetes API.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any, Literal

from pydantic import Field

from shoal_api.envelope import Priority, WireModel

DISPATCH_QUEUE = "shoal-dispatch"
IDEMPOTENCY_KEY_MAX = 256

ErrorCode = Literal[
    "WorkflowNotFound",  # no such Workflow in the namespace
    "InvalidWorkflow",  # the Workflow exists but cannot run (Ready=False)
    "InvalidInput",  # the input does not satisfy spec.input
    "InvalidRequest",  # the request itself is malformed
    "IdempotencyConflict",  # the key names a run of another Workflow
    "Unavailable",  # the dispatcher could not store the run (NATS trouble)
]


RunIdField = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


class RunRequest(WireModel):
    id: RunIdField | None = None
    """The run id the client chose: a retried submission names the same run (a key, if
    given, decides instead)."""
    input: Any = None
    priority: Priority | None = None
    """Overrides the Workflow's spec.priority for this run."""
    idempotency_key: Annotated[str, Field(min_length=1, max_length=IDEMPOTENCY_KEY_MAX)] | None = (
        Field(default=None, alias="idempotencyKey")
    )
    """Submitting the same key again returns the first run instead of a new one."""


class RunError(WireModel):
    code: ErrorCode
    message: str


class RunReply(WireModel):
    run: str | None = None
    created: bool = False
    """False when an idempotency key matched an existing run."""
    phase: str | None = None
    error: RunError | None = None


def run_id_for_key(namespace: str, workflow: str, key: str) -> str:
    """The run id of an idempotency key: deterministic, so a resubmission (even through
    another dispatcher) lands on the same KV record and its create fails."""
    digest = hashlib.sha256(f"{namespace}/{workflow}/{key}".encode()).hexdigest()
    return f"k{digest[:31]}"


def run_key(namespace: str, run: str) -> str:
    """The run record's key in the runs bucket."""
    return f"{namespace}.{run}"
