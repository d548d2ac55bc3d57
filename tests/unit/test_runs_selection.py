"""Choosing an Agent for a step that names a capability."""

from __future__ import annotations

import pytest

from shoal_core.runs.selection import choose

AGENTS = ["a", "b", "c"]


def test_least_lag_picks_the_shortest_queue_and_counts_unknown_as_idle() -> None:
    assert choose("LeastLag", AGENTS, lag={"a": 5, "b": 1, "c": 9}, success={}, turn=0) == "b"
    assert choose("LeastLag", AGENTS, lag={"a": 5, "b": 1}, success={}, turn=0) == "c"


def test_best_success_rate_prefers_the_reliable_agent() -> None:
    rates = {"a": 0.5, "b": 0.99, "c": 0.7}
    assert choose("BestSuccessRate", AGENTS, lag={}, success=rates, turn=7) == "b"


def test_round_robin_and_ties_rotate() -> None:
    picks = [choose("RoundRobin", AGENTS, lag={}, success={}, turn=t) for t in range(6)]
    assert picks == ["a", "b", "c", "a", "b", "c"]
    tied = {choose("LeastLag", AGENTS, lag={}, success={}, turn=t) for t in range(3)}
    assert tied == set(AGENTS)


def test_no_candidates_is_an_error() -> None:
    with pytest.raises(ValueError, match="no candidate"):
        choose("RoundRobin", [], lag={}, success={}, turn=0)
