"""The simulator (queue + pods + operator + HPA model) and ``shoal simulate``."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner
from typer.testing import Result as CliResult

from shoal_api.scaling import ScalingPolicySpec
from shoal_cli.cli import app
from shoal_core.autoscale.simulate import (
    DEFAULT_START,
    Step,
    TraceError,
    parse_trace,
    simulate,
    summarize,
)

REPO = Path(__file__).resolve().parents[2]


def spec(**fields: Any) -> ScalingPolicySpec:
    return ScalingPolicySpec.model_validate(
        {"targetRef": {"name": "triage"}, "maxReplicas": 20, **fields}
    )


def flat(seconds: int, rate: float, start: int = 0) -> list[tuple[float, float]]:
    return [(float(t), rate) for t in range(start, start + seconds)]


def first(steps: list[Step], at_or_after: int, pred: Any) -> int:
    return next(s.t for s in steps if s.t >= at_or_after and pred(s))


def test_a_burst_scales_up_then_down_to_min_then_to_zero() -> None:
    policy = spec(minReplicas=0, cooldownSeconds=600)
    trace = flat(60, 0) + flat(300, 40.0, 60) + flat(1800, 0, 360)
    steps = simulate(policy, trace, per_replica_rate=5.0)

    assert len(steps) == 2160
    assert all(s.replicas == 0 for s in steps[:60])
    assert steps[60].replicas >= 1
    assert steps[60].event is not None
    assert steps[60].event.startswith("operator 0 -> 1: queue lag 40 >= activation 1")
    peak = max(s.replicas for s in steps)
    assert 8 <= peak <= 20  # 40 tasks/s needs 8 replicas of 5 tasks/s
    # The backlog of the burst drains.
    idle_from = first(steps, 360, lambda s: s.lag == 0)
    assert all(s.lag == 0 for s in steps[idle_from:])
    # The HPA brings it back to its minimum (1) before the cooldown takes it to 0 ...
    back_at_min = first(steps, idle_from, lambda s: s.replicas == 1)
    zero_at = first(steps, idle_from, lambda s: s.replicas == 0)
    assert back_at_min < zero_at
    # ... exactly cooldownSeconds after the queue went idle.
    assert zero_at == idle_from + 600
    assert (steps[zero_at].replicas, steps[zero_at].ready) == (0, 0)
    event = steps[zero_at].event
    assert event is not None
    assert "scaling to 0" in event

    summary = summarize(steps)
    assert summary.max_replicas == peak
    assert summary.seconds_at_zero == 60 + (2160 - zero_at)
    assert summary.final_lag == 0
    assert summary.tasks == 300 * 40
    assert summary.scale_events == sum(1 for s in steps if s.event) + sum(
        s.event.count("; then ") for s in steps if s.event
    )


def test_new_replicas_serve_after_the_startup_delay() -> None:
    steps = simulate(spec(minReplicas=0), flat(40, 20.0), 5.0, startup_seconds=12)
    assert steps[0].replicas >= 1
    assert all(s.ready == 0 for s in steps[:12])
    assert steps[12].ready >= 1
    # Nothing is served before then: the lag is everything that arrived.
    assert steps[11].lag == 12 * 20


def test_a_schedule_window_raises_the_floor() -> None:
    window = {"cron": "0 1 * * *", "durationMinutes": 30, "minReplicas": 4}
    steps = simulate(spec(schedule=[window]), flat(3 * 3600, 1.0), 5.0, start=DEFAULT_START)
    assert {s.hpa_min for s in steps[:3600]} == {1}
    assert {s.hpa_min for s in steps[3600:5400]} == {4}
    assert {s.hpa_min for s in steps[5400:]} == {1}
    assert steps[3599].replicas == 1
    # The HPA syncs every 15 s: at 3600 it goes straight to the new minimum.
    assert steps[3600].replicas == 4
    assert steps[3600].decision.endswith("(schedule 0 1 * * * (UTC) minReplicas 4)")
    assert all(s.replicas >= 4 for s in steps[3600:5400])
    # Afterwards the HPA takes it back down (after its 300 s stabilisation).
    assert steps[-1].replicas == 1


def test_the_schedule_follows_the_start_time() -> None:
    window = {"cron": "0 9 * * 1-5", "durationMinutes": 60, "minReplicas": 3}
    saturday = datetime(2026, 1, 10, 8, 30, tzinfo=UTC)
    monday = datetime(2026, 1, 5, 8, 30, tzinfo=UTC)
    trace = flat(3600, 0.5)
    assert max(s.hpa_min for s in simulate(spec(schedule=[window]), trace, 5.0, saturday)) == 1
    assert simulate(spec(schedule=[window]), trace, 5.0, monday)[1800].hpa_min == 3


def daily_bursts(days: int, day: int) -> list[tuple[float, float]]:
    """Quiet 0.5 tasks/s with a 5-minute burst of 30 tasks/s at 40 % of every day."""
    burst = range(int(day * 0.4), int(day * 0.4) + 300)
    return [(float(t), 30.0 if t % day in burst else 0.5) for t in range(days * day)]


def test_predictive_pre_warms_before_a_recurring_burst() -> None:
    day = 3600  # fake time: a one-hour "day" keeps the test fast
    trace = daily_bursts(4, day)
    on = spec(predictive={"enabled": True, "horizonSeconds": 300})
    off = spec()
    with_forecast = simulate(on, trace, 5.0, season_seconds=day)
    without = simulate(off, trace, 5.0, season_seconds=day)

    # Two "days" of history before the first forecast.
    assert all(s.forecast_rate is None for s in with_forecast[: 2 * day - 1])
    assert with_forecast[2 * day].forecast_rate is not None
    burst_start = 3 * day + int(day * 0.4)
    before = burst_start - 30
    assert without[before].replicas == 1
    # 30 tasks/s needs 6 replicas of 5 tasks/s: they are there before the burst.
    assert with_forecast[before].floor >= 5
    assert with_forecast[before].ready >= 5
    assert "forecast" in with_forecast[before].decision
    peak_lag = max(s.lag for s in with_forecast[burst_start : burst_start + 300])
    assert peak_lag < max(s.lag for s in without[burst_start : burst_start + 300]) / 2
    # After the burst the forecast lets go again.
    assert with_forecast[burst_start + 900].floor == 1


def test_predictive_says_nothing_within_the_first_two_seasons() -> None:
    on = spec(predictive={"enabled": True})
    steps = simulate(on, daily_bursts(1, 3600), 5.0)  # the default season is a day
    assert all(s.forecast_rate is None for s in steps)


def test_quota_caps_the_replicas() -> None:
    capped = spec(quota={"requestsPerMinute": 600})
    steps = simulate(capped, flat(600, 100.0), 5.0)  # 600 / (60 x 5) = 2
    assert max(s.replicas for s in steps) == 2
    assert {s.hpa_max for s in steps} == {2}


def test_the_hpa_alone_never_goes_to_zero() -> None:
    policy = spec(
        minReplicas=0,
        cooldownSeconds=0,
        schedule=[{"cron": "* * * * *", "durationMinutes": 60, "minReplicas": 9}],
    )
    steps = simulate(policy, flat(60, 10.0) + flat(900, 0, 60), 5.0, hpa_only=True)
    assert min(s.replicas for s in steps) == 1
    assert {s.hpa_min for s in steps} == {1}


def test_simulate_refuses_what_it_cannot_run() -> None:
    with pytest.raises(ValueError, match="per_replica_rate"):
        simulate(spec(), flat(10, 1.0), 0.0)
    with pytest.raises(ValueError, match="aware"):
        simulate(spec(), flat(10, 1.0), 5.0, datetime(2026, 1, 5))
    with pytest.raises(ValueError, match="t and arrivals"):
        simulate(spec(), [(0.0, -1.0)], 5.0)


@settings(max_examples=40, deadline=None)
@given(
    trace=st.lists(st.just(0.0) | st.floats(0, 200), min_size=1, max_size=400),
    min_replicas=st.integers(0, 3),
    max_extra=st.integers(0, 10),
    cooldown=st.integers(0, 120),
)
def test_simulation_invariants(
    trace: list[float], min_replicas: int, max_extra: int, cooldown: int
) -> None:
    policy = spec(
        minReplicas=min_replicas,
        maxReplicas=max(1, min_replicas + max_extra),
        cooldownSeconds=cooldown,
    )
    steps = simulate(policy, list(enumerate(trace)), 5.0)
    assert [s.t for s in steps] == list(range(len(trace)))
    for s in steps:
        assert 1 <= s.hpa_min <= s.hpa_max <= policy.max_replicas
        assert 0 <= s.ready <= s.replicas <= policy.max_replicas
        assert s.lag >= 0
        if min_replicas > 0:
            assert s.replicas >= 1


# --- traces ---


def test_parse_trace_t_arrivals() -> None:
    got = parse_trace("t,arrivals\n0,3\n# a comment\n\n5,2.5\n")
    assert got.points == [(0.0, 3.0), (5.0, 2.5)]
    assert got.start is None


def test_parse_trace_timestamp_rate_holds_each_rate_until_the_next_row() -> None:
    got = parse_trace("timestamp,rate\n100,2\n103,0\n104,7\n")
    assert got.points == [(0.0, 2.0), (1.0, 2.0), (2.0, 2.0), (3.0, 0.0), (4.0, 7.0)]
    iso = parse_trace("Timestamp, Rate\n2026-01-05T08:00:00Z,1\n2026-01-05T08:01:00Z,4\n")
    assert iso.start == datetime(2026, 1, 5, 8, tzinfo=UTC)
    assert len(iso.points) == 120
    assert iso.points[60] == (60.0, 4.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("time,count\n0,1\n", "header must be t,arrivals or timestamp,rate"),
        ("t,arrivals\n0,many\n", "line 2: arrivals 'many' is not a number"),
        ("t,arrivals\n0,-1\n", "line 2: arrivals must be a finite number >= 0"),
        ("t,arrivals\n0,1,2\n", "line 2: expected 2 columns"),
        ("t,arrivals\n9999999999,1\n", "31 days"),
        ("timestamp,rate\n5,1\n5,2\n", "line 3: timestamps must increase"),
        ("timestamp,rate\n5,1\n2026-01-05T00:00:00Z,2\n", "mixes"),
        ("timestamp,rate\nyesterday,1\n", "neither seconds nor ISO 8601"),
    ],
)
def test_parse_trace_errors(text: str, message: str) -> None:
    with pytest.raises(TraceError, match=message):
        parse_trace(text)


# --- the CLI ---

POLICY: dict[str, Any] = {
    "apiVersion": "shoal.dev/v1alpha1",
    "kind": "ScalingPolicy",
    "metadata": {"name": "triage"},
    "spec": {"targetRef": {"name": "triage"}, "minReplicas": 0, "maxReplicas": 10},
}
AGENT: dict[str, Any] = {
    "apiVersion": "shoal.dev/v1alpha1",
    "kind": "Agent",
    "metadata": {"name": "triage"},
}


def invoke(*args: str) -> CliResult:
    result = CliRunner().invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump_all([AGENT, POLICY]))
    trace = tmp_path / "load.csv"
    rows = [f"{t},{20 if 60 <= t < 180 else 0}" for t in range(600)]
    trace.write_text("t,arrivals\n" + "\n".join(rows) + "\n")
    return policy, trace


def test_cli_prints_a_summary(files: tuple[Path, Path]) -> None:
    policy, trace = files
    result = invoke("simulate", str(policy), "--trace", str(trace))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == (
        "ScalingPolicy triage: 10m 0s of load from 2026-01-05T00:00:00+00:00,"
        " 2,400 tasks at 5 tasks/s per replica"
    )
    # 0 for the first minute, and from 300 s after the queue emptied (at 180 s).
    assert lines[1:] == [
        "replicas: max 10, 8 scale events, at 0 for 3m 0s (30%), 1.0 replica-hours",
        "queue lag: max 270, 0 at the end",
    ]


def test_cli_json(files: tuple[Path, Path]) -> None:
    policy, trace = files
    result = invoke(
        "simulate", str(policy), "--trace", str(trace), "-o", "json", "--per-replica-rate", "10"
    )
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert body["policy"] == "triage"
    assert body["summary"]["seconds"] == 600
    # Twice the rate per replica drains the same burst with half the backlog.
    assert body["summary"]["max_lag"] == 120
    assert body["events"][0] == {
        "t": 60,
        "time": "2026-01-05T00:01:00+00:00",
        "replicas": 2,
        "event": "operator 0 -> 1: queue lag 20 >= activation 1 at 0 replicas; scaling to 1;"
        " then hpa 1 -> 2: queue lag 20 / target 10 per replica -> 2",
    }
    assert body["plot"] is None


def test_cli_writes_a_png(files: tuple[Path, Path], tmp_path: Path) -> None:
    policy, trace = files
    out = tmp_path / "plot.png"
    result = invoke("simulate", str(policy), "--trace", str(trace), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000


def test_cli_without_matplotlib(
    files: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy, trace = files
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "plot.png"
    result = invoke("simulate", str(policy), "--trace", str(trace), "--out", str(out))
    assert result.exit_code == 2
    assert "plotting needs matplotlib: pip install 'shoal-cli[simulate]'" in result.stderr
    assert not out.exists()


def test_cli_start_and_the_example(tmp_path: Path) -> None:
    result = invoke(
        "simulate",
        str(REPO / "examples/triage.yaml"),
        "--trace",
        str(REPO / "examples/load/daily.csv"),
        "--start",
        "2026-01-05T07:00:00Z",
        "--per-replica-rate",
        "2",
        "-o",
        "json",
    )
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert body["start"] == "2026-01-05T07:00:00+00:00"
    assert body["summary"]["seconds"] == 7200
    assert body["summary"]["max_replicas"] == 5  # the quota: 600 / (60 x 2)
    assert body["summary"]["seconds_at_zero"] > 0


@pytest.mark.parametrize(
    ("policy_text", "message"),
    [
        ("kind: [unclosed\n", "is not valid YAML"),
        (yaml.safe_dump(AGENT), "must hold one ScalingPolicy, found none"),
        (yaml.safe_dump_all([POLICY, POLICY]), "found triage, triage; pick one with --name"),
        (
            yaml.safe_dump({**POLICY, "spec": {"targetRef": {"name": "triage"}}}),
            "invalid ScalingPolicy triage spec.maxReplicas: Field required",
        ),
        (
            yaml.safe_dump(
                {
                    **POLICY,
                    "spec": {
                        **POLICY["spec"],
                        "schedule": [
                            {"cron": "0 25 * * *", "durationMinutes": 5, "minReplicas": 1}
                        ],
                    },
                }
            ),
            "invalid ScalingPolicy triage: cron '0 25 * * *' is not a valid cron expression",
        ),
        (
            yaml.safe_dump(
                {
                    **POLICY,
                    "spec": {**POLICY["spec"], "behavior": {"scaleUp": {"selectPolicy": "x"}}},
                }
            ),
            "behavior.scaleUp.selectPolicy must be Max, Min or Disabled",
        ),
    ],
)
def test_cli_bad_policy_exits_2(
    files: tuple[Path, Path], tmp_path: Path, policy_text: str, message: str
) -> None:
    _, trace = files
    policy = tmp_path / "bad.yaml"
    policy.write_text(policy_text)
    result = invoke("simulate", str(policy), "--trace", str(trace))
    assert result.exit_code == 2
    assert message in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trace", "/nonexistent/load.csv"], "cannot read /nonexistent/load.csv"),
        (["--start", "soon"], "--start 'soon' is not an ISO 8601 time"),
    ],
)
def test_cli_bad_input_exits_2(files: tuple[Path, Path], args: list[str], message: str) -> None:
    policy, trace = files
    full = ["simulate", str(policy), "--trace", str(trace), *args]
    result = invoke(*full)
    assert result.exit_code == 2
    assert message in result.stderr


def test_cli_bad_trace_exits_2(files: tuple[Path, Path], tmp_path: Path) -> None:
    policy, _ = files
    trace = tmp_path / "bad.csv"
    trace.write_text("when,how_many\n0,1\n")
    result = invoke("simulate", str(policy), "--trace", str(trace))
    assert result.exit_code == 2
    assert "the header must be t,arrivals or timestamp,rate" in result.stderr


def test_cli_picks_a_policy_by_name(files: tuple[Path, Path], tmp_path: Path) -> None:
    _, trace = files
    other = {**POLICY, "metadata": {"name": "other"}}
    policy = tmp_path / "two.yaml"
    policy.write_text(yaml.safe_dump_all([POLICY, other]))
    result = invoke("simulate", str(policy), "--trace", str(trace), "--name", "other")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("ScalingPolicy other:")
