"""``shoal simulate``: replay a load trace through a ScalingPolicy, offline (the pure
engines of :mod:`shoal_core.autoscale`), optionally plotting it (:mod:`shoal_cli.simulate_plot`)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer
import yaml
from pydantic import ValidationError

from shoal_api.scaling import ScalingPolicySpec
from shoal_cli.commands.common import (
    Exit,
    Output,
    app,
    err,
    fail,
)
from shoal_cli.run_view import duration as _duration
from shoal_cli.run_view import to_json as _json
from shoal_cli.simulate_plot import plot
from shoal_core.autoscale import simulate as sim
from shoal_core.autoscale.hpa_model import parse_behavior
from shoal_core.autoscale.schedule import validate_window


def read_trace(path: Path) -> sim.Trace:
    """:func:`~shoal_core.autoscale.simulate.parse_trace` of a file; TraceError when it
    cannot be read."""
    try:
        return sim.parse_trace(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or exc
        raise sim.TraceError(f"cannot read {path}: {why}") from None


def _load_policy(path: Path, name: str | None) -> tuple[str, ScalingPolicySpec]:
    """The ScalingPolicy in ``path`` (which may hold other documents too), validated."""
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except (OSError, UnicodeDecodeError) as exc:
        fail(Exit.USAGE, f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}")
    except yaml.YAMLError as exc:
        fail(Exit.USAGE, f"{path} is not valid YAML: {exc}")
    policies = [d for d in docs if isinstance(d, dict) and d.get("kind") == "ScalingPolicy"]
    names = [str((p.get("metadata") or {}).get("name", "")) for p in policies]
    if name is not None:
        policies = [p for p, n in zip(policies, names, strict=True) if n == name]
        names = [name] * len(policies)
    if len(policies) != 1:
        found = ", ".join(n or "(unnamed)" for n in names) or "none"
        which = f" named {name}" if name is not None else ""
        hint = "; pick one with --name" if len(policies) > 1 else ""
        fail(Exit.USAGE, f"{path} must hold one ScalingPolicy{which}, found {found}{hint}")
    where = f"ScalingPolicy {names[0]}" if names[0] else "ScalingPolicy"
    try:
        spec = ScalingPolicySpec.model_validate(policies[0].get("spec"))
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in ("spec", *first["loc"]))
        fail(Exit.USAGE, f"invalid {where} {field}: {first['msg']}")
    problems = [p for p in map(validate_window, spec.schedule) if p is not None]
    try:
        parse_behavior(spec.behavior)
    except ValueError as exc:
        problems.append(str(exc))
    if problems:
        fail(Exit.USAGE, f"invalid {where}: {'; '.join(problems)}")
    return names[0], spec


def _parse_start(text: str) -> datetime:
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        fail(Exit.USAGE, f"--start {text!r} is not an ISO 8601 time (e.g. 2026-01-05T00:00:00Z)")
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


@app.command("simulate")
def simulate_cmd(
    policy: Annotated[
        Path,
        typer.Argument(
            metavar="POLICY.yaml", help="YAML with the ScalingPolicy (other documents are skipped)."
        ),
    ],
    trace: Annotated[
        Path,
        typer.Option(
            "--trace",
            metavar="LOAD.csv",
            help="CSV: t,arrivals (seconds from the start, tasks that second)"
            " or timestamp,rate (seconds or ISO 8601, tasks/s until the next row).",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            metavar="PLOT.png",
            help="Write a PNG with the three charts here.",
            show_default=False,
        ),
    ] = None,
    per_replica_rate: Annotated[
        float, typer.Option(min=0.001, help="Tasks/s one replica completes.")
    ] = 5.0,
    start: Annotated[
        str | None,
        typer.Option(
            help="Wall-clock time of the trace's first second, for the schedule."
            " Default: the trace's first ISO 8601 time, else 2026-01-05T00:00:00Z (a Monday).",
            show_default=False,
        ),
    ] = None,
    startup_seconds: Annotated[
        float, typer.Option(min=0, help="Seconds from a new replica to serving.")
    ] = 5.0,
    season_seconds: Annotated[
        int,
        typer.Option(
            min=120, help="Period of the forecast's seasonality; it needs two of them of history."
        ),
    ] = sim.DAY,
    tokens_per_task: Annotated[
        float | None,
        typer.Option(min=0, help="Tokens per task, for quota.tokensPerMinute.", show_default=False),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(
            help="The ScalingPolicy to take when the file has several.", show_default=False
        ),
    ] = None,
    output: Annotated[Output, typer.Option("--output", "-o")] = Output.text,
) -> None:
    """Replay a load trace through a ScalingPolicy: the operator's decisions each second and a
    model of the HPA every 15 s. Offline: needs no cluster and no NATS."""
    policy_name, spec = _load_policy(policy, name)
    try:
        loaded = read_trace(trace)
    except sim.TraceError as exc:
        fail(Exit.USAGE, f"{trace}: {exc}")
    if not loaded.points:
        fail(Exit.USAGE, f"{trace}: the trace has no rows after its header")
    begin = _parse_start(start) if start else loaded.start or sim.DEFAULT_START
    try:
        steps = sim.simulate(
            spec,
            loaded.points,
            per_replica_rate,
            begin,
            startup_seconds=startup_seconds,
            season_seconds=season_seconds,
            tokens_per_task=tokens_per_task,
        )
    except ValueError as exc:
        fail(Exit.USAGE, str(exc))
    summary = sim.summarize(steps)
    if out is not None:
        try:
            plot(steps, begin, out, title=f"ScalingPolicy {policy_name}".strip())
        except ImportError as exc:
            fail(Exit.USAGE, str(exc))
        except OSError as exc:
            fail(Exit.USAGE, f"cannot write {out}: {exc.strerror or exc}")

    events = [
        {
            "t": s.t,
            "time": (begin + timedelta(seconds=s.t)).isoformat(),
            "replicas": s.replicas,
            "event": s.event,
        }
        for s in steps
        if s.event is not None
    ]
    if output is Output.json:
        typer.echo(
            _json(
                {
                    "policy": policy_name,
                    "start": begin.isoformat(),
                    "summary": dataclasses.asdict(summary),
                    "events": events,
                    "plot": str(out) if out is not None else None,
                }
            )
        )
        return
    at_zero = summary.seconds_at_zero / summary.seconds if summary.seconds else 0.0
    label = f"ScalingPolicy {policy_name}" if policy_name else "the ScalingPolicy"
    typer.echo(
        f"{label}: {_duration(summary.seconds)} of load from {begin.isoformat()},"
        f" {summary.tasks:,.0f} tasks at {per_replica_rate:g} tasks/s per replica"
    )
    typer.echo(
        f"replicas: max {summary.max_replicas}, {summary.scale_events} scale events,"
        f" at 0 for {_duration(summary.seconds_at_zero)} ({at_zero:.0%}),"
        f" {summary.replica_seconds / 3600:.1f} replica-hours"
    )
    typer.echo(f"queue lag: max {summary.max_lag}, {summary.final_lag} at the end")
    if spec.predictive.enabled and all(s.forecast_rate is None for s in steps):
        err.print(
            f"predictive: no forecast; it needs {_duration(2 * season_seconds)} of history"
            " (two seasons, see --season-seconds)"
        )
    if out is not None:
        err.print(f"plot written to {out}")
