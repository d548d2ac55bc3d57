"""Queue figures per Agent, read from JetStream when asked: the one source behind both
the external metrics API (the HPAs) and the autoscaler's own loop (0<->1, floors).

- ``shoal_queue_lag``: pending + in-flight tasks of the Agent's JetStream consumer;
- ``shoal_latency_p95_ms``: the highest p95 latency its runtime pods reported to KV
  ``shoal-stats`` (0 when none reported within the bucket's TTL);
- ``shoal_arrival_rate``: tasks per second reaching the consumer.

Values are read when asked and kept at most ``max_age`` (0.5 s), so an HPA (which asks
every 15 s) sees the queue as it is, not a poll of it, while a burst of askers (replicas
of the HPA controller, the autoscaler, a person with kubectl) costs one JetStream request
per Agent. It is kept apart from the HTTP server because the autoscaler uses it without
one, and because its caching and error mapping (404 for an Agent without a consumer,
503 without NATS) are what both callers rely on.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from shoal_api.runtime_state import PodStats
from shoal_operator.builders.hpa import LATENCY_METRIC, QUEUE_LAG_METRIC
from shoal_operator.clients.jetstream import queue_counts

ARRIVAL_RATE_METRIC = "shoal_arrival_rate"
METRICS = (QUEUE_LAG_METRIC, LATENCY_METRIC, ARRIVAL_RATE_METRIC)
MAX_AGE_SECONDS = 0.5
RATE_WINDOW_SECONDS = 30.0

T = TypeVar("T")


class ArrivalRate:
    """Tasks per second, from a count of tasks that ever arrived sampled now and then.

    The rate spans from the oldest sample inside ``window`` (or, if none is that recent,
    the newest one before it) to the latest: one sample gives 0.
    """

    def __init__(self, window: float = RATE_WINDOW_SECONDS, max_samples: int = 64) -> None:
        self.window = window
        self._samples: deque[tuple[float, int]] = deque(maxlen=max_samples)

    def observe(self, at: float, arrived: int) -> float:
        if self._samples and arrived < self._samples[-1][1]:
            # The consumer was recreated (the Agent deleted and applied again): its
            # counters started over, and a difference across that means nothing.
            self._samples.clear()
        self._samples.append((at, arrived))
        while len(self._samples) > 2 and self._samples[1][0] <= at - self.window:
            self._samples.popleft()
        return self.rate()

    def rate(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, a0), (t1, a1) = self._samples[0], self._samples[-1]
        return (a1 - a0) / (t1 - t0) if t1 > t0 else 0.0


@dataclass(frozen=True)
class QueueSample:
    pending: int
    in_flight: int
    arrived: int
    """Deliveries so far (the consumer sequence) + pending: grows by one per arriving
    task, and by one per redelivery, which is work arriving too."""

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> QueueSample:
        pending, in_flight = queue_counts(info)
        delivered = int((info.get("delivered") or {}).get("consumer_seq", 0))
        return cls(pending, in_flight, delivered + pending)


# -- the metric sources ------------------------------------------------------------------


class MetricsError(Exception):
    code = 500
    reason = "InternalError"


class AgentNotFound(MetricsError):  # noqa: N818  (an API answer: NotFound)
    code = 404
    reason = "NotFound"


class MetricsUnavailable(MetricsError):  # noqa: N818  (an API answer: ServiceUnavailable)
    code = 503
    reason = "ServiceUnavailable"


class MetricsSource(Protocol):
    """Where the figures come from (:class:`~shoal_operator.clients.jetstream.JetStreamAdmin`)."""

    async def consumer_info(self, namespace: str, agent: str) -> dict[str, Any] | None: ...

    async def pod_stats(self, namespace: str, agent: str) -> list[PodStats]: ...


@dataclass
class _Cached(Generic[T]):
    value: T | None = None
    at: float = -math.inf
    pending: asyncio.Task[T] | None = None
    used: float = 0.0


@dataclass
class _Agent:
    queue: _Cached[QueueSample] = field(default_factory=_Cached)
    stats: _Cached[list[PodStats]] = field(default_factory=_Cached)
    rate: ArrivalRate = field(default_factory=ArrivalRate)


class QueueMetrics:
    """Per-Agent queue figures, read from JetStream on demand and kept ``max_age``
    seconds, so that a burst of requests (replicas of the HPA controller, the
    autoscaler, a person with kubectl) costs one JetStream request per Agent.

    ``source`` returns the connection, or None while there is none (503).
    """

    PRUNE_AFTER = 600.0

    def __init__(
        self,
        source: Callable[[], MetricsSource | None],
        *,
        max_age: float = MAX_AGE_SECONDS,
        rate_window: float = RATE_WINDOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self.max_age = max_age
        self.rate_window = rate_window
        self._clock = clock
        self._agents: dict[tuple[str, str], _Agent] = {}
        self._pruned = clock()

    async def lag(self, namespace: str, agent: str) -> tuple[int, int]:
        """(pending, in flight) of the Agent's consumer."""
        sample = await self._sample(namespace, agent)
        return sample.pending, sample.in_flight

    async def arrival_rate(self, namespace: str, agent: str) -> float:
        """Tasks per second arriving for the Agent over the last ``rate_window`` seconds
        of samples (every read of the queue is a sample; the first gives 0)."""
        await self._sample(namespace, agent)
        return self._agent(namespace, agent).rate.rate()

    async def pod_stats(self, namespace: str, agent: str) -> list[PodStats]:
        """The live figures of the Agent's runtime pods (those that reported within the
        stats bucket's TTL)."""
        entry = self._agent(namespace, agent)
        return await self._cached(entry.stats, lambda src: src.pod_stats(namespace, agent))

    async def latency_p95_ms(self, namespace: str, agent: str) -> float:
        """The highest p95 latency among the Agent's pods: the slowest pod is the one
        that misses the target first."""
        return max((s.p95_ms for s in await self.pod_stats(namespace, agent)), default=0.0)

    async def value(self, metric: str, namespace: str, agent: str) -> float:
        """A metric of :data:`METRICS`; AgentNotFound when the Agent has no consumer."""
        pending, in_flight = await self.lag(namespace, agent)
        if metric == QUEUE_LAG_METRIC:
            return float(pending + in_flight)
        if metric == LATENCY_METRIC:
            return await self.latency_p95_ms(namespace, agent)
        if metric == ARRIVAL_RATE_METRIC:
            return await self.arrival_rate(namespace, agent)
        raise KeyError(metric)

    # -- caching -----------------------------------------------------------------------

    def _agent(self, namespace: str, agent: str) -> _Agent:
        now = self._clock()
        if now - self._pruned > self.PRUNE_AFTER:
            # Deleted Agents leave their entries behind; nobody asks about them again.
            self._pruned = now
            for key, old in list(self._agents.items()):
                if now - max(old.queue.used, old.stats.used) > self.PRUNE_AFTER:
                    del self._agents[key]
        key = (namespace, agent)
        entry = self._agents.get(key)
        if entry is None:
            entry = self._agents[key] = _Agent(rate=ArrivalRate(self.rate_window))
        return entry

    async def _sample(self, namespace: str, agent: str) -> QueueSample:
        entry = self._agent(namespace, agent)

        async def fetch(src: MetricsSource) -> QueueSample:
            info = await src.consumer_info(namespace, agent)
            if info is None:
                raise AgentNotFound(
                    f"Agent {agent} in namespace {namespace} has no JetStream consumer "
                    "(no such Agent, or not reconciled yet)"
                )
            sample = QueueSample.from_info(info)
            entry.rate.observe(self._clock(), sample.arrived)
            return sample

        return await self._cached(entry.queue, fetch)

    async def _cached(self, cache: _Cached[T], fetch: Callable[[MetricsSource], Awaitable[T]]) -> T:
        now = self._clock()
        cache.used = now
        if cache.value is not None and now - cache.at < self.max_age:
            return cache.value
        if cache.pending is None:
            src = self._source()
            if src is None:
                raise MetricsUnavailable("the operator is not connected to NATS yet")
            cache.pending = asyncio.create_task(self._fetch(cache, fetch, src))
            cache.pending.add_done_callback(_retrieve)
        # Shielded: a caller that gives up (the aggregator's timeout) does not cancel
        # the read the other callers wait for.
        return await asyncio.shield(cache.pending)

    async def _fetch(
        self, cache: _Cached[T], fetch: Callable[[MetricsSource], Awaitable[T]], src: MetricsSource
    ) -> T:
        try:
            value = await fetch(src)
        except MetricsError:
            raise
        except Exception as exc:
            raise MetricsUnavailable(f"reading JetStream: {type(exc).__name__}: {exc}") from exc
        finally:
            cache.pending = None
        cache.value, cache.at = value, self._clock()
        return value


def _retrieve(task: asyncio.Task[Any]) -> None:
    # Every waiter may have gone: mark the outcome seen so asyncio does not warn.
    if not task.cancelled():
        task.exception()
