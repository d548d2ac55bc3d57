"""The run engine: ``advance(spec, state, event, now) -> (state, effects)``.

A pure function, so that the dispatcher can keep a run in one NATS KV record and update
it with compare-and-set: on a conflict it re-reads the record and calls ``advance``
again, and on a crash it replays the event. Either way the same inputs give the same
state and the same effects, with the same task ids, which JetStream deduplicates. An
event the run has already absorbed (a duplicate result, a second approval, a result of
an attempt the run has moved past) returns the state unchanged and no effects.

Time comes in as ``now`` and is read nowhere else. Every event first applies what is
due at ``now`` (the run deadline, approval timeouts) so a result arriving after the
deadline cannot revive a run that a Tick would have failed.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Mapping
from typing import Any, Literal

from shoal_api import dag
from shoal_api.runs.model import (
    ApprovalDecided,
    AwaitApproval,
    Cancel,
    DispatchTask,
    Effect,
    Event,
    RunFinished,
    RunState,
    Started,
    StepApproval,
    StepPhase,
    StepResult,
    StepState,
    Tick,
)
from shoal_api.workflow import Step, WorkflowSpec
from shoal_core.runs.templates import TemplateError, render
from shoal_core.runs.when import WhenError, evaluate_when

_TASK_ID_MAX = 128
_TASK_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_RENDER: Any = object()
"""Marks an input still to be rendered (None is a valid rendered input)."""

# Reasons, as CamelCase codes in the state and in RunFinished.
DEPENDENCY_FAILED = "DependencyFailed"
WHEN_FALSE = "WhenFalse"
WHEN_ERROR = "WhenError"
TEMPLATE_ERROR = "TemplateError"
APPROVAL_REJECTED = "ApprovalRejected"
APPROVAL_TIMEOUT = "ApprovalTimeout"
DEADLINE_EXCEEDED = "DeadlineExceeded"
CANCELLED = "Cancelled"
INVALID_WORKFLOW = "InvalidWorkflow"
STEP_FAILED = "StepFailed"
WORKFLOW_DELETED = "WorkflowDeleted"


def task_id_for(run_id: str, step: str, attempt: int) -> str:
    """The task id of a step's attempt: ``<run>-<step>-<attempt>``, deterministic so that
    a repeated dispatch is a duplicate publish.

    A run id that is not a valid task id (characters, length) is shortened and made safe,
    with a digest of the original appended: two runs must never share a task id, or
    JetStream would drop the second run's task as a duplicate of the first's."""
    raw = f"{run_id}-{step}-{attempt}"
    if len(raw) <= _TASK_ID_MAX and not _TASK_ID_UNSAFE.search(raw):
        return raw
    digest = hashlib.sha256(run_id.encode()).hexdigest()[:16]
    tail = f"-{digest}-{_TASK_ID_UNSAFE.sub('_', step)}-{attempt}"
    head = _TASK_ID_UNSAFE.sub("_", run_id)[: max(0, _TASK_ID_MAX - len(tail))]
    return (head + tail)[-_TASK_ID_MAX:].lstrip("-") or digest


def invalid_reason(spec: WorkflowSpec) -> str | None:
    """Why the engine cannot run ``spec`` (the operator reports the same as Ready=False;
    the engine checks again because a run may be submitted before the operator looked)."""
    names = [s.name for s in spec.steps]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        return f"duplicate step names: {', '.join(dupes)}"
    known = set(names)
    for step in spec.steps:
        for dep in step.depends_on:
            if dep not in known:
                return f"step {step.name}: dependsOn unknown step {dep}"
    if cycle := dag.find_cycle(spec.steps):
        return "steps form a cycle: " + " -> ".join(cycle)
    return None


def next_wakeup(state: RunState) -> float | None:
    """The earliest ``now`` at which a Tick changes the run (deadline, approval timeout),
    or None when no time-based transition is pending."""
    if state.phase != "Running":
        return None
    times = [
        s.approval.until
        for s in state.steps.values()
        if s.phase == "WaitingApproval" and s.approval is not None
    ]
    if state.deadline is not None:
        times.append(state.deadline)
    return min(times, default=None)


def advance(
    spec: WorkflowSpec, state: RunState, event: Event, now: float
) -> tuple[RunState, list[Effect]]:
    """The run after ``event`` at ``now``, and what the dispatcher must do about it."""
    if state.terminal:
        return state, []
    run = _Run(spec, state, now)
    if isinstance(event, Cancel):
        run.abort(CANCELLED, event.message or "the run was cancelled")
    elif isinstance(event, Started):
        if state.phase != "Pending":
            return state, []
        run.start()
    elif state.phase != "Running":
        # Nothing but Started or Cancel moves a run that has not started.
        return state, []
    else:
        run.expire()
        if run.running:
            if isinstance(event, StepResult):
                run.on_result(event)
            elif isinstance(event, ApprovalDecided):
                run.on_decision(event)
            else:
                assert isinstance(event, Tick)
    if run.running:
        run.settle()
    new = run.state()
    if new == state:
        return state, []
    return new, run.effects


def abandon(
    state: RunState, reason: str, message: str, now: float
) -> tuple[RunState, list[Effect]]:
    """Fails a run that has no spec to advance by any more (its Workflow was deleted):
    every step still open ends with ``reason``, and nothing more is dispatched."""
    if state.terminal:
        return state, []
    steps = {
        name: st
        if st.terminal
        else st.model_copy(
            update={
                "phase": "Failed" if st.phase == "Dispatched" else "Skipped",
                "reason": reason,
                "message": message,
                "finished": now,
            }
        )
        for name, st in state.steps.items()
    }
    new = state.model_copy(
        update={
            "phase": "Failed",
            "reason": reason,
            "message": message,
            "finished": now,
            "steps": steps,
        }
    )
    return new, [
        RunFinished(run=state.id, phase="Failed", output=None, reason=reason, message=message)
    ]


def _awaiting(step: StepState) -> bool:
    return step.phase == "WaitingApproval" and step.approval is not None


class _Run:
    """One advance's working copy of a run: step states change in place here, and
    :meth:`state` freezes them back into a RunState."""

    def __init__(self, spec: WorkflowSpec, state: RunState, now: float) -> None:
        self.spec = spec
        self.now = now
        self.base = state
        self.fields: dict[str, Any] = {}
        self.steps: dict[str, StepState] = {
            s.name: state.steps.get(s.name, StepState()) for s in spec.steps
        }
        self.by_name: dict[str, Step] = {s.name: s for s in spec.steps}
        self.effects: list[Effect] = []

    @property
    def running(self) -> bool:
        return bool(self.get("phase") == "Running")

    @functools.cached_property
    def ancestors(self) -> dict[str, set[str]]:
        return dag.ancestors(self.spec.steps)

    def get(self, field: str) -> Any:
        return self.fields[field] if field in self.fields else getattr(self.base, field)

    def state(self) -> RunState:
        return self.base.model_copy(update={**self.fields, "steps": self.steps})

    def set_step(self, name: str, **changes: Any) -> None:
        self.steps[name] = self.steps[name].model_copy(update=changes)

    def end_step(self, name: str, phase: StepPhase, reason: str, message: str) -> None:
        self.set_step(name, phase=phase, reason=reason, message=message, finished=self.now)

    # Transitions of the run.

    def start(self) -> None:
        if problem := invalid_reason(self.spec):
            self.abort(INVALID_WORKFLOW, problem)
            return
        self.fields.update(
            phase="Running",
            started=self.now,
            deadline=self.now + self.spec.deadline_seconds,
        )

    def expire(self) -> None:
        deadline = self.base.deadline
        if deadline is not None and self.now >= deadline:
            self.abort(
                DEADLINE_EXCEEDED,
                f"the run did not finish within {self.spec.deadline_seconds}s of its start",
            )
            return
        for name, st in self.steps.items():
            if not _awaiting(st):
                continue
            assert st.approval is not None
            if self.now < st.approval.until:
                continue
            gate = self.by_name[name].approval
            action = gate.on_timeout if gate is not None else "Fail"
            if action == "Approve":
                closed = {"timed_out": True, "decision": "Approve", "at": self.now}
                self.set_step(name, approval=st.approval.model_copy(update=closed))
                self.dispatch(name, attempt=1, on_fallback=False)
                continue
            self.set_step(name, approval=st.approval.model_copy(update={"timed_out": True}))
            waited = f"no decision within {st.approval.until - st.approval.requested:g}s"
            self.end_step(
                name, "Failed" if action == "Fail" else "Skipped", APPROVAL_TIMEOUT, waited
            )

    def abort(self, reason: str, message: str) -> None:
        """Fails the run now; steps still underway end with the run's reason."""
        for name, st in self.steps.items():
            if st.terminal:
                continue
            phase: StepPhase = "Failed" if st.phase == "Dispatched" else "Skipped"
            self.end_step(name, phase, reason, message)
        self.finish("Failed", None, reason, message)

    def finish(
        self, phase: Literal["Succeeded", "Failed"], output: Any, reason: str, message: str
    ) -> None:
        self.fields.update(
            phase=phase, output=output, reason=reason, message=message, finished=self.now
        )
        self.effects.append(
            RunFinished(
                run=self.base.id,
                phase=phase,
                output=output,
                reason=reason,
                message=message,
            )
        )

    # Events about steps.

    def on_result(self, ev: StepResult) -> None:
        st = self.steps.get(ev.step)
        if st is None or st.phase != "Dispatched" or st.task_id != ev.task_id:
            return
        agent = ev.path[-1] if ev.path else st.agent
        if ev.status == "Succeeded":
            self.set_step(
                ev.step, phase="Succeeded", output=ev.output, agent=agent, finished=self.now
            )
            return
        self.set_step(ev.step, agent=agent)
        step = self.by_name[ev.step]
        allowed = step.retry.max_attempts if step.retry is not None else 1
        if not st.on_fallback and st.attempt < allowed:
            self.dispatch(ev.step, attempt=st.attempt + 1, on_fallback=False)
        elif not st.on_fallback and step.fallback is not None:
            self.dispatch(ev.step, attempt=st.attempt + 1, on_fallback=True)
        else:
            tried = f"{st.attempt} attempt{'s' if st.attempt != 1 else ''}"
            last = f"{ev.reason}: {ev.message}" if ev.message else (ev.reason or "")
            self.end_step(
                ev.step,
                "Failed",
                ev.reason or "DeadLettered",
                f"dead-lettered after {tried}" + (f"; last: {last}" if last else ""),
            )

    def on_decision(self, ev: ApprovalDecided) -> None:
        st = self.steps.get(ev.step)
        if st is None or not _awaiting(st):
            return
        assert st.approval is not None
        approval = st.approval.model_copy(
            update={
                "decision": ev.decision,
                "approver": ev.approver,
                "at": ev.at,
                "comment": ev.comment,
            }
        )
        self.set_step(ev.step, approval=approval)
        if ev.decision == "Approve":
            self.dispatch(ev.step, attempt=1, on_fallback=False)
        else:
            why = f"rejected by {ev.approver}" + (f": {ev.comment}" if ev.comment else "")
            self.end_step(ev.step, "Failed", APPROVAL_REJECTED, why)

    # Scheduling.

    def settle(self) -> None:
        """Starts every step whose dependencies are done, then finishes the run if no
        step is left. One pass in dependency order suffices: a step skipped or failed
        here is already final when its dependents come up later in the same pass."""
        for name in _topological(self.spec):
            st = self.steps[name]
            if st.phase not in ("Waiting", "Ready"):
                continue
            deps = self.by_name[name].depends_on
            blocked = [d for d in deps if self._blocks(d)]
            if blocked:
                self.end_step(
                    name,
                    "Skipped",
                    DEPENDENCY_FAILED,
                    f"dependency {blocked[0]} {self._blocks_how(blocked[0])}",
                )
            elif all(self.steps[d].terminal for d in deps):
                self.ready(name)
        if all(st.terminal for st in self.steps.values()):
            self.complete()

    def _blocks(self, dep: str) -> bool:
        st = self.steps[dep]
        return st.phase == "Failed" or (st.phase == "Skipped" and st.reason == DEPENDENCY_FAILED)

    def _blocks_how(self, dep: str) -> str:
        return (
            "failed" if self.steps[dep].phase == "Failed" else "was skipped (a dependency failed)"
        )

    def scope(self, steps: set[str] | None) -> dict[str, Any]:
        """What templates and conditions see. A step sees only its ancestors: any other
        step might not have finished yet, and a run must not depend on timing."""
        names = self.steps if steps is None else sorted(steps)
        return {
            "input": self.base.input,
            "steps": {
                n: {"output": self.steps[n].output, "phase": self.steps[n].phase} for n in names
            },
            "context": self.base.context,
        }

    def ready(self, name: str) -> None:
        step = self.by_name[name]
        self.set_step(name, phase="Ready")
        scope = self.scope(self.ancestors[name])
        try:
            go = evaluate_when(
                step.when, input=scope["input"], steps=scope["steps"], context=scope["context"]
            )
        except WhenError as exc:
            self.end_step(name, "Failed", WHEN_ERROR, str(exc))
            return
        if not go:
            self.end_step(name, "Skipped", WHEN_FALSE, f"when is false: {step.when}")
            return
        try:
            task_input = render(step.input, scope)
        except TemplateError as exc:
            self.end_step(name, "Failed", TEMPLATE_ERROR, f"input: {exc}")
            return
        if step.approval is not None and step.approval.required:
            until = self.now + step.approval.timeout_seconds
            self.set_step(
                name,
                phase="WaitingApproval",
                started=self.now,
                approval=StepApproval(requested=self.now, until=until),
            )
            self.effects.append(
                AwaitApproval(run=self.base.id, step=name, until=until, input=task_input)
            )
            return
        self.dispatch(name, attempt=1, on_fallback=False, task_input=task_input)

    def dispatch(
        self, name: str, *, attempt: int, on_fallback: bool, task_input: Any = _RENDER
    ) -> None:
        step = self.by_name[name]
        if task_input is _RENDER:
            # Rendered again per attempt: the run's context may have moved on since.
            try:
                task_input = render(step.input, self.scope(self.ancestors[name]))
            except TemplateError as exc:
                self.end_step(name, "Failed", TEMPLATE_ERROR, f"input: {exc}")
                return
        agent = step.fallback.agent if on_fallback and step.fallback else step.agent
        selector = None if on_fallback else step.agent_selector
        task_id = task_id_for(self.base.id, name, attempt)
        started = self.steps[name].started
        self.set_step(
            name,
            phase="Dispatched",
            attempt=attempt,
            on_fallback=on_fallback,
            agent=agent,
            task_id=task_id,
            started=self.now if started is None else started,
        )
        self.effects.append(
            DispatchTask(
                run=self.base.id,
                step=name,
                task_id=task_id,
                attempt=attempt,
                agent=agent,
                selector=selector,
                input=task_input,
                priority=self.base.priority,
                deadline=self.get("deadline"),
                timeout_seconds=step.timeout_seconds,
                retry=step.retry,
                fallback=None if on_fallback or step.fallback is None else step.fallback.agent,
            )
        )

    def complete(self) -> None:
        failed = [n for n, st in self.steps.items() if st.phase == "Failed"]
        if failed:
            first = self.steps[failed[0]]
            which = ", ".join(failed)
            self.finish(
                "Failed",
                None,
                STEP_FAILED,
                f"step{'s' if len(failed) > 1 else ''} {which} failed; "
                f"{failed[0]}: {first.reason}: {first.message}",
            )
            return
        try:
            output = render(self.spec.output, self.scope(None)) if self.spec.output else None
        except TemplateError as exc:
            self.finish("Failed", None, TEMPLATE_ERROR, f"output: {exc}")
            return
        done = sum(st.phase == "Succeeded" for st in self.steps.values())
        self.finish("Succeeded", output, "Succeeded", f"{done} of {len(self.steps)} steps ran")


def _topological(spec: WorkflowSpec) -> list[str]:
    """Step names, every step after its dependencies, ties in spec order (assumes a
    valid DAG: :func:`invalid_reason` keeps any other from starting)."""
    deps: Mapping[str, tuple[str, ...]] = {s.name: s.depends_on for s in spec.steps}
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        for d in deps.get(name, ()):
            visit(d)
        order.append(name)

    for s in spec.steps:
        visit(s.name)
    return order
