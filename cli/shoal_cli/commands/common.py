"""What every ``shoal`` command shares: the typer apps, the exit codes, the output
consoles, the common options and the one-line error reporting."""

from __future__ import annotations

import asyncio
import enum
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import nats.errors
import typer
from rich.console import Console

from shoal_cli.client import (
    URL_ENV,
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


def fail(code: Exit, message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def with_client(fn: Callable[[ShoalClient], Awaitable[T]], nats_url: str | None) -> T:
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
        fail(Exit.UNAVAILABLE, str(exc))
    except ResultTimeoutError as exc:
        fail(Exit.TIMEOUT, f"{exc} (it may still be queued or running)")
    except ShoalError as exc:
        fail(Exit.UNAVAILABLE, str(exc))
    except nats.errors.Error as exc:
        # NATS went away mid-command (a request timed out, the connection closed).
        fail(Exit.UNAVAILABLE, f"NATS: {exc or type(exc).__name__}")
    except KeyboardInterrupt:
        # click would report "Aborted!" with exit code 1, which means dead-lettered here.
        fail(Exit.INTERRUPTED, "interrupted")


def check_names(namespace: str, agent: str | None) -> None:
    try:
        check_name("namespace", namespace)
        if agent is not None:
            check_name("agent", agent)
    except ValueError as exc:
        fail(Exit.USAGE, str(exc))


def read_input(spec: str | None) -> Any:
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
            fail(Exit.USAGE, f"cannot read input file {path}: {getattr(exc, 'strerror', exc)}")
        where = str(path)
    else:
        text = spec
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        hint = "" if spec.startswith(("@", "-")) else " (a string needs quotes: '\"text\"')"
        fail(Exit.USAGE, f"{where} is not valid JSON: {exc}{hint}")
