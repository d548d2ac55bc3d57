"""plan(): the HPA's bounds, the operator's 0 <-> 1 step and the sentence that says why."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal_api.scaling import ScalingPolicySpec
from shoal_core.autoscale.policy import MAX_DECISION, Observation, Plan, plan

NOW = 1_767_571_200.0  # 2026-01-05 00:00 UTC


def spec(**fields: Any) -> ScalingPolicySpec:
    return ScalingPolicySpec.model_validate(
        {"targetRef": {"name": "triage"}, "maxReplicas": 20, **fields}
    )


def obs(
    replicas: int = 3,
    lag: int = 12,
    idle_for: float | None = None,
    **fields: Any,
) -> Observation:
    now = NOW + fields.pop("now_shift", 0.0)
    idle_since = None if idle_for is None else now - idle_for
    in_flight = fields.pop("in_flight", min(lag, replicas))
    return Observation(
        now=now,
        replicas=replicas,
        lag=lag,
        in_flight=in_flight,
        idle_since=idle_since,
        **fields,
    )


def test_steady_state_leaves_it_to_the_hpa() -> None:
    got = plan(spec(), obs())
    assert got == Plan(
        hpa_min=1,
        hpa_max=20,
        scale_to=None,
        floor=1,
        decision="3 replicas, queue lag 12; the HPA decides within [1, 20]",
        reasons=(),
    )


def test_min_replicas_is_the_floor() -> None:
    got = plan(spec(minReplicas=4), obs())
    assert (got.hpa_min, got.floor, got.reasons) == (4, 4, ())


@pytest.mark.parametrize(("lag", "activate"), [(0, False), (4, False), (5, True), (47, True)])
def test_activation_at_zero_replicas(lag: int, activate: bool) -> None:
    got = plan(spec(minReplicas=0, activation={"queueLag": 5}), obs(replicas=0, lag=lag))
    if activate:
        assert got.scale_to == 1
        assert got.decision == f"queue lag {lag} >= activation 5 at 0 replicas; scaling to 1"
    else:
        assert got.scale_to is None
        assert got.decision == f"0 replicas, queue lag {lag} below activation 5; staying at 0"
    assert got.floor == 0
    assert got.hpa_min == 1


def test_the_default_activation_is_one_task() -> None:
    got = plan(spec(minReplicas=0), obs(replicas=0, lag=47))
    assert got.decision == "queue lag 47 >= activation 1 at 0 replicas; scaling to 1"


def test_a_floor_above_zero_wakes_the_agent_without_lag() -> None:
    why = "schedule 0 8 * * 1-5 (UTC) minReplicas 3"
    got = plan(spec(minReplicas=0), obs(replicas=0, lag=0, idle_for=3600), 3, why)
    assert got.scale_to == 1
    assert (got.floor, got.hpa_min) == (3, 3)
    assert got.reasons == (why,)
    assert got.decision == (f"floor 3 at 0 replicas; scaling to 1, the HPA takes it to 3 ({why})")


def test_zero_replicas_with_min_replicas_above_zero_is_repaired() -> None:
    got = plan(spec(minReplicas=2), obs(replicas=0, lag=0))
    assert got.scale_to == 1
    assert got.hpa_min == 2


@pytest.mark.parametrize(
    ("idle_for", "scale_to"), [(None, None), (0.0, None), (299.0, None), (300.0, 0), (5000.0, 0)]
)
def test_cooldown_to_zero(idle_for: float | None, scale_to: int | None) -> None:
    got = plan(spec(minReplicas=0, cooldownSeconds=300), obs(replicas=2, lag=0, idle_for=idle_for))
    assert got.scale_to == scale_to
    if scale_to == 0:
        assert got.decision == (
            f"idle for {idle_for:.0f} s >= cooldown 300 s at 2 replicas; scaling to 0"
        )
    elif idle_for is not None:
        assert got.decision.startswith("2 replicas, idle since ")
        assert "(cooldown 300 s) unless work arrives; the HPA decides within [1, 20]" in (
            got.decision
        )
        # The same idle period reads the same a second later (no countdown churn).
        later = plan(
            spec(minReplicas=0, cooldownSeconds=300),
            obs(replicas=2, lag=0, idle_for=idle_for + 0.5, now_shift=0.5),
        )
        assert later.decision == got.decision


def test_cooldown_zero_scales_down_as_soon_as_idle() -> None:
    got = plan(spec(minReplicas=0, cooldownSeconds=0), obs(replicas=1, lag=0, idle_for=0.0))
    assert got.scale_to == 0


def test_no_cooldown_when_something_holds_the_floor() -> None:
    idle = obs(replicas=2, lag=0, idle_for=10_000.0)
    assert plan(spec(minReplicas=1), idle).scale_to is None
    assert plan(spec(minReplicas=0), idle, 2, "schedule").scale_to is None
    predictive = spec(minReplicas=0, predictive={"enabled": True})
    warm = obs(replicas=2, lag=0, idle_for=10_000.0, forecast_rate=3.0, per_replica_rate=5.0)
    assert plan(predictive, warm).scale_to is None


def test_predictive_floor() -> None:
    on = spec(predictive={"enabled": True})
    got = plan(on, obs(forecast_rate=12.0, per_replica_rate=4.0))
    assert (got.floor, got.hpa_min) == (3, 3)
    assert got.reasons == ("forecast 12.0 tasks/s needs 3",)
    assert got.decision.endswith("within [3, 20] (forecast 12.0 tasks/s needs 3)")
    # Float noise must not cost a replica: 0.3 / 0.1 is 3, not 4.
    assert plan(on, obs(forecast_rate=0.3, per_replica_rate=0.1)).floor == 3


def test_predictive_floor_needs_it_enabled_and_both_rates() -> None:
    assert plan(spec(), obs(forecast_rate=12.0, per_replica_rate=4.0)).floor == 1
    on = spec(predictive={"enabled": True})
    assert plan(on, obs(forecast_rate=None, per_replica_rate=4.0)).floor == 1
    assert plan(on, obs(forecast_rate=12.0, per_replica_rate=None)).floor == 1
    # A forecast below minReplicas does not show as a reason.
    assert plan(on, obs(forecast_rate=1.0, per_replica_rate=4.0)).reasons == ()


def test_schedule_and_forecast_take_the_higher() -> None:
    on = spec(predictive={"enabled": True})
    got = plan(on, obs(forecast_rate=40.0, per_replica_rate=4.0), 3, "schedule w")
    assert got.floor == 10
    assert got.reasons == ("schedule w", "forecast 40.0 tasks/s needs 10")
    assert plan(on, obs(forecast_rate=4.0, per_replica_rate=4.0), 3, "w").reasons == ("w",)


def test_request_quota_caps_the_max() -> None:
    got = plan(spec(quota={"requestsPerMinute": 600}), obs(per_replica_rate=2.5))
    assert got.hpa_max == 4
    assert got.reasons == ("quota 600 req/min caps at 4",)
    assert got.decision == (
        "3 replicas, queue lag 12; the HPA decides within [1, 4] (quota 600 req/min caps at 4)"
    )


def test_token_quota_caps_the_max() -> None:
    quota = spec(quota={"requestsPerMinute": 600, "tokensPerMinute": 90_000})
    got = plan(quota, obs(per_replica_rate=5.0, tokens_per_task=100.0))
    # requests: 600 / (60 x 5) = 2; tokens: 90,000 / (60 x 5 x 100) = 3.
    assert got.hpa_max == 2
    assert got.reasons == ("quota 600 req/min caps at 2", "quota 90000 tokens/min caps at 3")
    tokens_only = spec(quota={"tokensPerMinute": 90_000})
    assert plan(tokens_only, obs(per_replica_rate=5.0, tokens_per_task=100.0)).hpa_max == 3
    assert plan(tokens_only, obs(per_replica_rate=5.0)).hpa_max == 20  # tokens per task unknown


def test_quota_caps_need_a_known_rate_and_never_go_below_one() -> None:
    quota = spec(quota={"requestsPerMinute": 600})
    assert plan(quota, obs()).hpa_max == 20
    assert plan(quota, obs(per_replica_rate=1000.0)).hpa_max == 1
    loose = plan(quota, obs(per_replica_rate=0.1))  # allows 100: no cap below maxReplicas
    assert (loose.hpa_max, loose.reasons) == (20, ())
    assert plan(spec(quota={"requestsPerMinute": 0}), obs(per_replica_rate=5.0)).hpa_max == 20


def test_floors_are_capped_by_the_max() -> None:
    capped = spec(minReplicas=6, quota={"requestsPerMinute": 600})
    got = plan(capped, obs(per_replica_rate=2.5), 10, "schedule w")
    assert (got.floor, got.hpa_min, got.hpa_max) == (4, 4, 4)
    assert got.reasons == ("schedule w", "quota 600 req/min caps at 4", "floor 10 capped at max 4")


def test_schedule_reason_has_a_default() -> None:
    assert plan(spec(), obs(), 5).reasons == ("schedule minReplicas 5",)


def test_the_decision_fits_last_decision() -> None:
    got = plan(spec(), obs(), 5, "x" * 5000)
    assert len(got.decision) == MAX_DECISION


@settings(max_examples=200, deadline=None)
@given(
    min_replicas=st.integers(0, 30),
    extra=st.integers(0, 30),
    rpm=st.integers(0, 100_000),
    tpm=st.integers(0, 10_000_000),
    predictive=st.booleans(),
    replicas=st.integers(0, 60),
    lag=st.integers(0, 10_000),
    idle_for=st.none() | st.floats(0, 10_000),
    forecast_rate=st.none() | st.floats(0, 1e5),
    per_replica_rate=st.none() | st.floats(0.01, 1e3),
    tokens=st.none() | st.floats(0.01, 1e5),
    schedule_min=st.integers(0, 100),
)
def test_plan_invariants(
    min_replicas: int,
    extra: int,
    rpm: int,
    tpm: int,
    predictive: bool,
    replicas: int,
    lag: int,
    idle_for: float | None,
    forecast_rate: float | None,
    per_replica_rate: float | None,
    tokens: float | None,
    schedule_min: int,
) -> None:
    s = spec(
        minReplicas=min_replicas,
        maxReplicas=max(1, min_replicas + extra),
        quota={"requestsPerMinute": rpm, "tokensPerMinute": tpm},
        predictive={"enabled": predictive},
    )
    o = obs(
        replicas=replicas,
        lag=lag,
        idle_for=idle_for,
        forecast_rate=forecast_rate,
        per_replica_rate=per_replica_rate,
        tokens_per_task=tokens,
    )
    got = plan(s, o, schedule_min, "w")
    assert 1 <= got.hpa_min <= got.hpa_max <= s.max_replicas
    assert got.hpa_min == max(1, got.floor)
    assert 0 <= got.floor <= got.hpa_max
    assert got.floor >= min(min_replicas, got.hpa_max)
    assert got.scale_to in (None, 0, 1)
    if got.scale_to == 1:
        assert replicas == 0
    if got.scale_to == 0:
        assert replicas > 0
        assert min_replicas == 0
        assert got.floor == 0
        assert idle_for is not None
    if replicas == 0 and (lag >= s.activation.queue_lag or got.floor > 0):
        assert got.scale_to == 1
    assert got.decision
    assert len(got.decision) <= MAX_DECISION
