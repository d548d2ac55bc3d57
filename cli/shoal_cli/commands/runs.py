"""``shoal run`` and ``shoal runs list|get``: start a Workflow run, follow it, look at runs."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, NoReturn

import typer
from rich.console import RenderableType
from rich.live import Live
from rich.text import Text

from shoal_api.envelope import to_dict
from shoal_api.runs.model import RunState
from shoal_api.runs.wire import IDEMPOTENCY_KEY_MAX, RunReply
from shoal_cli.client import (
    DispatcherUnavailableError,
    RunRejectedError,
    ShoalClient,
    ShoalError,
    check_name,
)
from shoal_cli.commands.common import (
    Exit,
    ListOutput,
    NamespaceOpt,
    NatsOpt,
    Output,
    app,
    check_names,
    err,
    fail,
    out,
    read_input,
    runs_app,
    with_client,
)
from shoal_cli.run_view import (
    change_lines,
    header_lines,
    live_view,
    outcome_line,
    runs_table,
    steps_table,
)
from shoal_cli.run_view import to_json as _json

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
            fail(Exit.NOT_FOUND, f"workflow {workflow} not found in namespace {namespace}")
        case "InvalidInput":
            fail(Exit.USAGE, f"invalid input for workflow {workflow}: {exc.message}")
        case "InvalidWorkflow":
            fail(Exit.USAGE, f"workflow {namespace}/{workflow} cannot run: {exc.message}")
        case "Unavailable":
            fail(Exit.UNAVAILABLE, f"the dispatcher could not store the run: {exc.message}")
        case _:
            fail(Exit.USAGE, f"run refused ({exc.code}): {exc.message}")


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
        fail(Exit.NOT_FOUND, f"run {run_id} not found in namespace {namespace}")
    if not state.terminal:
        # The watch ends early only when the record goes: deleted or purged from KV.
        fail(Exit.NOT_FOUND, f"run {run_id} was deleted while {state.phase}")
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
    check_names(namespace, None)
    try:
        check_name("workflow", workflow)
    except ValueError as exc:
        fail(Exit.USAGE, str(exc))
    if idempotency_key is not None and not 0 < len(idempotency_key) <= IDEMPOTENCY_KEY_MAX:
        fail(Exit.USAGE, f"--idempotency-key must be 1 to {IDEMPOTENCY_KEY_MAX} characters")
    payload = read_input(input)

    async def go(client: ShoalClient) -> tuple[RunReply, str, RunState | None]:
        try:
            reply = await client.submit_run(
                namespace, workflow, payload, priority=priority, idempotency_key=idempotency_key
            )
        except RunRejectedError as exc:
            _rejected(exc, namespace, workflow)
        except DispatcherUnavailableError:
            fail(
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

    reply, run_id, final = with_client(go, nats_url)
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
    check_names(namespace, None)

    async def go(client: ShoalClient) -> list[RunState]:
        return await client.list_runs(namespace, workflow)

    runs = with_client(go, nats_url)
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
    check_names(namespace, None)

    async def go(client: ShoalClient) -> RunState | None:
        try:
            state = await client.get_run(namespace, run)
        except ValueError as exc:  # the run id: it becomes part of a KV key
            fail(Exit.USAGE, str(exc))
        if state is None or not watch:
            return state
        return await _follow(client, namespace, run)

    state = with_client(go, nats_url)
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
