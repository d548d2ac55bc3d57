"""The run engine: advance(spec, state, event, now) -> (state, effects)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal_api.envelope import Task
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
    StepResult,
    Tick,
    parse_event,
)
from shoal_api.workflow import WorkflowSpec
from shoal_core.runs.engine import abandon, advance, next_wakeup, task_id_for
from shoal_core.runs.when import compile_when

NOW = 1_767_571_200.0
RUN = "r-7f3a"

# celpy raises the recursion limit when first used; Hypothesis warns if that happens
# inside one of its tests, so it happens here.
compile_when("true")


def workflow(steps: list[dict[str, Any]], **fields: Any) -> WorkflowSpec:
    return WorkflowSpec.model_validate({"steps": steps, **fields})


# The diamond of API.md, with classify after authenticate as the brief draws it.
DIAMOND = workflow(
    [
        {"name": "authenticate", "agent": "auth", "input": {"customerId": "${input.customerId}"}},
        {
            "name": "classify",
            "agent": "triage",
            "dependsOn": ["authenticate"],
            "input": {"text": "${input.message}"},
        },
        {
            "name": "compliance",
            "agentSelector": {"capability": "compliance-check", "strategy": "LeastLag"},
            "dependsOn": ["authenticate"],
            "input": {"customerId": "${input.customerId}"},
        },
        {
            "name": "answer",
            "agent": "support",
            "dependsOn": ["classify", "compliance"],
            "when": "steps.classify.output.category != 'spam'",
            "input": {"text": "${input.message}", "category": "${steps.classify.output.category}"},
            "timeoutSeconds": 120,
            "retry": {"maxAttempts": 3},
            "fallback": {"agent": "support-basic"},
        },
    ],
    deadlineSeconds=300,
    priority=6,
    output={"answer": "${steps.answer.output}", "category": "${steps.classify.output.category}"},
)
INPUT = {"customerId": "c-42", "message": "my invoice is wrong"}


class Driver:
    """Feeds events to one run and keeps the latest state."""

    def __init__(self, spec: WorkflowSpec, input: Any = None, now: float = NOW) -> None:
        self.spec = spec
        self.now = now
        self.state = RunState.new(
            spec, run_id=RUN, workflow="wf", namespace="ns", input=input, now=now
        )

    def send(self, event: Event, at: float | None = None) -> list[Effect]:
        if at is not None:
            self.now = at
        self.state, effects = advance(self.spec, self.state, event, self.now)
        return effects

    def start(self) -> list[Effect]:
        return self.send(Started())

    def run_phase(self) -> str:
        return self.state.phase

    def phase(self, step: str) -> str:
        return self.state.steps[step].phase


def tasks(effects: list[Effect]) -> dict[str, DispatchTask]:
    return {e.step: e for e in effects if isinstance(e, DispatchTask)}


def ok(task: DispatchTask, output: Any = None, agent: str | None = None) -> StepResult:
    path = (agent or task.agent or "picked",)
    return StepResult(
        step=task.step, task_id=task.task_id, status="Succeeded", output=output, path=path
    )


def dead(task: DispatchTask, reason: str = "HandlerError", message: str = "boom") -> StepResult:
    return StepResult(
        step=task.step,
        task_id=task.task_id,
        status="DeadLettered",
        reason=reason,
        message=message,
        path=(task.agent or "picked",),
    )


def finished(effects: list[Effect]) -> RunFinished:
    (done,) = [e for e in effects if isinstance(e, RunFinished)]
    return done


def test_new_run_is_pending_with_waiting_steps_and_the_workflow_priority() -> None:
    run = Driver(DIAMOND, INPUT).state
    assert run.phase == "Pending"
    assert run.priority == 6
    assert set(run.steps) == {"authenticate", "classify", "compliance", "answer"}
    assert {s.phase for s in run.steps.values()} == {"Waiting"}


def test_diamond_fans_out_in_one_advance_and_joins() -> None:
    d = Driver(DIAMOND, INPUT)
    first = tasks(d.start())
    assert list(first) == ["authenticate"]
    auth = first["authenticate"]
    assert auth.input == {"customerId": "c-42"}
    assert auth.priority == 6
    assert auth.deadline == NOW + 300
    assert d.state.phase == "Running"
    assert d.state.deadline == NOW + 300

    both = tasks(d.send(ok(auth, {"user": "u1"})))
    assert set(both) == {"classify", "compliance"}
    assert both["classify"].agent == "triage"
    assert both["classify"].input == {"text": "my invoice is wrong"}
    assert both["compliance"].agent is None
    assert both["compliance"].selector is not None
    assert both["compliance"].selector.capability == "compliance-check"

    assert d.send(ok(both["classify"], {"category": "billing"})) == []
    assert d.phase("answer") == "Waiting"

    last = tasks(d.send(ok(both["compliance"], {"ok": True}, agent="comply-eu")))
    assert list(last) == ["answer"]
    answer = last["answer"]
    assert answer.input == {"text": "my invoice is wrong", "category": "billing"}
    assert answer.timeout_seconds == 120
    assert answer.fallback == "support-basic"
    assert answer.retry is not None
    assert answer.retry.max_attempts == 3
    assert d.state.steps["compliance"].agent == "comply-eu"

    done = finished(d.send(ok(answer, {"reply": "refund issued"}), at=NOW + 9))
    assert done.phase == "Succeeded"
    assert done.output == {"answer": {"reply": "refund issued"}, "category": "billing"}
    assert d.run_phase() == "Succeeded"
    assert d.state.output == done.output
    assert d.state.finished == NOW + 9
    assert all(s.phase == "Succeeded" for s in d.state.steps.values())


def test_when_false_skips_and_dependents_proceed() -> None:
    spec = workflow(
        [
            {"name": "classify", "agent": "triage"},
            {
                "name": "answer",
                "agent": "support",
                "dependsOn": ["classify"],
                "when": "steps.classify.output.category != 'spam'",
            },
            {"name": "log", "agent": "logger", "dependsOn": ["answer"]},
        ],
        output={"answer": "${steps.answer.output}"},
    )
    d = Driver(spec)
    classify = tasks(d.start())["classify"]
    after = tasks(d.send(ok(classify, {"category": "spam"})))
    assert d.phase("answer") == "Skipped"
    assert d.state.steps["answer"].reason == "WhenFalse"
    assert list(after) == ["log"]
    done = finished(d.send(ok(after["log"])))
    assert done.phase == "Succeeded"
    assert done.output == {"answer": None}


def test_a_failed_step_skips_its_dependents_lets_other_branches_finish_and_fails_the_run() -> None:
    spec = workflow(
        [
            {"name": "a", "agent": "x"},
            {"name": "b", "agent": "x", "dependsOn": ["a"]},
            {"name": "c", "agent": "x", "dependsOn": ["b"], "when": "true"},
            {"name": "side", "agent": "x"},
        ]
    )
    d = Driver(spec)
    first = tasks(d.start())
    assert set(first) == {"a", "side"}
    assert d.send(dead(first["a"], "ContractViolation", "bad input")) == []
    assert d.phase("a") == "Failed"
    assert d.state.steps["a"].reason == "ContractViolation"
    # Transitively: c waits on b, which was skipped because a failed.
    assert (d.phase("b"), d.phase("c")) == ("Skipped", "Skipped")
    assert d.state.steps["c"].reason == "DependencyFailed"
    assert d.state.phase == "Running"
    done = finished(d.send(ok(first["side"])))
    assert done.phase == "Failed"
    assert done.reason == "StepFailed"
    assert "a: ContractViolation" in done.message
    assert done.output is None


def approval_spec(on_timeout: str = "Fail") -> WorkflowSpec:
    return workflow(
        [
            {"name": "draft", "agent": "writer"},
            {
                "name": "send",
                "agent": "mailer",
                "dependsOn": ["draft"],
                "input": {"body": "${steps.draft.output.text}"},
                "approval": {"required": True, "timeoutSeconds": 600, "onTimeout": on_timeout},
            },
        ]
    )


def until_approval(on_timeout: str = "Fail") -> Driver:
    d = Driver(approval_spec(on_timeout))
    draft = tasks(d.start())["draft"]
    effects = d.send(ok(draft, {"text": "hello"}))
    assert effects == [
        AwaitApproval(run=RUN, step="send", until=NOW + 600, input={"body": "hello"})
    ]
    assert d.phase("send") == "WaitingApproval"
    assert next_wakeup(d.state) == NOW + 600
    return d


def test_approve_dispatches_the_step() -> None:
    d = until_approval()
    decide = ApprovalDecided(step="send", decision="Approve", approver="jane", at=NOW + 5)
    sent = tasks(d.send(decide, at=NOW + 5))
    assert sent["send"].input == {"body": "hello"}
    approval = d.state.steps["send"].approval
    assert approval is not None
    assert (approval.decision, approval.approver, approval.timed_out) == ("Approve", "jane", False)
    assert d.send(decide) == []  # a second copy of the decision


def test_reject_fails_the_step_and_the_run() -> None:
    d = until_approval()
    decide = ApprovalDecided(
        step="send", decision="Reject", approver="jane", at=NOW + 5, comment="tone"
    )
    done = finished(d.send(decide, at=NOW + 5))
    assert d.phase("send") == "Failed"
    assert d.state.steps["send"].reason == "ApprovalRejected"
    assert d.state.steps["send"].message == "rejected by jane: tone"
    assert done.phase == "Failed"


def test_approval_timeout_fail() -> None:
    d = until_approval("Fail")
    assert d.send(Tick(), at=NOW + 599) == []
    done = finished(d.send(Tick(), at=NOW + 600))
    assert d.phase("send") == "Failed"
    assert d.state.steps["send"].reason == "ApprovalTimeout"
    assert done.phase == "Failed"


def test_approval_timeout_skip() -> None:
    d = until_approval("Skip")
    done = finished(d.send(Tick(), at=NOW + 601))
    assert d.phase("send") == "Skipped"
    assert d.state.steps["send"].reason == "ApprovalTimeout"
    assert done.phase == "Succeeded"


def test_approval_timeout_approve() -> None:
    d = until_approval("Approve")
    sent = tasks(d.send(Tick(), at=NOW + 700))
    assert list(sent) == ["send"]
    approval = d.state.steps["send"].approval
    assert approval is not None
    assert (approval.decision, approval.timed_out, approval.approver) == ("Approve", True, "")


def test_a_decision_after_the_timeout_is_too_late() -> None:
    d = until_approval("Fail")
    decide = ApprovalDecided(step="send", decision="Approve", approver="jane", at=NOW + 650)
    assert tasks(d.send(decide, at=NOW + 650)) == {}
    assert d.state.steps["send"].reason == "ApprovalTimeout"


def test_deadline_fails_the_run() -> None:
    d = Driver(DIAMOND, INPUT)
    auth = tasks(d.start())["authenticate"]
    assert next_wakeup(d.state) == NOW + 300
    assert d.send(Tick(), at=NOW + 299) == []
    done = finished(d.send(Tick(), at=NOW + 300))
    assert done.phase == "Failed"
    assert done.reason == "DeadlineExceeded"
    assert d.state.reason == "DeadlineExceeded"
    assert d.phase("authenticate") == "Failed"  # it was underway
    assert d.phase("answer") == "Skipped"
    assert all(s.terminal for s in d.state.steps.values())
    assert next_wakeup(d.state) is None
    # A result arriving later changes nothing.
    assert d.send(ok(auth)) == []


def test_a_result_after_the_deadline_does_not_revive_the_run() -> None:
    d = Driver(DIAMOND, INPUT)
    auth = tasks(d.start())["authenticate"]
    done = finished(d.send(ok(auth), at=NOW + 301))
    assert done.reason == "DeadlineExceeded"
    assert d.phase("classify") == "Skipped"


def test_retry_then_fallback_then_failure() -> None:
    spec = workflow(
        [
            {
                "name": "answer",
                "agent": "support",
                "retry": {"maxAttempts": 2},
                "fallback": {"agent": "support-basic"},
            }
        ]
    )
    d = Driver(spec)
    one = tasks(d.start())["answer"]
    assert (one.attempt, one.task_id, one.agent) == (1, f"{RUN}-answer-1", "support")
    two = tasks(d.send(dead(one)))["answer"]
    assert (two.attempt, two.task_id, two.agent) == (2, f"{RUN}-answer-2", "support")
    assert two.fallback == "support-basic"
    three = tasks(d.send(dead(two)))["answer"]
    assert (three.attempt, three.task_id, three.agent) == (3, f"{RUN}-answer-3", "support-basic")
    assert three.fallback is None
    assert d.state.steps["answer"].on_fallback
    done = finished(d.send(dead(three, "Timeout", "too slow")))
    assert d.phase("answer") == "Failed"
    assert d.state.steps["answer"].reason == "Timeout"
    assert "after 3 attempts" in d.state.steps["answer"].message
    assert done.phase == "Failed"


def test_fallback_can_succeed() -> None:
    spec = workflow([{"name": "s", "agent": "a", "fallback": {"agent": "b"}}])
    d = Driver(spec)
    first = tasks(d.start())["s"]
    second = tasks(d.send(dead(first)))["s"]
    assert second.agent == "b"
    assert finished(d.send(ok(second, 1))).phase == "Succeeded"
    assert d.state.steps["s"].agent == "b"


def test_without_retry_or_fallback_one_dead_letter_fails_the_step() -> None:
    d = Driver(workflow([{"name": "s", "agent": "a"}]))
    first = tasks(d.start())["s"]
    assert finished(d.send(dead(first))).phase == "Failed"


def test_duplicate_and_stale_results_are_no_ops() -> None:
    spec = workflow([{"name": "s", "agent": "a", "retry": {"maxAttempts": 3}}])
    d = Driver(spec)
    first = tasks(d.start())["s"]
    second = tasks(d.send(dead(first)))["s"]
    before = d.state
    # The first attempt's record again, a late success of it, a made-up task, an unknown step.
    stale: list[Event] = [
        dead(first),
        ok(first, "late"),
        StepResult(step="s", task_id="other", status="Succeeded"),
        StepResult(step="ghost", task_id=second.task_id, status="Succeeded"),
        Started(),
        Tick(),
    ]
    for event in stale:
        assert d.send(event) == []
        assert d.state is before
    d.send(ok(second, "fine"))
    after = d.state
    assert d.send(ok(second, "fine")) == []
    assert d.state is after


def test_events_on_a_finished_run_are_no_ops() -> None:
    d = Driver(workflow([{"name": "s", "agent": "a"}]))
    first = tasks(d.start())["s"]
    d.send(ok(first))
    done = d.state
    late: list[Event] = [ok(first), Cancel(), Started(), Tick()]
    for event in late:
        assert d.send(event, at=NOW + 10_000) == []
        assert d.state is done


def test_events_before_start_do_nothing_but_cancel_does() -> None:
    d = Driver(workflow([{"name": "s", "agent": "a"}]))
    pending = d.state
    assert d.send(Tick()) == []
    assert d.state is pending
    done = finished(d.send(Cancel(message="user asked")))
    assert (done.phase, done.reason, done.message) == ("Failed", "Cancelled", "user asked")
    assert d.phase("s") == "Skipped"


def test_cancel_a_running_run() -> None:
    d = Driver(DIAMOND, INPUT)
    d.start()
    done = finished(d.send(Cancel()))
    assert done.reason == "Cancelled"
    assert d.phase("authenticate") == "Failed"
    assert d.phase("classify") == "Skipped"


def test_advance_is_deterministic_and_task_ids_repeat() -> None:
    d = Driver(DIAMOND, INPUT)
    pending = d.state
    a = advance(DIAMOND, pending, Started(), NOW)
    b = advance(DIAMOND, pending, Started(), NOW)
    assert a == b
    auth = tasks(a[1])["authenticate"]
    assert auth.task_id == f"{RUN}-authenticate-1"
    result = ok(auth, {"user": "u1"})
    assert advance(DIAMOND, a[0], result, NOW + 1) == advance(DIAMOND, a[0], result, NOW + 1)


def test_task_ids_are_sanitised_to_the_envelope_pattern_and_stay_distinct() -> None:
    weird = task_id_for("tenant.a/run 1", "answer", 2)
    other = task_id_for("tenant_a_run_1", "answer", 2)
    long_a = task_id_for("x" * 128, "a" * 63, 100)
    long_b = task_id_for("x" * 127 + "y", "a" * 63, 100)
    for tid in (weird, other, long_a, long_b):
        Task(id=tid)  # the envelope accepts it
    assert other == "tenant_a_run_1-answer-2"
    assert weird != other
    assert long_a != long_b
    assert weird.endswith("-answer-2")
    assert task_id_for("tenant.a/run 1", "answer", 2) == weird


def test_output_template_error_fails_the_run() -> None:
    spec = workflow([{"name": "s", "agent": "a"}], output={"x": "${steps.s.output.missing}"})
    d = Driver(spec)
    done = finished(d.send(ok(tasks(d.start())["s"], {"other": 1})))
    assert (done.phase, done.reason) == ("Failed", "TemplateError")
    assert "steps.s.output.missing" in done.message


def test_input_template_and_when_errors_fail_the_step() -> None:
    spec = workflow(
        [
            {"name": "a", "agent": "x", "input": {"v": "${input.nope}"}},
            {"name": "b", "agent": "x", "when": "input.n >"},
            {"name": "c", "agent": "x", "when": "steps.a.output == 1"},  # not an ancestor
        ]
    )
    d = Driver(spec, {"n": 1})
    done = finished(d.start())
    assert d.state.steps["a"].reason == "TemplateError"
    assert "${input.nope}" in d.state.steps["a"].message
    assert d.state.steps["b"].reason == "WhenError"
    assert d.state.steps["c"].reason == "WhenError"
    assert "'a'" in d.state.steps["c"].message
    assert done.phase == "Failed"


def test_a_workflow_with_a_cycle_fails_at_start() -> None:
    spec = workflow(
        [
            {"name": "a", "agent": "x", "dependsOn": ["b"]},
            {"name": "b", "agent": "x", "dependsOn": ["a"]},
        ]
    )
    d = Driver(spec)
    done = finished(d.start())
    assert done.reason == "InvalidWorkflow"
    assert "cycle" in done.message


def test_context_feeds_templates_and_conditions_and_is_versioned() -> None:
    spec = workflow(
        [{"name": "s", "agent": "a", "when": "context.go", "input": {"t": "${context.tenant}"}}]
    )
    d = Driver(spec)
    d.state = d.state.with_context({"go": True, "tenant": "acme"})
    assert d.state.context_version == 1
    assert d.state.with_context({"go": True}) is d.state
    assert tasks(d.start())["s"].input == {"t": "acme"}


def test_state_and_events_round_trip_through_compact_json() -> None:
    d = Driver(DIAMOND, INPUT)
    d.start()
    raw = d.state.to_json()
    assert b'"phase":"Waiting"' not in raw  # defaults are not written
    assert RunState.model_validate_json(raw) == d.state
    pending = Driver(DIAMOND, INPUT).state
    assert RunState.model_validate_json(pending.to_json()) == pending
    for event in [
        Started(),
        Tick(),
        Cancel(message="m"),
        StepResult(step="a", task_id="t", status="DeadLettered", reason="Timeout"),
        ApprovalDecided(step="a", decision="Reject", approver="j", at=1.0),
    ]:
        assert parse_event(event.to_json()) == event


# Property: random DAGs, random outcomes, random delivery order with duplicates.

NAMES = [f"s{i}" for i in range(8)]


@st.composite
def random_workflows(draw: st.DrawFn) -> WorkflowSpec:
    n = draw(st.integers(1, len(NAMES)))
    steps: list[dict[str, Any]] = []
    for i in range(n):
        step: dict[str, Any] = {
            "name": NAMES[i],
            "agent": "a",
            "dependsOn": draw(st.lists(st.sampled_from(NAMES[:i]), unique=True)) if i else [],
            "input": {"i": "${input.n}"},
        }
        if draw(st.booleans()):
            step["retry"] = {"maxAttempts": draw(st.integers(1, 3))}
        if draw(st.booleans()):
            step["fallback"] = {"agent": "b"}
        if draw(st.integers(0, 4)) == 0:
            step["when"] = f"input.skip != '{NAMES[i]}'"
        if draw(st.integers(0, 4)) == 0:
            step["approval"] = {"required": True}
        steps.append(step)
    return workflow(steps)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=random_workflows(), data=st.data())
def test_random_runs_always_terminate_in_dependency_order(
    spec: WorkflowSpec, data: st.DataObject
) -> None:
    skip = data.draw(st.sampled_from(["none", *NAMES]))
    deps = {s.name: s.depends_on for s in spec.steps}
    d = Driver(spec, {"n": 1, "skip": skip})
    pool: list[Event] = []
    delivered: list[Event] = []
    seen_attempts: set[tuple[str, int]] = set()
    seen_ids: set[str] = set()
    finishes = 0

    def absorb(effects: list[Effect]) -> None:
        nonlocal finishes
        for effect in effects:
            if isinstance(effect, DispatchTask):
                key = (effect.step, effect.attempt)
                assert key not in seen_attempts, f"{key} dispatched twice"
                assert effect.task_id not in seen_ids
                seen_attempts.add(key)
                seen_ids.add(effect.task_id)
                for dep in deps[effect.step]:
                    assert d.state.steps[dep].phase in ("Succeeded", "Skipped"), (
                        f"{effect.step} dispatched before {dep} finished"
                    )
                succeed = data.draw(st.booleans(), label=f"{effect.task_id} succeeds")
                pool.append(ok(effect, {"from": effect.step}) if succeed else dead(effect))
            elif isinstance(effect, AwaitApproval):
                decision = data.draw(st.sampled_from(["Approve", "Reject"]))
                pool.append(
                    ApprovalDecided(step=effect.step, decision=decision, approver="p", at=NOW)
                )
            else:
                finishes += 1

    absorb(d.start())
    duplicates = 20  # a budget, so that the pool always drains
    while pool:
        i = data.draw(st.integers(0, len(pool) - 1), label="deliver")
        # Drawn so that Hypothesis shrinks towards fewer duplicates, not more.
        again = duplicates > 0 and data.draw(st.integers(0, 3), label="duplicate") == 3
        duplicates -= again
        event = pool[i] if again else pool.pop(i)
        before = d.state
        # The same advance twice gives the same answer (a retried compare-and-set).
        assert advance(spec, before, event, d.now) == advance(spec, before, event, d.now)
        effects = d.send(event)
        if event in delivered:
            assert effects == []
            assert d.state is before
        delivered.append(event)
        absorb(effects)
        if data.draw(st.integers(0, 5), label="redeliver an old event") == 5:
            old = delivered[data.draw(st.integers(0, len(delivered) - 1), label="which")]
            assert d.send(old) == []
    assert d.state.terminal, d.state
    assert finishes == 1
    assert all(s.terminal for s in d.state.steps.values())
    failed = any(s.phase == "Failed" for s in d.state.steps.values())
    assert d.state.phase == ("Failed" if failed else "Succeeded")
    conditional = next((s for s in spec.steps if s.name == skip and s.when), None)
    if conditional and d.state.steps[skip].reason != "DependencyFailed":
        assert d.state.steps[skip].phase == "Skipped"
        assert d.state.steps[skip].reason == "WhenFalse"


@pytest.mark.parametrize("bad", ["Started", "Nope"])
def test_parse_event_rejects_unknown_fields_and_types(bad: str) -> None:
    with pytest.raises(ValueError, match="validation error"):
        parse_event(f'{{"type":"{bad}","extra":1}}')


def test_abandon_fails_a_run_whose_workflow_is_gone() -> None:
    d = Driver(DIAMOND, INPUT)
    d.start()
    state, effects = abandon(d.state, "WorkflowDeleted", "workflow wf was deleted", NOW + 1)
    assert (state.phase, state.reason) == ("Failed", "WorkflowDeleted")
    assert state.steps["authenticate"].phase == "Failed"  # it was dispatched
    assert state.steps["answer"].phase == "Skipped"
    assert finished(effects).reason == "WorkflowDeleted"
    assert abandon(state, "WorkflowDeleted", "again", NOW + 2) == (state, [])
