"""The ``shoal`` command line: submit tasks, wait for results, list and replay dead letters,
replay a load trace through a ScalingPolicy (``shoal simulate``, offline).

One typer app with a sub-app per noun (``shoal dlq ...``); verbs on tasks sit at the top
(``shoal submit``). A later command is a function on ``app`` or a new sub-app added the
same way as ``dlq_app``, using :func:`_run` so that it shares the exit codes and the
one-line error reporting.

Exit codes: 0 done, 1 the task was dead-lettered, 2 bad usage or input, 3 NATS
unreachable or Shoal's streams missing, 4 no result within ``--timeout``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import nats.errors
import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from shoal_api.autoscale import simulate as sim
from shoal_api.autoscale.hpa_model import parse_behavior
from shoal_api.autoscale.schedule import validate_window
from shoal_api.envelope import DeadLetter, Result, Task, new_task_id, to_dict
from shoal_api.scaling import ScalingPolicySpec
from shoal_runtime.client import (
    URL_ENV,
    ReplayReport,
    ResultTimeoutError,
    ShoalClient,
    ShoalConnectionError,
    ShoalError,
    StreamsMissingError,
    check_name,
)

T = TypeVar("T")


class Exit(enum.IntEnum):
    OK = 0
    DEAD_LETTERED = 1
    USAGE = 2
    UNAVAILABLE = 3
    TIMEOUT = 4
    INTERRUPTED = 130


class Output(enum.StrEnum):
    text = "text"
    json = "json"


class ListOutput(enum.StrEnum):
    table = "table"
    json = "json"


app = typer.Typer(
    name="shoal",
    help="Submit tasks to Shoal Agents and look after what could not be done.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
dlq_app = typer.Typer(
    help="Dead-lettered tasks: list them, replay them.",
    no_args_is_help=True,
)
app.add_typer(dlq_app, name="dlq")

NatsOpt = Annotated[
    str | None,
    typer.Option("--nats", envvar=URL_ENV, help="NATS URL.", show_default=False),
]
NamespaceOpt = Annotated[
    str,
    typer.Option("--namespace", "-n", envvar="SHOAL_NAMESPACE", help="Namespace of the Agents."),
]

# Informational lines go to stderr so that stdout carries only what a script consumes.
err = Console(stderr=True, highlight=False, soft_wrap=True)
# Piped output (scripts, CI logs, `make demo`) gets whole lines, like kubectl's tables.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)


def _fail(code: Exit, message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _run(fn: Callable[[ShoalClient], Awaitable[T]], nats_url: str | None) -> T:
    """Runs ``fn`` with a connected client; expected failures become one line on stderr
    and their exit code."""

    async def main() -> T:
        client = await ShoalClient.connect(nats_url)
        try:
            return await fn(client)
        finally:
            await client.close()

    try:
        return asyncio.run(main())
    except (ShoalConnectionError, StreamsMissingError) as exc:
        _fail(Exit.UNAVAILABLE, str(exc))
    except ResultTimeoutError as exc:
        _fail(Exit.TIMEOUT, f"{exc} (it may still be queued or running)")
    except ShoalError as exc:
        _fail(Exit.UNAVAILABLE, str(exc))
    except nats.errors.Error as exc:
        # NATS went away mid-command (a request timed out, the connection closed).
        _fail(Exit.UNAVAILABLE, f"NATS: {exc or type(exc).__name__}")
    except KeyboardInterrupt:
        # click would report "Aborted!" with exit code 1, which means dead-lettered here.
        _fail(Exit.INTERRUPTED, "interrupted")


def _check_names(namespace: str, agent: str | None) -> None:
    try:
        check_name("namespace", namespace)
        if agent is not None:
            check_name("agent", agent)
    except ValueError as exc:
        _fail(Exit.USAGE, str(exc))


def _read_input(spec: str | None) -> Any:
    """``--input``: JSON text, ``@file`` with JSON, or ``-`` for JSON on stdin."""
    if spec is None:
        return None
    where = "--input"
    if spec == "-":
        text, where = typer.get_text_stream("stdin").read(), "stdin"
    elif spec.startswith("@"):
        path = Path(spec[1:])
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            _fail(Exit.USAGE, f"cannot read input file {path}: {getattr(exc, 'strerror', exc)}")
        where = str(path)
    else:
        text = spec
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        hint = "" if spec.startswith(("@", "-")) else " (a string needs quotes: '\"text\"')"
        _fail(Exit.USAGE, f"{where} is not valid JSON: {exc}{hint}")


def describe(result: Result, submitted_to: str) -> str:
    """Where a task went, in one line: who served it, from whom it was passed on and why."""
    if result.hops:
        after = "".join(
            f" after {h.reason} from {h.agent}" + (f" ({h.detail})" if h.detail else "")
            for h in result.hops
        )
    else:
        via = [a for a in result.path[:-1] if a != result.agent] if result.path else []
        if not via and result.agent != submitted_to:
            via = [submitted_to]
        after = f" after {' -> '.join(via)} passed it on" if via else ""
    # Each Agent on the path spent at least one attempt; more than that were retries.
    tries = f" in {result.attempts} attempts" if result.attempts > max(1, len(result.path)) else ""
    if result.status == "Succeeded":
        how = "cached result of" if result.cached else "served by"
        return f"succeeded: {how} {result.agent}{after}{tries}"
    what = f"{result.reason}: {result.message}" if result.reason else (result.message or "")
    return f"dead-lettered by {result.agent}{after}{tries}: {what}"


def _age(at: float) -> str:
    seconds = max(0, int(time.time() - at))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _truncate(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


@app.command()
def submit(
    agent: Annotated[str, typer.Argument(help="The Agent to send the task to.")],
    namespace: NamespaceOpt = "default",
    input: Annotated[
        str | None,
        typer.Option(
            "--input",
            "-i",
            help="Task input: JSON text, @FILE with JSON, or - to read JSON from stdin.",
            show_default=False,
        ),
    ] = None,
    priority: Annotated[int, typer.Option(min=0, max=9, help="0 (lowest) to 9.")] = 5,
    task_id: Annotated[
        str | None,
        typer.Option(
            "--id",
            help="Task id (idempotency key): resubmitting it within the stream's duplicate"
            " window queues nothing new. Default: a new one.",
            show_default=False,
        ),
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", "-w", help="Wait for the result.")] = False,
    timeout: Annotated[
        float | None,
        typer.Option(
            min=0, help="With --wait: give up after this many seconds.", show_default=False
        ),
    ] = None,
    nats_url: NatsOpt = None,
    output: Annotated[Output, typer.Option("--output", "-o")] = Output.text,
) -> None:
    """Submit a task to an Agent; print its id, or with --wait its result."""
    _check_names(namespace, agent)
    payload = _read_input(input)
    try:
        task = Task(id=task_id or new_task_id(), input=payload, priority=priority)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        _fail(Exit.USAGE, f"invalid task {where}: {first['msg']}")

    async def go(client: ShoalClient) -> Result | None:
        if not wait:
            published = await client.publish_task(namespace, agent, task)
            if published.duplicate:
                err.print(f"task {task.id} was submitted already: not queued again")
            return None
        async with client.watch_result(namespace, task.id, min_replays=task.replays) as watch:
            published = await client.publish_task(namespace, agent, task)
            note = " (submitted already: not queued again)" if published.duplicate else ""
            err.print(f"task {task.id} submitted to {namespace}/{agent}{note}")
            with err.status(f"waiting for the result of {task.id}"):
                return await watch.wait(timeout)

    result = _run(go, nats_url)
    if result is None:
        if output is Output.json:
            out.print_json(data={"id": task.id, "namespace": namespace, "agent": agent})
        else:
            typer.echo(task.id)
        return
    if output is Output.json:
        typer.echo(_json(to_dict(result)))
    else:
        err.print(describe(result, agent))
        if result.status == "Succeeded":
            typer.echo(_json(result.output))
    if result.status != "Succeeded":
        raise typer.Exit(Exit.DEAD_LETTERED)


@dlq_app.command("list")
def dlq_list(
    namespace: NamespaceOpt = "default",
    agent: Annotated[
        str | None, typer.Option("--agent", "-a", help="Only this Agent's.", show_default=False)
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="Show the newest N.")] = 100,
    nats_url: NatsOpt = None,
    output: Annotated[ListOutput, typer.Option("--output", "-o")] = ListOutput.table,
) -> None:
    """List dead letters, oldest first."""
    _check_names(namespace, agent)

    async def go(client: ShoalClient) -> list[tuple[int, DeadLetter]]:
        return await client.dead_letters(namespace, agent, limit)

    entries = _run(go, nats_url)
    if output is ListOutput.json:
        typer.echo(_json([{"seq": seq, **to_dict(dl)} for seq, dl in entries]))
        return
    if not entries:
        err.print(f"no dead letters in {namespace}" + (f" from {agent}" if agent else ""))
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("SEQ", "AGENT", "REASON", "TASK", "AGE", "MESSAGE"):
        table.add_column(column, no_wrap=column != "MESSAGE", overflow="fold")
    for seq, dl in entries:
        table.add_row(
            str(seq),
            dl.agent,
            dl.reason,
            dl.task.id if dl.task else "(unparsable)",
            _age(dl.at),
            _truncate(dl.message, 80),
        )
    out.print(table)


@dlq_app.command("replay")
def dlq_replay(
    namespace: NamespaceOpt = "default",
    agent: Annotated[
        str | None, typer.Option("--agent", "-a", help="Only this Agent's.", show_default=False)
    ] = None,
    seq: Annotated[
        list[int] | None,
        typer.Option("--seq", help="DLQ sequence to replay (repeatable).", show_default=False),
    ] = None,
    all_: Annotated[
        bool, typer.Option("--all", help="Replay every dead letter (of --agent, if given).")
    ] = False,
    keep: Annotated[
        bool, typer.Option("--keep", help="Leave replayed entries in the DLQ.")
    ] = False,
    nats_url: NatsOpt = None,
) -> None:
    """Send dead-lettered tasks to their Agent again, as fresh attempts."""
    _check_names(namespace, agent)
    if bool(seq) == all_:
        _fail(Exit.USAGE, "say which entries: --seq N (repeatable) or --all")

    async def go(client: ShoalClient) -> ReplayReport:
        return await client.replay(namespace, seq or None, agent, keep=keep)

    report = _run(go, nats_url)
    for dlq_seq, published in report.replayed:
        t = published.task
        typer.echo(f"replayed {dlq_seq}: task {t.id} -> {published.subject} (replay {t.replays})")
    for skipped in report.skipped:
        typer.echo(f"skipped {skipped.seq}: {skipped.reason}", err=True)
    err.print(f"{len(report.replayed)} replayed, {len(report.skipped)} skipped")


def _load_policy(path: Path, name: str | None) -> tuple[str, ScalingPolicySpec]:
    """The ScalingPolicy in ``path`` (which may hold other documents too), validated."""
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except (OSError, UnicodeDecodeError) as exc:
        _fail(Exit.USAGE, f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}")
    except yaml.YAMLError as exc:
        _fail(Exit.USAGE, f"{path} is not valid YAML: {exc}")
    policies = [d for d in docs if isinstance(d, dict) and d.get("kind") == "ScalingPolicy"]
    names = [str((p.get("metadata") or {}).get("name", "")) for p in policies]
    if name is not None:
        policies = [p for p, n in zip(policies, names, strict=True) if n == name]
        names = [name] * len(policies)
    if len(policies) != 1:
        found = ", ".join(n or "(unnamed)" for n in names) or "none"
        which = f" named {name}" if name is not None else ""
        hint = "; pick one with --name" if len(policies) > 1 else ""
        _fail(Exit.USAGE, f"{path} must hold one ScalingPolicy{which}, found {found}{hint}")
    where = f"ScalingPolicy {names[0]}" if names[0] else "ScalingPolicy"
    try:
        spec = ScalingPolicySpec.model_validate(policies[0].get("spec"))
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in ("spec", *first["loc"]))
        _fail(Exit.USAGE, f"invalid {where} {field}: {first['msg']}")
    problems = [p for p in map(validate_window, spec.schedule) if p is not None]
    try:
        parse_behavior(spec.behavior)
    except ValueError as exc:
        problems.append(str(exc))
    if problems:
        _fail(Exit.USAGE, f"invalid {where}: {'; '.join(problems)}")
    return names[0], spec


def _parse_start(text: str) -> datetime:
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        _fail(Exit.USAGE, f"--start {text!r} is not an ISO 8601 time (e.g. 2026-01-05T00:00:00Z)")
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s" if minutes else f"{secs}s"


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
        loaded = sim.read_trace(trace)
    except sim.TraceError as exc:
        _fail(Exit.USAGE, f"{trace}: {exc}")
    if not loaded.points:
        _fail(Exit.USAGE, f"{trace}: the trace has no rows after its header")
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
        _fail(Exit.USAGE, str(exc))
    summary = sim.summarize(steps)
    if out is not None:
        try:
            sim.plot(steps, begin, out, title=f"ScalingPolicy {policy_name}".strip())
        except ImportError as exc:
            _fail(Exit.USAGE, str(exc))
        except OSError as exc:
            _fail(Exit.USAGE, f"cannot write {out}: {exc.strerror or exc}")

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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
