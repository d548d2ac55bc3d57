"""The runtime's two hot JetStream paths, leaner than nats-py's general-purpose ones.

- :class:`Puller` pulls from the Agent's priority bands' consumers, high band first with
  a weighted share for the lower ones, and hands each delivered message to a callback as
  it arrives (nats-py's ``fetch`` queues every message and waits on it with a timer of
  its own).
- :class:`AckedPublisher` publishes a record and resolves a future when JetStream has
  stored it (nats-py's ``js.publish`` arms a timer per publish; here one sweeper expires
  all overdue acknowledgements).

Both measurably matter: the runtime's per-task cost is mostly event-loop callbacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import time
from collections.abc import Callable, Sequence

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

log = logging.getLogger(__name__)

STATUS = "Status"
NS = 1_000_000_000


class PublishError(RuntimeError):
    """JetStream refused or did not confirm a publish."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code
        """JetStream's ``err_code`` when it refused (e.g. 10071: wrong last sequence)."""


class AckedPublisher:
    def __init__(self, nc: Client, timeout: float = 10.0) -> None:
        self.nc = nc
        self.timeout = timeout
        self._prefix = ""
        self._next = 0
        self._pending: dict[str, tuple[float, asyncio.Future[bytes]]] = {}
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

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str]) -> bytes:
        """Returns JetStream's acknowledgement (JSON: stream, seq, duplicate) once it has
        stored the message, or raises PublishError."""
        self._next += 1
        token = str(self._next)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[token] = (time.monotonic(), fut)
        try:
            await self.nc.publish(
                subject, payload, reply=f"{self._prefix}.{token}", headers=headers
            )
            return await fut
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
            fut.set_exception(
                PublishError(
                    f"JetStream refused the publish: {error}", int(error.get("err_code", 0))
                )
            )
        else:
            fut.set_result(msg.data)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            overdue = time.monotonic() - self.timeout
            for sent, fut in list(self._pending.values()):
                if sent < overdue and not fut.done():
                    fut.set_exception(PublishError(f"no acknowledgement in {self.timeout:.0f}s"))


class Shares:
    """Splits pull capacity among the priority bands that have work, by weight.

    A band gets ``weight / sum(weights of the bands with work)`` of the capacity. What a
    split cannot give exactly (capacity 1 among three bands) is carried over as credit,
    so over successive splits each band still gets its share: with weights 7, 2, 1 and
    every band backlogged, ten splits of capacity 1 give 7, 2 and 1. A band without work
    banks nothing, and a lone band gets everything without touching the credits.
    """

    def __init__(self, weights: Sequence[int]) -> None:
        if not weights or any(w <= 0 for w in weights):
            raise ValueError(f"weights must be positive: {list(weights)}")
        self.weights = list(weights)
        self.credit = [0.0] * len(weights)

    def split(self, capacity: int, with_work: Sequence[bool]) -> list[int]:
        shares = [0] * len(self.weights)
        on = [i for i, busy in enumerate(with_work) if busy]
        for i in range(len(self.weights)):
            if i not in on:
                self.credit[i] = 0.0
        if capacity <= 0 or not on:
            return shares
        if len(on) == 1:
            shares[on[0]] = capacity
            return shares
        total = sum(self.weights[i] for i in on)
        quota = {i: self.credit[i] + capacity * self.weights[i] / total for i in on}
        for i in on:
            shares[i] = max(0, math.floor(quota[i]))
        # Rounding leaves at most a few units to place (or take back): by who is owed most.
        while (short := capacity - sum(shares)) != 0:
            if short > 0:
                shares[max(on, key=lambda i: quota[i] - shares[i])] += 1
            else:
                shares[min((i for i in on if shares[i]), key=lambda i: quota[i] - shares[i])] -= 1
        for i in on:
            self.credit[i] = quota[i] - shares[i]
        return shares


class _Band:
    """One band's durable consumer, as the puller sees it."""

    def __init__(self, api: str) -> None:
        self.api = api
        self.fetch_inbox = ""
        self.watch_inbox = ""
        self.open = False  # a fetch is under way
        self.left = 0  # messages that fetch may still deliver
        # Until a fetch says otherwise, a band may have work: asking is how to find out.
        self.has_work = True
        self.pending = 0  # the consumer's pending count as last seen
        self.watch = ""  # while without work: PEEK or WAIT open, or "" for none
        # Past this an unanswered watch counts as lost; after a refusal, no new watch
        # before it (monotonic).
        self.watch_until = 0.0


PEEK, WAIT = "peek", "wait"


class Puller:
    """Pulls an Agent's tasks from its priority bands' consumers (highest band first)
    and hands each delivered message to a callback as it arrives.

    Capacity goes only to bands known to have work, shared by weight (:class:`Shares`),
    in ``no_wait`` fetches: a fetch never outlives what its band has, so it cannot keep
    taking low-band work after high-band work shows up, and capacity a band cannot use
    goes to the others on the next pull.

    A band without work is watched instead, so that its next task is noticed at once:

    - a *peek*: a pull request with ``max_bytes`` 1, which the server answers with 409
      "Message Size Exceeds MaxBytes" as soon as the band has a message, without
      delivering it. Peeks take no capacity, so every band can be watched all the time
      (also with concurrency 1); noticing a task this way costs a round trip more.
    - a *wait*, when no band has work: a long-poll for one task on the band that had
      work last, so that a trickle of tasks in one band (the common case) is served
      without that extra round trip. It keeps one slot, never the last one free.
    """

    def __init__(
        self,
        nc: Client,
        stream: str,
        bands: Sequence[tuple[str, int]],
        on_msg: Callable[[Msg], None],
        expires: float = 1.0,
        peek_expires: float = 5.0,
        wake: asyncio.Event | None = None,
    ) -> None:
        """``bands``: (consumer, weight) in drain order, highest band first. ``wake``:
        the caller sets it when a slot comes free, the puller when a watch answers; a
        pull with nothing it may fetch waits for it (at most ``expires``)."""
        self.nc, self.on_msg = nc, on_msg
        self.expires, self.peek_expires = expires, peek_expires
        self.bands = [_Band(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{c}") for c, _ in bands]
        self.shares = Shares([w for _, w in bands])
        self._subs: list[Subscription] = []
        self._open = 0  # fetches of the current pull still under way
        self._fetched = asyncio.Event()
        self._woken = wake if wake is not None else asyncio.Event()
        self._recent: _Band | None = None  # the band that delivered last
        self._bodies = {
            PEEK: json.dumps(
                {"batch": 1, "max_bytes": 1, "expires": int(peek_expires * NS)}
            ).encode(),
            WAIT: json.dumps({"batch": 1, "expires": int(expires * NS)}).encode(),
        }
        self.last_status = ""

    @property
    def pending(self) -> int:
        """Tasks waiting in all bands, as last seen."""
        return sum(b.pending for b in self.bands)

    async def start(self) -> None:
        for band in self.bands:
            band.fetch_inbox, band.watch_inbox = self.nc.new_inbox(), self.nc.new_inbox()
            # Generous limits: the fetch size already bounds what can be queued here.
            self._subs.append(
                await self.nc.subscribe(
                    band.fetch_inbox,
                    cb=functools.partial(self._on_fetched, band),
                    pending_msgs_limit=100_000,
                )
            )
            self._subs.append(
                await self.nc.subscribe(
                    band.watch_inbox, cb=functools.partial(self._on_watch, band)
                )
            )

    async def stop(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def reconnected(self) -> None:
        """Watches open before a reconnect may be gone with the server: renew them now
        rather than at their deadline."""
        for band in self.bands:
            band.watch, band.watch_until = "", 0.0
        self._woken.set()

    async def pull(self, batch: int) -> None:
        """Takes up to ``batch`` messages from the bands with work; returns when those
        fetches are over. With nothing to fetch (no band known to have work, or only
        the slots open waits keep), returns once that may have changed (``wake``) or
        after ``expires``, so the caller can size the next pull."""
        await self._watch(batch)
        capacity = batch - self._waits(time.monotonic())
        shares = self.shares.split(capacity, [b.has_work for b in self.bands])
        asked = [(band, n) for band, n in zip(self.bands, shares, strict=True) if n > 0]
        if not asked:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._woken.wait(), self.expires)
            # Before the caller reads its state again: what changes after is not missed.
            self._woken.clear()
            return
        self._fetched.clear()
        self._open = len(asked)
        for band, n in asked:
            band.open, band.left = True, n
            await self.nc.publish(band.api, _fetch_body(n), reply=band.fetch_inbox)
        try:
            # The server answers a no_wait fetch at once; the margin covers a lost
            # end-of-request status (e.g. across a reconnect).
            await asyncio.wait_for(self._fetched.wait(), self.expires + 2.0)
        except TimeoutError:
            for band, _ in asked:
                band.open = False
            self._open = 0

    async def _watch(self, batch: int) -> None:
        """Opens a watch on each band without work that has none open."""
        now = time.monotonic()
        idle = not any(b.has_work for b in self.bands)
        waiting = self._waits(now)
        for band in self.bands:
            if band.has_work or band.watch_until > now:
                continue
            kind = PEEK
            if idle and band is self._recent and not waiting and batch >= 2:
                kind, waiting = WAIT, 1
            band.watch = kind
            band.watch_until = now + (self.expires if kind == WAIT else self.peek_expires) + 2.0
            await self.nc.publish(band.api, self._bodies[kind], reply=band.watch_inbox)

    def _waits(self, now: float) -> int:
        """Slots kept by open waits (one each)."""
        return sum(b.watch == WAIT and b.watch_until > now for b in self.bands)

    def _end(self, band: _Band) -> None:
        if band.open:
            band.open = False
            self._open -= 1
            if self._open <= 0:
                self._fetched.set()

    async def _on_fetched(self, band: _Band, msg: Msg) -> None:
        status = msg.headers.get(STATUS) if msg.headers and not msg.data else None
        if status is not None:
            if status == "100":  # idle heartbeat
                return
            if status not in ("404", "408"):  # 409 consumer deleted, 503 no consumer...
                self.last_status = f"{status} {_description(msg)}"
            # No messages (or none to be had): the band has no work until a watch says so.
            band.has_work, band.pending, band.left = False, 0, 0
            self._end(band)
            return
        self.on_msg(msg)
        self._recent = band
        band.left -= 1
        if band.left == 0:
            # A filled fetch ends without a status; its last message tells what is left.
            band.pending = delivery(msg)[1]
            band.has_work = band.pending > 0
            self._end(band)

    async def _on_watch(self, band: _Band, msg: Msg) -> None:
        status = msg.headers.get(STATUS) if msg.headers and not msg.data else None
        if status == "100":
            return
        band.watch, band.watch_until = "", 0.0
        if status is None:  # the task a wait was for
            self.on_msg(msg)
            self._recent = band
            band.pending = delivery(msg)[1]
            band.has_work = band.pending > 0
        elif status == "409" and _description(msg) == MAX_BYTES_EXCEEDED:  # a peek's
            band.has_work = True
            band.pending = max(band.pending, 1)
        elif status not in ("404", "408"):  # expired: simply watch again
            self.last_status = f"{status} {_description(msg)}"
            # No hot loop on a consumer that is missing or refuses.
            band.watch_until = time.monotonic() + self.expires
        self._woken.set()


MAX_BYTES_EXCEEDED = "Message Size Exceeds MaxBytes"


def _description(msg: Msg) -> str:
    return str(msg.headers.get("Description", "")) if msg.headers else ""


@functools.cache
def _fetch_body(batch: int) -> bytes:
    return json.dumps({"batch": batch, "no_wait": True}).encode()


def delivery(msg: Msg) -> tuple[int, int]:
    """(times delivered, messages pending) from a JetStream message's reply subject.

    The common v1 form is split here directly; nats-py's ``metadata`` builds dataclasses
    and a datetime for every message, which shows on a no-op task's profile."""
    tokens = (msg.reply or "").split(".")
    if len(tokens) == 9 and tokens[0] == "$JS" and tokens[1] == "ACK":
        return int(tokens[4]), int(tokens[8])
    meta = msg.metadata
    return meta.num_delivered or 1, meta.num_pending or 0
