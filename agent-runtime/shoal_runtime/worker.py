"""The runtime's work loop: pull an Agent's tasks from its durable consumer, enforce the
Agent's contract and failure handling, record one result per task, then acknowledge.

Delivery guarantees, in order of the steps for one task:
- A result (or dead letter, or the forwarded task) is stored by JetStream *before* the
  task is acknowledged, so an acknowledged task always has its record. Records carry a
  ``Nats-Msg-Id``, so a record written twice (a worker died between write and ack) is
  kept once.
- A redelivered task first looks up its result: when one exists the delivery is
  acknowledged without running the handler again.
- Retries are JetStream redeliveries (``nak`` with the Agent's backoff), never sleeps in
  the worker; an attempt cannot outlive its ack wait because in-flight tasks send
  progress heartbeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue

from shoal_api import envelope as env
from shoal_api import nats_layout as nl
from shoal_api.agent import AgentSpec
from shoal_api.json_schema import validator, violation
from shoal_runtime.breaker import Breaker, Transition
from shoal_runtime.config import Settings
from shoal_runtime.handler_loading import Handlers
from shoal_runtime.metrics import Metrics
from shoal_runtime.run_context import RunContext
from shoal_runtime.sdk import Context, PermanentError, RetryableError
from shoal_runtime.shared import (
    CircuitSync,
    Clock,
    ResultCache,
    StatsReporter,
    TaskRateLimiter,
    TokenRateLimiter,
    UsageLedger,
    open_buckets,
    stop_task,
    wall_clock,
)
from shoal_runtime.stream import AckedPublisher, Puller, delivery

log = logging.getLogger("shoal.runtime")

FETCH_MAX = 256
FETCH_WAIT = 1.0
HELD_POLL = 0.2


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


class Worker:
    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock = wall_clock,
        handlers: Handlers | None = None,
    ) -> None:
        self.settings = settings
        self.spec: AgentSpec = settings.spec
        self.ns, self.agent = settings.namespace, settings.agent
        self.clock = clock
        self.handlers = handlers or Handlers(self.spec, settings.llm_api_key)
        self.metrics = Metrics(self.ns, self.agent)
        self.input_schema = validator(self.spec.contract.input)
        self.output_schema = validator(self.spec.contract.output)
        self.delays = self.spec.retry.delays()
        self.breaker = Breaker(self.spec.circuit_breaker) if self.spec.circuit_breaker else None
        self.ready = False
        self.stopping = False
        self.last_loop = time.monotonic()
        # Keyed by id(msg): Msg is an unhashable dataclass.
        self._inflight: dict[int, tuple[Msg, asyncio.Task[None]]] = {}
        self._slot = asyncio.Event()
        self._background: list[asyncio.Task[None]] = []
        self._spawned: set[asyncio.Task[Any]] = set()
        self.stats = StatsReporter(clock)
        # Read at scrape time rather than updated per task.
        self.metrics.in_flight.set_function(lambda: len(self._inflight))
        self._batches: asyncio.Queue[Job] | None = None
        self.nc: Client | None = None
        self.circuit: CircuitSync | None = None
        self.task_limiter: TaskRateLimiter | None = None
        self.token_limiter: TokenRateLimiter | None = None
        self.ledger: UsageLedger | None = None
        self.cache: ResultCache | None = None
        self.runs: KeyValue | None = None

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Serves tasks until ``stop`` is set, then drains within the grace period."""
        await self.start()
        try:
            fetch = asyncio.create_task(self._fetch_loop(stop), name="fetch")
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait((fetch, stopped), return_when=asyncio.FIRST_COMPLETED)
            self.stopping = True
            self.ready = False
            stop.set()
            await stopped
            await fetch  # re-raises if the loop died
            await self.drain()
        finally:
            await self.close()

    async def start(self) -> None:
        s = self.settings
        self.nc = await nats.connect(
            s.nats_url,
            name=f"shoal-runtime {self.ns}/{self.agent} {s.pod_name}",
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            connect_timeout=5,
            reconnected_cb=self._reconnected,
        )
        self.js = self.nc.jetstream(timeout=10)
        self.publisher = AckedPublisher(self.nc)
        await self.publisher.start()
        self.puller = Puller(
            self.nc,
            nl.TASKS_STREAM,
            [(nl.consumer_name(self.ns, self.agent, b.name), b.weight) for b in nl.BANDS],
            self._accept,
            expires=FETCH_WAIT,
            wake=self._slot,
        )
        await self.puller.start()
        # Queued in every band as last seen; read at scrape time like in_flight.
        self.metrics.queue_lag.set_function(lambda: self.puller.pending + len(self._inflight))
        kv = await open_buckets(self.js)
        key = nl.agent_key(self.ns, self.agent)
        if self.breaker is not None:
            self.circuit = CircuitSync(
                kv[nl.CIRCUIT_BUCKET], key, self.breaker, s.pod_name, self.metrics.set_circuit
            )
            await self.circuit.start()
        rate = self.spec.rate_limit
        if rate is not None and rate.tasks_per_second:
            self.task_limiter = TaskRateLimiter(
                kv[nl.USAGE_BUCKET],
                nl.limiter_key(self.ns, self.agent, "tasks"),
                rate.tasks_per_second,
                self.clock,
            )
        if rate is not None and rate.tokens_per_minute:
            self.token_limiter = TokenRateLimiter(
                kv[nl.USAGE_BUCKET],
                nl.limiter_key(self.ns, self.agent, "tokens"),
                rate.tokens_per_minute,
                self.clock,
            )
        self.stats.start(
            kv[nl.STATS_BUCKET],
            nl.stats_key(self.ns, self.agent, s.pod_name),
            s.pod_name,
            lambda: len(self._inflight),
        )
        self.runs = kv[nl.RUNS_BUCKET]
        self.ledger = UsageLedger(kv[nl.USAGE_BUCKET], key, self.clock)
        await self.ledger.start()
        if self.spec.cache is not None:
            self.cache = ResultCache(
                kv[nl.CACHE_BUCKET], self.ns, self.agent, self.spec.cache.ttl_seconds, self.clock
            )
        # The bands' consumers differ only in name and filter: any one tells the ack wait.
        info = await self.js.consumer_info(nl.TASKS_STREAM, nl.consumer_name(self.ns, self.agent))
        waits = [w for w in (info.config.ack_wait, *(info.config.backoff or ())) if w]
        # A third of the shortest ack wait the consumer really has, whoever declared it.
        beat = max(0.2, min(10.0, min(waits, default=30.0) / 3))
        self._background.append(asyncio.create_task(self._heartbeats(beat), name="heartbeats"))
        if self.spec.batching is not None:
            self._batches = asyncio.Queue()
            self._background.append(asyncio.create_task(self._batch_loop(), name="batches"))
        self.ready = True
        log.info(
            "serving %s/%s (concurrency %d, consumers %s)",
            self.ns,
            self.agent,
            self.spec.concurrency,
            ", ".join(nl.consumer_names(self.ns, self.agent)),
        )

    async def drain(self) -> None:
        """Lets in-flight tasks finish within the grace period, then hands the rest back."""
        pending = [task for _, task in self._inflight.values()]
        if pending:
            log.info("draining %d tasks in flight", len(pending))
            _, late = await asyncio.wait(pending, timeout=self.settings.drain_seconds)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=5)
                log.warning("handed back %d unfinished tasks", len(late))

    async def close(self) -> None:
        self.ready = False
        await asyncio.gather(*(stop_task(task) for task in self._background))
        await self.stats.stop()
        if self.circuit is not None:
            await self.circuit.stop()
        if self.ledger is not None and self.nc is not None and self.nc.is_connected:
            await self.ledger.stop()
        await self.handlers.close()
        if self.nc is not None and not self.nc.is_closed:
            # Flush (our acks reach the server) then close; nats-py's drain() waits for
            # every subscription, the KV watchers' included, and can stall on them.
            await self.puller.stop()
            await self.publisher.stop()
            with contextlib.suppress(Exception):
                await self.nc.flush(timeout=5)
            await self.nc.close()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Fire-and-forget work that must not be garbage-collected before it ends."""
        task = asyncio.create_task(coro)
        self._spawned.add(task)
        task.add_done_callback(self._spawned.discard)

    @property
    def alive(self) -> bool:
        return time.monotonic() - self.last_loop < 120

    # -- fetching ----------------------------------------------------------------------

    async def _fetch_loop(self, stop: asyncio.Event) -> None:
        concurrency = self.spec.concurrency
        while not stop.is_set():
            self.last_loop = time.monotonic()
            free = concurrency - len(self._inflight)
            if free <= 0:
                self._slot.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._slot.wait(), FETCH_WAIT)
                continue
            if (wait := self._gate()) > 0:
                await asyncio.sleep(min(wait, FETCH_WAIT))
                continue
            try:
                await self.puller.pull(min(free, FETCH_MAX))
            except Exception as exc:  # connection trouble: nats-py reconnects underneath
                log.warning("pull request failed (%s); retrying", exc)
                await asyncio.sleep(0.5)
                continue
            if self.puller.last_status:  # e.g. 409 consumer deleted, 503 no consumer
                log.warning("consumer refused the pull: %s", self.puller.last_status)
                self.puller.last_status = ""
                await asyncio.sleep(FETCH_WAIT)

    async def _reconnected(self) -> None:
        if self.ready:
            self.puller.reconnected()

    def _accept(self, msg: Msg) -> None:
        if self.stopping:
            # Delivered after fetching stopped: straight back to the queue.
            self._spawn(msg.nak())
            return
        self._inflight[id(msg)] = (msg, asyncio.create_task(self._serve(msg)))

    def _gate(self) -> float:
        """Seconds to pause fetching: an open circuit without fallback keeps tasks queued
        (rather than spending their attempts), and so does a throttling budget."""
        now = self.clock()
        b = self.breaker
        if b is not None and self.spec.fallback is None and (at := b.reopen_at()) is not None:
            return max(0.0, at - now)
        if self._over_budget() and self.spec.budget and self.spec.budget.on_exceeded == "Throttle":
            return FETCH_WAIT
        return 0.0

    # -- one task ----------------------------------------------------------------------

    async def _serve(self, msg: Msg) -> None:
        started = time.monotonic()
        job: Job | None = None
        try:
            job = await self._prepare(msg)
            if self._batches is not None:
                job.done = asyncio.get_running_loop().create_future()
                await self._batches.put(job)
                await job.done
            else:
                await self._execute([job])
        except DisposedError:
            pass
        except asyncio.CancelledError:
            # Drain ran out of time: hand the task back for another replica at once.
            with contextlib.suppress(Exception):
                await asyncio.shield(msg.nak())
            self.metrics.outcome["handed_back"].inc()
        except Exception:
            log.exception("unexpected error serving a task; it will be redelivered")
            with contextlib.suppress(Exception):
                await msg.nak(delay=self.delays[0])
        finally:
            if job is not None and job.probe and self.breaker is not None:
                self.breaker.release_probe()  # its slot must not stay taken
            took = time.monotonic() - started
            self.metrics.observe(took)
            self.stats.finished(took)
            self._inflight.pop(id(msg), None)
            self._slot.set()

    async def _prepare(self, msg: Msg) -> Job:
        """Everything before the handler; raises :class:`DisposedError` when the task is done."""
        delivered, _ = delivery(msg)
        try:
            task = env.parse_task(msg.data)
        except env.EnvelopeError as exc:
            await self._dead_letter(msg, None, "MalformedEnvelope", str(exc), delivered)
            raise DisposedError from None
        job = Job(msg, task, delivered, self.clock(), self._context(task, delivered))
        # A workflow step is looked up even on its first delivery: after a NATS restart
        # the stream has forgotten the ids of tasks already done (its duplicate window
        # lives with the stored messages), so a dispatcher's replayed publish of a
        # finished step arrives as new. A step with a recorded result never runs again.
        if (delivered > 1 or task.run is not None) and await self._already_recorded(task):
            await msg.ack()
            self.metrics.outcome["duplicate"].inc()
            raise DisposedError
        if delivered > self.spec.retry.max_attempts:
            # max_deliver is attempts + 1: the last attempt's worker vanished mid-task.
            await self._exhausted(job, "Timeout", "the worker of the last attempt vanished")
            raise DisposedError
        if task.deadline is not None and job.started > task.deadline:
            await self._dead_letter(
                msg,
                task,
                "DeadlineExceeded",
                "the task's deadline passed before it started",
                job.attempts,
            )
            raise DisposedError
        if problem := violation(self.input_schema, task.input):
            await self._dead_letter(
                msg,
                task,
                "ContractViolation",
                f"input violates the contract: {problem}",
                job.attempts,
            )
            raise DisposedError
        if self.cache is not None:
            hit, output = await self.cache.get(task.input)
            if hit:
                self.metrics.cache_hits.inc()
                await self._succeed(job, output, cached=True)
                raise DisposedError
            self.metrics.cache_misses.inc()
        await self._check_budget(job)
        if self.task_limiter is not None:
            await self.task_limiter.acquire()
        if self.token_limiter is not None:
            await self.token_limiter.wait()
        await self._admit(job)  # last: nothing may come between a probe's admission and run
        return job

    def _context(self, task: env.Task, delivered: int) -> Context:
        return Context(
            task_id=task.id,
            agent=self.agent,
            namespace=self.ns,
            attempt=delivered,
            priority=task.priority,
            deadline=task.deadline,
            run=task.run,
            step=task.step,
            path=tuple(h.agent for h in task.path),
            trace=dict(task.trace),
            shared=(
                RunContext(self.runs, self.ns, task.run)
                if task.run is not None and self.runs is not None
                else None
            ),
        )

    async def _admit(self, job: Job) -> None:
        """The circuit breaker's say: call, probe, divert to the fallback, or hold."""
        b = self.breaker
        while b is not None:
            decision, transition = b.allow(self.clock())
            await self._share(transition)
            if decision != "reject":
                job.probe = decision == "probe"
                return
            if self.spec.fallback is not None:
                await self._forward(job, self.spec.fallback.agent, "fallback", "circuit open")
                raise DisposedError
            await self._hold(job)

    async def _hold(self, job: Job) -> None:
        """One wait of a task held back (open circuit, throttling budget); on drain it
        goes back to the queue instead, for another replica."""
        if self.stopping:
            await job.msg.nak()
            self.metrics.outcome["handed_back"].inc()
            raise DisposedError
        await asyncio.sleep(HELD_POLL)

    def _over_budget(self) -> bool:
        budget = self.spec.budget
        if budget is None or self.ledger is None:
            return False
        tokens, cost = self.ledger.this_hour()
        return (budget.tokens_per_hour is not None and tokens >= budget.tokens_per_hour) or (
            budget.cost_per_hour is not None and cost >= budget.cost_per_hour
        )

    async def _check_budget(self, job: Job) -> None:
        budget = self.spec.budget
        while budget is not None and self._over_budget():
            why = "the Agent's hourly token or cost budget is spent"
            if budget.on_exceeded == "Reject" or (
                budget.on_exceeded == "Downgrade" and self.spec.fallback is None
            ):
                await self._dead_letter(job.msg, job.task, "BudgetExceeded", why, job.attempts)
                raise DisposedError
            if budget.on_exceeded == "Downgrade":
                assert self.spec.fallback is not None
                await self._forward(job, self.spec.fallback.agent, "downgrade", why)
                raise DisposedError
            await self._hold(job)

    # -- running the handler -----------------------------------------------------------

    async def _execute(self, jobs: list[Job]) -> None:
        """Runs the handler once for ``jobs`` (one, or a batch) and settles each job."""
        ctx = jobs[0].ctx
        timeout = min(j.task.timeout or float(self.spec.timeout_seconds) for j in jobs)
        deadlines = [j.task.deadline for j in jobs if j.task.deadline is not None]
        if deadlines:
            timeout = max(0.001, min(timeout, min(deadlines) - self.clock()))
        try:
            async with asyncio.timeout(timeout):
                if self._batches is None:
                    outputs = [await self.handlers.single(jobs[0].task.input, ctx)]
                else:
                    outputs = await self.handlers.batch([j.task.input for j in jobs], ctx)
                    if not isinstance(outputs, list) or len(outputs) != len(jobs):
                        raise RetryableError(
                            f"batch handler returned {type(outputs).__name__} "
                            f"instead of a list of {len(jobs)} outputs"
                        )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if isinstance(exc, TimeoutError):
                exc = TimeoutError(f"attempt exceeded {timeout:.3g}s")
            self._account(jobs, ctx, completed=False)  # a failed call may have spent tokens
            await _each(self._failed(j, exc) for j in jobs)
            return
        self._account(jobs, ctx)
        batched = self._batches is not None
        await _each(
            self._succeeded(j, o, _confidence(o) if batched else ctx.confidence, ctx)
            for j, o in zip(jobs, outputs, strict=True)
        )

    def _account(self, jobs: list[Job], ctx: Context, completed: bool = True) -> None:
        """Usage of one call (tasks count only when the call completed)."""
        cost = ctx.cost
        llm = self.spec.handler.llm
        if not cost and llm is not None and llm.pricing is not None:
            p = llm.pricing
            cost = (
                Decimal(ctx.input_tokens) * p.input_per_1k_tokens
                + Decimal(ctx.output_tokens) * p.output_per_1k_tokens
            ) / 1000
        ctx.cost = cost
        if ctx.tokens:
            self.metrics.input_tokens.inc(ctx.input_tokens)
            self.metrics.output_tokens.inc(ctx.output_tokens)
            if self.token_limiter is not None:
                self.token_limiter.spend(ctx.tokens)
                self._spawn(self.token_limiter.sync())
        if cost:
            self.metrics.cost.inc(float(cost))
        if self.ledger is not None:
            self.ledger.add(len(jobs) if completed else 0, ctx.tokens, cost)

    async def _succeeded(
        self, job: Job, output: Any, confidence: float | None, ctx: Context
    ) -> None:
        if problem := violation(self.output_schema, output):
            await self._failed(
                job, OutputViolationError(f"output violates the contract: {problem}")
            )
            return
        await self._record(job, ok=True)
        esc = self.spec.escalation
        if (
            esc is not None
            and confidence is not None
            and confidence < esc.confidence_below
            and esc.agent not in job.ctx.path
        ):
            detail = f"confidence {confidence:.2f} < {esc.confidence_below}"
            await self._forward(job, esc.agent, "escalation", detail)
            return
        if self.cache is not None:
            await self.cache.put(job.task.input, output)
        await self._succeed(job, output, confidence=confidence, ctx=ctx)

    async def _failed(self, job: Job, error: BaseException) -> None:
        reason: env.DeadLetterReason = "HandlerError"
        if isinstance(error, TimeoutError):
            reason = "Timeout"
        elif isinstance(error, OutputViolationError):
            reason = "OutputContractViolation"
        message = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        await self._record(job, ok=False)
        if isinstance(error, PermanentError):
            await self._dead_letter(job.msg, job.task, reason, message, job.attempts)
            return
        own = self.spec.retry.max_attempts
        if job.delivered < min(own, job.task.max_attempts or own):
            delay = self.delays[job.delivered - 1]
            if isinstance(error, RetryableError) and error.retry_after is not None:
                delay = max(delay, error.retry_after)
            log.info(
                "task %s attempt %d failed (%s); retry in %.3gs",
                job.task.id,
                job.delivered,
                message,
                delay,
            )
            await job.msg.nak(delay=delay)
            self.metrics.retries.inc()
            self.metrics.outcome["failed"].inc()
            return
        await self._exhausted(job, reason, message)

    async def _record(self, job: Job, ok: bool) -> None:
        if self.breaker is not None:
            probe, job.probe = job.probe, False
            await self._share(self.breaker.record(self.clock(), ok, probe))

    async def _share(self, transition: Transition | None) -> None:
        if transition is None:
            return
        self.metrics.set_circuit(transition.state)
        if self.circuit is not None:
            await self.circuit.publish(transition)

    async def _exhausted(self, job: Job, reason: env.DeadLetterReason, message: str) -> None:
        fallback = self.spec.fallback
        if fallback is not None and fallback.agent not in job.ctx.path:
            await self._forward(
                job, fallback.agent, "fallback", f"{job.delivered} attempts failed: {message}"
            )
            return
        await self._dead_letter(
            job.msg, job.task, reason, f"after {job.delivered} attempts: {message}", job.attempts
        )

    # -- batching ----------------------------------------------------------------------

    async def _batch_loop(self) -> None:
        assert self._batches is not None
        assert self.spec.batching is not None
        size, wait = self.spec.batching.max_size, self.spec.batching.max_wait_millis / 1000
        while True:
            batch = [await self._batches.get()]
            deadline = time.monotonic() + wait
            while len(batch) < size:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._batches.get(), left))
                except TimeoutError:
                    break
            self._spawn(self._run_batch(batch))

    async def _run_batch(self, batch: list[Job]) -> None:
        error: BaseException | None = None
        try:
            await self._execute(batch)
        except BaseException as exc:
            error = exc
            raise
        finally:
            for job in batch:
                if job.done is not None and not job.done.done():
                    if error is None:
                        job.done.set_result(None)
                    else:
                        job.done.set_exception(error)

    # -- records -----------------------------------------------------------------------

    async def _succeed(
        self,
        job: Job,
        output: Any,
        *,
        cached: bool = False,
        confidence: float | None = None,
        ctx: Context | None = None,
    ) -> None:
        task = job.task
        usage = None
        if ctx is not None and (ctx.tokens or ctx.cost):
            usage = env.Usage(
                tokens=ctx.tokens,
                input_tokens=ctx.input_tokens,
                output_tokens=ctx.output_tokens,
                cost=str(ctx.cost),
            )
        # Every field comes from a validated task or from us: skip re-validating.
        result = env.Result.model_construct(
            id=task.id,
            agent=self.agent,
            status="Succeeded",
            output=output,
            path=(*(h.agent for h in task.path), self.agent),
            hops=task.path,
            attempts=job.attempts,
            confidence=confidence,
            cached=cached,
            usage=usage,
            run=task.run,
            step=task.step,
            replays=task.replays,
            started=job.started,
            finished=self.clock(),
        )
        await self._publish(nl.result_subject(self.ns, task.id), result, task.result_msg_id())
        await job.msg.ack()
        if cached and self.ledger is not None:
            self.ledger.add(1, 0, Decimal(0))
        self.metrics.outcome["cached" if cached else "succeeded"].inc()

    async def _dead_letter(
        self,
        msg: Msg,
        task: env.Task | None,
        reason: env.DeadLetterReason,
        message: str,
        attempts: int,
    ) -> None:
        record = env.dead_letter_for(
            self.ns, self.agent, reason, message, task, raw=msg.data, attempts=attempts
        )
        msg_id = f"dlq.{task.result_msg_id()}" if task else f"dlq.{msg.metadata.sequence.stream}"
        await self._publish(nl.dlq_subject(self.ns, self.agent), record, msg_id)
        if task is not None:
            result = env.Result(
                id=task.id,
                agent=self.agent,
                status="DeadLettered",
                reason=reason,
                message=record.message,
                path=(*(h.agent for h in task.path), self.agent),
                hops=task.path,
                attempts=attempts,
                run=task.run,
                step=task.step,
                replays=task.replays,
                finished=self.clock(),
            )
            await self._publish(nl.result_subject(self.ns, task.id), result, task.result_msg_id())
        await msg.ack()
        log.warning(
            "dead-lettered task %s: %s: %s", task.id if task else "(unparsed)", reason, message
        )
        self.metrics.dead_letter(reason)

    async def _forward(self, job: Job, agent: str, why: env.HopReason, detail: str) -> None:
        """Passes the task on to another Agent (fallback, escalation, downgrade)."""
        task = job.task
        hop = env.Hop(agent=self.agent, reason=why, detail=detail)
        if agent in job.ctx.path or agent == self.agent:
            await self._dead_letter(
                job.msg,
                task,
                "Unroutable",
                f"{why} to {agent} would loop: {detail}",
                job.attempts,
            )
            return
        nxt = task.model_copy(update={"path": (*task.path, hop), "attempt": job.attempts + 1})
        subject = nl.task_subject(self.ns, agent, task.priority)
        await self._publish(subject, nxt, nxt.msg_id())
        await job.msg.ack()
        log.info("task %s passed to %s (%s: %s)", task.id, agent, why, detail)
        self.metrics.outcome["forwarded"].inc()

    async def _publish(self, subject: str, record: env.WireModel, msg_id: str) -> None:
        await self.publisher.publish(subject, record.to_json(), {env.MSG_ID_HEADER: msg_id})

    async def _already_recorded(self, task: env.Task) -> bool:
        subject = nl.result_subject(self.ns, task.id)
        try:
            try:
                raw = await self.js.get_last_msg(nl.RESULTS_STREAM, subject, direct=True)
            except NoRespondersError:
                # A results stream declared before direct gets were allowed.
                raw = await self.js.get_last_msg(nl.RESULTS_STREAM, subject)
        except NotFoundError:
            return False
        if raw.data is None:
            return False
        try:
            return env.Result.model_validate_json(raw.data).replays >= task.replays
        except ValueError:
            return False

    # -- heartbeats --------------------------------------------------------------------

    async def _heartbeats(self, interval: float) -> None:
        """Progress acks for everything in flight, well inside the shortest ack wait."""
        while True:
            await asyncio.sleep(interval)
            for msg, _ in list(self._inflight.values()):
                with contextlib.suppress(Exception):
                    await msg.in_progress()


async def _each(coros: Iterable[Coroutine[Any, Any, None]]) -> None:
    """Awaits them concurrently; a single one directly (``gather`` would wrap it in a
    Task, and without batching there is always exactly one)."""
    pending = list(coros)
    if len(pending) == 1:
        await pending[0]
    else:
        await asyncio.gather(*pending)


def _confidence(output: Any) -> float | None:
    """A batch shares one context, so each output may carry its own ``confidence``."""
    value = output.get("confidence") if isinstance(output, dict) else None
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1:
        return float(value)
    return None


class OutputViolationError(Exception):
    """The handler's output does not satisfy the output contract."""
