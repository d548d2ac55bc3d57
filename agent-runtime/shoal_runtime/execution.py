"""Running the handler once for a task or a batch of tasks under the Agent's timeout, and
settling each outcome: output contract, usage accounting, circuit breaker, escalation,
cache, retry with backoff, fallback or dead letter."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Iterable
from decimal import Decimal
from typing import Any

from shoal_api import envelope as env
from shoal_api.json_schema import violation
from shoal_runtime.admission import TaskAdmission
from shoal_runtime.job import Job, OutputViolationError
from shoal_runtime.sdk import Context, PermanentError, RetryableError

log = logging.getLogger("shoal.runtime")


class TaskExecution(TaskAdmission):
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
