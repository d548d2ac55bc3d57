"""State shared by all replicas of an Agent, kept in NATS KV with compare-and-set.

Nothing here is on the per-task hot path unless the Agent asks for it: a shared rate
limit leases a chunk of the window at a time, usage is merged about once a second, and
circuit transitions (rare) are the only writes the breaker makes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue
from pydantic import ValidationError

from shoal_api import kv as kvs
from shoal_api import nats_layout as nl
from shoal_api.envelope import canonical_json
from shoal_api.runtime_state import CircuitRecord, PodStats, UsageRecord
from shoal_runtime.breaker import Breaker, Transition

log = logging.getLogger(__name__)
Clock = Callable[[], float]
CAS_ATTEMPTS = 8


class CircuitSync:
    """Keeps this replica's :class:`Breaker` in step with the shared circuit record."""

    def __init__(
        self,
        kv: KeyValue,
        key: str,
        breaker: Breaker,
        pod: str,
        on_change: Callable[[str], None],
    ) -> None:
        self.kv, self.key, self.breaker, self.pod = kv, key, breaker, pod
        self.on_change = on_change
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        raw, _ = await kvs.read(self.kv, self.key)
        if raw is not None and (record := _parse_circuit(raw)) and self.breaker.adopt(record):
            self.on_change(record.state)
        self._task = asyncio.create_task(self._watch(), name="circuit-watch")

    async def stop(self) -> None:
        await stop_task(self._task)

    async def publish(self, transition: Transition) -> None:
        """Writes our transition unless another replica already moved the circuit later."""
        for _ in range(CAS_ATTEMPTS):
            raw, rev = await kvs.read(self.kv, self.key)
            current = _parse_circuit(raw) if raw is not None else None
            if current is not None and current.since > transition.since:
                if self.breaker.adopt(current):
                    self.on_change(current.state)
                return
            if (
                await kvs.compare_and_set(
                    self.kv, self.key, transition.record(self.pod).to_json(), rev
                )
                is not None
            ):
                log.warning(
                    "circuit %s: %s (failure rate %.0f%%)",
                    transition.state,
                    transition.reason,
                    transition.failure_rate_percent,
                )
                return
        log.warning("circuit transition to %s not shared: KV kept changing", transition.state)

    async def _watch(self) -> None:
        delay = 0.5
        while True:
            try:
                watcher = await self.kv.watch(self.key)
                delay = 0.5
                async for entry in watcher:
                    if entry is None or entry.value is None:
                        continue
                    record = _parse_circuit(entry.value)
                    if record is not None and self.breaker.adopt(record):
                        self.on_change(record.state)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("circuit watch interrupted (%s); restarting in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)


def _parse_circuit(raw: bytes) -> CircuitRecord | None:
    try:
        return CircuitRecord.model_validate_json(raw)
    except ValidationError:
        log.warning("ignoring a malformed circuit record")
        return None


class SharedWindow:
    """A counter per fixed time window shared by all replicas: ``{"w": window, "n": used}``."""

    def __init__(self, kv: KeyValue, key: str, window_seconds: float, clock: Clock) -> None:
        self.kv, self.key, self.window, self.clock = kv, key, window_seconds, clock

    def current(self) -> int:
        return int(self.clock() // self.window)

    def seconds_left(self) -> float:
        now = self.clock()
        return (int(now // self.window) + 1) * self.window - now

    async def add(self, delta: int, cap: float | None = None) -> tuple[int, int]:
        """Adds up to ``delta`` (never beyond ``cap``) to this window's count.

        Returns (added, count after)."""
        for _ in range(CAS_ATTEMPTS):
            w = self.current()
            raw, rev = await kvs.read(self.kv, self.key)
            used = 0
            if raw is not None:
                doc = json.loads(raw)
                used = int(doc["n"]) if doc.get("w") == w else 0
            grant = delta if cap is None else max(0, min(delta, int(cap) - used))
            if grant == 0:
                return 0, used
            body = json.dumps({"w": w, "n": used + grant}).encode()
            if await kvs.compare_and_set(self.kv, self.key, body, rev) is not None:
                return grant, used + grant
        return 0, 0


class TaskRateLimiter:
    """Tasks per second across replicas: each replica leases a slice of the window."""

    def __init__(self, kv: KeyValue, key: str, per_second: float, clock: Clock) -> None:
        window = 1.0 if per_second >= 1 else 1.0 / per_second
        self.limit = max(1, round(per_second * window))
        self.chunk = max(1, math.ceil(self.limit / 10))
        self.shared = SharedWindow(kv, key, window, clock)
        self._window = -1
        self._left = 0
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            while True:
                w = self.shared.current()
                if self._window == w and self._left > 0:
                    self._left -= 1
                    return
                granted, _ = await self.shared.add(self.chunk, cap=self.limit)
                if granted:
                    self._window, self._left = w, granted
                    continue
                await asyncio.sleep(self.shared.seconds_left() + 0.001)


class TokenRateLimiter:
    """LLM tokens per minute across replicas. Tokens are known only after a call, so
    calls start while the minute has room and their tokens are counted afterwards."""

    def __init__(self, kv: KeyValue, key: str, per_minute: int, clock: Clock) -> None:
        self.limit = per_minute
        self.shared = SharedWindow(kv, key, 60.0, clock)
        self._seen = (-1, 0)  # (window, count) last read from KV
        self._unsynced = 0  # counted here, not yet added to the shared window
        self._lock = asyncio.Lock()

    async def wait(self) -> None:
        while True:
            w = self.shared.current()
            if self._seen[0] != w:
                _, used = await self.shared.add(0)
                self._seen = (w, used)
            if self._seen[1] + self._unsynced < self.limit:
                return
            await asyncio.sleep(min(self.shared.seconds_left() + 0.001, 1.0))
            self._seen = (-1, 0)

    def spend(self, tokens: int) -> None:
        """Counts tokens at once, so the next :meth:`wait` here already sees them; the
        shared window learns of them through :meth:`sync`."""
        self._unsynced += max(0, tokens)

    async def sync(self) -> None:
        async with self._lock:  # one merge at a time, each of what is unsynced then
            tokens = self._unsynced
            if tokens > 0:
                _, used = await self.shared.add(tokens)
                # Both at once: in between, wait() would count these tokens twice or not.
                self._unsynced -= tokens
                self._seen = (self.shared.current(), used)


class UsageLedger:
    """Tasks, tokens and cost per clock hour, merged into the shared record every second."""

    def __init__(self, kv: KeyValue, key: str, clock: Clock, interval: float = 1.0) -> None:
        self.kv, self.key, self.clock, self.interval = kv, key, clock, interval
        self.shared = UsageRecord()
        self._tasks = 0
        self._tokens = 0
        self._cost = Decimal(0)
        self._task: asyncio.Task[None] | None = None
        self.changed = asyncio.Event()

    def add(self, tasks: int, tokens: int, cost: Decimal) -> None:
        self._tasks += tasks
        self._tokens += tokens
        self._cost += cost

    def this_hour(self) -> tuple[int, Decimal]:
        """(tokens, cost) of this clock hour: everyone's merged usage plus our unmerged."""
        hour = int(self.clock() // 3600)
        merged = self.shared.this_hour(hour)
        return merged.tokens + self._tokens, merged.cost + self._cost

    async def start(self) -> None:
        await self.flush()
        self._task = asyncio.create_task(self._loop(), name="usage-ledger")

    async def stop(self) -> None:
        await stop_task(self._task)
        with contextlib.suppress(Exception):
            await self.flush()

    async def flush(self) -> None:
        """Merges our pending usage (if any) and refreshes the shared view."""
        for _ in range(CAS_ATTEMPTS):
            raw, rev = await kvs.read(self.kv, self.key)
            try:
                current = UsageRecord.model_validate_json(raw) if raw else UsageRecord()
            except ValidationError:
                log.warning("replacing a malformed usage record")
                current = UsageRecord()
            tasks, tokens, cost = self._tasks, self._tokens, self._cost
            if not (tasks or tokens or cost):
                self._set(current)
                return
            merged = current.add(int(self.clock() // 3600), tasks, tokens, cost)
            if await kvs.compare_and_set(self.kv, self.key, merged.to_json(), rev) is not None:
                self._tasks -= tasks
                self._tokens -= tokens
                self._cost -= cost
                self._set(merged)
                return

    def _set(self, record: UsageRecord) -> None:
        if record != self.shared:
            self.shared = record
            self.changed.set()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("usage not merged (%s); retrying", exc)


class StatsReporter:
    """This pod's live figures, put into the stats bucket every second: the operator
    serves them to the HPA (p95 latency) and orders scale-in by them (in flight)."""

    WINDOW_SECONDS = 10
    SAMPLES_PER_SECOND = 2048  # enough for a p95, bounded at any task rate

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.completed = 0
        self._now: list[float] = []
        self._recent: deque[list[float]] = deque(maxlen=self.WINDOW_SECONDS)
        self._task: asyncio.Task[None] | None = None

    def finished(self, seconds: float) -> None:
        self.completed += 1
        if len(self._now) < self.SAMPLES_PER_SECOND:
            self._now.append(seconds)

    def p95_ms(self) -> float:
        samples = sorted(x for second in (*self._recent, self._now) for x in second)
        if not samples:
            return 0.0
        return round(samples[min(len(samples) - 1, int(len(samples) * 0.95))] * 1000, 3)

    def start(self, kv: KeyValue, key: str, pod: str, in_flight: Callable[[], int]) -> None:
        self._task = asyncio.create_task(self._loop(kv, key, pod, in_flight), name="stats")

    async def stop(self) -> None:
        await stop_task(self._task)

    async def _loop(self, kv: KeyValue, key: str, pod: str, in_flight: Callable[[], int]) -> None:
        while True:
            record = PodStats(
                pod=pod,
                in_flight=in_flight(),
                p95_ms=self.p95_ms(),
                completed=self.completed,
                at=self.clock(),
            )
            self._recent.append(self._now)
            self._now = []
            try:
                await kv.put(key, record.to_json())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("stats not reported (%s)", exc)
            await asyncio.sleep(1.0)


class ResultCache:
    """Outputs by Agent + canonical input, with the TTL stored in the entry (the bucket is
    shared by Agents with different TTLs)."""

    def __init__(self, kv: KeyValue, namespace: str, agent: str, ttl: float, clock: Clock):
        self.kv, self.namespace, self.agent, self.ttl, self.clock = (
            kv,
            namespace,
            agent,
            ttl,
            clock,
        )

    def key(self, input: Any) -> str:
        digest = hashlib.sha256(canonical_json(input).encode()).hexdigest()
        return nl.cache_key(self.namespace, self.agent, digest)

    async def get(self, input: Any) -> tuple[bool, Any]:
        raw, _ = await kvs.read(self.kv, self.key(input))
        if raw is None:
            return False, None
        doc = json.loads(raw)
        if float(doc.get("exp", 0)) < self.clock():
            return False, None
        return True, doc.get("output")

    async def put(self, input: Any, output: Any) -> None:
        body = canonical_json({"exp": self.clock() + self.ttl, "output": output}).encode()
        await self.kv.put(self.key(input), body)


async def stop_task(task: asyncio.Task[Any] | None, within: float = 5.0) -> None:
    """Cancels ``task`` and waits until it ends (at most ``within`` seconds).

    A cancel can be lost: on Python 3.11, ``asyncio.wait_for`` (inside nats-py's requests)
    swallows one that races with the reply, and a loop would go on forever. So the task
    is cancelled again until it ends."""
    if task is None:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not task.done() and loop.time() < deadline:
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)


async def open_buckets(js: JetStreamContext) -> dict[str, KeyValue]:
    return {bucket: await js.key_value(bucket) for bucket in nl.BUCKETS}


def wall_clock() -> float:
    return time.time()
