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

import nats
from nats.aio.msg import Msg

from shoal_api import nats_layout as nl
from shoal_runtime.execution import TaskExecution
from shoal_runtime.job import DisposedError, Job
from shoal_runtime.shared import (
    CircuitSync,
    ResultCache,
    TaskRateLimiter,
    TokenRateLimiter,
    UsageLedger,
    open_buckets,
    stop_task,
)
from shoal_runtime.stream import AckedPublisher, Puller
from shoal_runtime.worker_state import FETCH_MAX, FETCH_WAIT

log = logging.getLogger("shoal.runtime")


class Worker(TaskExecution):
    """One runtime: fetches the Agent's tasks while it has free slots, serves each
    (:class:`~shoal_runtime.execution.TaskExecution`), heartbeats what is in flight and
    drains on stop."""

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

    # -- heartbeats --------------------------------------------------------------------

    async def _heartbeats(self, interval: float) -> None:
        """Progress acks for everything in flight, well inside the shortest ack wait."""
        while True:
            await asyncio.sleep(interval)
            for msg, _ in list(self._inflight.values()):
                with contextlib.suppress(Exception):
                    await msg.in_progress()
