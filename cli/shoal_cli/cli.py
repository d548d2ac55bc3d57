"""The ``shoal`` command line: submit tasks, wait for results, list and replay dead letters,
start and follow workflow runs (``shoal run``, ``shoal runs``), replay a load trace
through a ScalingPolicy (``shoal simulate``, offline).

One typer app with a sub-app per noun (``shoal dlq ...``); verbs on tasks sit at the top
(``shoal submit``). A later command is a function on ``app`` or a new sub-app added the
same way as ``dlq_app``, using :func:`_run` so that it shares the exit codes and the
one-line error reporting.

Exit codes: 0 done, 1 the task was dead-lettered or the run failed, 2 bad usage or input,
3 NATS unreachable, Shoal's streams missing or no dispatcher answering, 4 no result within
``--timeout``, 5 no such Workflow or run, 6 refused by the Kubernetes API server
(``shoal approve``/``reject``: RBAC or the admission policy).
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
from rich.console import Console, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from shoal_api.approval import ApprovalSpec
from shoal_api.envelope import DeadLetter, Result, Task, new_task_id, to_dict
from shoal_api.runs.model import RunState
from shoal_api.runs.wire import IDEMPOTENCY_KEY_MAX, RunReply
from shoal_api.scaling import ScalingPolicySpec
from shoal_cli import approvals, kubeapi
from shoal_cli.client import (
    URL_ENV,
    DispatcherUnavailableError,
    ReplayReport,
    ResultTimeoutError,
    RunRejectedError,
    ShoalClient,
    ShoalConnectionError,
    ShoalError,
    StreamsMissingError,
    check_name,
)
from shoal_cli.run_view import age as _age
from shoal_cli.run_view import (
    change_lines,
    header_lines,
    live_view,
    outcome_line,
    runs_table,
    steps_table,
)
from shoal_cli.run_view import duration as _duration
from shoal_cli.run_view import to_json as _json
from shoal_cli.run_view import truncate as _truncate
from shoal_core.autoscale import simulate as sim
from shoal_core.autoscale.hpa_model import parse_behavior
from shoal_core.autoscale.schedule import validate_window

T = TypeVar("T")


class Exit(enum.IntEnum):
    OK = 0
    DEAD_LETTERED = 1
    USAGE = 2
    UNAVAILABLE = 3
    TIMEOUT = 4
    NOT_FOUND = 5
    FORBIDDEN = 6
    INTERRUPTED = 130
    RUN_FAILED = DEAD_LETTERED  # the same news for a run: the work was not done


class Output(enum.StrEnum):
    text = "text"
    json = "json"


class ListOutput(enum.StrEnum):
    table = "table"
    json = "json"


app = typer.Typer(
    name="shoal",
    help="Submit tasks to Agents, start runs of Workflows, and look after what could not be done.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
dlq_app = typer.Typer(
    help="Dead-lettered tasks: list them, replay them.",
    no_args_is_help=True,
)
app.add_typer(dlq_app, name="dlq")
runs_app = typer.Typer(
    help="Workflow runs: list them, show one, follow one.",
    no_args_is_help=True,
)
app.add_typer(runs_app, name="runs")

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


# -- approvals (Kubernetes writes, not NATS: the API server authenticates the approver) --


def _decide(
    decision: approvals.Decision,
    run: str,
    step: str,
    namespace: str | None,
    workflow: str,
    comment: str,
    wait: bool,
    timeout: float,
    kubeconfig: str | None,
    context: str | None,
    output: Output,
) -> None:
    verb = "approve" if decision == "Approve" else "reject"
    try:
        ApprovalSpec(
            workflow=workflow, run=run, step=step, decision=decision, approver="-", comment=comment
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        _fail(Exit.USAGE, f"invalid {'.'.join(str(p) for p in first['loc'])}: {first['msg']}")
    try:
        creds = kubeapi.load(kubeconfig, context)
    except kubeapi.KubeConfigError as exc:
        _fail(Exit.USAGE, str(exc))
    ns = namespace or creds.namespace or "default"

    async def go() -> approvals.Decided:
        async with kubeapi.KubeApi(creds) as api:
            return await approvals.decide(
                api,
                ns,
                workflow=workflow,
                run=run,
                step=step,
                decision=decision,
                comment=comment,
                wait=timeout if wait else None,
            )

    try:
        decided = asyncio.run(go())
    except kubeapi.KubeApiError as exc:
        if exc.status == 401:
            _fail(Exit.FORBIDDEN, f"the Kubernetes API did not accept your credentials: {exc}")
        if exc.status == 403:
            # Both say 403: RBAC, and the policy tying spec.approver to the caller.
            who = "admission policy" if "admissionpolicy" in exc.message.lower() else "RBAC"
            _fail(Exit.FORBIDDEN, f"you may not {verb} in namespace {ns} ({who}): {exc}")
        if exc.status == 404 and exc.kind == "namespaces":
            _fail(Exit.NOT_FOUND, f"namespace {ns} not found")
        if exc.status == 404:
            _fail(
                Exit.UNAVAILABLE,
                f"no Approval resource in this cluster (is Shoal installed?): {exc}",
            )
        if exc.status == 422:
            _fail(Exit.USAGE, str(exc))
        _fail(Exit.UNAVAILABLE, f"the Kubernetes API answered {exc.status} {exc.reason}: {exc}")
    except kubeapi.KubeUnreachableError as exc:
        _fail(Exit.UNAVAILABLE, str(exc))
    except approvals.WaitTimeoutError as exc:
        typer.echo(exc.decided.name)
        _fail(Exit.TIMEOUT, f"{exc} within {timeout:g}s (the operator relays it when it can)")
    except KeyboardInterrupt:
        _fail(Exit.INTERRUPTED, "interrupted")
    if output is Output.json:
        typer.echo(_json(decided.approval))
    else:
        typer.echo(decided.name)
        err.print(
            f"{decision} of step {step} in run {run} (workflow {workflow}) recorded"
            f" as {decided.approver}: approval {decided.name} in namespace {ns}"
        )
    if decided.phase == "Applied":
        err.print(f"applied: {decided.message}")
    elif decided.phase == "Ignored":
        err.print(f"ignored ({decided.reason}): {decided.message}")
        raise typer.Exit(Exit.NOT_FOUND if decided.reason == "RunNotFound" else Exit.RUN_FAILED)


RunArg = Annotated[str, typer.Argument(metavar="RUN", help="The run id.")]
StepArg = Annotated[str, typer.Argument(metavar="STEP", help="The step waiting for approval.")]
ApprovalNamespaceOpt = Annotated[
    str | None,
    typer.Option(
        "--namespace",
        "-n",
        envvar="SHOAL_NAMESPACE",
        help="Namespace of the run. Default: the kubeconfig context's, else default.",
        show_default=False,
    ),
]
WorkflowOpt = Annotated[str, typer.Option("--workflow", help="The Workflow of the run.")]
CommentOpt = Annotated[str, typer.Option("--comment", "-m", help="Why, for the run's record.")]
DecisionWaitOpt = Annotated[
    bool,
    typer.Option(
        "--wait",
        help="Wait until the run took the decision; exit 1 if the step was not waiting,"
        " 5 if there is no such run.",
    ),
]
DecisionTimeoutOpt = Annotated[
    float, typer.Option(min=0, help="With --wait: give up after this many seconds.")
]
KubeconfigOpt = Annotated[
    str | None,
    typer.Option(help="Kubeconfig file. Default: $KUBECONFIG, ~/.kube/config, in-cluster."),
]
ContextOpt = Annotated[
    str | None, typer.Option(help="Kubeconfig context. Default: its current-context.")
]


@app.command()
def approve(
    run: RunArg,
    step: StepArg,
    workflow: WorkflowOpt,
    namespace: ApprovalNamespaceOpt = None,
    comment: CommentOpt = "",
    wait: DecisionWaitOpt = False,
    timeout: DecisionTimeoutOpt = 30.0,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    output: Annotated[Output, typer.Option("--output", "-o")] = Output.text,
) -> None:
    """Approve a step waiting for approval: an Approval created as you, so Kubernetes RBAC
    decides whether you may (ClusterRole shoal-approver); prints its name."""
    _decide(
        "Approve",
        run,
        step,
        namespace,
        workflow,
        comment,
        wait,
        timeout,
        kubeconfig,
        context,
        output,
    )


@app.command()
def reject(
    run: RunArg,
    step: StepArg,
    workflow: WorkflowOpt,
    namespace: ApprovalNamespaceOpt = None,
    comment: CommentOpt = "",
    wait: DecisionWaitOpt = False,
    timeout: DecisionTimeoutOpt = 30.0,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    output: Annotated[Output, typer.Option("--output", "-o")] = Output.text,
) -> None:
    """Reject a step waiting for approval (the step fails, reason ApprovalRejected); as
    approve, an Approval created as you."""
    _decide(
        "Reject",
        run,
        step,
        namespace,
        workflow,
        comment,
        wait,
        timeout,
        kubeconfig,
        context,
        output,
    )


# -- workflow runs -----------------------------------------------------------------------

WatchOpt = Annotated[
    bool,
    typer.Option(
        "--watch",
        "-w",
        help="Follow the run step by step until it ends; exit 0 if it succeeded, 1 if it"
        " failed. Ctrl-C stops watching, not the run.",
    ),
]


def _server(client: ShoalClient) -> str:
    # Scheme, host and port only: a URL may carry a user and password.
    url = client.nc.connected_url
    return f"{url.scheme}://{url.hostname}:{url.port}" if url else "(disconnected)"


def _rejected(exc: RunRejectedError, namespace: str, workflow: str) -> NoReturn:
    """The dispatcher's refusal as the CLI's usual one line and exit code."""
    match exc.code:
        case "WorkflowNotFound":
            _fail(Exit.NOT_FOUND, f"workflow {workflow} not found in namespace {namespace}")
        case "InvalidInput":
            _fail(Exit.USAGE, f"invalid input for workflow {workflow}: {exc.message}")
        case "InvalidWorkflow":
            _fail(Exit.USAGE, f"workflow {namespace}/{workflow} cannot run: {exc.message}")
        case "Unavailable":
            _fail(Exit.UNAVAILABLE, f"the dispatcher could not store the run: {exc.message}")
        case _:
            _fail(Exit.USAGE, f"run refused ({exc.code}): {exc.message}")


async def _follow(client: ShoalClient, namespace: str, run_id: str) -> RunState | None:
    """Shows the run's progress on stderr until it ends; its last state (None when there
    is no such run).

    stderr, because stdout carries only the run's output. A terminal gets a table redrawn
    in place; anything else (a pipe, a CI log) gets a line per change, since redrawing
    there would write the table again at every change."""
    last: RunState | None = None
    try:
        if err.is_terminal:

            def view() -> RenderableType:
                # Called from rich's refresh thread too: durations of running steps tick.
                now = time.time()
                return live_view(last, now) if last is not None else Text(f"run {run_id}")

            with Live(
                get_renderable=view,
                console=err,
                refresh_per_second=4,
                vertical_overflow="visible",
            ):
                async for state in client.watch_run(namespace, run_id):
                    last = state
        else:
            async for state in client.watch_run(namespace, run_id):
                for line in change_lines(last, state, time.time()):
                    typer.echo(line, err=True)
                last = state
    except (asyncio.CancelledError, KeyboardInterrupt):
        if last is None or not last.terminal:
            typer.echo(
                f"stopped watching; run {run_id} keeps running."
                f" Re-attach with: shoal runs get {run_id} -n {namespace} --watch",
                err=True,
            )
        raise
    return last


def _finish(state: RunState | None, run_id: str, namespace: str, output: Output) -> None:
    """After watching: the outcome on stderr, the output on stdout, the exit code."""
    if state is None:
        _fail(Exit.NOT_FOUND, f"run {run_id} not found in namespace {namespace}")
    if not state.terminal:
        # The watch ends early only when the record goes: deleted or purged from KV.
        _fail(Exit.NOT_FOUND, f"run {run_id} was deleted while {state.phase}")
    if output is Output.json:
        typer.echo(_json(to_dict(state)))
    else:
        typer.echo(outcome_line(state, time.time()), err=True)
        if state.phase == "Succeeded":
            typer.echo(_json(state.output))
    if state.phase != "Succeeded":
        raise typer.Exit(Exit.RUN_FAILED)


@app.command("run")
def run_cmd(
    workflow: Annotated[str, typer.Argument(help="The Workflow to run.")],
    namespace: NamespaceOpt = "default",
    input: Annotated[
        str | None,
        typer.Option(
            "--input",
            "-i",
            help="The run's input: JSON text, @FILE with JSON, or - to read JSON from stdin.",
            show_default=False,
        ),
    ] = None,
    priority: Annotated[
        int | None,
        typer.Option(
            min=0, max=9, help="0 (lowest) to 9. Default: the Workflow's.", show_default=False
        ),
    ] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option(
            "--idempotency-key",
            help="Submitting the same key again returns the first run instead of a new one.",
            show_default=False,
        ),
    ] = None,
    watch: WatchOpt = False,
    nats_url: NatsOpt = None,
    output: Annotated[Output, typer.Option("--output", "-o")] = Output.text,
) -> None:
    """Start a run of a Workflow; print its id, or with --watch follow it to the end."""
    _check_names(namespace, None)
    try:
        check_name("workflow", workflow)
    except ValueError as exc:
        _fail(Exit.USAGE, str(exc))
    if idempotency_key is not None and not 0 < len(idempotency_key) <= IDEMPOTENCY_KEY_MAX:
        _fail(Exit.USAGE, f"--idempotency-key must be 1 to {IDEMPOTENCY_KEY_MAX} characters")
    payload = _read_input(input)

    async def go(client: ShoalClient) -> tuple[RunReply, str, RunState | None]:
        try:
            reply = await client.submit_run(
                namespace, workflow, payload, priority=priority, idempotency_key=idempotency_key
            )
        except RunRejectedError as exc:
            _rejected(exc, namespace, workflow)
        except DispatcherUnavailableError:
            _fail(
                Exit.UNAVAILABLE,
                f"no dispatcher answered on NATS at {_server(client)}:"
                " is the Shoal operator running?",
            )
        if reply.run is None:
            raise ShoalError("the dispatcher's reply names no run")
        if not watch:
            return reply, reply.run, None
        typer.echo(_created(reply.run, reply.created), err=True)
        return reply, reply.run, await _follow(client, namespace, reply.run)

    reply, run_id, final = _run(go, nats_url)
    if watch:
        _finish(final, run_id, namespace, output)
    elif output is Output.json:
        typer.echo(
            _json(
                {
                    "run": run_id,
                    "created": reply.created,
                    "phase": reply.phase,
                    "workflow": workflow,
                    "namespace": namespace,
                }
            )
        )
    else:
        typer.echo(_created(run_id, reply.created))


def _created(run_id: str, created: bool) -> str:
    return f"run {run_id} " + ("created" if created else "already exists (idempotency key)")


@runs_app.command("list")
def runs_list(
    namespace: NamespaceOpt = "default",
    workflow: Annotated[
        str | None,
        typer.Option("--workflow", "-W", help="Only this Workflow's.", show_default=False),
    ] = None,
    nats_url: NatsOpt = None,
    output: Annotated[ListOutput, typer.Option("--output", "-o")] = ListOutput.table,
) -> None:
    """List the runs still kept, newest first."""
    _check_names(namespace, None)

    async def go(client: ShoalClient) -> list[RunState]:
        return await client.list_runs(namespace, workflow)

    runs = _run(go, nats_url)
    if output is ListOutput.json:
        typer.echo(_json([to_dict(r) for r in runs]))
        return
    if not runs:
        of = f" of workflow {workflow}" if workflow else ""
        typer.echo(f"no runs{of} in {namespace}", err=True)
        return
    out.print(runs_table(runs, time.time()))


@runs_app.command("get")
def runs_get(
    run: Annotated[str, typer.Argument(help="The run's id.")],
    namespace: NamespaceOpt = "default",
    watch: WatchOpt = False,
    nats_url: NatsOpt = None,
    output: Annotated[Output, typer.Option("--output", "-o")] = Output.text,
) -> None:
    """Show a run: its phase and every step's; with --watch follow it to the end."""
    _check_names(namespace, None)

    async def go(client: ShoalClient) -> RunState | None:
        try:
            state = await client.get_run(namespace, run)
        except ValueError as exc:  # the run id: it becomes part of a KV key
            _fail(Exit.USAGE, str(exc))
        if state is None or not watch:
            return state
        return await _follow(client, namespace, run)

    state = _run(go, nats_url)
    if watch or state is None:
        _finish(state, run, namespace, output)
        return
    if output is Output.json:
        typer.echo(_json(to_dict(state)))
        return
    now = time.time()
    for line in header_lines(state, now):
        typer.echo(line)
    typer.echo("")
    out.print(steps_table(state, now))
    if state.phase == "Succeeded":
        typer.echo("\noutput:")
        typer.echo(_json(state.output))


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
