"""The HPA model against the rules of kube-controller-manager's podautoscaler."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal_api.scaling import Metric
from shoal_core.autoscale.hpa_model import (
    DEFAULT_SCALE_DOWN,
    DEFAULT_SCALE_UP,
    HpaModel,
    HpaPolicy,
    Readings,
    parse_behavior,
)

LAG = Metric(type="QueueLag", target=10)
LATENCY = Metric(type="Latency", target_millis=2000)
CPU = Metric(type="CPU", target_utilization_percent=70)
# Fast scale-up, so that tests of other rules start from any count at once.
FAST_UP = {"scaleUp": {"policies": [{"type": "Pods", "value": 1000, "periodSeconds": 15}]}}


def lag(n: float) -> Readings:
    return Readings(queue_lag=n)


def step(
    hpa: HpaModel,
    now: float,
    current: int,
    readings: Readings,
    lo: int = 1,
    hi: int = 100,
    **kw: Any,
) -> int:
    return hpa.reconcile(
        now, spec_replicas=current, min_replicas=lo, max_replicas=hi, readings=readings, **kw
    ).replicas


def test_queue_lag_proposes_lag_over_target() -> None:
    hpa = HpaModel([LAG], FAST_UP)
    result = hpa.reconcile(0, spec_replicas=2, min_replicas=1, max_replicas=100, readings=lag(95))
    assert (result.proposal, result.replicas) == (10, 10)
    assert result.reason == "queue lag 95 / target 10 per replica -> 10"


@pytest.mark.parametrize(
    ("current", "lag_", "proposal"),
    [
        (3, 33, 3),  # ratio 1.1: within the tolerance
        (3, 34, 4),  # ratio 1.13
        (10, 90, 10),  # ratio 0.9: within
        (10, 89, 9),
        (4, 0, 0),
    ],
)
def test_tolerance(current: int, lag_: float, proposal: int) -> None:
    hpa = HpaModel([LAG], FAST_UP)
    got = hpa.reconcile(
        0, spec_replicas=current, min_replicas=1, max_replicas=100, readings=lag(lag_)
    )
    assert got.proposal == proposal


def test_behavior_tolerance_overrides_the_default() -> None:
    hpa = HpaModel([LAG], {"scaleUp": {"tolerance": "50m"}})
    assert step(hpa, 0, 3, lag(32)) == 4  # 1.067 > 1.05
    parsed = parse_behavior({"scaleDown": {"tolerance": 0.2}})
    assert parsed is not None
    assert parsed.scale_down.tolerance == 0.2
    hpa = HpaModel([LAG], {"scaleDown": {"tolerance": 0.2, "stabilizationWindowSeconds": 0}})
    assert step(hpa, 0, 10, lag(81)) == 10  # 0.81 is within 20 %


def test_queue_lag_counts_pods_that_exist_not_only_ready_ones() -> None:
    hpa = HpaModel([LAG], FAST_UP)
    # 4 pods, 1 ready, lag 40: 10 per pod is on target.
    assert step(hpa, 0, 4, lag(40), status_replicas=4, ready_replicas=1) == 4


def test_latency_is_a_value_target_scaled_by_ready_pods() -> None:
    hpa = HpaModel([LATENCY], FAST_UP)
    slow = Readings(queue_lag=0, latency_ms=5000)
    assert step(hpa, 0, 3, slow, status_replicas=3, ready_replicas=2) == 5  # ceil(2.5 x 2)


def test_cpu_utilization() -> None:
    hpa = HpaModel([CPU], FAST_UP)
    assert step(hpa, 0, 4, Readings(queue_lag=0, cpu_utilization=140)) == 8
    # Utilisation is an integer percentage: 76.9 % is 76 %, within 10 % of 70.
    assert step(hpa, 15, 8, Readings(queue_lag=0, cpu_utilization=76.9)) == 8


def test_cpu_scale_up_counts_starting_pods_as_idle() -> None:
    hpa = HpaModel([CPU], FAST_UP)
    busy = Readings(queue_lag=0, cpu_utilization=80)
    # 80 % on 4 ready pods, 2 more starting: 80 x 4 / 6 = 53 %, below target, so no change.
    assert step(hpa, 0, 6, busy, status_replicas=6, ready_replicas=4) == 6
    hot = Readings(queue_lag=0, cpu_utilization=200)
    # 200 x 4 / 6 = 133 %: ceil(1.9 x 6) = 12.
    assert step(hpa, 15, 6, hot, status_replicas=6, ready_replicas=4) == 12


def test_the_largest_proposal_wins() -> None:
    hpa = HpaModel([LAG, LATENCY, CPU], FAST_UP)
    r = Readings(queue_lag=30, latency_ms=6000, cpu_utilization=70)
    result = hpa.reconcile(0, spec_replicas=2, min_replicas=1, max_replicas=100, readings=r)
    assert result.proposal == 6
    assert result.reason.startswith("p95 latency 6000 ms")


def test_no_metric_no_change() -> None:
    hpa = HpaModel([LATENCY, CPU])
    result = hpa.reconcile(0, spec_replicas=3, min_replicas=1, max_replicas=10, readings=lag(500))
    assert result.replicas == 3
    assert "no metric" in result.reason


def test_zero_replicas_disable_the_hpa() -> None:
    hpa = HpaModel([LAG])
    assert step(hpa, 0, 0, lag(1000)) == 0


def test_out_of_range_goes_to_the_bound_at_once() -> None:
    hpa = HpaModel([LAG])
    assert step(hpa, 0, 30, lag(1000), lo=1, hi=20) == 20
    assert step(hpa, 15, 2, lag(0), lo=8, hi=20) == 8


def test_without_behavior_scale_up_is_at_most_double_or_four() -> None:
    hpa = HpaModel([LAG])
    assert step(hpa, 0, 1, lag(1000)) == 4
    assert step(hpa, 15, 4, lag(1000)) == 8
    assert step(hpa, 30, 8, lag(1000)) == 16
    assert step(hpa, 45, 16, lag(1000)) == 32


def test_default_scale_up_rules_pods_4_or_percent_100_per_15s() -> None:
    hpa = HpaModel([LAG], {"scaleDown": {"stabilizationWindowSeconds": 0}})
    assert hpa.behavior is not None
    assert hpa.behavior.scale_up == DEFAULT_SCALE_UP
    assert step(hpa, 0, 1, lag(1000)) == 5  # 1 + 4 beats 1 x 2
    assert step(hpa, 15, 5, lag(1000)) == 10  # 5 x 2 beats 5 + 4


def sync_until_change(hpa: HpaModel, current: int, readings: Readings, start: int) -> int:
    """The first sync (every 15 s from ``start``) at which the count changes."""
    for now in range(start, start + 3600, 15):
        if step(hpa, now, current, readings) != current:
            return now
    raise AssertionError("no change within an hour")


def test_default_scale_down_stabilisation_is_300s() -> None:
    hpa = HpaModel([LAG])
    assert step(hpa, 0, 10, lag(100)) == 10
    # The 10 recommended at 0 holds until it leaves the window; Go's Before(cutoff) keeps
    # a sample exactly 300 s old.
    assert sync_until_change(hpa, 10, lag(0), 15) == 315
    assert step(hpa, 330, 10, lag(0)) == 1


def test_behavior_scale_down_stabilisation_window() -> None:
    hpa = HpaModel([LAG], {"scaleDown": {"stabilizationWindowSeconds": 120}})
    assert step(hpa, 0, 10, lag(100)) == 10
    # With behavior, After(cutoff) drops a sample exactly at the cutoff.
    assert sync_until_change(hpa, 10, lag(0), 15) == 120


def test_behavior_defaults_down_to_300s() -> None:
    hpa = HpaModel([LAG], FAST_UP)
    assert hpa.behavior is not None
    assert hpa.behavior.scale_down == DEFAULT_SCALE_DOWN
    assert step(hpa, 0, 10, lag(100)) == 10
    assert sync_until_change(hpa, 10, lag(0), 15) == 300


def test_stabilisation_takes_the_highest_recommendation_in_the_window() -> None:
    hpa = HpaModel([LAG], {"scaleDown": {"stabilizationWindowSeconds": 60}, **FAST_UP})
    assert step(hpa, 0, 10, lag(100)) == 10
    assert step(hpa, 15, 10, lag(60)) == 10  # recommends 6; 10 is in the window
    assert step(hpa, 30, 10, lag(20)) == 10
    assert step(hpa, 60, 10, lag(20)) == 6  # 10 left the window; 6 (at 15 s) is the highest
    assert step(hpa, 90, 6, lag(20)) == 2


def test_scale_up_stabilisation_takes_the_lowest_recommendation() -> None:
    hpa = HpaModel([LAG], {"scaleUp": {"stabilizationWindowSeconds": 60}})
    assert step(hpa, 0, 2, lag(20)) == 2
    assert step(hpa, 15, 2, lag(80)) == 2  # lowest recommendation in the window is 2
    assert step(hpa, 30, 2, lag(80)) == 2
    assert step(hpa, 60, 2, lag(80)) == 6  # 2 (at 0) left; 8, limited by Pods 4 per 15 s
    assert step(hpa, 75, 6, lag(80)) == 8


def test_pods_policy_over_a_period() -> None:
    behavior = {
        "scaleDown": {
            "stabilizationWindowSeconds": 0,
            "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}],
        }
    }
    hpa = HpaModel([LAG], behavior)
    counts = []
    current = 10
    for now in range(0, 241, 15):
        current = step(hpa, now, current, lag(0))
        counts.append(current)
    # One pod per 60 s: the scale-down at 0 s counts until it is 60 s old.
    assert counts == [9] * 4 + [8] * 4 + [7] * 4 + [6] * 4 + [5]


def test_percent_policy_rounds_up_on_the_way_up_and_down_on_the_way_down() -> None:
    up = {"scaleUp": {"policies": [{"type": "Percent", "value": 50, "periodSeconds": 60}]}}
    hpa = HpaModel([LAG], up)
    assert step(hpa, 0, 3, lag(1000)) == 5  # ceil(3 x 1.5)
    assert step(hpa, 15, 5, lag(1000)) == 5  # the period started at 3
    assert step(hpa, 60, 5, lag(1000)) == 8  # ceil(5 x 1.5)
    down = {
        "scaleDown": {
            "stabilizationWindowSeconds": 0,
            "policies": [{"type": "Percent", "value": 50, "periodSeconds": 15}],
        }
    }
    hpa = HpaModel([LAG], down)
    assert step(hpa, 0, 5, lag(0)) == 2  # int(5 x 0.5)


@pytest.mark.parametrize(("select", "expected"), [("Max", 20), ("Min", 14)])
def test_select_policy(select: str, expected: int) -> None:
    behavior = {"scaleUp": {"selectPolicy": select}}
    assert step(HpaModel([LAG], behavior), 0, 10, lag(1000)) == expected


def test_min_select_policy_on_the_way_down_takes_the_smaller_change() -> None:
    behavior = {
        "scaleDown": {
            "stabilizationWindowSeconds": 0,
            "selectPolicy": "Min",
            "policies": [
                {"type": "Pods", "value": 2, "periodSeconds": 15},
                {"type": "Percent", "value": 50, "periodSeconds": 15},
            ],
        }
    }
    assert step(HpaModel([LAG], behavior), 0, 10, lag(0)) == 8


@pytest.mark.parametrize("direction", ["scaleUp", "scaleDown"])
def test_disabled_direction_never_moves(direction: str) -> None:
    hpa = HpaModel([LAG], {direction: {"selectPolicy": "Disabled"}})
    readings = lag(1000) if direction == "scaleUp" else lag(0)
    for now in range(0, 1200, 15):
        assert step(hpa, now, 5, readings) == 5
    # The other direction still works.
    fresh = HpaModel([LAG], {direction: {"selectPolicy": "Disabled"}})
    expected = 1 if direction == "scaleUp" else 10
    assert step(fresh, 0, 5, lag(0) if direction == "scaleUp" else lag(1000)) == expected


def test_disabled_still_honours_the_bounds() -> None:
    hpa = HpaModel([LAG], {"scaleUp": {"selectPolicy": "Disabled"}})
    assert step(hpa, 0, 2, lag(1000), lo=4) == 4


def test_parse_behavior_fills_in_defaults() -> None:
    assert parse_behavior(None) is None
    assert parse_behavior({}) is None
    b = parse_behavior({"scaleDown": {"stabilizationWindowSeconds": 60}})
    assert b is not None
    assert b.scale_up == DEFAULT_SCALE_UP
    assert b.scale_down.stabilization_window_seconds == 60
    assert b.scale_down.policies == DEFAULT_SCALE_DOWN.policies
    custom = parse_behavior(
        {"scaleUp": {"policies": [{"type": "Pods", "value": 2, "periodSeconds": 30}]}}
    )
    assert custom is not None
    assert custom.scale_up.policies == (HpaPolicy("Pods", 2, 30),)
    assert custom.scale_up.select_policy == "Max"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"scaleSideways": {}}, "unknown field"),
        ({"scaleUp": []}, "must be an object"),
        ({"scaleUp": {"selectPolicy": "Most"}}, "selectPolicy must be Max, Min or Disabled"),
        ({"scaleUp": {"stabilizationWindowSeconds": 4000}}, "0..3600"),
        ({"scaleUp": {"policies": [{"type": "Nodes", "value": 1, "periodSeconds": 15}]}}, "type"),
        ({"scaleUp": {"policies": [{"type": "Pods", "value": 0, "periodSeconds": 15}]}}, "value"),
        ({"scaleUp": {"policies": [{"type": "Pods", "value": 1, "periodSeconds": 0}]}}, "period"),
        ({"scaleUp": {"policies": []}}, "must not be empty"),
        ({"scaleUp": {"tolerance": "lots"}}, "not a quantity"),
    ],
)
def test_parse_behavior_rejects_what_the_api_server_would(
    raw: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        parse_behavior(raw)


BEHAVIORS = [
    None,
    FAST_UP,
    {"scaleUp": {"selectPolicy": "Disabled"}, "scaleDown": {"selectPolicy": "Min"}},
    {
        "scaleUp": {"stabilizationWindowSeconds": 45, "selectPolicy": "Min"},
        "scaleDown": {
            "stabilizationWindowSeconds": 0,
            "policies": [{"type": "Pods", "value": 3, "periodSeconds": 30}],
        },
    },
]


@settings(max_examples=100, deadline=None)
@given(
    behavior=st.sampled_from(BEHAVIORS),
    start=st.integers(1, 40),
    syncs=st.lists(
        st.tuples(
            st.integers(1, 20),  # min
            st.integers(0, 30),  # max - min
            st.floats(0, 5000),  # lag
            st.none() | st.floats(0, 60_000),  # latency
            st.none() | st.floats(0, 300),  # cpu
            st.integers(0, 10),  # pods not ready
        ),
        min_size=1,
        max_size=40,
    ),
)
def test_the_hpa_stays_within_its_bounds(
    behavior: dict[str, Any] | None,
    start: int,
    syncs: list[tuple[int, int, float, float | None, float | None, int]],
) -> None:
    hpa = HpaModel([LAG, LATENCY, CPU], behavior)
    current = start
    for i, (lo, span, lag_, latency, cpu, starting) in enumerate(syncs):
        hi = lo + span
        readings = Readings(queue_lag=lag_, latency_ms=latency, cpu_utilization=cpu)
        current = hpa.reconcile(
            i * 15,
            spec_replicas=current,
            min_replicas=lo,
            max_replicas=hi,
            readings=readings,
            ready_replicas=max(0, current - starting),
        ).replicas
        assert lo <= current <= hi
