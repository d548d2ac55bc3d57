"""Holt-Winters forecast of arrivals: it learns a season, says nothing without two of
them, and never forecasts negative load."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal_core.autoscale.forecast import ALPHAS, BETAS, GAMMAS, fit, forecast

M = 24


def seasonal(
    n: int, level: float = 20.0, amplitude: float = 8.0, slope: float = 0.0
) -> list[float]:
    return [level + slope * t + amplitude * math.sin(2 * math.pi * t / M) for t in range(n)]


@pytest.mark.parametrize("slope", [0.0, 0.05])
@pytest.mark.parametrize("steps", [1, 6, 13, 24])
def test_recovers_a_clean_seasonal_series(slope: float, steps: int) -> None:
    n = 5 * M
    history = seasonal(n, slope=slope)
    truth = seasonal(n + steps, slope=slope)[-1]
    got = forecast(history, M, steps)
    assert got is not None
    assert got == pytest.approx(truth, abs=0.3)


def test_learns_a_recurring_burst() -> None:
    # Quiet minutes with a burst at phase 18..20 of every season, and the next one is due.
    history = [60.0 if 18 <= t % M <= 20 else 2.0 for t in range(3 * M + 15)]
    assert forecast(history, M, 4) == pytest.approx(60.0, abs=3)  # phase 18
    assert forecast(history, M, 1) == pytest.approx(2.0, abs=3)  # phase 15


def test_none_with_less_than_two_seasons() -> None:
    history = seasonal(2 * M)
    assert forecast(history[:-1], M, 1) is None
    assert fit(history[:-1], M) is None
    assert forecast(history, M, 1) is not None
    assert forecast([], M, 1) is None


def test_clamps_at_zero() -> None:
    # A steep decline: the trend alone would take the forecast below zero.
    history = [max(0.0, 100.0 - 2.0 * t) for t in range(3 * M)]
    model = fit(history, M)
    assert model is not None
    assert model.predict(24) < 0
    assert forecast(history, M, 24) == 0.0


def test_the_fit_picks_from_the_grid_and_update_moves_it_on() -> None:
    history = seasonal(4 * M)
    model = fit(history, M)
    assert model is not None
    assert (model.alpha, model.beta, model.gamma) in {
        (a, b, g) for a in ALPHAS for b in BETAS for g in GAMMAS
    }
    assert model.phase == len(history) % M
    nxt = seasonal(4 * M + 1)[-1]
    before = model.predict(2)
    model.update(nxt)
    assert model.phase == (len(history) + 1) % M
    assert model.predict(1) == pytest.approx(before, abs=0.3)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="season_length"):
        forecast(seasonal(10), 1, 1)
    with pytest.raises(ValueError, match="steps_ahead"):
        forecast(seasonal(3 * M), M, 0)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.floats(min_value=0, max_value=1e4, allow_nan=False), min_size=0, max_size=80),
    st.integers(min_value=2, max_value=12),
    st.integers(min_value=1, max_value=30),
)
def test_never_negative_and_none_only_when_short(
    history: list[float], season: int, steps: int
) -> None:
    got = forecast(history, season, steps)
    if len(history) < 2 * season:
        assert got is None
    else:
        assert got is not None
        assert got >= 0
        assert math.isfinite(got)
