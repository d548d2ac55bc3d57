"""Additive Holt-Winters forecast of an evenly spaced series (arrivals per minute).

Pure Python on purpose: statsmodels would bring numpy, scipy, pandas and patsy (well over
100 MB) into the operator image for one small recursion, and its optimiser's running
time depends on the data. Here the smoothing parameters come from a fixed grid, so a fit
costs ``len(GRID) * len(history)`` steps of the recursion, whatever the data.

The model (Hyndman & Athanasopoulos, *Forecasting: Principles and Practice*, 8.3)::

    level_t    = alpha (x_t - season_{t-m}) + (1 - alpha) (level_{t-1} + trend_{t-1})
    trend_t    = beta (level_t - level_{t-1}) + (1 - beta) trend_{t-1}
    season_t   = gamma (x_t - level_t) + (1 - gamma) season_{t-m}
    x_{t+h|t}  = level_t + h trend_t + season_{t+h-m(k+1)}

initialised from the first two seasons; the grid point with the smallest sum of squared
one-step errors wins.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

ALPHAS = (0.05, 0.2, 0.5, 0.8)
BETAS = (0.0, 0.02, 0.1)
GAMMAS = (0.05, 0.2, 0.5)
GRID: tuple[tuple[float, float, float], ...] = tuple(itertools.product(ALPHAS, BETAS, GAMMAS))
"""(alpha, beta, gamma) candidates: 36 recursions over the history per fit."""


@dataclass
class HoltWinters:
    """A fitted model: smoothing parameters and the state after the last sample.

    :meth:`update` moves it one sample on without refitting, so a caller that gets one
    sample a minute can refit now and then (say once a season) and update in between.
    """

    alpha: float
    beta: float
    gamma: float
    season_length: int
    level: float
    trend: float
    seasonals: list[float] = field(repr=False)
    """One per phase; ``seasonals[phase]`` is the estimate for the next sample in that phase."""
    phase: int = 0
    """Position within the season of the next sample."""
    sse: float = 0.0
    """Sum of squared one-step errors over the fitted history."""

    def update(self, x: float) -> None:
        """Takes the next sample into the state."""
        m, p = self.season_length, self.phase
        season = self.seasonals[p]
        prev_level = self.level
        self.level = self.alpha * (x - season) + (1 - self.alpha) * (prev_level + self.trend)
        self.trend = self.beta * (self.level - prev_level) + (1 - self.beta) * self.trend
        self.seasonals[p] = self.gamma * (x - self.level) + (1 - self.gamma) * season
        self.phase = (p + 1) % m

    def predict(self, steps_ahead: int) -> float:
        """The value ``steps_ahead`` samples after the last one (1 = the next sample)."""
        if steps_ahead < 1:
            raise ValueError("steps_ahead must be >= 1")
        phase = (self.phase + steps_ahead - 1) % self.season_length
        return self.level + steps_ahead * self.trend + self.seasonals[phase]

    def peak(self, steps_ahead: int) -> float:
        """The highest of the next ``steps_ahead`` values: what pre-warming must be ready
        for at any time within the horizon, not only at its end."""
        return max(self.predict(h) for h in range(1, steps_ahead + 1))


def fit(history: Sequence[float], season_length: int) -> HoltWinters | None:
    """The best model on the grid for ``history`` (oldest first); None with fewer than
    two seasons of samples."""
    if season_length < 2:
        raise ValueError("season_length must be >= 2")
    m = season_length
    if len(history) < 2 * m:
        return None
    xs = [float(x) for x in history]
    first = sum(xs[:m]) / m
    second = sum(xs[m : 2 * m]) / m
    trend0 = (second - first) / m
    # Each season's mean sits at its middle; the trend moves the level within it.
    seasonals0 = [
        ((xs[i] - first) + (xs[m + i] - second)) / 2 - trend0 * (i - (m - 1) / 2) for i in range(m)
    ]
    # The level the recursion starts from is the one at the end of the first season:
    # its mean sits in the middle of it.
    level0 = first + trend0 * (m - 1) / 2

    best: HoltWinters | None = None
    for alpha, beta, gamma in GRID:
        model = HoltWinters(alpha, beta, gamma, m, level0, trend0, list(seasonals0))
        sse = _run(model, xs, m, best.sse if best is not None else None)
        if sse is not None and (best is None or sse < best.sse):
            model.sse = sse
            best = model
    return best


def forecast(history: Sequence[float], season_length: int, steps_ahead: int) -> float | None:
    """The value ``steps_ahead`` samples after the last of ``history`` (evenly spaced,
    oldest first), never below 0; None with fewer than two seasons of history."""
    if steps_ahead < 1:
        raise ValueError("steps_ahead must be >= 1")
    model = fit(history, season_length)
    return None if model is None else max(0.0, model.predict(steps_ahead))


def _run(
    model: HoltWinters, xs: list[float], start: int, give_up_above: float | None
) -> float | None:
    """Runs the recursion over ``xs[start:]`` into ``model``; the one-step SSE, or None once
    it exceeds ``give_up_above`` (that candidate cannot win)."""
    # The same recursion as HoltWinters.update, inlined: this loop is the whole cost of a fit.
    a, b, g, m = model.alpha, model.beta, model.gamma, model.season_length
    level, trend, seasonals = model.level, model.trend, model.seasonals
    sse = 0.0
    for t in range(start, len(xs)):
        x = xs[t]
        p = t % m
        season = seasonals[p]
        error = x - (level + trend + season)
        sse += error * error
        prev = level
        level = a * (x - season) + (1 - a) * (prev + trend)
        trend = b * (level - prev) + (1 - b) * trend
        seasonals[p] = g * (x - level) + (1 - g) * season
        if give_up_above is not None and sse >= give_up_above and (t & 255) == 0:
            return None
    model.level, model.trend = level, trend
    model.phase = len(xs) % m
    return sse
