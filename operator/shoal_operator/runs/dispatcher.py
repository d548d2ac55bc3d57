"""The workflow dispatcher: takes run submissions, turns step results into the next
steps' tasks, and keeps every run in one NATS KV record.

Everything on the hot path is NATS: a submission is a request on
``shoal.run.<ns>.<workflow>``, a step's result arrives on the results stream (a durable
consumer, so results that arrive while no dispatcher runs wait for the next one), and
the next tasks are published to the tasks stream. Workflow specs and Agent capabilities
come from a :class:`~shoal_operator.runs.catalog.Catalog` in memory; nothing waits on the
Kubernetes API.

Every change of a run is ``advance(spec, state, event, now)`` (pure, in
:mod:`shoal_core.runs.engine`) followed by a compare-and-set on the record's revision
(:mod:`~shoal_operator.runs.store`). The tasks an advance asks for are published *before*
its compare-and-set: their ids are deterministic, so if the dispatcher dies in between,
the replayed event publishes the same message ids and JetStream drops the repeats; a
result is acknowledged only after the record holding it is stored. That is the whole
resume story: restart the dispatcher, the runtimes or nats-server, and every run goes on
from its record (:mod:`~shoal_operator.runs.recovery`), no recorded step running again.

This module is the event loop and its ordering rules (one event at a time per run,
publish before store, acknowledge after store); admission, routing, slots, timers and
recovery are modules of their own, each with its reasons. The dispatcher is an object of
its own so it runs (and is tested and benchmarked) without kopf; the operator starts it
on the leader and reads back only :meth:`Dispatcher.tally` and :meth:`Dispatcher.queues`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api
from pydantic import ValidationError

from shoal_api import nats_layout as nl
from shoal_api.envelope import Result
from shoal_api.runs.model import (
    ApprovalDecided,
    Cancel,
    DispatchTask,
    Effect,
    Event,
    RunFinished,
    RunState,
    Started,
    Tick,
)
from shoal_api.runs.wire import DISPATCH_QUEUE, RunReply, run_key
from shoal_core.runs.engine import WORKFLOW_DELETED, abandon, advance, next_wakeup
from shoal_operator.runs.admission import Admitted, admit
from shoal_operator.runs.catalog import Catalog
from shoal_operator.runs.gate import DecideOutcome
from shoal_operator.runs.metrics import RunMetrics
from shoal_operator.runs.recovery import Resync, rebuild
from shoal_operator.runs.slots import RunSlots, Tally
from shoal_operator.runs.store import RunGone, RunStore
from shoal_operator.runs.tasks import LagSource, TaskRouter, no_lag, step_result
from shoal_operator.runs.timers import Wakeups

log = logging.getLogger(__name__)

# Results being applied at once; more wait in the consumer (max_ack_pending).
CONCURRENCY = 512
MAX_ACK_PENDING = 20_000
ACK_WAIT_SECONDS = 30
# Compare-and-set attempts before an event is left to redelivery.
CAS_ATTEMPTS = 20
RETRY_SECONDS = 1.0
SUBMIT_CONCURRENCY = 64
MISSING_RECORD_DELIVERIES = 5
MISSING_RECORD_RETRY_SECONDS = 2.0


class Dispatcher:
    def __init__(
        self,
        nc: Client,
        catalog: Catalog,
        *,
        lag: LagSource = no_lag,
        clock: Callable[[], float] = time.time,
        on_tally: Callable[[str, str], None] | None = None,
        metrics: RunMetrics | None = None,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream(timeout=10)
        self.catalog = catalog
        self.clock = clock
        self.metrics = metrics or RunMetrics()
        self.store: RunStore | None = None
        self.slots = RunSlots(on_tally)
        self.router = TaskRouter(self.js, catalog, lag, clock)
        self.wakeups = Wakeups(clock)
        self._locks: dict[str, asyncio.Lock] = {}
        self._lock_users: collections.Counter[str] = collections.Counter()
        self._slots = asyncio.Semaphore(CONCURRENCY)
        # Submissions have slots of their own: a burst of them must not keep results (the
        # runs already going) from being applied.
        self._submit_slots = asyncio.Semaphore(SUBMIT_CONCURRENCY)
        self._subs: list[Any] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self.dispatch_latency: collections.deque[float] = collections.deque(maxlen=100_000)
        """Seconds from a result's arrival to its dependents' tasks being stored and the
        run's record written (the benchmark reads it)."""

    # -- what the operator reads back --------------------------------------------------

    def tally(self, namespace: str, workflow: str) -> Tally | None:
        """The Workflow's run counts for its status; None before any run of it was seen
        (by this dispatcher, including the records it recovered)."""
        return self.slots.tally(namespace, workflow)

    def queues(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(active, queued) runs per Workflow (the metrics' gauges)."""
        return self.slots.queues()

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        self.store = store = RunStore(await self.js.key_value(nl.RUNS_BUCKET))
        await rebuild(store, self.slots, self.wakeups)
        # The results consumer exists before the first submission is taken, so no result
        # of a run can predate it: it starts at new results.
        self._subs.append(
            await self.js.subscribe(
                nl.RESULT_SUBJECTS,
                stream=nl.RESULTS_STREAM,
                durable=nl.DISPATCHER_CONSUMER,
                cb=self._on_result,
                manual_ack=True,
                pending_msgs_limit=MAX_ACK_PENDING * 2,
                config=api.ConsumerConfig(
                    deliver_policy=api.DeliverPolicy.NEW,
                    ack_wait=ACK_WAIT_SECONDS,
                    max_ack_pending=MAX_ACK_PENDING,
                ),
            )
        )
        self._subs.append(
            await self.nc.subscribe(
                nl.run_subject("*", "*"), queue=DISPATCH_QUEUE, cb=self._on_submit
            )
        )
        # Submissions are answered from the moment start() returns.
        await self.nc.flush()
        resync = Resync(self.js, store, self.slots, self.clock, self._apply_later)
        self._loops.append(
            asyncio.create_task(self.wakeups.run(self._tick), name="shoal-run-timer")
        )
        self._loops.append(asyncio.create_task(resync.run(), name="shoal-run-resync"))
        for ns, wf in self.slots.with_queue():
            self._start_queued(ns, wf)
        active, queued = self.slots.counts()
        log.info("dispatcher started: %d runs active, %d queued", active, queued)

    async def stop(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()
        for task in [*self._loops, *self._tasks]:
            task.cancel()
        await asyncio.gather(*self._loops, *self._tasks, return_exceptions=True)
        self._loops.clear()

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _store(self) -> RunStore:
        assert self.store is not None, "the dispatcher is not started"
        return self.store

    # -- submissions -----------------------------------------------------------------

    async def _on_submit(self, msg: Msg) -> None:
        # nats-py runs a subscription's callbacks one after another: answering here would
        # hold every other submission for this one's KV round trip.
        await self._submit_slots.acquire()
        self._spawn(self._answer(msg))

    async def _answer(self, msg: Msg) -> None:
        try:
            _, _, ns, wf = msg.subject.split(".", 3)
            reply = await self.submit(ns, wf, msg.data)
            outcome: str
            if reply.error is not None:
                outcome = reply.error.code
                # A name nobody declared must not become a time series of its own.
                wf = "" if outcome == "WorkflowNotFound" else wf
            else:
                outcome = "Created" if reply.created else "Existing"
            self.metrics.submissions.labels(ns, wf, outcome).inc()
            if msg.reply:
                with contextlib.suppress(Exception):
                    await msg.respond(reply.to_json())
        finally:
            self._submit_slots.release()

    async def submit(self, namespace: str, workflow: str, data: bytes) -> RunReply:
        """Validates a submission and stores its run; the reply says which run it is."""
        admitted = await admit(self._store(), self.catalog, namespace, workflow, data, self.clock)
        if not isinstance(admitted, Admitted):
            return admitted
        self.slots.account(None, admitted.state)
        self._start_queued(namespace, workflow)
        return admitted.reply

    # -- slots (maxConcurrentRuns) -----------------------------------------------------

    def _start_queued(self, namespace: str, workflow: str) -> None:
        view = self.catalog.workflow(namespace, workflow)
        if view is None:
            return
        for run in self.slots.take(namespace, workflow, view.spec.max_concurrent_runs):
            self._spawn(self._start(namespace, workflow, run))

    async def _start(self, namespace: str, workflow: str, run: str) -> None:
        state: RunState | None = None
        missing = 0
        while state is None:
            try:
                state = await self.apply(namespace, run, Started())
            except RunGone:
                # As for results: a store recovering after a restart may not find it yet.
                missing += 1
                if missing >= MISSING_RECORD_DELIVERIES:
                    break
                await asyncio.sleep(MISSING_RECORD_RETRY_SECONDS)
            except Exception as exc:
                log.warning("run %s/%s not started yet: %s", namespace, run, exc)
                await asyncio.sleep(RETRY_SECONDS)
        if state is None or state.phase != "Running":
            # Cancelled or expired while queued: the slot goes to the next run.
            self.slots.release(namespace, workflow, run)
            self._start_queued(namespace, workflow)

    # -- events ----------------------------------------------------------------------

    async def _on_result(self, msg: Msg) -> None:
        arrived = time.perf_counter()
        await self._slots.acquire()
        self._spawn(self._result(msg, arrived))

    async def _result(self, msg: Msg, arrived: float) -> None:
        try:
            try:
                result = Result.model_validate_json(msg.data)
            except ValidationError:
                await msg.ack()  # not ours to judge; the runtime wrote it
                return
            ns = msg.subject.split(".", 3)[2]
            self.router.observe(ns, result)
            if result.run is None or result.step is None:
                await msg.ack()
                return
            event = step_result(result)
            try:
                await self.apply(ns, result.run, event, arrived=arrived)
            except RunGone:
                # Records outlive runs by weeks: a missing one is most likely a store
                # still recovering after a restart. Asked again a few times before the
                # result is let go as one of a run that expired (or never was).
                if msg.metadata.num_delivered < MISSING_RECORD_DELIVERIES:
                    await msg.nak(delay=MISSING_RECORD_RETRY_SECONDS)
                    return
                log.warning("run %s/%s: no record; result of %s dropped", ns, result.run, result.id)
            except Exception as exc:
                log.warning(
                    "run %s/%s: result of %s not applied yet: %s", ns, result.run, result.id, exc
                )
                with contextlib.suppress(Exception):
                    await msg.nak(delay=RETRY_SECONDS)
                return
            await msg.ack()
        finally:
            self._slots.release()

    async def decide(
        self, namespace: str, run: str, event: ApprovalDecided, *, workflow: str
    ) -> tuple[DecideOutcome, str]:
        """Relays an approval decision (:class:`~shoal_operator.runs.gate.RunGate`)."""
        key = run_key(namespace, run)
        current = await self._store().read(key)
        if current is None:
            return "RunNotFound", f"run {run} does not exist in namespace {namespace}"
        if current[1].workflow != workflow:
            return (
                "RunNotFound",
                f"run {run} belongs to workflow {current[1].workflow}, not {workflow}",
            )
        try:
            new = await self.apply(namespace, run, event)
        except RunGone:
            return "RunNotFound", f"run {run} does not exist in namespace {namespace}"
        step = new.steps.get(event.step)
        approval = step.approval if step is not None else None
        if (
            approval is not None
            and approval.approver == event.approver
            and approval.at == event.at
            and approval.decision == event.decision
        ):
            return "Applied", f"{event.decision} of step {event.step} by {event.approver}"
        phase = step.phase if step is not None else "unknown"
        return (
            "NotWaiting",
            f"step {event.step} of run {run} is not waiting for approval (it is {phase}; "
            f"the run is {new.phase})",
        )

    async def cancel(self, namespace: str, run: str, message: str = "") -> RunState:
        return await self.apply(namespace, run, Cancel(message=message))

    def _tick(self, namespace: str, run: str) -> None:
        self._apply_later(namespace, run, Tick())

    def _apply_later(self, namespace: str, run: str, event: Event) -> None:
        self._spawn(self._apply_logged(namespace, run, event))

    async def _apply_logged(self, namespace: str, run: str, event: Event) -> None:
        try:
            await self.apply(namespace, run, event)
        except RunGone:
            pass
        except Exception as exc:
            log.warning("run %s/%s: %s not applied: %s; retrying", namespace, run, event.type, exc)
            await asyncio.sleep(RETRY_SECONDS)
            self._apply_later(namespace, run, event)

    async def apply(
        self, namespace: str, run: str, event: Event, *, arrived: float | None = None
    ) -> RunState:
        """Advances the run by ``event`` (and the events that follows from it): publish
        what it asks for, then store it with compare-and-set. Returns the stored state."""
        key = run_key(namespace, run)
        async with self._lock(key):
            pending: collections.deque[Event] = collections.deque([event])
            state: RunState | None = None
            while pending:
                state = await self._advance(key, pending.popleft(), pending, arrived)
                arrived = None
            assert state is not None
            return state

    async def _advance(
        self, key: str, event: Event, more: collections.deque[Event], arrived: float | None
    ) -> RunState:
        store = self._store()
        for _ in range(CAS_ATTEMPTS):
            current, cached = await store.current(key)
            if current is None:
                raise RunGone(key)
            revision, state = current
            view = self.catalog.workflow(state.namespace, state.workflow)
            if view is None:
                why = f"workflow {state.workflow} was deleted"
                new, effects = abandon(state, WORKFLOW_DELETED, why, self.clock())
            else:
                new, effects = advance(view.spec, state, event, self.clock())
            if new is state:
                if cached:
                    # Nothing to do, by the cache: confirm it with the store, which may be
                    # behind the cache (a nats-server that lost its latest writes). A
                    # change decided on a stale cache would fail its compare-and-set; a
                    # no-op would silently drop the event.
                    store.forget(key)
                    continue
                return state
            new, follow_ups = await self.router.publish(new, effects)
            if await store.compare_and_set(key, new, revision) is None:
                self.metrics.conflicts.inc()
                continue
            if arrived is not None and any(isinstance(e, DispatchTask) for e in effects):
                took = time.perf_counter() - arrived
                self.dispatch_latency.append(took)
                self.metrics.dispatch.observe(took)
            self._after(state, new, effects)
            more.extend(follow_ups)
            return new
        raise RuntimeError(f"run {key}: {CAS_ATTEMPTS} compare-and-set conflicts in a row")

    def _lock(self, key: str) -> _KeyLock:
        return _KeyLock(self, key)

    def _after(self, old: RunState, new: RunState, effects: Iterable[Effect]) -> None:
        self.slots.account(old, new)
        for effect in effects:
            if isinstance(effect, RunFinished):
                labels = (new.namespace, new.workflow)
                self.metrics.finished.labels(*labels, effect.phase, effect.reason).inc()
                if new.finished is not None and new.started is not None:
                    self.metrics.duration.labels(*labels).observe(new.finished - new.started)
                log.info(
                    "run %s/%s of %s %s: %s",
                    new.namespace,
                    new.id,
                    new.workflow,
                    effect.phase,
                    effect.message,
                )
                self._start_queued(new.namespace, new.workflow)
        if (when := next_wakeup(new)) is not None:
            self.wakeups.add(when, new.namespace, new.id)


class _KeyLock:
    """A lock per run key that is forgotten when nobody holds or waits for it."""

    def __init__(self, owner: Dispatcher, key: str) -> None:
        self.owner, self.key = owner, key

    async def __aenter__(self) -> None:
        self.owner._lock_users[self.key] += 1
        lock = self.owner._locks.setdefault(self.key, asyncio.Lock())
        await lock.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.owner._locks[self.key].release()
        self.owner._lock_users[self.key] -= 1
        if self.owner._lock_users[self.key] <= 0:
            del self.owner._lock_users[self.key]
            del self.owner._locks[self.key]
