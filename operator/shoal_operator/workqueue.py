"""A deduplicating work queue, as in controller-runtime: a key is queued at most once,
processed by one worker at a time, and re-queued if it changed while being processed.

Two priorities: keys from watch events (someone changed something) go before keys of
the periodic drift check, so a user's edit never waits behind a full resync.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class WorkQueue(Generic[K]):
    def __init__(self) -> None:
        self._high: deque[K] = deque()
        self._low: deque[K] = deque()
        self._queued: dict[K, bool] = {}  # key -> queued with low priority
        self._active: set[K] = set()
        self._dirty: dict[K, bool] = {}
        self._timers: dict[K, asyncio.TimerHandle] = {}
        self._wakeup = asyncio.Event()

    def add(self, key: K, low: bool = False) -> None:
        if key in self._active:
            self._dirty[key] = self._dirty.get(key, True) and low
            return
        queued_low = self._queued.get(key)
        if queued_low is None:
            self._queued[key] = low
            (self._low if low else self._high).append(key)
        elif queued_low and not low:
            # Promote: the stale low entry is skipped when it comes up.
            self._queued[key] = False
            self._high.append(key)
        self._wakeup.set()

    def add_after(self, key: K, delay: float) -> None:
        """Queue ``key`` after ``delay`` seconds; of two pending timers the sooner wins."""
        loop = asyncio.get_running_loop()
        pending = self._timers.get(key)
        if pending is not None:
            if pending.when() <= loop.time() + delay:
                return
            pending.cancel()

        def fire() -> None:
            self._timers.pop(key, None)
            self.add(key)

        self._timers[key] = loop.call_later(delay, fire)

    def _pop(self) -> K | None:
        while self._high:
            key = self._high.popleft()
            if self._queued.get(key) is False:
                return key
        while self._low:
            key = self._low.popleft()
            if self._queued.get(key) is True:
                return key
        return None

    async def get(self) -> K:
        while True:
            key = self._pop()
            if key is not None:
                del self._queued[key]
                self._active.add(key)
                return key
            self._wakeup.clear()
            await self._wakeup.wait()

    def done(self, key: K) -> None:
        self._active.discard(key)
        if key in self._dirty:
            self.add(key, low=self._dirty.pop(key))

    def __len__(self) -> int:
        return len(self._queued) + len(self._active)

    def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
