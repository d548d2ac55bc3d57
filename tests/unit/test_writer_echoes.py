"""The writer's savings: echoes of our own writes queue nothing, status writes of a burst
coalesce, our status stays visible across our own finalizer write, and a replica count
of 1 needs no handover."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from shoal_api.agent import AgentSpec, AgentStatus, QueueStatus
from shoal_api.base import status_patch
from shoal_operator import writer as writer_mod
from shoal_operator.builders.common import Owner
from shoal_operator.builders.deployment import RuntimeDefaults
from shoal_operator.cache import Cache, Key
from shoal_operator.clients.kube import Kube
from shoal_operator.kinds.scaling import PolicyIO
from shoal_operator.reconcilers import agent as agent_rec
from shoal_operator.settings import FIELD_MANAGER
from shoal_operator.status_conditions import EventSpec
from shoal_operator.triggers import Triggers
from shoal_operator.workqueue import WorkQueue

NS = "team-a"


class VersionedKube:
    """Answers every patch with the next resourceVersion, as the API server does."""

    def __init__(self, rv: int = 10) -> None:
        self.rv = rv
        self.patches: list[tuple[str, str | None]] = []
        self.events: list[str] = []

    async def merge_patch(
        self, kind: str, namespace: str, name: str, patch: dict[str, Any], sub: str | None = None
    ) -> dict[str, Any]:
        self.rv += 1
        self.patches.append((kind, sub))
        return {"metadata": {"name": name, "namespace": namespace, "resourceVersion": str(self.rv)}}

    async def event(self, regarding: dict[str, Any], type_: str, reason: str, message: str) -> None:
        self.events.append(reason)


class Parts:
    def __init__(self) -> None:
        self.kube = VersionedKube()
        self.queue: WorkQueue[Key] = WorkQueue()
        self.requeued: list[tuple[Key, float]] = []
        self.writer = writer_mod.Writer(
            cast(Kube, self.kube), lambda key, delay: self.requeued.append((key, delay))
        )
        policies = PolicyIO(Cache(), self.writer, lambda namespace, name: None)
        self.triggers = Triggers(self.queue, Cache(), self.writer, policies)


def body(kind: str = "Agent", rv: str = "7", generation: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "shoal.dev/v1alpha1",
        "kind": kind,
        "metadata": {
            "name": "triage",
            "namespace": NS,
            "uid": "u",
            "generation": generation,
            "resourceVersion": rv,
            "finalizers": [],
        },
        "spec": {"targetRef": {"name": "triage"}},
        "status": {},
    }


def with_rv(obj: dict[str, Any], rv: str, **meta: Any) -> dict[str, Any]:
    return {**obj, "metadata": {**obj["metadata"], "resourceVersion": rv, **meta}}


def queue_depth(p: Parts) -> int:
    return len(p.queue)


def test_the_echo_of_our_status_write_queues_nothing() -> None:
    p = Parts()
    agent = body()
    asyncio.run(p.writer.write_status("Agent", agent, AgentStatus(observed_generation=1), []))
    echo = with_rv(agent, str(p.kube.rv))
    p.triggers.on_agent(NS, "triage", echo)
    assert queue_depth(p) == 0
    # The same resourceVersion with a new generation is not ours alone: reconciled.
    p.triggers.on_agent(NS, "triage", with_rv(agent, str(p.kube.rv), generation=2))
    assert queue_depth(p) == 1


def test_the_echo_of_our_finalizer_write_queues_nothing_and_keeps_our_status() -> None:
    p = Parts()
    agent = body()

    async def reconcile() -> None:
        await p.writer.ensure_finalizer("Agent", agent)  # -> rv 11
        await p.writer.write_status(  # -> rv 12
            "Agent", agent, AgentStatus(queue=QueueStatus(pending=3, in_flight=0)), []
        )

    asyncio.run(reconcile())
    finalized = with_rv(agent, "11", finalizers=["shoal.dev/cleanup"])
    p.triggers.on_agent(NS, "triage", finalized)
    assert queue_depth(p) == 0
    # The cache between our two writes still shows our status (no second write, no
    # second Event); once it shows our status write, the object is the truth again.
    assert p.writer.current_status("Agent", finalized)["queue"]["pending"] == 3
    assert p.writer.current_status("Agent", with_rv(agent, "12")) == {}


def test_a_status_change_right_after_a_write_waits_and_coalesces() -> None:
    p = Parts()
    agent = body()
    first = AgentStatus(observed_generation=1)
    asyncio.run(p.writer.write_status("Agent", agent, first, []))
    shown = {**with_rv(agent, str(p.kube.rv)), "status": {"observedGeneration": 1}}
    asyncio.run(p.writer.write_status("Agent", shown, AgentStatus(observed_generation=2), []))
    assert len(p.kube.patches) == 1  # waits for the coalescing window
    ((key, delay),) = p.requeued
    assert key == ("Agent", NS, "triage")
    assert 0 < delay <= writer_mod.STATUS_COALESCE_SECONDS
    # A transition with an Event is news: written (and posted) at once.
    became_ready = [EventSpec("Normal", "Available", "1/1 replicas ready")]
    asyncio.run(
        p.writer.write_status("Agent", shown, AgentStatus(observed_generation=2), became_ready)
    )
    assert (len(p.kube.patches), p.kube.events) == (2, ["Available"])


def test_an_unchanged_status_is_not_written() -> None:
    p = Parts()
    status = AgentStatus(observed_generation=1)
    agent = {**body(), "status": status_patch(status)["status"]}
    asyncio.run(p.writer.write_status("Agent", agent, status, []))
    assert p.kube.patches == []


def test_a_policy_status_write_does_not_reconcile_its_target_agent() -> None:
    p = Parts()
    policy = body("ScalingPolicy")
    p.triggers.on_policy(NS, "triage", policy)
    assert queue_depth(p) == 2  # the policy and its target Agent
    asyncio.run(drain(p.queue, 2))
    # Someone else's status write (the policy's own, via another path) or ours: the
    # Agent reads nothing of a policy's status.
    p.triggers.on_policy(NS, "triage", {**with_rv(policy, "8"), "status": {"hpaName": "x"}})
    assert queue_depth(p) == 1
    asyncio.run(drain(p.queue, 1))
    # A new generation (maxReplicas, say) reaches the Agent.
    p.triggers.on_policy(NS, "triage", with_rv(policy, "9", generation=2))
    assert queue_depth(p) == 2


async def drain(queue: WorkQueue[Key], n: int) -> None:
    for _ in range(n):
        queue.done(await queue.get())


@pytest.mark.parametrize(("replicas", "handover"), [(1, False), (4, True)])
def test_a_replica_count_of_one_needs_no_handover(replicas: int, handover: bool) -> None:
    owned = {
        "manager": FIELD_MANAGER,
        "operation": "Apply",
        "fieldsV1": {"f:spec": {"f:replicas": {}}},
    }
    dep = {
        "metadata": {"name": "triage", "generation": 1, "managedFields": [owned]},
        "spec": {"replicas": replicas},
    }
    obs = agent_rec.AgentObserved(
        deployment=dep, agents=frozenset({"triage"}), scaled_by="p", max_replicas=5
    )
    spec = AgentSpec.model_validate({"handler": {"python": "m:f"}})
    plan = agent_rec.plan(
        Owner("Agent", NS, "triage", "u"),
        spec,
        obs,
        RuntimeDefaults(image="i", nats_url="nats://x"),
        FIELD_MANAGER,
    )
    assert (plan.handover is not None) == handover
