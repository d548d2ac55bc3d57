"""The steps' side of the wire: the engine's DispatchTask effects become tasks on the
tasks stream, and results read back become the engine's StepResult events.

Routing lives here because it is the only part of a step that depends on the moment
rather than on the run's record: which Agent an ``agentSelector`` step goes to depends on
the Agents' lag (LeastLag), on their recent results (BestSuccessRate) or on a turn
(RoundRobin). The choice is recorded in the run's state before its compare-and-set, so
a replayed event publishes the same task to the same Agent.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from collections.abc import Awaitable, Callable, Iterable

from nats.js.client import JetStreamContext

from shoal_api import nats_layout as nl
from shoal_api.envelope import MSG_ID_HEADER, Result, Task
from shoal_api.runs.model import DispatchTask, Effect, Event, RunState, StepResult
from shoal_core.runs.selection import choose
from shoal_operator.runs.catalog import Catalog

# BestSuccessRate looks at this window of results per Agent.
SUCCESS_WINDOW_SECONDS = 300.0
SUCCESS_WINDOW_MAX = 1000

LagSource = Callable[[str, str], Awaitable[int | None]]
"""(namespace, agent) -> tasks waiting for the Agent, None when unknown (LeastLag)."""


async def no_lag(namespace: str, agent: str) -> int | None:
    return None


def step_result(result: Result) -> StepResult:
    """The engine's event for a step's result record."""
    assert result.step is not None
    return StepResult(
        step=result.step,
        task_id=result.id,
        status=result.status,
        output=result.output,
        reason=result.reason,
        message=result.message,
        path=result.path,
    )


class TaskRouter:
    """Publishes the tasks of an advance, choosing Agents for selector steps."""

    def __init__(
        self,
        js: JetStreamContext,
        catalog: Catalog,
        lag: LagSource,
        clock: Callable[[], float],
    ) -> None:
        self.js = js
        self.catalog = catalog
        self.lag = lag
        self.clock = clock
        self._outcomes: dict[tuple[str, str], collections.deque[tuple[float, bool]]] = {}
        self._turns = itertools.count()

    def observe(self, namespace: str, result: Result) -> None:
        """Feeds BestSuccessRate: every result on the stream, of runs or not."""
        window = self._outcomes.setdefault(
            (namespace, result.agent), collections.deque(maxlen=SUCCESS_WINDOW_MAX)
        )
        window.append((result.finished, result.status == "Succeeded"))

    def success_rate(self, namespace: str, agent: str, now: float) -> float | None:
        window = self._outcomes.get((namespace, agent))
        if not window:
            return None
        recent = [ok for at, ok in window if at >= now - SUCCESS_WINDOW_SECONDS]
        return sum(recent) / len(recent) if recent else None

    async def publish(
        self, state: RunState, effects: Iterable[Effect]
    ) -> tuple[RunState, list[Event]]:
        """Publishes the tasks of ``effects``. Returns the state with the Agents chosen
        for ``agentSelector`` steps recorded, and events for steps that could not be
        routed (no Agent has the capability), to be applied next."""
        follow_ups: list[Event] = []
        chosen: dict[str, str] = {}
        sends = []
        for effect in effects:
            if not isinstance(effect, DispatchTask):
                continue
            agent = effect.agent
            if agent is None and effect.selector is not None:
                agent = await self._select(state.namespace, effect)
                if agent is None:
                    follow_ups.append(
                        StepResult(
                            step=effect.step,
                            task_id=effect.task_id,
                            status="DeadLettered",
                            reason="Unroutable",
                            message=f"no Agent in namespace {state.namespace} has "
                            f"capability {effect.selector.capability}",
                        )
                    )
                    continue
                chosen[effect.step] = agent
            assert agent is not None
            task = Task(
                id=effect.task_id,
                input=effect.input,
                priority=effect.priority,
                deadline=effect.deadline,
                run=effect.run,
                step=effect.step,
                timeout=effect.timeout_seconds,
                max_attempts=1 if effect.retry is not None else None,
                submitted=self.clock(),
            )
            subject = nl.task_subject(state.namespace, agent, task.priority)
            sends.append(
                self.js.publish(subject, task.to_json(), headers={MSG_ID_HEADER: task.msg_id()})
            )
        if sends:
            await asyncio.gather(*sends)
        if chosen:
            steps = {
                name: st.model_copy(update={"agent": chosen[name]}) if name in chosen else st
                for name, st in state.steps.items()
            }
            state = state.model_copy(update={"steps": steps})
        return state, follow_ups

    async def _select(self, namespace: str, effect: DispatchTask) -> str | None:
        assert effect.selector is not None
        candidates = self.catalog.capable(namespace, effect.selector.capability)
        if not candidates:
            return None
        strategy = effect.selector.strategy
        lag: dict[str, int] = {}
        success: dict[str, float] = {}
        if strategy == "LeastLag":
            figures = await asyncio.gather(*(self.lag(namespace, a) for a in candidates))
            lag = {a: f for a, f in zip(candidates, figures, strict=True) if f is not None}
        elif strategy == "BestSuccessRate":
            now = self.clock()
            rates = {a: self.success_rate(namespace, a, now) for a in candidates}
            success = {a: r for a, r in rates.items() if r is not None}
        return choose(strategy, candidates, lag=lag, success=success, turn=next(self._turns))
