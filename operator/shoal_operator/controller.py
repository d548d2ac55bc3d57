"""The reconcile loop: workers take (kind, namespace, name) keys off the work queue and
run that kind's reconcile; a resync queues every object again over the drift interval.

Every trigger (a watch event of the object or of something it depends on, a child
changing, a runtime's record, the drift check) only queues a key; the same
level-triggered reconcile runs for all of them, and only while this replica leads.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from shoal_operator.cache import Cache, Key
from shoal_operator.clients.kube import ApiError
from shoal_operator.kinds.agent import AgentIO
from shoal_operator.kinds.scaling import PolicyIO
from shoal_operator.kinds.workflow import WorkflowIO
from shoal_operator.leadership import Charge
from shoal_operator.workqueue import WorkQueue
from shoal_operator.writer import RetryLater, api_reason

log = logging.getLogger(__name__)

MAX_BACKOFF = 300.0


@dataclass
class Controller:
    queue: WorkQueue[Key]
    cache: Cache
    charge: Charge
    agents: AgentIO
    policies: PolicyIO
    workflows: WorkflowIO
    workers: int = 32
    drift_interval: float = 60.0
    _force: set[Key] = field(default_factory=set)
    _failures: dict[Key, int] = field(default_factory=dict)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        for i in range(self.workers):
            self._tasks.append(asyncio.create_task(self._worker(), name=f"shoal-worker-{i}"))
        self._tasks.append(asyncio.create_task(self._resync(), name="shoal-resync"))

    async def stop(self) -> None:
        self.queue.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def enqueue_all(self) -> None:
        """Every object, forced and behind the event-driven work."""
        for key in self.cache.all_keys():
            self._force.add(key)
            self.queue.add(key, low=True)

    async def _worker(self) -> None:
        while True:
            await self.charge.wait()
            key = await self.queue.get()
            try:
                await self.reconcile(key)
                self._failures.pop(key, None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                n = self._failures.get(key, 0) + 1
                self._failures[key] = n
                delay = min(MAX_BACKOFF, 0.5 * 2**n)
                if isinstance(exc, RetryLater | ApiError):
                    log.warning(
                        "reconcile %s/%s/%s: %s; retrying in %.0fs", *key, api_reason(exc), delay
                    )
                else:
                    log.exception(
                        "reconcile %s/%s/%s failed (attempt %d); retrying in %.0fs", *key, n, delay
                    )
                self.queue.add_after(key, delay)
            finally:
                self.queue.done(key)

    async def _resync(self) -> None:
        """The drift check: every object reconciled and its children re-applied, spread
        over the interval so it never floods the API server; all at once on taking over."""
        was_leading = False
        while True:
            await self.charge.wait()
            if not was_leading:
                # Taking over: the previous leader may have left work half done.
                was_leading = True
                self.enqueue_all()
                keys: list[Key] = []
            else:
                keys = self.cache.all_keys()
            pause = self.drift_interval / max(1, len(keys))
            for key in keys:
                if not self.charge.leading():
                    break
                self._force.add(key)
                self.queue.add(key, low=True)
                await asyncio.sleep(pause)
            if not keys:
                await asyncio.sleep(self.drift_interval)
            was_leading = self.charge.leading()

    async def reconcile(self, key: Key) -> None:
        kind, namespace, name = key
        force = key in self._force
        self._force.discard(key)
        if kind == "Agent":
            await self.agents.reconcile(namespace, name, force)
        elif kind == "ScalingPolicy":
            await self.policies.reconcile(namespace, name, force)
        elif kind == "Workflow":
            await self.workflows.reconcile(namespace, name)
