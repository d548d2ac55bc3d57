from __future__ import annotations

from shoal_operator.status_conditions import Cond, find, merge_conditions


def test_transition_time_changes_only_on_flip() -> None:
    first = merge_conditions(None, [Cond("Ready", "False", "Waiting", "x")], 1, "t1")
    same = merge_conditions(first, [Cond("Ready", "False", "StillWaiting", "y")], 2, "t2")
    flipped = merge_conditions(same, [Cond("Ready", "True", "Ok")], 3, "t3")
    assert first[0].last_transition_time == "t1"
    assert same[0].last_transition_time == "t1"
    assert same[0].reason == "StillWaiting"
    assert same[0].observed_generation == 2
    assert flipped[0].last_transition_time == "t3"


def test_sorted_and_untouched_types_kept() -> None:
    conds = merge_conditions(
        None, [Cond("Ready", "True", "Ok"), Cond("Degraded", "False", "Ok")], 1, "t"
    )
    assert [c.type for c in conds] == ["Degraded", "Ready"]
    again = merge_conditions(conds, [Cond("Progressing", "True", "Rolling")], 1, "t2")
    assert [c.type for c in again] == ["Degraded", "Progressing", "Ready"]
    assert find(again, "Ready") == conds[1]


def test_recomputing_the_same_state_is_byte_identical() -> None:
    desired = [Cond("Ready", "True", "Ok", "fine")]
    once = merge_conditions(None, desired, 4, "t1")
    assert merge_conditions(once, desired, 4, "t9") == once
    assert [c.to_wire() for c in merge_conditions(once, desired, 4, "t9")] == [
        c.to_wire() for c in once
    ]
