"""``shoal submit``: one task to an Agent, optionally waiting for its result."""

from __future__ import annotations

from typing import Annotated

import typer
from pydantic import ValidationError

from shoal_api.envelope import Result, Task, new_task_id, to_dict
from shoal_cli.client import (
    ShoalClient,
)
from shoal_cli.commands.common import (
    Exit,
    NamespaceOpt,
    NatsOpt,
    Output,
    app,
    check_names,
    err,
    fail,
    out,
    read_input,
    with_client,
)
from shoal_cli.run_view import to_json as _json


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
    check_names(namespace, agent)
    payload = read_input(input)
    try:
        task = Task(id=task_id or new_task_id(), input=payload, priority=priority)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        fail(Exit.USAGE, f"invalid task {where}: {first['msg']}")

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

    result = with_client(go, nats_url)
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
