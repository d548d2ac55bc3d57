"""One delivery of one task on its way through the runtime, and the two outcomes that
end its way early."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from nats.aio.msg import Msg

from shoal_api import envelope as env
from shoal_runtime.sdk import Context


class DisposedError(Exception):
    """The task got its final disposition before the handler ran (no further steps)."""


@dataclass
class Job:
    """One delivery of one task on its way through the worker."""

    msg: Msg
    task: env.Task
    delivered: int
    started: float
    ctx: Context
    probe: bool = False
    """Admitted as a half-open probe; cleared once its outcome is counted."""
    done: asyncio.Future[None] | None = None
    """Set when the job waits for the batch loop to settle it."""

    @property
    def attempts(self) -> int:
        return self.task.attempt - 1 + self.delivered


class OutputViolationError(Exception):
    """The handler's output does not satisfy the output contract."""
