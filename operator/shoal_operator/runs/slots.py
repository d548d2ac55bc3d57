"""Which runs hold a slot of their Workflow's ``maxConcurrentRuns``, which wait for one,
and the tallies the Workflow's status shows.

This is bookkeeping only, with no I/O: the dispatcher tells it each phase change of a
run (:meth:`RunSlots.account`) and asks it which waiting runs may start
(:meth:`RunSlots.take`). It is kept apart from the dispatcher because it is the one place
where in-memory state must agree with the records in KV: a restarted dispatcher rebuilds
it from them by replaying every record through :meth:`RunSlots.account`.
"""

from __future__ import annotations

import collections
import heapq
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from shoal_api.runs.model import RunState

DURATIONS_KEPT = 1000

WorkflowKey = tuple[str, str]
"""(namespace, workflow)"""


@dataclass
class Tally:
    """A Workflow's runs, for its status (the operator mirrors it, throttled)."""

    queued: int = 0
    active: int = 0
    succeeded: int = 0
    failed: int = 0
    durations: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=DURATIONS_KEPT)
    )
    last_run: float | None = None

    def p95(self) -> float | None:
        if not self.durations:
            return None
        ordered = sorted(self.durations)
        return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


class RunSlots:
    def __init__(self, on_tally: Callable[[str, str], None] | None = None) -> None:
        self.on_tally = on_tally
        # (ns, workflow) -> heap of (-priority, created, run id) waiting for a slot; an
        # entry whose run is no longer in _waiting (cancelled meanwhile) is passed over.
        self._queued: dict[WorkflowKey, list[tuple[int, float, str]]] = {}
        self._waiting: dict[WorkflowKey, set[str]] = {}
        self._active: dict[WorkflowKey, set[str]] = {}
        self._tallies: dict[WorkflowKey, Tally] = {}

    def account(self, old: RunState | None, new: RunState) -> None:
        """Moves a run between queue, slot and tally as its phase changes."""
        wf = (new.namespace, new.workflow)
        tally = self._tally(wf)
        if old is not None and old.phase == new.phase:
            return
        waiting = self._waiting.setdefault(wf, set())
        active = self._active.setdefault(wf, set())
        if new.phase == "Pending":
            heapq.heappush(self._queued.setdefault(wf, []), (-new.priority, new.created, new.id))
            waiting.add(new.id)
        elif new.phase == "Running":
            waiting.discard(new.id)
            active.add(new.id)
            tally.last_run = max(tally.last_run or 0.0, new.started or new.created)
        elif new.terminal:
            waiting.discard(new.id)
            active.discard(new.id)
            if new.phase == "Succeeded":
                tally.succeeded += 1
            else:
                tally.failed += 1
            if new.finished is not None:
                tally.durations.append(new.finished - (new.started or new.created))
        tally.queued, tally.active = len(waiting), len(active)
        if self.on_tally is not None:
            self.on_tally(*wf)

    def take(self, namespace: str, workflow: str, limit: int) -> list[str]:
        """The waiting runs that get a slot now, highest priority (then oldest) first,
        while fewer than ``limit`` hold one. They hold it from now on, so a burst of
        finishes cannot overfill the Workflow."""
        wf = (namespace, workflow)
        queue = self._queued.get(wf)
        if not queue:
            return []
        active = self._active.setdefault(wf, set())
        waiting = self._waiting.setdefault(wf, set())
        taken: list[str] = []
        while queue and len(active) < limit:
            _, _, run = heapq.heappop(queue)
            if run not in waiting:
                continue
            waiting.discard(run)
            active.add(run)
            self._tally(wf).queued = len(waiting)
            taken.append(run)
        return taken

    def release(self, namespace: str, workflow: str, run: str) -> None:
        """Gives back the slot of a run that did not start (cancelled or expired while
        queued)."""
        self._active.get((namespace, workflow), set()).discard(run)

    def with_queue(self) -> list[WorkflowKey]:
        """The Workflows that have had runs queued, sorted."""
        return sorted(self._queued)

    def active_runs(self) -> Iterator[tuple[str, str]]:
        """(namespace, run id) of every run holding a slot, by Workflow, then id."""
        for (ns, _), runs in list(self._active.items()):
            for run in sorted(runs):
                yield ns, run

    def counts(self) -> tuple[int, int]:
        """(active, queued) runs in all."""
        return (
            sum(len(a) for a in self._active.values()),
            sum(len(q) for q in self._queued.values()),
        )

    def tally(self, namespace: str, workflow: str) -> Tally | None:
        return self._tallies.get((namespace, workflow))

    def queues(self) -> dict[WorkflowKey, tuple[int, int]]:
        return {wf: (t.active, t.queued) for wf, t in self._tallies.items()}

    def _tally(self, wf: WorkflowKey) -> Tally:
        return self._tallies.setdefault(wf, Tally())
