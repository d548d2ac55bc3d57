"""Run deadlines and approval timeouts: the only events no message brings.

The engine says when a run next needs a look (:func:`shoal_core.runs.engine.next_wakeup`);
this keeps those moments in one heap and, when one comes, hands the run to ``fire``
(which applies a Tick). A wake-up is a hint, not a promise: a run advanced meanwhile
just gets a Tick that changes nothing, so entries are never removed, only passed. After
a restart the heap is refilled from the records (the dispatcher's recovery).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
from collections.abc import Callable

# The loop looks at least this often, so a clock that jumps is noticed.
MAX_SLEEP_SECONDS = 60.0


class Wakeups:
    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._heap: list[tuple[float, str, str]] = []
        self._woken = asyncio.Event()

    def add(self, when: float, namespace: str, run: str) -> None:
        """Asks for ``fire(namespace, run)`` at ``when``."""
        heapq.heappush(self._heap, (when, namespace, run))
        self._woken.set()

    async def run(self, fire: Callable[[str, str], None]) -> None:
        while True:
            self._woken.clear()
            now = self.clock()
            while self._heap and self._heap[0][0] <= now:
                _, ns, run = heapq.heappop(self._heap)
                fire(ns, run)
            delay = self._heap[0][0] - now if self._heap else MAX_SLEEP_SECONDS
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._woken.wait(), timeout=max(0.01, min(delay, MAX_SLEEP_SECONDS))
                )
