"""How a dispatcher gets back to where the last one was, and notices events it lost.

The records in KV are the whole truth about runs; everything the dispatcher holds in
memory (queues, slots, tallies, wake-ups) is rebuilt from them at start
(:func:`rebuild`), before it takes any submission or result.

Results are events, and events can be lost: a nats-server restart can forget a
consumer's record of what it delivered but had not seen acknowledged, and such a result
is then never delivered again. :class:`Resync` is the level-triggered backstop: a step
dispatched a while ago whose result is already on the results stream gets that result
applied. Applying it twice is harmless (the engine ignores a result for a step that is
no longer waiting for it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import nats.js.errors
from nats.js.client import JetStreamContext

from shoal_api import nats_layout as nl
from shoal_api.envelope import Result
from shoal_api.runs.model import Event, RunState
from shoal_api.runs.wire import run_key
from shoal_core.runs.engine import next_wakeup
from shoal_operator.runs.slots import RunSlots
from shoal_operator.runs.store import RunStore
from shoal_operator.runs.tasks import step_result
from shoal_operator.runs.timers import Wakeups

log = logging.getLogger(__name__)

# How often (and after how long) dispatched steps are checked for results already stored.
RESYNC_SECONDS = 30.0


async def rebuild(store: RunStore, slots: RunSlots, wakeups: Wakeups) -> None:
    """Rebuilds queues, slots, timers and tallies from the records in KV."""
    async for _, (_, state) in store.scan():
        slots.account(None, state)
        if (when := next_wakeup(state)) is not None:
            wakeups.add(when, state.namespace, state.id)


class Resync:
    def __init__(
        self,
        js: JetStreamContext,
        store: RunStore,
        slots: RunSlots,
        clock: Callable[[], float],
        apply: Callable[[str, str, Event], None],
    ) -> None:
        self.js = js
        self.store = store
        self.slots = slots
        self.clock = clock
        self.apply = apply
        """Applies an event to a run, in the background (namespace, run, event)."""

    async def run(self) -> None:
        while True:
            await asyncio.sleep(RESYNC_SECONDS)
            now = self.clock()
            for ns, run in self.slots.active_runs():
                key = run_key(ns, run)
                try:
                    current, _ = await self.store.current(key)
                    if current is not None and current[1].phase == "Running":
                        await self.catch_up(current[1], now)
                except Exception as exc:  # NATS trouble: the next round looks again
                    log.debug("resync of %s skipped: %s", key, exc)

    async def catch_up(self, state: RunState, now: float) -> None:
        """Applies the stored results of ``state``'s steps dispatched over
        :data:`RESYNC_SECONDS` ago."""
        for name, step in sorted(state.steps.items()):
            if step.phase != "Dispatched" or step.task_id is None:
                continue
            if (step.started or now) > now - RESYNC_SECONDS:
                continue
            try:
                raw = await self.js.get_last_msg(
                    nl.RESULTS_STREAM,
                    nl.result_subject(state.namespace, step.task_id),
                    direct=True,
                )
            except nats.js.errors.NotFoundError:
                continue  # no result yet
            result = Result.model_validate_json(raw.data or b"")
            if result.step is None:
                continue
            log.info(
                "run %s/%s: catching up on the result of step %s", state.namespace, state.id, name
            )
            self.apply(state.namespace, state.id, step_result(result))
