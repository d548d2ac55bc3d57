"""``shoal simulate`` speed: a 24 h trace at one-second resolution (86,400 steps).

Three runs of the same trace and policy, alternated round by round in one invocation so
that the ratios compare like with like on a noisy machine:

- baseline: the HPA model alone (``hpa_only``): the queue, the pods and an HPA sync every
  15 s, as if no operator existed;
- shoal: the operator's ``plan()`` every second on top, with a weekday schedule window
  and prediction on (a daily season: a 24 h trace never has the two days of history a
  forecast needs, so this is the cost of the policy logic itself);
- shoal + forecast: the same with an hourly season, so that Holt-Winters forecasts from
  the second hour on (refitted once an hour, moved on each minute).

Also timed: one ``forecast()`` over a week of per-minute history with a daily season,
the call the operator makes for a policy with the default ``lookbackHours`` (168).

Writes bench/results/simulator.json and bench/results/simulator.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

import results_meta

from shoal_api.scaling import ScalingPolicySpec
from shoal_core.autoscale.forecast import GRID, forecast
from shoal_core.autoscale.simulate import DEFAULT_START, Step, simulate, summarize

REPO = Path(__file__).resolve().parents[1]
DAY = 86400
PER_REPLICA_RATE = 5.0
GOAL_SECONDS = 10.0
"""A day at 1 s should replay "in seconds"."""

POLICY = ScalingPolicySpec.model_validate(
    {
        "targetRef": {"name": "triage"},
        "minReplicas": 0,
        "maxReplicas": 30,
        "metrics": [
            {"type": "QueueLag", "target": 10},
            {"type": "Latency", "targetMillis": 2000},
            {"type": "CPU", "targetUtilizationPercent": 70},
        ],
        "cooldownSeconds": 300,
        "schedule": [
            {"cron": "0 8 * * 1-5", "durationMinutes": 600, "minReplicas": 3, "timeZone": "UTC"}
        ],
        "predictive": {"enabled": True, "horizonSeconds": 300},
    }
)


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def day_trace(seed: int = 6) -> list[tuple[float, float]]:
    """A working day: quiet night, a morning ramp, a lunch dip, three 4-minute bursts and
    a small spike at the top of every hour; Poisson arrivals each second."""
    rng = random.Random(seed)

    def rate(t: int) -> float:
        hour = t / 3600
        base = 0.2 + 7.0 * math.exp(-(((hour - 11.0) / 3.0) ** 2))
        base += 4.0 * math.exp(-(((hour - 15.5) / 2.0) ** 2))
        if 12.5 <= hour < 13.25:
            base *= 0.5
        if t % 3600 < 120:
            base += 6.0
        if any(start <= t < start + 240 for start in (9 * 3600, 14 * 3600 + 900, 20 * 3600)):
            base += 40.0
        return base

    return [(float(t), float(_poisson(rng, rate(t)))) for t in range(DAY)]


def _poisson(rng: random.Random, lam: float) -> int:
    if lam > 30:
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


RUNS: dict[str, tuple[str, dict[str, Any]]] = {
    "baseline": ("HPA model alone", {"hpa_only": True}),
    "shoal": ("operator plan() every second + HPA model", {}),
    "shoal_forecast": (
        "the same + Holt-Winters forecast (hourly season)",
        {"season_seconds": 3600},
    ),
}


def timed(fn: Callable[[], list[Step]]) -> tuple[float, list[Step]]:
    t0 = time.perf_counter()
    steps = fn()
    return time.perf_counter() - t0, steps


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("shoal", "pydantic", "croniter"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "?"
    return out


def render(doc: dict[str, Any]) -> str:
    runs = doc["runs"]
    base = runs["baseline"]["median_seconds"]
    lines = [
        f"`shoal simulate` on a 24 h trace at 1 s resolution ({doc['steps']:,} steps,"
        f" {doc['tasks']:,} tasks), median of {doc['rounds']} alternated rounds, one"
        f" invocation, {doc['cores']} cores, Python {doc['versions']['python']} (1-minute load"
        f" average {doc['load_average_1m']['start']:.2f} at the start,"
        f" {doc['load_average_1m']['end']:.2f} at the end).",
        "",
        "| run | what runs | median (s) | min (s) | µs per simulated second | vs baseline |"
        " max replicas | max lag | scale events |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, run in runs.items():
        lines.append(
            f"| {key} | {run['what']} | {run['median_seconds']:.3f} | {run['min_seconds']:.3f}"
            f" | {run['median_seconds'] / doc['steps'] * 1e6:.1f}"
            f" | {run['median_seconds'] / base:.2f}x | {run['summary']['max_replicas']}"
            f" | {run['summary']['max_lag']} | {run['summary']['scale_events']} |"
        )
    fc = doc["forecast_week"]
    worst = max(r["median_seconds"] for r in runs.values())
    lines += [
        "",
        f"One `forecast()` over a week of per-minute history (10,080 samples, daily season,"
        f" {len(GRID)} grid points): median {fc['median_ms']:.0f} ms of {fc['rounds']}.",
        "",
        "| goal | target | measured | met |",
        "| --- | --- | --- | --- |",
        f"| 24 h at 1 s, slowest run | <= {GOAL_SECONDS:.0f} s | {worst:.2f} s |"
        f" {'met' if worst <= GOAL_SECONDS else 'missed'} |",
        "",
        "Method: the trace is synthetic (seeded): a quiet night, a morning ramp, a lunch dip,"
        " three 4-minute bursts of +40 tasks/s and a 2-minute spike at the top of every hour,"
        " Poisson arrivals each second. The policy: minReplicas 0, maxReplicas 30, QueueLag 10"
        " + Latency 2000 ms + CPU 70 %, a weekday window 08:00-18:00 UTC with minReplicas 3,"
        f" prediction on; {PER_REPLICA_RATE:g} tasks/s per replica, replicas ready 5 s after"
        " they are added. The trace starts on Monday 2026-01-05 00:00 UTC. Every run replays"
        " the whole trace through `shoal_core.autoscale.simulate.simulate()` (what"
        " `shoal simulate` runs, without reading the CSV or plotting).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    results_meta.start()

    load_start = os.getloadavg()[0]
    trace = day_trace()
    log(f"trace: {len(trace):,} seconds, {sum(n for _, n in trace):,.0f} tasks")
    seconds: dict[str, list[float]] = {key: [] for key in RUNS}
    last: dict[str, list[Step]] = {}
    wall = time.perf_counter()
    for round_ in range(args.rounds):
        for key, (_, kwargs) in RUNS.items():
            elapsed, steps = timed(
                partial(simulate, POLICY, trace, PER_REPLICA_RATE, DEFAULT_START, **kwargs)
            )
            seconds[key].append(elapsed)
            last[key] = steps
            log(f"round {round_ + 1}: {key} {elapsed:.3f} s")

    week = [float(n) for n in _minute_buckets(trace)] * 7
    fc_ms = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        forecast(week, 1440, 5)
        fc_ms.append((time.perf_counter() - t0) * 1000)
    log(f"forecast over a week of minutes: {statistics.median(fc_ms):.0f} ms")

    doc: dict[str, Any] = results_meta.stamp_json(
        {
            "steps": len(trace),
            "tasks": int(sum(n for _, n in trace)),
            "rounds": args.rounds,
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "versions": versions(),
            "wall_seconds": time.perf_counter() - wall,
            "load_average_1m": {"start": load_start, "end": os.getloadavg()[0]},
            "per_replica_rate": PER_REPLICA_RATE,
            "runs": {
                key: {
                    "what": RUNS[key][0],
                    "seconds": seconds[key],
                    "median_seconds": statistics.median(seconds[key]),
                    "min_seconds": min(seconds[key]),
                    "ratio_to_baseline": statistics.median(seconds[key])
                    / statistics.median(seconds["baseline"]),
                    "summary": dataclasses.asdict(summarize(last[key])),
                    "forecasts": sum(1 for s in last[key] if s.forecast_rate is not None),
                }
                for key in RUNS
            },
            "forecast_week": {
                "samples": len(week),
                "rounds": args.rounds,
                "median_ms": statistics.median(fc_ms),
                "ms": fc_ms,
            },
            "goal_seconds": GOAL_SECONDS,
        }
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "simulator.json").write_text(json.dumps(doc, indent=2) + "\n")
    table = results_meta.stamp_markdown(render(doc))
    (args.out / "simulator.md").write_text(table)
    print(table)


def _minute_buckets(trace: list[tuple[float, float]]) -> list[float]:
    buckets = [0.0] * (len(trace) // 60)
    for t, n in trace:
        if int(t) // 60 < len(buckets):
            buckets[int(t) // 60] += n
    return buckets


if __name__ == "__main__":
    main()
