"""``shoal dlq list`` and ``shoal dlq replay``: dead-lettered tasks."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from shoal_api.envelope import DeadLetter, to_dict
from shoal_cli.client import (
    ReplayReport,
    ShoalClient,
)
from shoal_cli.commands.common import (
    Exit,
    ListOutput,
    NamespaceOpt,
    NatsOpt,
    check_names,
    dlq_app,
    err,
    fail,
    out,
    with_client,
)
from shoal_cli.run_view import age as _age
from shoal_cli.run_view import to_json as _json
from shoal_cli.run_view import truncate as _truncate


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
    check_names(namespace, agent)

    async def go(client: ShoalClient) -> list[tuple[int, DeadLetter]]:
        return await client.dead_letters(namespace, agent, limit)

    entries = with_client(go, nats_url)
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
    check_names(namespace, agent)
    if bool(seq) == all_:
        fail(Exit.USAGE, "say which entries: --seq N (repeatable) or --all")

    async def go(client: ShoalClient) -> ReplayReport:
        return await client.replay(namespace, seq or None, agent, keep=keep)

    report = with_client(go, nats_url)
    for dlq_seq, published in report.replayed:
        t = published.task
        typer.echo(f"replayed {dlq_seq}: task {t.id} -> {published.subject} (replay {t.replays})")
    for skipped in report.skipped:
        typer.echo(f"skipped {skipped.seq}: {skipped.reason}", err=True)
    err.print(f"{len(report.replayed)} replayed, {len(report.skipped)} skipped")
