"""What a handler author needs: the task context and the errors that steer retries.

A handler is a few lines::

    from shoal_runtime.sdk import Context

    async def handle(input: dict, ctx: Context) -> dict:
        ctx.log.info("classifying %s", ctx.task_id)
        ctx.report_confidence(0.9)
        return {"category": "billing"}

Sync handlers (``def handle(input, ctx)``) run in a thread pool. With ``spec.batching``
the handler gets a list of inputs and returns a list of outputs of the same length; the
batch shares one context, so each output reports its own confidence as a
``"confidence"`` field in [0, 1].
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from shoal_runtime.run_context import ContextConflict, RunClosedError, RunContext

__all__ = [
    "Context",
    "ContextConflict",
    "HandlerError",
    "PermanentError",
    "RetryableError",
    "RunClosedError",
    "RunContext",
]

HANDLER_LOG = logging.getLogger("shoal.handler")
Handler = Callable[[Any, "Context"], Any | Awaitable[Any]]


class HandlerError(Exception):
    """Base of errors a handler raises on purpose."""


class RetryableError(HandlerError):
    """Try again later (through JetStream redelivery with the Agent's backoff).

    ``retry_after`` (seconds), when set, is the earliest useful retry, e.g. from an
    HTTP Retry-After header.
    """

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(HandlerError):
    """Retrying cannot help (bad request, refused content): dead-letter at once."""


@dataclass
class Context:
    """Task metadata and the channel back to the runtime, one per task (or per batch)."""

    task_id: str
    agent: str
    namespace: str
    attempt: int = 1
    priority: int = 5
    deadline: float | None = None
    run: str | None = None
    step: str | None = None
    path: tuple[str, ...] = ()
    trace: dict[str, str] = field(default_factory=dict)
    shared: RunContext | None = None
    """The run's shared context (tasks of workflow runs only; None otherwise)."""
    confidence: float | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cost: Decimal = Decimal("0")

    _log: logging.LoggerAdapter[logging.Logger] | None = field(default=None, repr=False)

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger whose records carry the task id and Agent (made on first use: most
        handlers never log, and the runtime is built to spend microseconds per task)."""
        if self._log is None:
            self._log = logging.LoggerAdapter(
                HANDLER_LOG, {"task": self.task_id, "agent": self.agent}
            )
        return self._log

    def report_confidence(self, value: float) -> None:
        """How sure the handler is of its result, in [0, 1] (drives escalation)."""
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"confidence must be within [0, 1], got {value}")
        self.confidence = value

    def report_usage(
        self, input_tokens: int = 0, output_tokens: int = 0, cost: Decimal | str | None = None
    ) -> None:
        """Tokens (and cost, when the handler knows it) spent; counts against budgets."""
        self.input_tokens += max(0, input_tokens)
        self.output_tokens += max(0, output_tokens)
        if cost is not None:
            self.cost += Decimal(str(cost))

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens
