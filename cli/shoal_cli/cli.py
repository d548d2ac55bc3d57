"""The ``shoal`` command line: submit tasks, wait for results, list and replay dead letters,
start and follow workflow runs (``shoal run``, ``shoal runs``), replay a load trace
through a ScalingPolicy (``shoal simulate``, offline).

One typer app with a sub-app per noun (``shoal dlq ...``); verbs on tasks sit at the top
(``shoal submit``). The commands live in :mod:`shoal_cli.commands`, one module per noun;
this module puts them together in the order ``shoal --help`` lists them. A later command
is a function on ``app`` (or a new sub-app added the same way as ``dlq_app``) in
:mod:`shoal_cli.commands.common`, using :func:`~shoal_cli.commands.common.with_client` so
that it shares the exit codes and the one-line error reporting.

Exit codes: 0 done, 1 the task was dead-lettered or the run failed, 2 bad usage or input,
3 NATS unreachable, Shoal's streams missing or no dispatcher answering, 4 no result within
``--timeout``, 5 no such Workflow or run, 6 refused by the Kubernetes API server
(``shoal approve``/``reject``: RBAC or the admission policy).
"""

from __future__ import annotations

from shoal_cli.commands.common import Exit, Output, app
from shoal_cli.commands.tasks import describe

# Imported for their commands, which register on ``app`` as they are imported: this order
# is the order of ``shoal --help``.
# isort: off
from shoal_cli.commands import tasks, dlq, approvals, runs, simulate  # noqa: F401
# isort: on

__all__ = ["Exit", "Output", "app", "describe", "main"]


def main() -> None:
    app()


if __name__ == "__main__":
    main()
