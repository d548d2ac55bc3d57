"""How many writes the operator makes for one Agent and its ScalingPolicy, counted by the
API server itself (``apiserver_request_total``): the API server's CPU is what limits a
fleet, so every write has to earn its place (README, "Writes per Agent")."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import pytest

from shoal_testbed.fixtures import Testbed, eventually
from tests.helpers import agent, is_ready, scaling_policy

SHOW = bool(os.environ.get("SHOW_WRITES"))
# (verb, resource) -> what the operator writes of it for a new Agent and its policy.
WRITES = {
    "PATCH shoal.dev/agents": "finalizer",
    "PATCH shoal.dev/agents/status": "Agent status",
    "PATCH shoal.dev/scalingpolicies/status": "policy status",
    "APPLY apps/deployments": "Deployment",
    "APPLY serviceaccounts": "ServiceAccount",
    "APPLY autoscaling/horizontalpodautoscalers": "HPA",
}


def requests(testbed: Testbed) -> dict[str, float]:
    """``apiserver_request_total`` by verb and group/resource[/subresource]."""
    out: dict[str, float] = {}
    for line in testbed.kubectl("get", "--raw", "/metrics").stdout.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        pairs = line[line.index("{") + 1 : line.rindex("}")].split(",")
        label = {k: v.strip('"') for k, v in (p.split("=", 1) for p in pairs)}
        res = "/".join(x for x in (label["group"], label["resource"], label["subresource"]) if x)
        key = f"{label['verb']} {res}"
        out[key] = out.get(key, 0) + float(line.rsplit(" ", 1)[1])
    return out


def operator_events(testbed: Testbed, namespace: str) -> list[str]:
    items = json.loads(testbed.kubectl("get", "events", "-n", namespace, "-o", "json").stdout)
    return sorted(
        f"{e['involvedObject']['kind']}/{e['reason']}"
        for e in items["items"]
        if (e.get("source") or {}).get("component") == "shoal-operator"
    )


@pytest.fixture
def no_drift_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """The drift check re-applies every child on a timer: not what is counted here."""
    monkeypatch.setenv("SHOAL_DRIFT_INTERVAL", "600")


def test_one_agent_and_policy_cost_a_handful_of_writes(
    no_drift_check: None, testbed: Testbed, namespace: str, operator: Any
) -> None:
    time.sleep(2)  # the operator's start-up (APIService, heartbeat) is not counted
    before = requests(testbed)
    testbed.apply(agent("lean"), namespace)
    testbed.apply(scaling_policy("lean", "lean", minReplicas=1), namespace)
    eventually(
        lambda: (
            is_ready(testbed, "lean", namespace)
            and is_ready(testbed, "lean", namespace, kind="scalingpolicy")
        ),
        90,
        what="Agent and policy Ready",
    )
    time.sleep(3)  # coalesced writes still waiting go out
    after = requests(testbed)
    writes = {what: int(after.get(k, 0) - before.get(k, 0)) for k, what in WRITES.items()}
    events = operator_events(testbed, namespace)
    seen = (writes, events)

    assert writes["finalizer"] == 1, seen
    assert writes["ServiceAccount"] == 1, seen
    assert writes["HPA"] == 1, seen
    # Once, or twice when the policy arrived after the Agent's first reconcile (replicas
    # then pass to the HPA); never a third write handing over a replica count of 1.
    assert 1 <= writes["Deployment"] <= 2, seen
    # Not Ready yet, then Ready: each status once, the echoes of our writes ignored
    # (before: 2, and the finalizer twice when its echo raced the status write).
    assert 1 <= writes["Agent status"] <= 2, seen
    # Ready with its HPA, then Active and the autoscaler's first decision, coalesced
    # (before: 3 or 4).
    assert 1 <= writes["policy status"] <= 2, seen
    # One Event per real transition: each object became Ready once.
    assert events == ["Agent/Available", "ScalingPolicy/HPAReady"], seen
    if SHOW:
        raise AssertionError(seen)
