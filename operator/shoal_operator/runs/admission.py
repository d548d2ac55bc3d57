"""Admission of run submissions: what may start a run, and which run a submission names.

A submission is refused here, with a code the client can act on, before anything is
stored: a malformed request, a Workflow that does not exist or cannot run, or an input
that does not match ``spec.input``. An admitted run is stored as a new record (create if
absent) in phase Pending; starting it is the dispatcher's business (slots).

Submitting is idempotent when the client names the run (an idempotency key or an id):
the same name gives the same run, whose current phase is the reply. A random id that
happens to be taken is drawn again.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from pydantic import ValidationError

from shoal_api.json_schema import violation
from shoal_api.runs.model import RunState
from shoal_api.runs.wire import ErrorCode, RunError, RunReply, RunRequest, run_id_for_key, run_key
from shoal_operator.runs.catalog import Catalog
from shoal_operator.runs.store import RunStore

# Tries at a free run id (random ids) or at a named run that expired meanwhile.
ATTEMPTS = 3


@dataclass(frozen=True)
class Admitted:
    """A run just stored."""

    state: RunState
    reply: RunReply


def refuse(code: ErrorCode, message: str) -> RunReply:
    return RunReply(error=RunError(code=code, message=message))


async def admit(
    store: RunStore,
    catalog: Catalog,
    namespace: str,
    workflow: str,
    data: bytes,
    now: Callable[[], float],
) -> Admitted | RunReply:
    """Validates a submission and stores its run. Returns the new run, or the reply for
    a refused submission or an existing run. Raises when an existing run cannot be read
    (the client's request times out and is repeated)."""
    try:
        request = RunRequest.model_validate_json(data)
    except ValidationError as exc:
        return refuse("InvalidRequest", f"malformed run request: {exc.errors()[0]['msg']}")
    view = catalog.workflow(namespace, workflow)
    if view is None:
        return refuse("WorkflowNotFound", f"workflow {workflow} not found in namespace {namespace}")
    if view.problem:
        return refuse("InvalidWorkflow", f"workflow {workflow} cannot run: {view.problem}")
    if problem := violation(view.input_validator, request.input):
        return refuse("InvalidInput", f"input does not match spec.input: {problem}")
    # A key or a client-chosen id names one run however often it is submitted.
    named = request.idempotency_key is not None or request.id is not None
    for _ in range(ATTEMPTS):
        if request.idempotency_key is not None:
            run_id = run_id_for_key(namespace, workflow, request.idempotency_key)
        else:
            run_id = request.id or secrets.token_hex(8)
        state = RunState.new(
            view.spec,
            run_id=run_id,
            workflow=workflow,
            namespace=namespace,
            input=request.input,
            now=now(),
            priority=request.priority,
            idempotency_key=request.idempotency_key,
        )
        key = run_key(namespace, run_id)
        try:
            revision = await store.create(key, state)
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            return refuse("Unavailable", f"could not store the run: {exc}")
        if revision is not None:
            return Admitted(state, RunReply(run=run_id, created=True, phase=state.phase))
        if not named:
            continue  # a random id taken: draw another
        existing = await store.read(key)
        if existing is None:
            continue  # expired in between: create it again
        _, run = existing
        if run.workflow != workflow:
            return refuse(
                "IdempotencyConflict",
                f"run id or idempotency key {request.idempotency_key or request.id!r} "
                f"belongs to run {run.id} of workflow {run.workflow}",
            )
        return RunReply(run=run.id, created=False, phase=run.phase)
    return refuse("Unavailable", "could not find a free run id")
