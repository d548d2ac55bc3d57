"""Replays a load trace through a ScalingPolicy, one simulated second at a time.

The pieces are the ones a cluster has, in miniature:

- a queue: each second the trace's arrivals join it and the ready replicas take up to
  ``replicas x per_replica_rate`` tasks off it; its lag is pending + in flight;
- pods: a replica the Deployment gains becomes ready ``startup_seconds`` later; one it
  loses goes at once, the newest first (a ReplicaSet deletes unready, younger pods first);
- the operator: :func:`~shoal_core.autoscale.policy.plan` every second, with the schedule
  floor of the simulated wall clock and, with ``predictive.enabled``, a Holt-Winters
  forecast over the arrivals seen so far in one-minute buckets: the highest rate it
  expects within ``horizonSeconds`` (pre-warmed replicas must last through a burst, not
  only be there when the horizon ends);
- the HPA: :class:`~shoal_core.autoscale.hpa_model.HpaModel` every 15 s within the bounds
  the operator last set.

The forecast is refitted once per season and moved on one bucket a minute in between,
which is :func:`~shoal_core.autoscale.forecast.forecast` with its parameters held for a
season; refitting every minute would cost a day of history each simulated minute.
"""

from __future__ import annotations

import bisect
import csv
import io
import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from shoal_api.scaling import ScalingPolicySpec
from shoal_core.autoscale.forecast import HoltWinters, fit
from shoal_core.autoscale.hpa_model import SYNC_PERIOD_SECONDS, HpaModel, Readings
from shoal_core.autoscale.policy import Observation, plan
from shoal_core.autoscale.schedule import describe_window, next_boundary, schedule_floor

DEFAULT_START = datetime(2026, 1, 5, tzinfo=UTC)
"""A Monday, 00:00 UTC: where a trace without wall-clock times starts."""
DAY = 86400
MAX_TRACE_SECONDS = 31 * DAY
CPU_WINDOW_SECONDS = 30
"""CPU utilisation is averaged over this many seconds (metrics-server's window)."""
LATENCY_WINDOW_SECONDS = 60
"""The Latency metric is the p95 of this many seconds."""
"""Longest trace :func:`simulate` takes: a month at one-second resolution."""

_EPSILON = 1e-9


class TraceError(ValueError):
    """A trace that cannot be read; the message says where and why."""


@dataclass(frozen=True, slots=True)
class Trace:
    points: list[tuple[float, float]]
    """(seconds from the start, tasks arriving in that second)."""
    start: datetime | None
    """Wall-clock time of second 0, when the trace gives one."""


@dataclass(frozen=True, slots=True)
class Step:
    """The state at the end of one simulated second."""

    t: int
    """Seconds from the start."""
    arrivals: float
    """Tasks that arrived in this second."""
    lag: int
    """Pending + in flight, as the operator saw it."""
    replicas: int
    """The Deployment's spec.replicas."""
    ready: int
    """Replicas serving."""
    hpa_min: int
    hpa_max: int
    floor: int
    forecast_rate: float | None
    """Tasks/s the forecast expects at most within ``predictive.horizonSeconds``."""
    decision: str
    """The operator's decision (the HPA's reason when simulating the HPA alone)."""
    event: str | None = None
    """Who changed spec.replicas in this second, from what to what and why."""


@dataclass(frozen=True, slots=True)
class Summary:
    seconds: int
    tasks: float
    max_replicas: int
    max_lag: int
    final_lag: int
    seconds_at_zero: int
    scale_events: int
    replica_seconds: int
    """Sum of spec.replicas over the seconds: what the replicas cost."""


def simulate(
    spec: ScalingPolicySpec,
    trace: Sequence[tuple[float, float]],
    per_replica_rate: float,
    start: datetime = DEFAULT_START,
    *,
    startup_seconds: float = 5.0,
    service_seconds: float = 1.0,
    season_seconds: int = DAY,
    tokens_per_task: float | None = None,
    hpa_only: bool = False,
) -> list[Step]:
    """Replays ``trace`` (seconds from ``start``, tasks arriving in that second) through
    ``spec``; one :class:`Step` per second up to the trace's last second.

    ``per_replica_rate``: tasks/s one replica completes; ``service_seconds``: time one
    task takes once picked (the Latency metric adds the wait in the queue to it);
    ``season_seconds``: the period of the forecast's seasonality (a day; a trace needs two
    of them before the forecast says anything); ``hpa_only``: the HPA alone between
    ``max(1, minReplicas)`` and ``maxReplicas``, without the operator's schedule,
    forecast, quota or 0 <-> 1.

    Raises ValueError for arguments it cannot simulate.
    """
    if not per_replica_rate > 0 or not math.isfinite(per_replica_rate):
        raise ValueError("per_replica_rate must be a positive number")
    if startup_seconds < 0 or service_seconds < 0:
        raise ValueError("startup_seconds and service_seconds must be >= 0")
    if start.tzinfo is None or start.utcoffset() is None:
        raise ValueError("start must be an aware datetime (with a time zone)")
    season = season_seconds // 60
    if spec.predictive.enabled and not hpa_only and season < 2:
        raise ValueError("season_seconds must be at least 120 (two one-minute buckets)")
    arrivals = _per_second(trace)
    hpa = HpaModel(spec.metrics, spec.behavior)
    start_ts = start.timestamp()

    # The forecast's history: one bucket per minute, as far back as lookbackHours.
    buckets: deque[float] = deque(maxlen=max(spec.predictive.lookback_hours * 60, 2 * season))
    model: HoltWinters | None = None
    fitted_at = 0
    minute_sum = 0.0
    steps_ahead = max(1, math.ceil(spec.predictive.horizon_seconds / 60))
    predictive = spec.predictive.enabled and not hpa_only
    forecast_rate: float | None = None

    windows = () if hpa_only else spec.schedule
    schedule_min, schedule_why = 0, ""
    recheck_at: float = 0.0

    replicas = max(1, spec.min_replicas) if hpa_only else spec.min_replicas
    ready_at: list[float] = [0.0] * replicas  # pods, oldest first
    hpa_min = max(1, spec.min_replicas)
    hpa_max = spec.max_replicas
    floor = spec.min_replicas
    backlog = 0.0
    # CPU use as metrics-server reports it: an average over a window, not one second.
    cpu_window: deque[tuple[float, float]] = deque()
    busy = offered = 0.0
    # p95 over the last minute of per-second estimates (queue wait + service time).
    latencies: deque[float] = deque(maxlen=LATENCY_WINDOW_SECONDS)
    idle_since: float | None = None
    decision = ""
    steps: list[Step] = []

    for t, arriving in enumerate(arrivals):
        event: str | None = None
        backlog += arriving
        ready = bisect.bisect_right(ready_at, t)
        capacity = ready * per_replica_rate
        served = min(backlog, capacity)
        lag = _count(backlog)
        in_flight = _count(served)
        backlog = max(0.0, backlog - served)
        if capacity > 0:
            latencies.append(1000 * (backlog / capacity + service_seconds))
        cpu_window.append((served, capacity))
        busy += served
        offered += capacity
        if len(cpu_window) > CPU_WINDOW_SECONDS:
            old_served, old_capacity = cpu_window.popleft()
            busy -= old_served
            offered -= old_capacity
        if lag > 0:
            idle_since = None
        elif idle_since is None:
            idle_since = t

        if predictive:
            minute_sum += arriving
            if t % 60 == 59:
                buckets.append(minute_sum)
                minute_sum = 0.0
                minute = t // 60 + 1
                if len(buckets) >= 2 * season and (model is None or minute - fitted_at >= season):
                    model, fitted_at = fit(list(buckets), season), minute
                elif model is not None:
                    model.update(buckets[-1])
                if model is not None:
                    forecast_rate = max(0.0, model.peak(steps_ahead)) / 60

        if not hpa_only:
            if windows and t >= recheck_at:
                now = start + timedelta(seconds=t)
                schedule_min, window = schedule_floor(windows, now)
                schedule_why = describe_window(window) if window is not None else ""
                boundary = next_boundary(windows, now)
                recheck_at = math.inf if boundary is None else (boundary - start).total_seconds()
            p = plan(
                spec,
                Observation(
                    now=start_ts + t,
                    replicas=replicas,
                    lag=lag,
                    in_flight=in_flight,
                    idle_since=None if idle_since is None else start_ts + idle_since,
                    arrival_rate=arriving,
                    forecast_rate=forecast_rate,
                    per_replica_rate=per_replica_rate,
                    tokens_per_task=tokens_per_task,
                ),
                schedule_min,
                schedule_why,
            )
            hpa_min, hpa_max, floor, decision = p.hpa_min, p.hpa_max, p.floor, p.decision
            if p.scale_to is not None and p.scale_to != replicas:
                event = f"operator {replicas} -> {p.scale_to}: {p.decision}"
                replicas = _resize(ready_at, replicas, p.scale_to, t + startup_seconds)

        if t % SYNC_PERIOD_SECONDS == 0 and replicas > 0:
            result = hpa.reconcile(
                t,
                spec_replicas=replicas,
                min_replicas=hpa_min,
                max_replicas=hpa_max,
                readings=_readings(backlog + served, latencies, busy, offered),
                status_replicas=len(ready_at),
                ready_replicas=ready,
            )
            if hpa_only:
                decision = result.reason
            if result.replicas != replicas:
                by_hpa = f"hpa {replicas} -> {result.replicas}: {result.reason}"
                event = by_hpa if event is None else f"{event}; then {by_hpa}"
                replicas = _resize(ready_at, replicas, result.replicas, t + startup_seconds)

        steps.append(
            Step(
                t,
                arriving,
                lag,
                replicas,
                # Pods removed in this second no longer serve.
                min(ready, replicas),
                hpa_min,
                hpa_max,
                floor,
                forecast_rate,
                decision,
                event,
            )
        )
    return steps


def summarize(steps: Sequence[Step]) -> Summary:
    """Totals and extremes of a run."""
    return Summary(
        seconds=len(steps),
        tasks=sum(s.arrivals for s in steps),
        max_replicas=max((s.replicas for s in steps), default=0),
        max_lag=max((s.lag for s in steps), default=0),
        final_lag=steps[-1].lag if steps else 0,
        seconds_at_zero=sum(1 for s in steps if s.replicas == 0),
        scale_events=sum(1 + s.event.count("; then ") for s in steps if s.event is not None),
        replica_seconds=sum(s.replicas for s in steps),
    )


def parse_trace(text: str) -> Trace:
    """A CSV trace: header ``t,arrivals`` (seconds from the start, tasks arriving in that
    second; seconds not listed have none) or ``timestamp,rate`` (seconds or ISO 8601
    times, tasks/s from that time until the next row; the last row lasts as long as the
    gap before it). Blank lines and lines starting with ``#`` are skipped."""
    rows = [
        (n, row)
        for n, row in enumerate(csv.reader(io.StringIO(text)), start=1)
        if row and any(c.strip() for c in row) and not row[0].lstrip().startswith("#")
    ]
    if not rows:
        raise TraceError("the trace is empty; it needs a header t,arrivals or timestamp,rate")
    line, header = rows[0]
    columns = tuple(c.strip().lower() for c in header)
    if columns == ("t", "arrivals"):
        points = [(_number(row, 0, n, "t"), _number(row, 1, n, "arrivals")) for n, row in rows[1:]]
        for (n, _), (t, _) in zip(rows[1:], points, strict=True):
            if t > MAX_TRACE_SECONDS:
                raise TraceError(f"line {n}: t {t:g} is beyond the longest trace (31 days)")
        return Trace(points, None)
    if columns == ("timestamp", "rate"):
        return _rate_trace(rows[1:])
    raise TraceError(
        f"line {line}: the header must be t,arrivals or timestamp,rate, not {','.join(header)}"
    )


def _per_second(trace: Iterable[tuple[float, float]]) -> list[float]:
    arrivals: list[float] = []
    for t, n in trace:
        if not (math.isfinite(t) and math.isfinite(n)) or t < 0 or n < 0:
            raise ValueError(f"trace point ({t}, {n}): t and arrivals must be finite and >= 0")
        if t > MAX_TRACE_SECONDS:
            raise ValueError(f"trace point at {t:g} s is beyond the longest trace (31 days)")
        second = int(t)
        if second >= len(arrivals):
            arrivals.extend([0.0] * (second + 1 - len(arrivals)))
        arrivals[second] += n
    return arrivals


def _count(x: float) -> int:
    # Fractional tasks come from rate traces; a part of a task is a task waiting.
    return math.ceil(x - _EPSILON) if x > _EPSILON else 0


def _resize(ready_at: list[float], current: int, target: int, ready_time: float) -> int:
    if target > current:
        ready_at.extend([ready_time] * (target - current))
    else:
        del ready_at[target:]
    return target


def _readings(lag: float, latencies: deque[float], busy: float, offered: float) -> Readings:
    p95: float | None = None
    if latencies:
        ordered = sorted(latencies)
        p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
    return Readings(
        queue_lag=lag,
        latency_ms=p95,
        cpu_utilization=100 * busy / offered if offered > 0 else None,
    )


def _number(row: list[str], index: int, line: int, name: str) -> float:
    if len(row) != 2:
        raise TraceError(f"line {line}: expected 2 columns, got {len(row)}")
    try:
        value = float(row[index])
    except ValueError:
        raise TraceError(f"line {line}: {name} {row[index].strip()!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise TraceError(f"line {line}: {name} must be a finite number >= 0")
    return value


def _time(text: str, line: int) -> float | datetime:
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise TraceError(
            f"line {line}: timestamp {text!r} is neither seconds nor ISO 8601"
        ) from None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _rate_trace(rows: list[tuple[int, list[str]]]) -> Trace:
    if not rows:
        return Trace([], None)
    parsed = [(n, _number(row, 1, n, "rate"), _time(row[0], n)) for n, row in rows]
    first = parsed[0][2]
    times: list[float] = []
    rates: list[float] = []
    for n, rate, at in parsed:
        if isinstance(at, datetime) and isinstance(first, datetime):
            offset = (at - first).total_seconds()
        elif isinstance(at, float) and isinstance(first, float):
            offset = at - first
        else:
            raise TraceError(f"line {n}: mixes ISO 8601 times with seconds")
        if times and offset <= times[-1]:
            raise TraceError(f"line {n}: timestamps must increase")
        if offset > MAX_TRACE_SECONDS:
            raise TraceError(f"line {n}: beyond the longest trace (31 days)")
        times.append(offset)
        rates.append(rate)
    last_gap = times[-1] - times[-2] if len(times) > 1 else 1.0
    ends = [*times[1:], times[-1] + last_gap]
    points: list[tuple[float, float]] = []
    for begin, end, rate in zip(times, ends, rates, strict=True):
        # Whole seconds from the one the row starts in to the one the next row starts in.
        first_second, stop = math.ceil(begin - _EPSILON), math.ceil(end - _EPSILON)
        points.extend((float(t), rate) for t in range(first_second, max(stop, first_second + 1)))
    return Trace(points, first if isinstance(first, datetime) else None)
