"""The reconcile loop: a work queue of (kind, namespace, name) keys, workers that run
the pure reconcilers against the watch cache, and the I/O that applies their output.

Every trigger (a watch event of the object or of something it depends on, a child
changing, the periodic drift check) only queues a key; the same level-triggered
reconcile runs for all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

from kubernetes_asyncio.client.exceptions import ApiException
from pydantic import ValidationError

from shoal_api import nats_layout as nl
from shoal_api.agent import AgentSpec
from shoal_api.approval import ApprovalSpec
from shoal_api.base import ApiModel
from shoal_api.runtime_state import CircuitRecord, UsageRecord
from shoal_api.scaling import ScalingPolicySpec
from shoal_api.workflow import WorkflowSpec
from shoal_core.autoscale.policy import Plan
from shoal_operator.builders.apiservice import MetricsProvider
from shoal_operator.builders.common import Owner
from shoal_operator.builders.deployment import RuntimeDefaults
from shoal_operator.conditions import Cond, EventSpec, merge_conditions, transition_events
from shoal_operator.jetstream_admin import JetStreamAdmin, queue_counts
from shoal_operator.kube import Kube
from shoal_operator.leader import LeaderElector
from shoal_operator.reconcilers import agent as agent_rec
from shoal_operator.reconcilers import approval as approval_rec
from shoal_operator.reconcilers import scaling as scaling_rec
from shoal_operator.reconcilers import workflow as workflow_rec
from shoal_operator.reconcilers.common import Problem
from shoal_operator.runs import Dispatcher, LagSource, RunGate, RunMetrics, WorkflowView, view_of
from shoal_operator.scaling import Autoscaler, MetricSource, PolicyView
from shoal_operator.settings import FIELD_MANAGER, FINALIZER, HANDOVER_MANAGER
from shoal_operator.workqueue import WorkQueue

log = logging.getLogger(__name__)

Key = tuple[str, str, str]  # (kind, namespace, name)
M = TypeVar("M", bound=ApiModel)
# At start-up, reconciles wait this long for NATS before reporting it unavailable.
NATS_GRACE_SECONDS = 10.0


MAX_BACKOFF = 300.0
# Approvals that could not be relayed (no dispatcher yet, not leading, NATS trouble) are
# tried again this often; there are few of them, written by people.
APPROVAL_RETRY_SECONDS = 2.0
DECIDE_TIMEOUT_SECONDS = 30.0


class RetryLater(Exception):  # noqa: N818  (a signal, not an error)
    """The reconcile did what it could; run it again with backoff (no traceback)."""


# Counts change all the time under load; without a condition flip they reach status at
# most this often (a status is a throttled mirror, not a live feed).
STATUS_THROTTLE_SECONDS = 5.0
# A changed autoscaling decision sentence (e.g. the idle countdown) at most this often.
DECISION_EVERY = 10.0
THROTTLED_STATUS_KEYS = frozenset(
    {
        "queue",
        "usage",
        "replicas",
        "readyReplicas",
        "currentReplicas",
        "desiredReplicas",
        "lastScaleTime",
        "runs",
        "p95DurationSeconds",
        "lastRunTime",
    }
)


class Index(Protocol):
    """What we use of a kopf.Index: key -> a collection of stored values."""

    def get(self, key: Any, default: Any = None) -> Any: ...

    def __iter__(self) -> Any: ...


@dataclass
class Indexes:
    """The watch cache (kopf indexes, filled before any reconcile runs)."""

    agents: Index
    policies: Index
    workflows: Index
    deployments: Index
    hpas: Index
    agents_by_ns: Index
    agents_by_reference: Index
    policies_by_target: Index
    workflows_by_ns: Index

    @staticmethod
    def one(index: Index, key: Any) -> dict[str, Any] | None:
        store = index.get(key)
        if not store:
            return None
        value: dict[str, Any] = next(iter(store))
        return value

    @staticmethod
    def names(index: Index, key: Any) -> list[str]:
        return sorted(set(index.get(key) or ()))


@dataclass
class ControllerConfig:
    runtime: RuntimeDefaults
    workers: int = 32
    drift_interval: float = 60.0


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _api_reason(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        with contextlib.suppress(Exception):
            return str(json.loads(exc.body or b"{}").get("message", exc.reason))
        return f"{exc.status} {exc.reason}"
    return f"{type(exc).__name__}: {exc}"


def validation_message(exc: ValidationError) -> str:
    return "; ".join(f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())


@dataclass
class Controller:
    kube: Kube
    config: ControllerConfig
    nats: JetStreamAdmin | None = None
    indexes: Indexes | None = None
    leader: LeaderElector | None = None
    """None: a single replica, always in charge."""
    queue: WorkQueue[Key] = field(default_factory=WorkQueue)
    _force: set[Key] = field(default_factory=set)
    _failures: dict[Key, int] = field(default_factory=dict)
    # (kind, ns, name) -> (digest of what we applied, generation or resourceVersion after)
    _applied: dict[Key, tuple[str, str]] = field(default_factory=dict)
    _policy_target: dict[tuple[str, str], str] = field(default_factory=dict)
    _agent_generation: dict[tuple[str, str], Any] = field(default_factory=dict)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _status_written: dict[Key, float] = field(default_factory=dict)
    # key -> (resourceVersion our last status write patched, the status it wrote)
    _status_pending: dict[Key, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    nats_ready: asyncio.Event = field(default_factory=asyncio.Event)
    _started: float = 0.0
    clock: Callable[[], str] = now_rfc3339
    metrics_provider: MetricsProvider | None = None
    """Who serves external.metrics.k8s.io (every ScalingPolicy's MetricsAvailable)."""
    autoscaler: Autoscaler | None = None
    dispatcher: Dispatcher | None = None
    """The workflow run dispatcher, while this replica leads."""
    run_metrics: RunMetrics = field(default_factory=RunMetrics)
    """The dispatchers' metrics; one registry however often leadership changes."""
    _workflow_views: dict[tuple[str, str], tuple[Any, WorkflowView]] = field(default_factory=dict)
    _decision_shown: dict[tuple[str, str], float] = field(default_factory=dict)
    _policy_specs: dict[tuple[str, str], tuple[Any, ScalingPolicySpec]] = field(
        default_factory=dict
    )
    runs: RunGate | None = None
    """Takes Approvals' decisions to runs; None until the run dispatcher starts."""
    _approvals_waiting: dict[tuple[str, str], Mapping[str, Any]] = field(default_factory=dict)
    _approvals_busy: set[tuple[str, str]] = field(default_factory=set)
    # uid -> the status a relay computed but could not write yet (never decide twice).
    _approval_results: dict[str, tuple[dict[str, Any], list[EventSpec]]] = field(
        default_factory=dict
    )

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        self._started = time.monotonic()
        for i in range(self.config.workers):
            self._tasks.append(asyncio.create_task(self._worker(), name=f"shoal-worker-{i}"))
        self._tasks.append(asyncio.create_task(self._resync(), name="shoal-resync"))
        self._tasks.append(
            asyncio.create_task(self._watch_runtime_state(), name="shoal-runtime-state")
        )
        self._tasks.append(asyncio.create_task(self._retry_approvals(), name="shoal-approvals"))

    async def stop(self) -> None:
        self.queue.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def _in_charge(self) -> None:
        if self.leader is not None:
            await self.leader.leading.wait()
        grace = self._started + NATS_GRACE_SECONDS - time.monotonic()
        if grace > 0 and not self.nats_ready.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.nats_ready.wait(), grace)

    def _all_keys(self) -> list[Key]:
        if self.indexes is None:
            return []
        return [
            (kind, ns, name)
            for kind, index in (
                ("Agent", self.indexes.agents),
                ("ScalingPolicy", self.indexes.policies),
                ("Workflow", self.indexes.workflows),
            )
            for ns, name in list(index)
        ]

    def enqueue_all(self) -> None:
        """Every object, forced and behind the event-driven work."""
        for key in self._all_keys():
            self._force.add(key)
            self.queue.add(key, low=True)

    async def _worker(self) -> None:
        while True:
            await self._in_charge()
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
                if isinstance(exc, RetryLater | ApiException):
                    log.warning(
                        "reconcile %s/%s/%s: %s; retrying in %.0fs", *key, _api_reason(exc), delay
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
            await self._in_charge()
            if not was_leading:
                # Taking over: the previous leader may have left work half done.
                was_leading = True
                self.enqueue_all()
                keys: list[Key] = []
            else:
                keys = self._all_keys()
            pause = self.config.drift_interval / max(1, len(keys))
            for key in keys:
                if self.leader is not None and not self.leader.is_leader():
                    break
                self._force.add(key)
                self.queue.add(key, low=True)
                await asyncio.sleep(pause)
            if not keys:
                await asyncio.sleep(self.config.drift_interval)
            was_leading = self.leader is None or self.leader.is_leader()

    # -- triggers (called from the kopf glue) ----------------------------------------

    def on_agent(self, namespace: str, name: str, body: Mapping[str, Any] | None) -> None:
        self.queue.add(("Agent", namespace, name))
        if self.indexes is None:
            return
        # Dependents care about the Agent's existence and spec, not its status writes.
        generation = None if body is None else body.get("metadata", {}).get("generation")
        if body is not None and self._agent_generation.get((namespace, name)) == generation:
            return
        if body is None:
            self._agent_generation.pop((namespace, name), None)
        else:
            self._agent_generation[(namespace, name)] = generation
        # Whatever refers to this Agent may change Ready with it.
        for other in Indexes.names(self.indexes.agents_by_reference, (namespace, name)):
            self.queue.add(("Agent", namespace, other))
        for policy in Indexes.names(self.indexes.policies_by_target, (namespace, name)):
            self.queue.add(("ScalingPolicy", namespace, policy))
        for wf in Indexes.names(self.indexes.workflows_by_ns, namespace):
            self.queue.add(("Workflow", namespace, wf))

    def on_policy(self, namespace: str, name: str, body: Mapping[str, Any] | None) -> None:
        self.queue.add(("ScalingPolicy", namespace, name))
        target = ((body or {}).get("spec") or {}).get("targetRef", {}).get("name")
        previous = self._policy_target.get((namespace, name))
        for agent in {target, previous} - {None}:
            assert agent is not None
            self.queue.add(("Agent", namespace, agent))
            if self.indexes is not None:
                for other in Indexes.names(self.indexes.policies_by_target, (namespace, agent)):
                    self.queue.add(("ScalingPolicy", namespace, other))
        if body is None or target is None:
            self._policy_target.pop((namespace, name), None)
        else:
            self._policy_target[(namespace, name)] = target

    def on_deployment(self, namespace: str, agent: str) -> None:
        """A child Deployment changed: its Agent (and the policy reporting its replicas)."""
        self.queue.add(("Agent", namespace, agent))
        if self.indexes is not None:
            for policy in Indexes.names(self.indexes.policies_by_target, (namespace, agent)):
                self.queue.add(("ScalingPolicy", namespace, policy))

    def on_metrics_provider(self, provider: MetricsProvider | None) -> None:
        """The APIService changed hands (or availability): every policy says so."""
        if provider == self.metrics_provider:
            return
        self.metrics_provider = provider
        if self.indexes is not None:
            for namespace, name in list(self.indexes.policies):
                self.queue.add(("ScalingPolicy", namespace, name))

    def on_workflow(self, namespace: str, name: str) -> None:
        self.queue.add(("Workflow", namespace, name))

    def on_circuit(self, namespace: str, agent: str, replay: bool) -> None:
        """A runtime wrote the Agent's circuit record (``replay``: the watch (re)started and
        reports the records that exist, a catch-up that goes behind user edits)."""
        if self._watched_agent(namespace, agent):
            self.queue.add(("Agent", namespace, agent), low=replay)

    def on_usage(self, namespace: str, agent: str, replay: bool) -> None:
        """A runtime merged the Agent's usage. Every replica merges about once a second
        and status.usage is throttled anyway: within the throttle interval of the last
        status write, the Agent is queued for when it ends (one reconcile, not five)."""
        if not self._watched_agent(namespace, agent):
            return
        key = ("Agent", namespace, agent)
        wait = self._status_written.get(key, 0.0) + STATUS_THROTTLE_SECONDS - time.monotonic()
        if replay:
            self.queue.add(key, low=True)
        elif wait > 0:
            self.queue.add_after(key, wait)
        else:
            self.queue.add(key)

    def _watched_agent(self, namespace: str, agent: str) -> bool:
        # The buckets hold every namespace's Agents; this operator may watch fewer.
        return self.indexes is None or bool(self.indexes.agents.get((namespace, agent)))

    # -- approvals (relayed to runs directly, not through the work queue) -------------

    async def on_approval(self, namespace: str, name: str, body: Mapping[str, Any] | None) -> None:
        """Relays an Approval's decision to its run, once, and records the outcome in its
        status. Until a run gate exists (or while another replica leads) it waits."""
        key = (namespace, name)
        if body is None or approval_rec.relayed(body.get("status")):
            self._approvals_waiting.pop(key, None)
            return
        if key in self._approvals_busy:
            self._approvals_waiting[key] = body  # looked at again once the relay is done
            return
        self._approvals_busy.add(key)
        try:
            await self._relay_approval(key, body)
        finally:
            self._approvals_busy.discard(key)

    async def _relay_approval(self, key: tuple[str, str], body: Mapping[str, Any]) -> None:
        meta = body["metadata"]
        uid, generation = str(meta["uid"]), int(meta.get("generation", 0))
        current = body.get("status") or {}
        result = self._approval_results.get(uid)
        if result is None:
            runs, leading = self.runs, self._leading()
            if runs is None or not leading:
                self._approvals_waiting[key] = body
                # Standbys have no dispatcher by design; only the leader says it waits.
                if leading and current.get("phase") != "Pending":
                    pending = approval_rec.waiting_status(generation, current, self.clock())
                    try:
                        await self._write_approval_status(body, pending)
                    except Exception as exc:  # cosmetic; the relay itself is retried
                        log.warning("approval %s/%s: %s", *key, _api_reason(exc))
                return
            try:
                spec = ApprovalSpec.model_validate(body.get("spec") or {})
            except ValidationError as exc:
                result = approval_rec.status(
                    generation, None, "InvalidSpec", validation_message(exc), current, self.clock()
                )
            else:
                event = approval_rec.decision_event(spec, str(meta["creationTimestamp"]))
                try:
                    outcome, message = await asyncio.wait_for(
                        runs.decide(key[0], spec.run, event, workflow=spec.workflow),
                        DECIDE_TIMEOUT_SECONDS,
                    )
                except Exception as exc:
                    log.warning("approval %s/%s: relaying failed (%s); retrying", *key, exc)
                    self._approvals_waiting[key] = body
                    return
                result = approval_rec.status(
                    generation, spec, outcome, message, current, self.clock()
                )
            self._approval_results[uid] = result
        status, events = result
        try:
            written = await self._write_approval_status(body, status)
        except Exception as exc:
            log.warning("approval %s/%s: status not written (%s); retrying", *key, _api_reason(exc))
            self._approvals_waiting[key] = body
            return
        self._approval_results.pop(uid, None)
        self._approvals_waiting.pop(key, None)
        if not written:
            return  # deleted, or somebody recorded an outcome first
        for ev in events:
            try:
                await self.kube.event(dict(body), ev.type, ev.reason, ev.message)
            except Exception as exc:  # an Event is best effort, never worth a retry
                log.warning("posting event %s failed: %s", ev.reason, _api_reason(exc))

    async def _write_approval_status(self, body: Mapping[str, Any], status: dict[str, Any]) -> bool:
        """Writes ``status`` unless the Approval is gone or already shows an outcome.
        The resourceVersion precondition keeps two writers (a replica taking over, a late
        retry) from overwriting an outcome with another one."""
        meta = body["metadata"]
        namespace, name, version = meta["namespace"], meta["name"], meta.get("resourceVersion")
        for _ in range(5):
            patch = {"metadata": {"resourceVersion": version}, "status": status}
            try:
                await self.kube.merge_patch("Approval", namespace, name, patch, sub="status")
                return True
            except ApiException as exc:
                if exc.status != 409:
                    if exc.status == 404:
                        return False
                    raise
            fresh = await self.kube.get("Approval", namespace, name)
            if fresh is None or fresh["metadata"].get("uid") != meta.get("uid"):
                return False
            if approval_rec.relayed(fresh.get("status")):
                return False
            version = fresh["metadata"].get("resourceVersion")
        raise RetryLater(f"Approval {namespace}/{name} keeps changing")

    def _leading(self) -> bool:
        return self.leader is None or self.leader.is_leader()

    async def _retry_approvals(self) -> None:
        while True:
            await asyncio.sleep(APPROVAL_RETRY_SECONDS)
            if not self._leading():
                continue
            for (namespace, name), body in list(self._approvals_waiting.items()):
                if (namespace, name) in self._approvals_busy:
                    continue
                try:
                    await self.on_approval(namespace, name, body)
                except Exception:  # this loop outlives any one Approval
                    log.exception("approval %s/%s: relaying failed", namespace, name)

    async def _watch_runtime_state(self) -> None:
        """The circuit and usage mirrors are event-driven: a KV write queues its Agent."""
        await self.nats_ready.wait()
        js = self.nats
        if js is None:
            return
        await asyncio.gather(
            js.watch_agents(nl.CIRCUIT_BUCKET, self.on_circuit),
            js.watch_agents(nl.USAGE_BUCKET, self.on_usage),
        )

    # -- reconcile -------------------------------------------------------------------

    async def reconcile(self, key: Key) -> None:
        kind, namespace, name = key
        force = key in self._force
        self._force.discard(key)
        if kind == "Agent":
            await self._reconcile_agent(namespace, name, force)
        elif kind == "ScalingPolicy":
            await self._reconcile_policy(namespace, name, force)
        elif kind == "Workflow":
            await self._reconcile_workflow(namespace, name)

    def _idx(self) -> Indexes:
        if self.indexes is None:
            raise RuntimeError("reconcile before the watch cache exists")
        return self.indexes

    def _agents(self, namespace: str) -> frozenset[str]:
        return frozenset(Indexes.names(self._idx().agents_by_ns, namespace))

    async def _apply(
        self,
        obj: dict[str, Any],
        observed: Mapping[str, Any] | None,
        force: bool,
        watched: bool = True,
    ) -> dict[str, Any] | None:
        """Server-side apply, skipped when neither the input nor the object has changed
        since our last apply. ``watched`` children are compared with the watch cache;
        the others are re-applied by the drift check, which always applies."""
        meta = obj["metadata"]
        key = (obj["kind"], meta["namespace"], meta["name"])
        digest = _digest(obj)
        last = self._applied.get(key)
        if not force and last is not None:
            if not watched and last[0] == digest:
                return None
            if observed is not None and last == (digest, _version(observed)):
                return dict(observed)
        result = await self.kube.apply(obj)
        self._applied[key] = (digest, _version(result))
        return result

    async def _write_status(
        self,
        kind: str,
        body: Mapping[str, Any],
        status: dict[str, Any],
        events: Iterable[EventSpec],
    ) -> None:
        meta = body["metadata"]
        key = (kind, meta["namespace"], meta["name"])
        current = self._current_status(kind, body)
        changed = {k for k, v in status.items() if current.get(k) != v}
        if changed and changed <= THROTTLED_STATUS_KEYS:
            wait = self._status_written.get(key, 0.0) + STATUS_THROTTLE_SECONDS - time.monotonic()
            if wait > 0:
                self.queue.add_after(key, wait)
                changed = set()
        if changed:
            await self.kube.merge_patch(
                kind, meta["namespace"], meta["name"], {"status": status}, sub="status"
            )
            self._status_written[key] = time.monotonic()
            self._status_pending[key] = (str(meta.get("resourceVersion", "")), status)
        for ev in events:
            try:
                await self.kube.event(dict(body), ev.type, ev.reason, ev.message)
            except Exception as exc:  # an Event is best effort, never worth a retry
                log.warning("posting event %s failed: %s", ev.reason, _api_reason(exc))

    def _current_status(self, kind: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """The object's status, including our last write while the watch cache has not
        caught up with it: a reconcile in between (a KV update, a child event) then sees
        the transition as done, and posts its Event once, not twice."""
        meta = body["metadata"]
        key = (kind, meta["namespace"], meta["name"])
        status: dict[str, Any] = body.get("status") or {}
        pending = self._status_pending.get(key)
        if pending is None:
            return status
        if pending[0] == str(meta.get("resourceVersion", "")):
            return {**status, **pending[1]}
        del self._status_pending[key]
        return status

    async def _set_finalizers(self, kind: str, meta: Mapping[str, Any], new: list[str]) -> None:
        """Writes metadata.finalizers, failing (409) if the object changed meanwhile."""
        patch = {"metadata": {"finalizers": new, "resourceVersion": meta["resourceVersion"]}}
        await self.kube.merge_patch(kind, meta["namespace"], meta["name"], patch)

    async def _release_if_deleted(
        self, kind: str, body: Mapping[str, Any], cleanup: Callable[[], Any] | None
    ) -> bool:
        """For an object being deleted: cleanup, then drop our finalizer. True if deleted."""
        meta = body["metadata"]
        if not meta.get("deletionTimestamp"):
            return False
        finalizers = list(meta.get("finalizers") or [])
        if FINALIZER in finalizers:
            if cleanup is not None:
                await cleanup()
            await self._set_finalizers(kind, meta, [f for f in finalizers if f != FINALIZER])
        return True

    async def _ensure_finalizer(self, kind: str, body: Mapping[str, Any]) -> None:
        meta = body["metadata"]
        finalizers = list(meta.get("finalizers") or [])
        if FINALIZER not in finalizers:
            await self._set_finalizers(kind, meta, [*finalizers, FINALIZER])

    async def _parse(self, kind: str, body: Mapping[str, Any], model: type[M]) -> M | None:
        """The spec parsed by the models, or None after reporting it InvalidSpec."""
        try:
            return model.model_validate(body["spec"])
        except ValidationError as exc:
            await self._invalid(kind, body, exc)
            return None

    async def _invalid(self, kind: str, body: Mapping[str, Any], exc: ValidationError) -> None:
        message = validation_message(exc)
        gen = int(body["metadata"].get("generation", 0))
        current = self._current_status(kind, body)
        conds = merge_conditions(
            current.get("conditions"),
            [
                Cond("Ready", "False", "InvalidSpec", message),
                Cond("Degraded", "True", "InvalidSpec", message),
            ],
            gen,
            self.clock(),
        )
        await self._write_status(
            kind,
            body,
            {"observedGeneration": gen, "conditions": conds},
            transition_events(current.get("conditions"), conds),
        )

    async def _reconcile_agent(self, namespace: str, name: str, force: bool) -> None:
        idx = self._idx()
        body = Indexes.one(idx.agents, (namespace, name))
        if body is None:
            return
        js = self.nats

        async def cleanup() -> None:
            if js is None:
                raise RuntimeError("NATS is not connected; JetStream cleanup must wait")
            await js.remove_agent(namespace, name)

        if await self._release_if_deleted("Agent", body, cleanup):
            return
        spec = await self._parse("Agent", body, AgentSpec)
        if spec is None:
            return
        meta = body["metadata"]
        owner = Owner("Agent", namespace, name, meta["uid"])
        policy = self._scaling_policy_for(namespace, name)
        observed = agent_rec.AgentObserved(
            deployment=Indexes.one(idx.deployments, (namespace, name)),
            agents=self._agents(namespace),
            scaled_by=policy[0] if policy else None,
            max_replicas=policy[1] if policy else 1,
        )
        plan = agent_rec.plan(owner, spec, observed, self.config.runtime, FIELD_MANAGER)
        problems: list[Problem] = []
        if plan.handover is not None:
            await self.kube.apply(plan.handover, manager=HANDOVER_MANAGER)

        async def apply_child(obj: dict[str, Any]) -> dict[str, Any] | None:
            try:
                if obj["kind"] == "Deployment":
                    return await self._apply(obj, observed.deployment, force)
                await self._apply(obj, None, force, watched=False)
            except ApiException as exc:
                problems.append(Problem("ApplyFailed", f"{obj['kind']} {name}: {_api_reason(exc)}"))
            return None

        async def delete_child(kind: str, child: str) -> None:
            existing = await self.kube.get(kind, namespace, child)
            owners = (existing or {}).get("metadata", {}).get("ownerReferences", [])
            if any(r.get("uid") == meta["uid"] for r in owners):
                await self.kube.delete(kind, namespace, child)

        async def records() -> tuple[CircuitRecord | None, UsageRecord | None]:
            if js is None:
                return None, None
            try:
                circuit, usage = await asyncio.gather(
                    js.circuit_record(namespace, name), js.usage_record(namespace, name)
                )
            except Exception as exc:
                # The status keeps the last mirrored values; the consumer reports NATS.
                log.debug("reading runtime state of %s/%s: %s", namespace, name, exc)
                return None, None
            return circuit, usage

        async def consumer() -> tuple[int, int] | None:
            if js is None:
                problems.append(Problem("JetStreamUnavailable", "not connected to NATS yet"))
                return None
            try:
                return queue_counts(await js.ensure_consumers(plan.consumers))
            except Exception as exc:
                problems.append(
                    Problem("JetStreamUnavailable", f"consumers of {namespace}/{name}: {exc}")
                )
                return None

        # Independent writes go out together: one round trip of latency, not five.
        state, results = await asyncio.gather(
            records(),
            asyncio.gather(
                consumer(),
                self._ensure_finalizer("Agent", body),
                *(delete_child(kind, child) for kind, child in plan.delete),
                *(apply_child(obj) for obj in plan.apply),
            ),
        )
        counts = results[0] if isinstance(results[0], tuple) else None
        applied = [r for r in results[2 + len(plan.delete) :] if isinstance(r, Mapping)]
        deployment = applied[0] if applied else observed.deployment
        outcome = agent_rec.AgentOutcome(problems, *(counts or (None, None)))
        observed = replace(observed, deployment=deployment, circuit=state[0], usage=state[1])
        status, events = agent_rec.status(
            int(meta.get("generation", 0)),
            namespace,
            spec,
            observed,
            outcome,
            self._current_status("Agent", body),
            self.clock(),
            unix_now=time.time(),
        )
        await self._write_status("Agent", body, status, events)
        if any(p.reason == "JetStreamUnavailable" for p in problems):
            raise RetryLater("JetStream unavailable")

    def _scaling_policy_for(self, namespace: str, agent: str) -> tuple[str, int] | None:
        """The policy that scales ``agent`` (first by name) and its maxReplicas."""
        idx = self._idx()
        for policy in Indexes.names(idx.policies_by_target, (namespace, agent)):
            body = Indexes.one(idx.policies, (namespace, policy))
            if body and not body["metadata"].get("deletionTimestamp"):
                try:
                    spec = ScalingPolicySpec.model_validate(body["spec"])
                except ValidationError:
                    continue
                return policy, spec.max_replicas
        return None

    async def _reconcile_policy(self, namespace: str, name: str, force: bool) -> None:
        idx = self._idx()
        body = Indexes.one(idx.policies, (namespace, name))
        if body is None:
            return
        spec = await self._parse("ScalingPolicy", body, ScalingPolicySpec)
        if spec is None:
            return
        meta = body["metadata"]
        owner = Owner("ScalingPolicy", namespace, name, meta["uid"])
        winner = self._scaling_policy_for(namespace, spec.target_ref.name)
        observed = scaling_rec.PolicyObserved(
            agents=self._agents(namespace),
            winner=winner[0] if winner else name,
            hpa=Indexes.one(idx.hpas, (namespace, name)),
            deployment=Indexes.one(idx.deployments, (namespace, spec.target_ref.name)),
            metrics=self.metrics_provider,
            autoscale=self.autoscaler.plans.get((namespace, name)) if self.autoscaler else None,
        )
        plan = scaling_rec.plan(owner, spec, observed)
        problems: list[Problem] = []
        hpa = observed.hpa
        if plan.hpa is not None:
            try:
                hpa = await self._apply(plan.hpa, observed.hpa, force)
            except ApiException as exc:
                problems.append(
                    Problem("ApplyFailed", f"HorizontalPodAutoscaler {name}: {_api_reason(exc)}")
                )
        elif observed.hpa is not None:
            await self.kube.delete("HorizontalPodAutoscaler", namespace, name)
            self._applied.pop(("HorizontalPodAutoscaler", namespace, name), None)
            hpa = None
        observed = replace(observed, hpa=hpa)
        status, events = scaling_rec.status(
            int(meta.get("generation", 0)),
            owner,
            observed,
            plan,
            problems,
            self._current_status("ScalingPolicy", body),
            self.clock(),
        )
        await self._write_status("ScalingPolicy", body, status, events)

    # -- workflow runs (the dispatcher itself is in dispatcher.py) -------------------

    async def run_dispatcher(self, lag: LagSource) -> None:
        """Runs the dispatcher while this replica leads (and NATS is there)."""
        await self.nats_ready.wait()
        assert self.nats is not None
        while True:
            await self._in_charge()
            dispatcher = Dispatcher(
                self.nats.nc, self, lag=lag, on_tally=self._on_tally, metrics=self.run_metrics
            )
            try:
                await dispatcher.start()
            except Exception as exc:
                log.warning("workflow dispatcher not started (%s); retrying", exc)
                await dispatcher.stop()
                await asyncio.sleep(2.0)
                continue
            self.dispatcher = self.runs = dispatcher
            try:
                # The elector has an event for leading, none for losing it.
                while self._leading():  # noqa: ASYNC110
                    await asyncio.sleep(1.0)
                log.info("no longer leading: workflow dispatcher stops")
            finally:
                self.dispatcher = self.runs = None
                await dispatcher.stop()

    def workflow(self, namespace: str, name: str) -> WorkflowView | None:
        """The dispatcher's catalog: a Workflow from the watch cache, parsed once per
        generation."""
        body = Indexes.one(self._idx().workflows, (namespace, name))
        if body is None:
            return None
        generation = body["metadata"].get("generation")
        cached = self._workflow_views.get((namespace, name))
        if cached is not None and cached[0] == generation:
            return cached[1]
        try:
            spec = WorkflowSpec.model_validate(body.get("spec") or {})
        except ValidationError as exc:
            log.warning("workflow %s/%s unusable: %s", namespace, name, validation_message(exc))
            return None
        view = view_of(spec)
        self._workflow_views[(namespace, name)] = (generation, view)
        return view

    def capable(self, namespace: str, capability: str) -> list[str]:
        idx = self._idx()
        return sorted(
            agent
            for agent in self._agents(namespace)
            if capability
            in ((Indexes.one(idx.agents, (namespace, agent)) or {}).get("spec", {})).get(
                "capabilities", []
            )
        )

    def _on_tally(self, namespace: str, workflow: str) -> None:
        # The status write is throttled in _write_status; the queue deduplicates keys.
        self.queue.add(("Workflow", namespace, workflow))

    def _run_summary(self, namespace: str, name: str) -> dict[str, Any] | None:
        tally = self.dispatcher.tally(namespace, name) if self.dispatcher else None
        if tally is None:
            return None
        out: dict[str, Any] = {
            "runs": {"active": tally.active, "succeeded": tally.succeeded, "failed": tally.failed}
        }
        if (p95 := tally.p95()) is not None:
            out["p95DurationSeconds"] = round(p95, 3)
        if tally.last_run is not None:
            out["lastRunTime"] = (
                dt.datetime.fromtimestamp(tally.last_run, dt.UTC).isoformat().replace("+00:00", "Z")
            )
        return out

    # -- autoscaling (the loop itself is in autoscaler.py) --------------------------

    async def run_autoscaler(self, metrics: MetricSource) -> None:
        """The per-second autoscaling loop, once NATS is there; idle unless leading."""
        await self.nats_ready.wait()
        assert self.nats is not None
        usage = await self.nats.js.key_value(nl.USAGE_BUCKET)
        self.autoscaler = Autoscaler(
            metrics, self._scale, self._annotate_pod, self._on_scaling_plan, usage
        )
        await self.autoscaler.run(self._policy_views)

    def _policy_views(self) -> list[PolicyView]:
        if self.indexes is None or (self.leader is not None and not self.leader.leading.is_set()):
            return []
        views = []
        for ns, name in list(self.indexes.policies):
            body = Indexes.one(self.indexes.policies, (ns, name))
            if body is None:
                continue
            spec = self._policy_spec(ns, name, body)
            if spec is None:
                continue
            winner = self._scaling_policy_for(ns, spec.target_ref.name)
            if winner is None or winner[0] != name:
                continue
            dep = Indexes.one(self.indexes.deployments, (ns, spec.target_ref.name))
            replicas = None if dep is None else int(dep.get("spec", {}).get("replicas", 1))
            views.append(PolicyView(ns, name, spec, replicas))
        return views

    def _policy_spec(self, ns: str, name: str, body: Mapping[str, Any]) -> ScalingPolicySpec | None:
        """Parsed once per generation (the loop asks every second)."""
        generation = body["metadata"].get("generation")
        cached = self._policy_specs.get((ns, name))
        if cached is not None and cached[0] == generation:
            return cached[1]
        try:
            spec = ScalingPolicySpec.model_validate(body.get("spec", {}))
        except ValidationError:
            return None  # the reconcile reports it
        self._policy_specs[(ns, name)] = (generation, spec)
        return spec

    async def _scale(self, namespace: str, deployment: str, replicas: int) -> None:
        await self.kube.merge_patch(
            "Deployment", namespace, deployment, {"spec": {"replicas": replicas}}, sub="scale"
        )

    async def _annotate_pod(self, namespace: str, pod: str, annotations: dict[str, str]) -> None:
        await self.kube.merge_patch(
            "Pod", namespace, pod, {"metadata": {"annotations": annotations}}
        )

    def _on_scaling_plan(self, view: PolicyView, new: Plan, old: Plan | None) -> None:
        """Reconciles the policy (HPA bounds, status) when the plan changed in substance,
        and shows a changed decision sentence at most every few seconds."""
        key = ("ScalingPolicy", view.namespace, view.name)
        acted = new.scale_to is not None and new.scale_to != view.replicas
        if acted and self.indexes is not None:
            body = Indexes.one(self.indexes.policies, (view.namespace, view.name))
            if body is not None:
                reason = "ScaledToZero" if new.scale_to == 0 else "Activated"
                task = asyncio.create_task(self.kube.event(body, "Normal", reason, new.decision))
                self._tasks.append(task)
                task.add_done_callback(self._forget_task)
        bounds_changed = old is None or (old.hpa_min, old.hpa_max) != (new.hpa_min, new.hpa_max)
        now = time.monotonic()
        shown = self._decision_shown.get((view.namespace, view.name), 0.0)
        if acted or bounds_changed:
            self._decision_shown[(view.namespace, view.name)] = now
            self.queue.add(key)
        elif (old is None or old.decision != new.decision) and now - shown >= DECISION_EVERY:
            self._decision_shown[(view.namespace, view.name)] = now
            self.queue.add(key, low=True)

    def _forget_task(self, task: asyncio.Task[None]) -> None:
        with contextlib.suppress(ValueError):
            self._tasks.remove(task)

    async def _reconcile_workflow(self, namespace: str, name: str) -> None:
        idx = self._idx()
        body = Indexes.one(idx.workflows, (namespace, name))
        if body is None:
            return
        spec = await self._parse("Workflow", body, WorkflowSpec)
        if spec is None:
            return
        capabilities = {}
        for agent in self._agents(namespace):
            agent_body = Indexes.one(idx.agents, (namespace, agent)) or {}
            capabilities[agent] = frozenset(agent_body.get("spec", {}).get("capabilities", []))
        status, events = workflow_rec.status(
            int(body["metadata"].get("generation", 0)),
            namespace,
            spec,
            capabilities,
            self._current_status("Workflow", body),
            self.clock(),
            self._run_summary(namespace, name),
        )
        await self._write_status("Workflow", body, status, events)


def _version(obj: Mapping[str, Any] | None) -> str:
    """What changes when somebody else edits an object: generation where it has one."""
    if obj is None:
        return ""
    meta = obj.get("metadata", {})
    gen = meta.get("generation")
    return f"g{gen}" if gen is not None else f"r{meta.get('resourceVersion', '')}"
