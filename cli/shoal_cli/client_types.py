"""What the client SDK's calls take and give besides the client itself: the checks of
names that become NATS subject tokens and KV keys, the errors it raises on purpose, and
the records its calls return. Import them from :mod:`shoal_cli.client`, which re-exports
them with :class:`~shoal_cli.client.ShoalClient`."""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass, field

from nats.js.client import JetStreamContext
from pydantic import ValidationError

from shoal_api.envelope import (
    Result,
    Task,
)

log = logging.getLogger("shoal_cli.client")


_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


_RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def check_run_id(value: str) -> str:
    """Run ids end up in KV keys: no dots or wildcards."""
    if not _RUN_ID.match(value):
        raise ValueError(f"run {value!r} is not a valid run id (A-Z, a-z, 0-9, _, -)")
    return value


def check_name(kind: str, value: str) -> str:
    """Namespaces and Agent names become subject tokens: a dot or a wildcard in one would
    address other subjects than meant."""
    if not _DNS_LABEL.match(value):
        raise ValueError(f"{kind} {value!r} is not a valid name (a DNS label: a-z, 0-9, -)")
    return value


class ShoalError(Exception):
    """Base of the errors the client raises on purpose."""


class ShoalConnectionError(ShoalError):
    """NATS cannot be reached (or refuses the connection)."""


class StreamsMissingError(ShoalError):
    """NATS is up but Shoal's JetStream streams are not there."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(
            "Shoal's JetStream streams do not exist on this NATS server"
            " (is the Shoal operator running and connected to it?)"
            + (f": {detail}" if detail else "")
        )


class RunRejectedError(ShoalError):
    """The dispatcher refused a run: ``code`` says why (``shoal_api.runs.wire.ErrorCode``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class DispatcherUnavailableError(ShoalError):
    """No dispatcher answered a run submission (the Shoal operator is not running, or has
    no connection to this NATS server)."""


class ResultTimeoutError(ShoalError, TimeoutError):
    """No result arrived in time; the task may still be queued or running."""

    def __init__(self, task_id: str, timeout: float) -> None:
        super().__init__(f"no result for task {task_id} within {timeout:g}s")
        self.task_id = task_id
        self.timeout = timeout


@dataclass(frozen=True)
class Published:
    """A task envelope accepted by the tasks stream."""

    task: Task
    subject: str
    seq: int
    duplicate: bool
    """JetStream dropped it as a resubmission of the same hop within the duplicate
    window: the earlier message (``seq``) is the one that counts."""


@dataclass(frozen=True)
class Skipped:
    seq: int
    reason: str


@dataclass
class ReplayReport:
    """What :meth:`ShoalClient.replay` did, entry by entry (by DLQ stream sequence)."""

    replayed: list[tuple[int, Published]] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def tasks(self) -> list[Task]:
        return [p.task for _, p in self.replayed]


class ResultWatch:
    """Results of one task as the results stream delivers them, from the latest stored
    one on; opened before the task is published so the result cannot slip by."""

    def __init__(self, sub: JetStreamContext.PushSubscription, task_id: str, min_replays: int):
        self._sub = sub
        self.task_id = task_id
        self.min_replays = min_replays

    async def wait(self, timeout: float | None = None) -> Result:  # noqa: ASYNC109
        """The task's result; :class:`ResultTimeoutError` after ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    msg = await self._sub.next_msg(timeout=None)
                    try:
                        result = Result.model_validate_json(msg.data)
                    except ValidationError as exc:
                        log.warning("ignoring unreadable result on %s: %s", msg.subject, exc)
                        continue
                    # An older record of the task (before a DLQ replay) is not the answer.
                    if result.replays >= self.min_replays:
                        return result
        except TimeoutError:
            raise ResultTimeoutError(self.task_id, timeout or 0.0) from None
