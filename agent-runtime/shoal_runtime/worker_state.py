"""What one runtime holds while it serves an Agent: its settings and policies' objects
(breaker, limiters, ledger, cache), the tasks in flight and, once started, its NATS
connection. The worker's concerns build on it, one module each:
:mod:`~shoal_runtime.records` -> :mod:`~shoal_runtime.admission` ->
:mod:`~shoal_runtime.execution` -> :mod:`~shoal_runtime.worker`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from shoal_api.agent import AgentSpec
from shoal_api.json_schema import validator
from shoal_runtime.breaker import Breaker
from shoal_runtime.config import Settings
from shoal_runtime.handler_loading import Handlers
from shoal_runtime.job import Job
from shoal_runtime.metrics import Metrics
from shoal_runtime.shared import (
    CircuitSync,
    Clock,
    ResultCache,
    StatsReporter,
    TaskRateLimiter,
    TokenRateLimiter,
    UsageLedger,
    wall_clock,
)
from shoal_runtime.stream import AckedPublisher, Puller

# Tasks asked for in one pull request at most, and how long a pull waits for them (also
# the pause of a fetch loop that has no free slot or is throttled).
FETCH_MAX = 256
FETCH_WAIT = 1.0


class WorkerState:
    """The state of a runtime that its concerns share (set up here and in ``start``)."""

    nc: Client | None
    js: JetStreamContext
    publisher: AckedPublisher
    puller: Puller

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

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Fire-and-forget work that must not be garbage-collected before it ends."""
        task = asyncio.create_task(coro)
        self._spawned.add(task)
        task.add_done_callback(self._spawned.discard)
