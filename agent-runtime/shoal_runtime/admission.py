"""Everything between a delivery and its handler call: the envelope and the input
contract, the result cache, the budget, the shared rate limits and the circuit breaker,
each of which may settle the task (dead letter, cached result, forward) or hold it back.
Also the same policies' say on whether to fetch at all."""

from __future__ import annotations

import asyncio

from nats.aio.msg import Msg

from shoal_api import envelope as env
from shoal_api.json_schema import violation
from shoal_runtime.breaker import Transition
from shoal_runtime.job import DisposedError, Job
from shoal_runtime.records import TaskRecords
from shoal_runtime.run_context import RunContext
from shoal_runtime.sdk import Context
from shoal_runtime.stream import delivery
from shoal_runtime.worker_state import FETCH_WAIT

# How long a task held back (open circuit, spent budget) waits before it asks again.
HELD_POLL = 0.2


class TaskAdmission(TaskRecords):
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

    async def _share(self, transition: Transition | None) -> None:
        if transition is None:
            return
        self.metrics.set_circuit(transition.state)
        if self.circuit is not None:
            await self.circuit.publish(transition)
