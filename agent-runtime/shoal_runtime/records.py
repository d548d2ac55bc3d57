"""What the runtime stores for a task before acknowledging it: its result, its dead
letter, or the task passed on to another Agent; and the look-up that spots a redelivered
task whose result is already stored."""

from __future__ import annotations

import logging
from decimal import Decimal
from typing import Any

from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.js.errors import NotFoundError

from shoal_api import envelope as env
from shoal_api import nats_layout as nl
from shoal_runtime.job import Job
from shoal_runtime.sdk import Context
from shoal_runtime.worker_state import WorkerState

log = logging.getLogger("shoal.runtime")


class TaskRecords(WorkerState):
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
