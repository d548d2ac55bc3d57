"""The operator's share of autoscaling, once a second per ScalingPolicy.

The HPA does 1..N on the external metrics; what it cannot do is done here:
- 0 -> 1 when the queue lag reaches ``activation.queueLag`` (or a floor asks for
  replicas), 1 -> 0 after ``cooldownSeconds`` idle (an HPA never acts at 0 replicas);
- the HPA's minReplicas raised by schedule windows and by the forecast, its maxReplicas
  capped by the provider quota (the controller applies them; this loop only computes);
- ``controller.kubernetes.io/pod-deletion-cost`` kept at each pod's in-flight count, so
  the ReplicaSet removes idle pods first when the HPA scales in.

Decisions are pure (:mod:`shoal_core.autoscale.policy`); this module gathers the
observations (JetStream, the runtimes' stats in KV, the clock) and carries out
``scale_to``. Arrival history for the forecast is kept in KV, per minute, so a restarted
operator keeps what it learned.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from nats.js.kv import KeyValue

from shoal_api import nats_layout as nl
from shoal_api.runtime_state import PodStats
from shoal_api.scaling import ScalingPolicySpec
from shoal_core.autoscale.forecast import fit
from shoal_core.autoscale.policy import Observation, Plan, plan
from shoal_core.autoscale.schedule import describe_window, schedule_floor
from shoal_operator.clients.kube import ApiError

log = logging.getLogger(__name__)

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
# A pod's cost is rewritten at once when it flips between idle and busy (that is what
# orders scale-in), otherwise at most this often.
COST_REFRESH_SECONDS = 5.0
MINUTES_PER_DAY = 1440


@dataclass(frozen=True)
class PolicyView:
    """What the loop needs of one ScalingPolicy (from the controller's indexes)."""

    namespace: str
    name: str
    spec: ScalingPolicySpec
    replicas: int | None
    """The target Deployment's spec.replicas (None: no Deployment yet)."""


@dataclass
class _Track:
    idle_since: float | None = None
    completed: dict[str, tuple[float, int]] = field(default_factory=dict)
    per_replica_rate: float | None = None
    minute: int = 0
    minute_count: float = 0.0
    history: list[float] | None = None
    last_rate_at: float = 0.0
    forecast_rate: float | None = None


class MetricSource(Protocol):
    """What the loop reads: the external metrics server's sources, shared with it."""

    async def lag(self, namespace: str, agent: str) -> tuple[int, int]: ...
    async def arrival_rate(self, namespace: str, agent: str) -> float: ...
    async def pod_stats(self, namespace: str, agent: str) -> list[PodStats]: ...


class Autoscaler:
    def __init__(
        self,
        metrics: MetricSource,
        scale: Callable[[str, str, int], Awaitable[None]],
        annotate_pod: Callable[[str, str, dict[str, str]], Awaitable[None]],
        on_plan: Callable[[PolicyView, Plan, Plan | None], None],
        usage_kv: KeyValue | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.metrics = metrics
        self.scale = scale
        self.annotate_pod = annotate_pod
        self.on_plan = on_plan
        self.usage_kv = usage_kv
        self.clock = clock
        self.plans: dict[tuple[str, str], Plan] = {}
        self._tracks: dict[tuple[str, str], _Track] = {}
        self._costs: dict[tuple[str, str], tuple[int, float]] = {}

    async def run(
        self, policies: Callable[[], Sequence[PolicyView]], interval: float = 1.0
    ) -> None:
        while True:
            started = time.monotonic()
            views = policies()
            live = {(v.namespace, v.name) for v in views}
            for key in list(self.plans):
                if key not in live:
                    self.plans.pop(key, None)
                    self._tracks.pop(key, None)
            await asyncio.gather(*(self._guarded(v) for v in views))
            await asyncio.sleep(max(0.05, interval - (time.monotonic() - started)))

    async def _guarded(self, view: PolicyView) -> None:
        try:
            await self.tick(view)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("autoscaling %s/%s skipped a beat: %s", view.namespace, view.name, exc)

    async def tick(self, view: PolicyView) -> Plan | None:
        """One look at one policy: observe, decide, act. Returns the plan."""
        if view.replicas is None:
            return None
        ns, agent, spec = view.namespace, view.spec.target_ref.name, view.spec
        key = (view.namespace, view.name)
        track = self._tracks.setdefault(key, _Track())
        now = self.clock()
        pending, in_flight = await self.metrics.lag(ns, agent)
        lag = pending + in_flight
        stats = await self.metrics.pod_stats(ns, agent)
        rate = await self.metrics.arrival_rate(ns, agent)
        if lag == 0 and in_flight == 0:
            track.idle_since = track.idle_since or now
        else:
            track.idle_since = None
        self._learn_throughput(track, stats, now)
        forecast_rate = None
        if spec.predictive.enabled:
            forecast_rate = await self._forecast(ns, agent, spec, track, rate, now)
        floor, window = schedule_floor(spec.schedule, datetime.fromtimestamp(now, UTC))
        why = describe_window(window) if window is not None else ""
        obs = Observation(
            now=now,
            replicas=view.replicas,
            lag=lag,
            in_flight=in_flight,
            idle_since=track.idle_since,
            arrival_rate=rate,
            forecast_rate=forecast_rate,
            per_replica_rate=track.per_replica_rate,
        )
        new = plan(spec, obs, floor, why)
        old = self.plans.get(key)
        self.plans[key] = new
        if new.scale_to is not None and new.scale_to != view.replicas:
            await self.scale(ns, agent, new.scale_to)
            log.info("%s/%s: %s", ns, view.name, new.decision)
        self.on_plan(view, new, old)
        await self._deletion_costs(ns, stats, now)
        return new

    def _learn_throughput(self, track: _Track, stats: list[PodStats], now: float) -> None:
        """Tasks/s one busy replica completes: the capacity quota caps and forecasts use."""
        rates = []
        for s in stats:
            prev = track.completed.get(s.pod)
            track.completed[s.pod] = (s.at, s.completed)
            if prev is not None and s.at > prev[0] and s.in_flight > 0:
                rates.append((s.completed - prev[1]) / (s.at - prev[0]))
        if rates:
            measured = sum(rates) / len(rates)
            old = track.per_replica_rate
            track.per_replica_rate = measured if old is None else 0.8 * old + 0.2 * measured

    async def _forecast(
        self, ns: str, agent: str, spec: ScalingPolicySpec, track: _Track, rate: float, now: float
    ) -> float | None:
        """Per-minute arrival counts (kept in KV) -> the highest rate expected within
        horizonSeconds (the peak, not the horizon's end: pre-warmed replicas must still
        be there when the burst arrives). Refitted once a minute, not every second."""
        minute = int(now // 60)
        if track.history is None:
            track.history = await self._load_history(ns, agent)
            track.minute = minute
        dt = now - track.last_rate_at if track.last_rate_at else 1.0
        track.last_rate_at = now
        if minute != track.minute:
            track.history.append(track.minute_count)
            del track.history[: -spec.predictive.lookback_hours * 60]
            track.minute, track.minute_count = minute, 0.0
            await self._save_history(ns, agent, track.history, minute)
            model = fit(track.history, MINUTES_PER_DAY)
            steps = max(1, math.ceil(spec.predictive.horizon_seconds / 60))
            track.forecast_rate = None if model is None else model.peak(steps) / 60.0
        track.minute_count += rate * min(dt, 5.0)
        return track.forecast_rate

    async def _load_history(self, ns: str, agent: str) -> list[float]:
        if self.usage_kv is None:
            return []
        with contextlib.suppress(Exception):
            entry = await self.usage_kv.get(nl.limiter_key(ns, agent, "arrivals"))
            doc = json.loads(entry.value or b"{}")
            return [float(x) for x in doc.get("counts", [])]
        return []

    async def _save_history(self, ns: str, agent: str, history: list[float], minute: int) -> None:
        if self.usage_kv is None:
            return
        body = json.dumps({"minute": minute, "counts": [round(x, 2) for x in history]})
        with contextlib.suppress(Exception):
            await self.usage_kv.put(nl.limiter_key(ns, agent, "arrivals"), body.encode())

    async def _deletion_costs(self, ns: str, stats: list[PodStats], now: float) -> None:
        # Pods come and go: forget what was written for those not seen for a while.
        stale = now - 600
        for key in [k for k, (_, at) in self._costs.items() if at < stale]:
            del self._costs[key]
        for s in stats:
            cost = s.in_flight
            last = self._costs.get((ns, s.pod))
            if last is not None:
                flipped = (last[0] == 0) != (cost == 0)
                if last[0] == cost or (not flipped and now - last[1] < COST_REFRESH_SECONDS):
                    continue
            try:
                await self.annotate_pod(ns, s.pod, {DELETION_COST: str(cost)})
            except ApiError as exc:
                if exc.status != 404:
                    raise
            self._costs[(ns, s.pod)] = (cost, now)
