"""The runtime's two hot JetStream paths, leaner than nats-py's general-purpose ones.

- :class:`Puller` keeps one pull request open on the Agent's durable consumer and hands
  each delivered message to a callback as it arrives (nats-py's ``fetch`` queues every
  message and waits on it with a timer of its own).
- :class:`AckedPublisher` publishes a record and resolves a future when JetStream has
  stored it (nats-py's ``js.publish`` arms a timer per publish; here one sweeper expires
  all overdue acknowledgements).

Both measurably matter: the runtime's per-task cost is mostly event-loop callbacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

log = logging.getLogger(__name__)

STATUS = "Status"
NS = 1_000_000_000


class PublishError(RuntimeError):
    """JetStream refused or did not confirm a publish."""


class AckedPublisher:
    def __init__(self, nc: Client, timeout: float = 10.0) -> None:
        self.nc = nc
        self.timeout = timeout
        self._prefix = ""
        self._next = 0
        self._pending: dict[str, tuple[float, asyncio.Future[None]]] = {}
        self._sub: Subscription | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._prefix = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(f"{self._prefix}.*", cb=self._on_ack)
        self._sweeper = asyncio.create_task(self._sweep(), name="publish-acks")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        for _, fut in self._pending.values():
            if not fut.done():
                fut.set_exception(PublishError("publisher stopped"))
        self._pending.clear()

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str]) -> None:
        """Returns once JetStream has stored the message (or raises PublishError)."""
        self._next += 1
        token = str(self._next)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending[token] = (time.monotonic(), fut)
        try:
            await self.nc.publish(
                subject, payload, reply=f"{self._prefix}.{token}", headers=headers
            )
            await fut
        finally:
            self._pending.pop(token, None)

    async def _on_ack(self, msg: Msg) -> None:
        token = msg.subject.rpartition(".")[2]
        entry = self._pending.get(token)
        if entry is None or entry[1].done():
            return
        fut = entry[1]
        status = msg.headers.get(STATUS) if msg.headers else None
        if status == "503":
            fut.set_exception(PublishError("no stream stores this subject (no responders)"))
        elif b'"error"' in msg.data:
            error = json.loads(msg.data).get("error", {})
            fut.set_exception(PublishError(f"JetStream refused the publish: {error}"))
        else:
            fut.set_result(None)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            overdue = time.monotonic() - self.timeout
            for sent, fut in list(self._pending.values()):
                if sent < overdue and not fut.done():
                    fut.set_exception(PublishError(f"no acknowledgement in {self.timeout:.0f}s"))


class Puller:
    """One outstanding pull request at a time, for up to ``want()`` messages."""

    def __init__(
        self,
        nc: Client,
        stream: str,
        consumer: str,
        on_msg: Callable[[Msg], None],
        expires: float = 1.0,
    ) -> None:
        self.nc, self.on_msg, self.expires = nc, on_msg, expires
        self._api = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = ""
        self._sub: Subscription | None = None
        self._left = 0  # messages the open request may still deliver
        self._done = asyncio.Event()
        self._done.set()
        self.last_status = ""

    async def start(self) -> None:
        self._inbox = self.nc.new_inbox()
        # Generous limits: the request size already bounds what can be queued here.
        self._sub = await self.nc.subscribe(
            self._inbox, cb=self._deliver, pending_msgs_limit=100_000
        )

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def pull(self, batch: int) -> None:
        """Asks for up to ``batch`` messages; returns when the request is over (filled,
        expired or refused), so the caller can size the next one."""
        self._left = batch
        self._done.clear()
        body = json.dumps({"batch": batch, "expires": int(self.expires * NS)}).encode()
        await self.nc.publish(self._api, body, reply=self._inbox)
        try:
            # The server ends an unfilled request itself after `expires`; the margin
            # covers a lost end-of-request status (e.g. across a reconnect).
            await asyncio.wait_for(self._done.wait(), self.expires + 2.0)
        except TimeoutError:
            self._left = 0
            self._done.set()

    async def _deliver(self, msg: Msg) -> None:
        status = msg.headers.get(STATUS) if msg.headers and not msg.data else None
        if status is not None:
            if status == "100":  # idle heartbeat
                return
            # 404 no messages, 408 request expired, 409 consumer changed/deleted...
            self.last_status = (
                f"{status} {msg.headers.get('Description', '') if msg.headers else ''}"
            )
            self._left = 0
            self._done.set()
            return
        self.on_msg(msg)
        self._left -= 1
        if self._left <= 0:
            self._done.set()


def delivery(msg: Msg) -> tuple[int, int]:
    """(times delivered, messages pending) from a JetStream message's reply subject.

    The common v1 form is split here directly; nats-py's ``metadata`` builds dataclasses
    and a datetime for every message, which shows on a no-op task's profile."""
    tokens = (msg.reply or "").split(".")
    if len(tokens) == 9 and tokens[0] == "$JS" and tokens[1] == "ACK":
        return int(tokens[4]), int(tokens[8])
    meta = msg.metadata
    return meta.num_delivered or 1, meta.num_pending or 0
