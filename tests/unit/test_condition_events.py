"""transition_events: Events for Ready flips and new Degraded reasons, nothing else."""

from __future__ import annotations

from shoal_api.base import Condition
from shoal_operator.status_conditions import Cond, EventSpec, merge_conditions, transition_events


def conds(*desired: Cond) -> tuple[Condition, ...]:
    return merge_conditions(None, desired, 1, "t")


READY = Cond("Ready", "True", "Available", "2/2 replicas ready")
HEALTHY = Cond("Degraded", "False", "AsExpected", "")
BROKEN_READY = Cond("Ready", "False", "FallbackNotFound", "fallback x missing")
BROKEN = Cond("Degraded", "True", "FallbackNotFound", "fallback x missing")


def test_first_ready_is_a_normal_event() -> None:
    assert transition_events(None, conds(READY, HEALTHY)) == [
        EventSpec("Normal", "Available", "2/2 replicas ready")
    ]


def test_ready_without_message_says_ready() -> None:
    events = transition_events(None, conds(Cond("Ready", "True", "Valid")))
    assert events == [EventSpec("Normal", "Valid", "Ready")]


def test_not_ready_is_a_warning() -> None:
    events = transition_events(conds(READY), conds(Cond("Ready", "False", "Down", "gone")))
    assert events == [EventSpec("Warning", "Down", "gone")]


def test_nothing_when_nothing_changed() -> None:
    state = conds(READY, HEALTHY)
    assert transition_events(state, state) == []
    broken = conds(BROKEN_READY, BROKEN)
    assert transition_events(broken, broken) == []


def test_ready_reason_change_alone_is_no_event() -> None:
    old = conds(Cond("Ready", "False", "Creating"))
    new = conds(Cond("Ready", "False", "RolloutInProgress"))
    assert transition_events(old, new) == []


def test_degraded_with_same_reason_as_ready_is_one_event() -> None:
    events = transition_events(conds(READY, HEALTHY), conds(BROKEN_READY, BROKEN))
    assert events == [EventSpec("Warning", "FallbackNotFound", "fallback x missing")]


def test_new_degraded_reason_while_not_ready() -> None:
    old = conds(BROKEN_READY, BROKEN)
    new = conds(
        Cond("Ready", "False", "EscalationNotFound", "y"),
        Cond("Degraded", "True", "EscalationNotFound", "y"),
    )
    assert transition_events(old, new) == [EventSpec("Warning", "EscalationNotFound", "y")]


def test_degraded_without_ready_condition() -> None:
    assert transition_events(None, conds(BROKEN)) == [
        EventSpec("Warning", "FallbackNotFound", "fallback x missing")
    ]


def test_degraded_false_is_no_event() -> None:
    assert transition_events(conds(BROKEN), conds(HEALTHY)) == []


def test_degraded_with_other_reason_than_ready_is_two_events() -> None:
    new = conds(Cond("Ready", "False", "A", "a"), Cond("Degraded", "True", "B", "b"))
    assert transition_events(conds(READY), new) == [
        EventSpec("Warning", "A", "a"),
        EventSpec("Warning", "B", "b"),
    ]


def test_new_object_not_ready_yet_is_no_event() -> None:
    # 1,000 Agents created at once must not post 1,000 warnings for rolling out.
    new = conds(Cond("Ready", "False", "RolloutInProgress", "0/1"), HEALTHY)
    assert transition_events(None, new) == []


def test_new_object_degraded_is_one_warning() -> None:
    new = conds(Cond("Ready", "False", "A", "a"), Cond("Degraded", "True", "B", "b"))
    assert transition_events(None, new) == [EventSpec("Warning", "B", "b")]


def test_no_conditions_no_events() -> None:
    assert transition_events(None, []) == []
    assert transition_events(conds(READY), []) == []
