"""The workflow dispatcher: takes run submissions, turns step results into the next
steps' tasks, and keeps every run in one NATS KV record.

Everything on the hot path is NATS: a submission is a request on
``shoal.run.<ns>.<workflow>``, a step's result arrives on the results stream (a durable
consumer, so results that arrive while no dispatcher runs wait for the next one), and
the next tasks are published to the tasks stream. Workflow specs and Agent capabilities
come from the operator's watch cache, in memory; nothing waits on the Kubernetes API.

Every change of a run is ``advance(spec, state, event, now)`` (pure, in
:mod:`shoal_core.runs.engine`) followed by a compare-and-set on the record's revision, so
two dispatchers (or a dispatcher and a handler writing the run's context) never both
move a run from the same revision. The tasks an advance asks for are published *before*
its compare-and-set: their ids are deterministic, so if the dispatcher dies in between,
the replayed event publishes the same message ids and JetStream drops the repeats; a
result is acknowledged only after the record holding it is stored. That is the whole
resume story: restart the dispatcher, the runtimes or nats-server, and every run goes on
from its record, no recorded step running again.

The dispatcher is an object of its own so it runs (and is tested and benchmarked)
without kopf; the operator starts it on the leader.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import itertools
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import jsonschema
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api
from nats.js.kv import KeyValue
from pydantic import ValidationError

from shoal_api import nats_layout as nl
from shoal_api.envelope import MSG_ID_HEADER, Result, Task
from shoal_api.json_schema import schema_error, validator, violation
from shoal_api.runs.model import (
    ApprovalDecided,
    Cancel,
    DispatchTask,
    Effect,
    Event,
    RunFinished,
    RunState,
    Started,
    StepResult,
    Tick,
)
from shoal_api.runs.wire import (
    DISPATCH_QUEUE,
    ErrorCode,
    RunError,
    RunReply,
    RunRequest,
    run_id_for_key,
    run_key,
)
from shoal_api.workflow import WorkflowSpec
from shoal_core.runs.engine import WORKFLOW_DELETED, abandon, advance, invalid_reason, next_wakeup
from shoal_core.runs.selection import choose
from shoal_core.runs.when import compile_when
from shoal_operator.run_gate import DecideOutcome
from shoal_operator.run_metrics import RunMetrics

log = logging.getLogger(__name__)

# Results being applied at once; more wait in the consumer (max_ack_pending).
CONCURRENCY = 512
MAX_ACK_PENDING = 20_000
ACK_WAIT_SECONDS = 30
# Compare-and-set attempts before an event is left to redelivery.
CAS_ATTEMPTS = 20
# BestSuccessRate looks at this window of results per Agent.
SUCCESS_WINDOW_SECONDS = 300.0
SUCCESS_WINDOW_MAX = 1000
DURATIONS_KEPT = 1000
RETRY_SECONDS = 1.0
SUBMIT_CONCURRENCY = 64
MISSING_RECORD_DELIVERIES = 5
# How often (and after how long) dispatched steps are checked for results already stored.
RESYNC_SECONDS = 30.0
MISSING_RECORD_RETRY_SECONDS = 2.0


@dataclass(frozen=True)
class WorkflowView:
    """What the dispatcher needs of one Workflow (from the operator's cache)."""

    spec: WorkflowSpec
    input_validator: jsonschema.protocols.Validator | None
    problem: str | None = None
    """Why no run of it can start (a cycle, a ``when`` that does not compile, ...)."""


def view_of(spec: WorkflowSpec) -> WorkflowView:
    """The dispatcher's view of a spec: its input validator, and why it cannot run at
    all (what the operator also reports as Ready=False; missing Agents are not on the
    list: their tasks wait in the stream until the Agent exists)."""
    problem = invalid_reason(spec)
    if problem is None:
        problem = next(
            (f"step {s.name}: {why}" for s in spec.steps if (why := compile_when(s.when))),
            None,
        )
    if why := schema_error(spec.input):
        return WorkflowView(spec, None, problem or f"spec.input is not a valid JSON Schema {why}")
    return WorkflowView(spec, validator(spec.input), problem)


class Catalog(Protocol):
    def workflow(self, namespace: str, name: str) -> WorkflowView | None: ...

    def capable(self, namespace: str, capability: str) -> list[str]:
        """The Agents of ``namespace`` declaring ``capability``, sorted."""
        ...


LagSource = Callable[[str, str], Awaitable[int | None]]


async def _no_lag(namespace: str, agent: str) -> int | None:
    return None


@dataclass
class Tally:
    """A Workflow's runs, for its status (the operator mirrors it, throttled)."""

    queued: int = 0
    active: int = 0
    succeeded: int = 0
    failed: int = 0
    durations: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=DURATIONS_KEPT)
    )
    last_run: float | None = None

    def p95(self) -> float | None:
        if not self.durations:
            return None
        ordered = sorted(self.durations)
        return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


class _Conflict(Exception):  # noqa: N818  (a signal, not an error)
    """A compare-and-set found the record at another revision."""


class RunGone(Exception):  # noqa: N818  (a signal, not an error)
    """The run's record does not exist (never did, or expired)."""


class Dispatcher:
    def __init__(
        self,
        nc: Client,
        catalog: Catalog,
        *,
        lag: LagSource = _no_lag,
        clock: Callable[[], float] = time.time,
        on_tally: Callable[[str, str], None] | None = None,
        metrics: RunMetrics | None = None,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream(timeout=10)
        self.catalog = catalog
        self.lag = lag
        self.clock = clock
        self.on_tally = on_tally
        self.metrics = metrics or RunMetrics()
        self.kv: KeyValue | None = None
        # key -> (revision, state) as last stored by this dispatcher: saves the read
        # before each advance; a stale entry only costs a failed compare-and-set.
        self._records: dict[str, tuple[int, RunState]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._lock_users: collections.Counter[str] = collections.Counter()
        # (ns, workflow) -> heap of (-priority, created, run id) waiting for a slot; an
        # entry whose run is no longer in _waiting (cancelled meanwhile) is passed over.
        self._queued: dict[tuple[str, str], list[tuple[int, float, str]]] = {}
        self._waiting: dict[tuple[str, str], set[str]] = {}
        self._active: dict[tuple[str, str], set[str]] = {}
        self._tallies: dict[tuple[str, str], Tally] = {}
        self._wakeups: list[tuple[float, str, str]] = []
        self._woken = asyncio.Event()
        self._outcomes: dict[tuple[str, str], collections.deque[tuple[float, bool]]] = {}
        self._turns = itertools.count()
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

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        self.kv = await self.js.key_value(nl.RUNS_BUCKET)
        await self._recover()
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
        self._loops.append(asyncio.create_task(self._timer(), name="shoal-run-timer"))
        self._loops.append(asyncio.create_task(self._resync(), name="shoal-run-resync"))
        for ns, wf in sorted(self._queued):
            self._start_queued(ns, wf)
        log.info(
            "dispatcher started: %d runs active, %d queued",
            sum(len(a) for a in self._active.values()),
            sum(len(q) for q in self._queued.values()),
        )

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

    async def _recover(self) -> None:
        """Rebuilds queues, slots, timers and tallies from the records in KV."""
        assert self.kv is not None
        watcher = await self.kv.watch("*.*", ignore_deletes=True)
        try:
            while (entry := await watcher.updates(timeout=30)) is not None:  # type: ignore[no-untyped-call]
                if not entry.value:
                    continue
                try:
                    state = RunState.model_validate_json(entry.value)
                except ValidationError as exc:
                    log.warning("ignoring unreadable run record %s: %s", entry.key, exc)
                    continue
                self._records[entry.key] = (entry.revision or 0, state)
                self._account(None, state)
                if (when := next_wakeup(state)) is not None:
                    heapq.heappush(self._wakeups, (when, state.namespace, state.id))
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]  # nats-py
        # Only live runs stay cached: finished ones are read again if ever needed.
        self._records = {k: v for k, v in self._records.items() if not v[1].terminal}

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

        def refuse(code: ErrorCode, message: str) -> RunReply:
            return RunReply(error=RunError(code=code, message=message))

        try:
            request = RunRequest.model_validate_json(data)
        except ValidationError as exc:
            return refuse("InvalidRequest", f"malformed run request: {exc.errors()[0]['msg']}")
        view = self.catalog.workflow(namespace, workflow)
        if view is None:
            return refuse(
                "WorkflowNotFound", f"workflow {workflow} not found in namespace {namespace}"
            )
        if view.problem:
            return refuse("InvalidWorkflow", f"workflow {workflow} cannot run: {view.problem}")
        if problem := violation(view.input_validator, request.input):
            return refuse("InvalidInput", f"input does not match spec.input: {problem}")
        # A key or a client-chosen id names one run however often it is submitted.
        named = request.idempotency_key is not None or request.id is not None
        for _ in range(3):
            if request.idempotency_key is not None:
                run_id = run_id_for_key(namespace, workflow, request.idempotency_key)
            else:
                run_id = request.id or secrets.token_hex(8)
            state = RunState.new(
                view.spec,
                run_id=run_id,
                workflow=workflow,
                namespace=namespace,
                input=request.input,
                now=self.clock(),
                priority=request.priority,
                idempotency_key=request.idempotency_key,
            )
            key = run_key(namespace, run_id)
            try:
                assert self.kv is not None
                revision = await self.kv.create(key, state.to_json())
            except nats.js.errors.KeyWrongLastSequenceError:
                if not named:
                    continue  # a random id taken: draw another
                existing = await self._read(key)
                if existing is None:
                    continue  # expired in between: create it again
                if existing[1].workflow != workflow:
                    return refuse(
                        "IdempotencyConflict",
                        f"run id or idempotency key {request.idempotency_key or request.id!r} "
                        f"belongs to run "
                        f"{existing[1].id} of workflow {existing[1].workflow}",
                    )
                return RunReply(run=existing[1].id, created=False, phase=existing[1].phase)
            except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
                return refuse("Unavailable", f"could not store the run: {exc}")
            self._records[key] = (revision, state)
            self._account(None, state)
            self._start_queued(namespace, workflow)
            return RunReply(run=run_id, created=True, phase=state.phase)
        return refuse("Unavailable", "could not find a free run id")

    # -- slots (maxConcurrentRuns) -----------------------------------------------------

    def _start_queued(self, namespace: str, workflow: str) -> None:
        wf = (namespace, workflow)
        view = self.catalog.workflow(namespace, workflow)
        queue = self._queued.get(wf)
        if view is None or not queue:
            return
        active = self._active.setdefault(wf, set())
        waiting = self._waiting.setdefault(wf, set())
        while queue and len(active) < view.spec.max_concurrent_runs:
            _, _, run = heapq.heappop(queue)
            if run not in waiting:
                continue
            # Holds the slot from now on, so a burst of finishes cannot overfill it.
            waiting.discard(run)
            active.add(run)
            self._tally(wf).queued = len(waiting)
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
            self._active.get((namespace, workflow), set()).discard(run)
            self._start_queued(namespace, workflow)

    def _account(self, old: RunState | None, new: RunState) -> None:
        """Moves a run between queue, slot and tally as its phase changes."""
        wf = (new.namespace, new.workflow)
        tally = self._tally(wf)
        if old is not None and old.phase == new.phase:
            return
        waiting = self._waiting.setdefault(wf, set())
        active = self._active.setdefault(wf, set())
        if new.phase == "Pending":
            heapq.heappush(self._queued.setdefault(wf, []), (-new.priority, new.created, new.id))
            waiting.add(new.id)
        elif new.phase == "Running":
            waiting.discard(new.id)
            active.add(new.id)
            tally.last_run = max(tally.last_run or 0.0, new.started or new.created)
        elif new.terminal:
            waiting.discard(new.id)
            active.discard(new.id)
            if new.phase == "Succeeded":
                tally.succeeded += 1
            else:
                tally.failed += 1
            if new.finished is not None:
                tally.durations.append(new.finished - (new.started or new.created))
        tally.queued, tally.active = len(waiting), len(active)
        if self.on_tally is not None:
            self.on_tally(*wf)

    def _tally(self, wf: tuple[str, str]) -> Tally:
        return self._tallies.setdefault(wf, Tally())

    def tally(self, namespace: str, workflow: str) -> Tally | None:
        return self._tallies.get((namespace, workflow))

    def queues(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(active, queued) runs per Workflow."""
        return {wf: (t.active, t.queued) for wf, t in self._tallies.items()}

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
            self._observe(ns, result)
            if result.run is None or result.step is None:
                await msg.ack()
                return
            event = _step_result(result)
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

    def _observe(self, namespace: str, result: Result) -> None:
        """Feeds BestSuccessRate: every result on the stream, of runs or not."""
        window = self._outcomes.setdefault(
            (namespace, result.agent), collections.deque(maxlen=SUCCESS_WINDOW_MAX)
        )
        window.append((result.finished, result.status == "Succeeded"))

    def _success_rate(self, namespace: str, agent: str, now: float) -> float | None:
        window = self._outcomes.get((namespace, agent))
        if not window:
            return None
        recent = [ok for at, ok in window if at >= now - SUCCESS_WINDOW_SECONDS]
        return sum(recent) / len(recent) if recent else None

    async def decide(
        self, namespace: str, run: str, event: ApprovalDecided, *, workflow: str
    ) -> tuple[DecideOutcome, str]:
        """Relays an approval decision (:class:`~shoal_operator.run_gate.RunGate`)."""
        key = run_key(namespace, run)
        current = await self._read(key)
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

    async def _apply_logged(self, namespace: str, run: str, event: Event) -> None:
        try:
            await self.apply(namespace, run, event)
        except RunGone:
            pass
        except Exception as exc:
            log.warning("run %s/%s: %s not applied: %s; retrying", namespace, run, event.type, exc)
            await asyncio.sleep(RETRY_SECONDS)
            self._spawn(self._apply_logged(namespace, run, event))

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
        for _ in range(CAS_ATTEMPTS):
            cached = self._records.get(key)
            current = cached or await self._read(key)
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
                if cached is not None:
                    # Nothing to do, by the cache: confirm it with the store, which may be
                    # behind the cache (a nats-server that lost its latest writes). A
                    # change decided on a stale cache would fail its compare-and-set; a
                    # no-op would silently drop the event.
                    self._records.pop(key, None)
                    continue
                return state
            new, follow_ups = await self._publish(new, effects)
            try:
                revision = await self._store(key, new, revision)
            except _Conflict:
                self.metrics.conflicts.inc()
                self._records.pop(key, None)
                continue
            if arrived is not None and any(isinstance(e, DispatchTask) for e in effects):
                took = time.perf_counter() - arrived
                self.dispatch_latency.append(took)
                self.metrics.dispatch.observe(took)
            if new.terminal:
                self._records.pop(key, None)
            else:
                self._records[key] = (revision, new)
            self._after(state, new, effects)
            more.extend(follow_ups)
            return new
        raise RuntimeError(f"run {key}: {CAS_ATTEMPTS} compare-and-set conflicts in a row")

    async def _store(self, key: str, state: RunState, revision: int) -> int:
        """Compare-and-set of a run record; returns the new revision, raises
        :class:`_Conflict` when the record moved on."""
        assert self.kv is not None
        try:
            return await self.kv.update(key, state.to_json(), last=revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            raise _Conflict(key) from None

    async def _read(self, key: str) -> tuple[int, RunState] | None:
        assert self.kv is not None
        try:
            entry = await self.kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        if not entry.value:
            return None
        return entry.revision or 0, RunState.model_validate_json(entry.value)

    def _lock(self, key: str) -> _KeyLock:
        return _KeyLock(self, key)

    # -- effects ---------------------------------------------------------------------

    async def _publish(
        self, state: RunState, effects: Iterable[Effect]
    ) -> tuple[RunState, list[Event]]:
        """Publishes the tasks of ``effects``. Returns the state with the Agents chosen
        for ``agentSelector`` steps recorded, and events for steps that could not be
        routed (no Agent has the capability), to be applied next."""
        follow_ups: list[Event] = []
        chosen: dict[str, str] = {}
        sends = []
        for effect in effects:
            if not isinstance(effect, DispatchTask):
                continue
            agent = effect.agent
            if agent is None and effect.selector is not None:
                agent = await self._select(state.namespace, effect)
                if agent is None:
                    follow_ups.append(
                        StepResult(
                            step=effect.step,
                            task_id=effect.task_id,
                            status="DeadLettered",
                            reason="Unroutable",
                            message=f"no Agent in namespace {state.namespace} has "
                            f"capability {effect.selector.capability}",
                        )
                    )
                    continue
                chosen[effect.step] = agent
            assert agent is not None
            task = Task(
                id=effect.task_id,
                input=effect.input,
                priority=effect.priority,
                deadline=effect.deadline,
                run=effect.run,
                step=effect.step,
                timeout=effect.timeout_seconds,
                max_attempts=1 if effect.retry is not None else None,
                submitted=self.clock(),
            )
            subject = nl.task_subject(state.namespace, agent, task.priority)
            sends.append(
                self.js.publish(subject, task.to_json(), headers={MSG_ID_HEADER: task.msg_id()})
            )
        if sends:
            await asyncio.gather(*sends)
        if chosen:
            steps = {
                name: st.model_copy(update={"agent": chosen[name]}) if name in chosen else st
                for name, st in state.steps.items()
            }
            state = state.model_copy(update={"steps": steps})
        return state, follow_ups

    async def _select(self, namespace: str, effect: DispatchTask) -> str | None:
        assert effect.selector is not None
        candidates = self.catalog.capable(namespace, effect.selector.capability)
        if not candidates:
            return None
        strategy = effect.selector.strategy
        lag: dict[str, int] = {}
        success: dict[str, float] = {}
        if strategy == "LeastLag":
            figures = await asyncio.gather(*(self.lag(namespace, a) for a in candidates))
            lag = {a: f for a, f in zip(candidates, figures, strict=True) if f is not None}
        elif strategy == "BestSuccessRate":
            now = self.clock()
            rates = {a: self._success_rate(namespace, a, now) for a in candidates}
            success = {a: r for a, r in rates.items() if r is not None}
        return choose(strategy, candidates, lag=lag, success=success, turn=next(self._turns))

    def _after(self, old: RunState, new: RunState, effects: Iterable[Effect]) -> None:
        self._account(old, new)
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
            heapq.heappush(self._wakeups, (when, new.namespace, new.id))
            self._woken.set()

    async def _resync(self) -> None:
        """Level-triggered backstop for lost events: a step dispatched a while ago whose
        result is already stored gets that result applied. Results arrive as events; a
        nats-server restart can lose a consumer's record of what it delivered but not
        acknowledged, and then such a result is never delivered again."""
        while True:
            await asyncio.sleep(RESYNC_SECONDS)
            now = self.clock()
            for (ns, _), runs in list(self._active.items()):
                for run in sorted(runs):
                    key = run_key(ns, run)
                    try:
                        current = self._records.get(key) or await self._read(key)
                        if current is not None and current[1].phase == "Running":
                            await self._catch_up(current[1], now)
                    except Exception as exc:  # NATS trouble: the next round looks again
                        log.debug("resync of %s skipped: %s", key, exc)

    async def _catch_up(self, state: RunState, now: float) -> None:
        for name, step in sorted(state.steps.items()):
            if step.phase != "Dispatched" or step.task_id is None:
                continue
            if (step.started or now) > now - RESYNC_SECONDS:
                continue
            try:
                raw = await self.js.get_last_msg(
                    nl.RESULTS_STREAM,
                    nl.result_subject(state.namespace, step.task_id),
                    direct=True,
                )
            except nats.js.errors.NotFoundError:
                continue  # no result yet
            result = Result.model_validate_json(raw.data or b"")
            if result.step is None:
                continue
            log.info(
                "run %s/%s: catching up on the result of step %s", state.namespace, state.id, name
            )
            self._spawn(self._apply_logged(state.namespace, state.id, _step_result(result)))

    # -- time ------------------------------------------------------------------------

    async def _timer(self) -> None:
        """Feeds Ticks at run deadlines and approval timeouts."""
        while True:
            self._woken.clear()
            now = self.clock()
            while self._wakeups and self._wakeups[0][0] <= now:
                _, ns, run = heapq.heappop(self._wakeups)
                self._spawn(self._apply_logged(ns, run, Tick()))
            delay = self._wakeups[0][0] - now if self._wakeups else 60.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._woken.wait(), timeout=max(0.01, min(delay, 60.0)))


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


def _step_result(result: Result) -> StepResult:
    """The engine's event for a step's result record."""
    assert result.step is not None
    return StepResult(
        step=result.step,
        task_id=result.id,
        status=result.status,
        output=result.output,
        reason=result.reason,
        message=result.message,
        path=result.path,
    )
