"""The client SDK: submit tasks to Agents, wait for their results, inspect and replay dead
letters. What the ``shoal`` CLI is built on, usable from any asyncio program::

    async with await ShoalClient.connect() as shoal:
        result = await shoal.run_task("support", "triage", {"text": "refund please"})
        print(result.status, result.output)

Everything goes through JetStream: tasks are published to the Agent's task subject (and
acknowledged by the stream), results are read from the results stream, so a result that
arrived before anyone waited for it is not lost.

Longer than 500 lines on purpose: :class:`ShoalClient` is the SDK's one public class, and
its task, run and dead-letter calls share one connection and its helpers, so it stays
one class in one file. The name checks, errors and records it takes and returns live in
:mod:`shoal_cli.client_types` and are re-exported here.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import api
from nats.js.kv import KeyValue
from pydantic import ValidationError

from shoal_api import nats_layout as nl
from shoal_api.envelope import (
    MSG_ID_HEADER,
    DeadLetter,
    Result,
    Task,
    new_task_id,
)
from shoal_api.runs.model import RunState
from shoal_api.runs.wire import RunReply, RunRequest, run_key
from shoal_cli.client_types import (
    DispatcherUnavailableError,
    Published,
    ReplayReport,
    ResultTimeoutError,
    ResultWatch,
    RunRejectedError,
    ShoalConnectionError,
    ShoalError,
    Skipped,
    StreamsMissingError,
    check_name,
    check_run_id,
)

__all__ = [
    "DEFAULT_URL",
    "URL_ENV",
    "DispatcherUnavailableError",
    "Published",
    "ReplayReport",
    "ResultTimeoutError",
    "ResultWatch",
    "RunRejectedError",
    "ShoalClient",
    "ShoalConnectionError",
    "ShoalError",
    "Skipped",
    "StreamsMissingError",
    "check_name",
    "check_run_id",
]

log = logging.getLogger(__name__)

DEFAULT_URL = "nats://127.0.0.1:4222"
URL_ENV = "SHOAL_NATS_URL"

# JetStream API error codes the client tells apart.
STREAM_NOT_FOUND = 10059
NO_MESSAGE_FOUND = 10037

# The server removes the client's ephemeral consumers this long after their last use:
# result watches are not deleted one by one (an API round trip per task), and a killed
# CLI deletes nothing.
EPHEMERAL_INACTIVE_SECONDS = 5.0
FETCH_BATCH = 256
# A result watch whose consumer vanished (NATS restarted: ordered consumers live in
# memory) notices after two missed heartbeats and recreates it.
WATCH_HEARTBEAT_SECONDS = 2.0
# A run submission is retried (same run id) until its timeout: an operator failing over
# leaves no dispatcher for a few seconds.
SUBMIT_ATTEMPT_SECONDS = 5.0
SUBMIT_RETRY_SECONDS = 0.5


class ShoalClient:
    """A connection to Shoal's NATS. Create with :meth:`connect`; close with :meth:`close`
    (or use it as an async context manager)."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.js = nc.jetstream()

    @classmethod
    async def connect(cls, url: str | None = None, *, timeout: float = 5) -> ShoalClient:  # noqa: ASYNC109
        """Connects to ``url`` (default: ``$SHOAL_NATS_URL``, else a local server).

        The first failed attempt (or ``timeout`` without a connection) is a
        :class:`ShoalConnectionError`: a caller wants to hear that NATS is down, not wait
        for it. Once connected, the client reconnects for as long as it lives, so a NATS
        restart does not end a wait for a result.
        """
        url = url or os.environ.get(URL_ENV) or DEFAULT_URL
        loop = asyncio.get_running_loop()
        first_error: asyncio.Future[Exception] = loop.create_future()

        async def on_error(exc: Exception) -> None:
            # Replaces the default handler, which logs a traceback for every failed
            # (re)connect.
            if not first_error.done():
                first_error.set_result(exc)
            log.debug("nats: %s", exc)

        nc = Client()
        connecting = asyncio.ensure_future(
            nc.connect(
                url,
                name="shoal-client",
                connect_timeout=max(1, round(timeout)),
                reconnect_time_wait=1,
                max_reconnect_attempts=-1,
                error_cb=on_error,
            )
        )
        racing: list[asyncio.Future[Any]] = [connecting, first_error]
        await asyncio.wait(racing, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if connecting.done() and connecting.exception() is None:
            return cls(nc)
        connecting.cancel()
        with contextlib.suppress(BaseException):
            await connecting
        with contextlib.suppress(Exception):
            await nc.close()
        cause: BaseException
        if first_error.done():
            cause = first_error.result()
        elif not connecting.cancelled() and (failed := connecting.exception()) is not None:
            cause = failed
        else:
            cause = TimeoutError(f"no connection within {timeout:g}s")
        why = str(cause) or type(cause).__name__
        raise ShoalConnectionError(f"cannot connect to NATS at {url}: {why}")

    async def close(self) -> None:
        if not self.nc.is_closed:
            await self.nc.close()

    async def __aenter__(self) -> ShoalClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- tasks ---------------------------------------------------------------------------

    async def publish_task(self, namespace: str, agent: str, task: Task) -> Published:
        """Publishes ``task`` to ``agent``'s task subject and waits for the stream's ack."""
        subject = nl.task_subject(
            check_name("namespace", namespace), check_name("agent", agent), task.priority
        )
        try:
            ack = await self.js.publish(
                subject, task.to_json(), headers={MSG_ID_HEADER: task.msg_id()}
            )
        except nats.js.errors.NoStreamResponseError:
            raise StreamsMissingError(f"nothing stores {subject}") from None
        except nats.js.errors.APIError as exc:
            raise ShoalError(f"publishing to {subject} failed: {exc}") from None
        return Published(task, subject, ack.seq, bool(ack.duplicate))

    async def submit(
        self,
        namespace: str,
        agent: str,
        input: Any,
        *,
        priority: int = 5,
        task_id: str | None = None,
        deadline: float | None = None,
    ) -> Task:
        """Queues a task for ``agent``. Submitting the same ``task_id`` again within the
        stream's duplicate window queues nothing new."""
        task = Task(id=task_id or new_task_id(), input=input, priority=priority, deadline=deadline)
        await self.publish_task(namespace, agent, task)
        return task

    @contextlib.asynccontextmanager
    async def watch_result(
        self, namespace: str, task_id: str, *, min_replays: int = 0
    ) -> AsyncIterator[ResultWatch]:
        """Watches for the result of a task: open it, publish, then ``await w.wait()``.

        The watch starts from the latest stored result of the task, so one published
        before the watch opened is returned too; records of earlier replays than
        ``min_replays`` are passed over.
        """
        subject = nl.result_subject(check_name("namespace", namespace), task_id)
        try:
            sub = await self.js.subscribe(
                subject,
                stream=nl.RESULTS_STREAM,
                ordered_consumer=True,
                idle_heartbeat=WATCH_HEARTBEAT_SECONDS,
                deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
                inactive_threshold=EPHEMERAL_INACTIVE_SECONDS,
            )
        except nats.js.errors.NotFoundError as exc:
            raise StreamsMissingError(f"{nl.RESULTS_STREAM}: {exc.description}") from None
        except nats.js.errors.ServiceUnavailableError:
            raise StreamsMissingError("JetStream does not answer") from None
        try:
            yield ResultWatch(sub, task_id, min_replays)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def wait_result(
        self,
        namespace: str,
        task_id: str,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Result:
        """The result of a task, once there is one (also if it is there already).

        Raises :class:`ResultTimeoutError` when none arrives within ``timeout`` seconds.
        """
        async with self.watch_result(namespace, task_id) as watch:
            return await watch.wait(timeout)

    async def run_task(
        self,
        namespace: str,
        agent: str,
        input: Any,
        *,
        priority: int = 5,
        task_id: str | None = None,
        deadline: float | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Result:
        """Submits a task and waits for its result (:class:`ResultTimeoutError` on timeout)."""
        task = Task(id=task_id or new_task_id(), input=input, priority=priority, deadline=deadline)
        async with self.watch_result(namespace, task.id, min_replays=task.replays) as watch:
            await self.publish_task(namespace, agent, task)
            return await watch.wait(timeout)

    async def get_result(self, namespace: str, task_id: str) -> Result | None:
        """The latest stored result of a task, or None while there is none."""
        subject = nl.result_subject(check_name("namespace", namespace), task_id)
        try:
            msg = await self.js.get_msg(nl.RESULTS_STREAM, subject=subject)
        except nats.js.errors.NotFoundError as exc:
            if exc.err_code == NO_MESSAGE_FOUND:
                return None
            raise StreamsMissingError(f"{nl.RESULTS_STREAM}: {exc.description}") from None
        except nats.js.errors.ServiceUnavailableError:
            raise StreamsMissingError("JetStream does not answer") from None
        return Result.model_validate_json(msg.data or b"")

    # -- workflow runs -------------------------------------------------------------------

    async def submit_run(
        self,
        namespace: str,
        workflow: str,
        input: Any,
        *,
        priority: int | None = None,
        idempotency_key: str | None = None,
        timeout: float = 10,  # noqa: ASYNC109
    ) -> RunReply:
        """Starts a run of ``workflow``; returns once the dispatcher has stored it.

        With ``idempotency_key``, a second submission returns the first run
        (``created`` False) instead of starting another. Raises :class:`RunRejectedError`
        for a missing Workflow or invalid input, :class:`DispatcherUnavailableError` when
        no dispatcher answers."""
        subject = nl.run_subject(
            check_name("namespace", namespace), check_name("workflow", workflow)
        )
        # The run id is chosen here, so that a retry of this submission (its reply lost,
        # or no dispatcher for a moment while the operator fails over) is the same run.
        request = RunRequest(
            id=secrets.token_hex(8),
            input=input,
            priority=priority,
            idempotency_key=idempotency_key,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            try:
                msg = await self.nc.request(
                    subject, request.to_json(), timeout=max(0.1, min(left, SUBMIT_ATTEMPT_SECONDS))
                )
                break
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError) as exc:
                if loop.time() + SUBMIT_RETRY_SECONDS >= deadline:
                    why = (
                        "no dispatcher answered"
                        if isinstance(exc, nats.errors.NoRespondersError)
                        else "no answer"
                    )
                    raise DispatcherUnavailableError(
                        f"{why} on {subject} within {timeout:g}s: is the Shoal operator running?"
                    ) from None
                await asyncio.sleep(SUBMIT_RETRY_SECONDS)
        reply = RunReply.model_validate_json(msg.data)
        if reply.error is not None:
            raise RunRejectedError(reply.error.code, reply.error.message)
        return reply

    async def _runs(self) -> KeyValue:
        try:
            return await self.js.key_value(nl.RUNS_BUCKET)
        except (nats.js.errors.BucketNotFoundError, nats.js.errors.NotFoundError):
            raise StreamsMissingError(f"bucket {nl.RUNS_BUCKET} is missing") from None
        except nats.js.errors.ServiceUnavailableError:
            raise StreamsMissingError("JetStream does not answer") from None

    async def get_run(self, namespace: str, run: str) -> RunState | None:
        """The run's current record, or None when there is no such run."""
        kv = await self._runs()
        try:
            entry = await kv.get(run_key(check_name("namespace", namespace), check_run_id(run)))
        except nats.js.errors.KeyNotFoundError:
            return None
        return RunState.model_validate_json(entry.value or b"")

    async def watch_run(self, namespace: str, run: str) -> AsyncIterator[RunState]:
        """The run's record now and after every change, until it is finished. Ends at
        once (with nothing) when there is no such run."""
        kv = await self._runs()
        key = run_key(check_name("namespace", namespace), check_run_id(run))
        watcher = await kv.watch(key, inactive_threshold=EPHEMERAL_INACTIVE_SECONDS)
        try:
            while True:
                entry = await watcher.updates(timeout=None)  # type: ignore[no-untyped-call]
                if entry is None:  # the end of the initial values
                    if not await self._exists(kv, key):
                        return
                    continue
                if entry.operation is not None or not entry.value:
                    return  # deleted or purged
                state = RunState.model_validate_json(entry.value)
                yield state
                if state.terminal:
                    return
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]  # nats-py

    @staticmethod
    async def _exists(kv: KeyValue, key: str) -> bool:
        try:
            await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return False
        return True

    async def list_runs(self, namespace: str, workflow: str | None = None) -> list[RunState]:
        """The namespace's runs still kept in KV (of one Workflow if named), newest first."""
        kv = await self._runs()
        prefix = f"{check_name('namespace', namespace)}."
        watcher = await kv.watch(f"{prefix}*", inactive_threshold=EPHEMERAL_INACTIVE_SECONDS)
        runs: list[RunState] = []
        try:
            while (entry := await watcher.updates(timeout=5)) is not None:  # type: ignore[no-untyped-call]
                if entry.operation is not None or not entry.value:
                    continue
                try:
                    state = RunState.model_validate_json(entry.value)
                except ValidationError as exc:
                    log.warning("ignoring unreadable run record %s: %s", entry.key, exc)
                    continue
                if workflow is None or state.workflow == workflow:
                    runs.append(state)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]  # nats-py
        return sorted(runs, key=lambda r: (-r.created, r.id))

    # -- dead letters --------------------------------------------------------------------

    async def dead_letters(
        self, namespace: str, agent: str | None = None, limit: int | None = 100
    ) -> list[tuple[int, DeadLetter]]:
        """The newest ``limit`` dead letters of the namespace (or of one Agent), oldest
        first, each with its sequence in the DLQ stream; ``limit=None`` for all."""
        check_name("namespace", namespace)
        subject = nl.dlq_subject(namespace, check_name("agent", agent) if agent else "*")
        keep: collections.deque[tuple[int, DeadLetter]] = collections.deque(maxlen=limit)
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.ALL,
            ack_policy=api.AckPolicy.NONE,
            inactive_threshold=EPHEMERAL_INACTIVE_SECONDS,
            mem_storage=True,
        )
        try:
            sub = await self.js.pull_subscribe(subject, stream=nl.DLQ_STREAM, config=config)
        except nats.js.errors.NotFoundError as exc:
            raise StreamsMissingError(f"{nl.DLQ_STREAM}: {exc.description}") from None
        except nats.js.errors.ServiceUnavailableError:
            raise StreamsMissingError("JetStream does not answer") from None
        name: str | None = None
        try:
            info = await sub.consumer_info()
            name = info.name
            # Fetching exactly what is pending: a fetch for more would wait out its timeout.
            pending = info.num_pending or 0
            while pending > 0:
                msgs = await sub.fetch(min(pending, FETCH_BATCH), timeout=10)
                pending -= len(msgs)
                for msg in msgs:
                    meta = msg.metadata
                    dl = _dead_letter(msg.subject, msg.data, meta.timestamp.timestamp())
                    keep.append((meta.sequence.stream, dl))
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            if name is not None:
                with contextlib.suppress(Exception):
                    await self.js.delete_consumer(nl.DLQ_STREAM, name)
        return list(keep)

    async def dead_letter(self, namespace: str, seq: int) -> DeadLetter | None:
        """The dead letter at ``seq`` in the DLQ stream, if it is one of the namespace's."""
        try:
            msg = await self.js.get_msg(nl.DLQ_STREAM, seq=seq)
        except nats.js.errors.NotFoundError as exc:
            if exc.err_code == NO_MESSAGE_FOUND:
                return None
            raise StreamsMissingError(f"{nl.DLQ_STREAM}: {exc.description}") from None
        except nats.js.errors.ServiceUnavailableError:
            raise StreamsMissingError("JetStream does not answer") from None
        subject = msg.subject or ""
        if not subject.startswith(nl.dlq_subject(namespace, "")):
            return None
        stored = msg.time.timestamp() if msg.time else time.time()
        return _dead_letter(subject, msg.data or b"", stored)

    async def replay(
        self,
        namespace: str,
        seqs: list[int] | None = None,
        agent: str | None = None,
        *,
        keep: bool = False,
    ) -> ReplayReport:
        """Republishes dead-lettered tasks to the Agent that dead-lettered them.

        ``seqs`` picks entries by DLQ sequence; without it, every dead letter of the
        namespace (or of ``agent``) is replayed. Each task goes out again as a fresh
        attempt (``attempt=1``, ``replays+1``, its path kept), so it produces a result
        record of its own. Entries without a parsable task cannot be replayed and are
        reported as skipped. A replayed entry is removed from the DLQ unless ``keep``:
        what stays there is what still needs attention, and replaying twice does not
        run a task twice.
        """
        report = ReplayReport()
        entries: list[tuple[int, DeadLetter]] = []
        if seqs is None:
            entries = await self.dead_letters(namespace, agent, limit=None)
        else:
            for seq in seqs:
                dl = await self.dead_letter(namespace, seq)
                if dl is None:
                    report.skipped.append(Skipped(seq, f"no dead letter of {namespace}"))
                elif agent is not None and dl.agent != agent:
                    report.skipped.append(Skipped(seq, f"dead-lettered by {dl.agent}"))
                else:
                    entries.append((seq, dl))
        for seq, dl in entries:
            if dl.task is None:
                report.skipped.append(Skipped(seq, f"no parsable task ({dl.reason})"))
                continue
            task = dl.task.model_copy(update={"replays": dl.task.replays + 1, "attempt": 1})
            published = await self.publish_task(namespace, dl.agent, task)
            if published.duplicate:
                report.skipped.append(Skipped(seq, "replayed already (duplicate publish)"))
            else:
                report.replayed.append((seq, published))
            if not keep:
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await self.js.delete_msg(nl.DLQ_STREAM, seq)
        return report


def _dead_letter(subject: str, data: bytes, stored: float) -> DeadLetter:
    """Parses a DLQ record; one that does not parse is shown as what it is rather than
    hidden (and can never be replayed, having no task)."""
    try:
        return DeadLetter.model_validate_json(data)
    except ValidationError as exc:
        parts = subject.split(".")
        namespace, agent = (parts[2], parts[3]) if len(parts) >= 4 else ("", "")
        return DeadLetter(
            namespace=namespace,
            agent=agent,
            reason="MalformedEnvelope",
            message=f"unreadable dead-letter record: {exc.error_count()} error(s)",
            raw=data[:65536].decode("utf-8", errors="replace"),
            at=stored,
        )
