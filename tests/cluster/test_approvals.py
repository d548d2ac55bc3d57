"""Approvals on the real API server: RBAC decides who may decide, the admission policy
makes spec.approver the caller, the spec cannot change, and the operator relays the
decision to the run (a fake run gate here: the dispatcher has tests of its own)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shoal_api.runs.model import ApprovalDecided
from shoal_operator.kinds.approval import ApprovalRelay
from shoal_operator.runs import DecideOutcome
from shoal_operator.supervision import RunSupervisor
from shoal_testbed.fixtures import Testbed, eventually
from tests.helpers import REPO, agent, is_ready

WORKFLOW = "customer-inquiry"


@pytest.fixture(scope="module")
def approver_roles(testbed: Testbed, crds: list[str]) -> Iterator[None]:
    roles = str(REPO / "manifests/base/approver-roles.yaml")
    testbed.kubectl("apply", "-f", roles)
    yield
    testbed.kubectl("delete", "-f", roles, "--ignore-not-found", check=False)


def approval(name: str, approver: str, run: str = "r1", **spec: str) -> dict[str, Any]:
    return {
        "apiVersion": "shoal.dev/v1alpha1",
        "kind": "Approval",
        "metadata": {"name": name},
        "spec": {
            "workflow": WORKFLOW,
            "run": run,
            "step": "answer",
            "decision": "Approve",
            "approver": approver,
            **spec,
        },
    }


def create_as(
    testbed: Testbed, kubeconfig: Path | None, obj: dict[str, Any], namespace: str
) -> subprocess.CompletedProcess[str]:
    return testbed.kubectl(
        "create",
        "-n",
        namespace,
        "-f",
        "-",
        stdin=json.dumps(obj),
        kubeconfig=kubeconfig,
        check=False,
    )


def grant(testbed: Testbed, namespace: str, user: str, role: str = "shoal-approver") -> None:
    testbed.kubectl(
        "create", "rolebinding", f"{role}-{user}", f"--clusterrole={role}", f"--user={user}",
        "-n", namespace,
    )  # fmt: skip


def whoami(testbed: Testbed) -> str:
    review = json.loads(testbed.kubectl("auth", "whoami", "-o", "json").stdout)
    return str(review["status"]["userInfo"]["username"])


def shoal(*args: str, kubeconfig: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shoal_cli.cli", *args, "--kubeconfig", str(kubeconfig)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def status_of(testbed: Testbed, name: str, namespace: str) -> dict[str, Any]:
    obj = testbed.get("approval", name, namespace) or {}
    status: dict[str, Any] = obj.get("status") or {}
    return status


# -- who may decide --------------------------------------------------------------------


def test_a_user_without_rbac_is_refused(
    testbed: Testbed, approver_roles: None, namespace: str
) -> None:
    mallory = testbed.user_kubeconfig("mallory")
    proc = create_as(testbed, mallory, approval("m1", "mallory"), namespace)
    assert proc.returncode != 0
    assert "Forbidden" in proc.stderr
    assert 'cannot create resource "approvals"' in proc.stderr

    cli = shoal(
        "approve", "r1", "answer", "--workflow", WORKFLOW, "-n", namespace, kubeconfig=mallory
    )
    assert cli.returncode == 6, cli.stderr
    assert f"you may not approve in namespace {namespace} (RBAC)" in cli.stderr
    assert testbed.kubectl("get", "approvals", "-n", namespace, "-o", "name").stdout == ""


def test_an_approver_may_not_decide_in_another_name(
    testbed: Testbed, approver_roles: None, namespace: str
) -> None:
    grant(testbed, namespace, "bob")
    bob = testbed.user_kubeconfig("bob")

    def refused() -> str | None:
        proc = create_as(testbed, bob, approval("b1", "alice"), namespace)
        if proc.returncode == 0:  # the policy was installed a moment ago: not active yet
            testbed.kubectl("delete", "approval", "b1", "-n", namespace)
            return None
        return proc.stderr

    stderr = eventually(refused, 30, what="the admission policy refusing")
    assert "spec.approver must be the requesting user (bob)" in stderr
    assert "ValidatingAdmissionPolicy 'shoal-approval-approver'" in stderr
    assert testbed.get("approval", "b1", namespace) is None


def test_an_approver_deciding_as_herself_is_admitted(
    testbed: Testbed, approver_roles: None, namespace: str
) -> None:
    grant(testbed, namespace, "alice")
    alice = testbed.user_kubeconfig("alice", ("approvers",))
    proc = create_as(testbed, alice, approval("a1", "alice"), namespace)
    assert proc.returncode == 0, proc.stderr
    # The CLI fills in the approver from who the API server says the caller is.
    cli = shoal(
        "reject", "r_2", "answer", "--workflow", WORKFLOW, "-n", namespace, "-m", "not now",
        kubeconfig=alice,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    name = cli.stdout.strip()
    assert name.startswith("r-2-answer-")
    obj = testbed.get("approval", name, namespace)
    assert obj is not None
    assert obj["spec"] == {
        "workflow": WORKFLOW,
        "run": "r_2",
        "step": "answer",
        "decision": "Reject",
        "approver": "alice",
        "comment": "not now",
    }
    listed = testbed.kubectl("get", "approvals", "-n", namespace).stdout
    assert listed.split("\n")[0].split() == [
        "NAME", "WORKFLOW", "RUN", "STEP", "DECISION", "APPROVER", "PHASE", "AGE"
    ]  # fmt: skip


def test_viewers_see_decisions_but_cannot_decide(
    testbed: Testbed, approver_roles: None, namespace: str
) -> None:
    grant(testbed, namespace, "victor", role="view")
    victor = testbed.user_kubeconfig("victor")

    def can(verb: str) -> str:
        return testbed.kubectl(
            "auth", "can-i", verb, "approvals.shoal.dev", "-n", namespace,
            kubeconfig=victor, check=False,
        ).stdout.strip()  # fmt: skip

    # The aggregation controller adds shoal-approval-viewer's rules to view.
    eventually(lambda: can("list") == "yes", 30, what="view aggregates approvals")
    assert can("create") == "no"


def test_an_approval_cannot_be_changed(testbed: Testbed, crds: list[str], namespace: str) -> None:
    me = whoami(testbed)
    testbed.apply(approval("fixed", me), namespace)
    proc = testbed.apply(approval("fixed", me, comment="on second thought"), namespace, check=False)
    assert proc.returncode != 0
    assert "an Approval is immutable; create a new one" in proc.stderr
    stored = testbed.get("approval", "fixed", namespace)
    assert stored is not None
    assert "comment" not in stored["spec"]


# -- the operator relays it ------------------------------------------------------------


class FakeGate:
    """Plays the run dispatcher: knows some runs, records what it was told."""

    def __init__(self, known: set[str]) -> None:
        self.known = known
        self.calls: list[tuple[str, str, ApprovalDecided, str]] = []

    async def decide(
        self, namespace: str, run: str, event: ApprovalDecided, *, workflow: str
    ) -> tuple[DecideOutcome, str]:
        self.calls.append((namespace, run, event, workflow))
        if run in self.known:
            return "Applied", f"{event.decision} of step {event.step} by {event.approver}"
        return "RunNotFound", f"run {run} does not exist in namespace {namespace}"


@pytest.fixture
def relay(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> ApprovalRelay:
    """The in-process operator, leading, with no run dispatcher of its own (it would take
    the relay's run gate): the test plugs in a fake."""

    async def no_dispatcher(self: RunSupervisor, *args: Any, **kwargs: Any) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(RunSupervisor, "run", no_dispatcher)
    request.getfixturevalue("operator")
    from shoal_operator.kopf_module import OPERATOR

    ctl: ApprovalRelay = eventually(
        lambda: OPERATOR.running.relay if OPERATOR.running else None, 30, what="the relay"
    )
    eventually(lambda: ctl.leader is None or ctl.leader.is_leader(), 30, what="leading")
    return ctl


def test_the_operator_relays_approvals_to_their_runs(
    testbed: Testbed, approver_roles: None, namespace: str, relay: ApprovalRelay
) -> None:
    me = whoami(testbed)
    testbed.apply(approval("early", me, run="r-known"), namespace)
    pending = eventually(
        lambda: (
            status_of(testbed, "early", namespace).get("phase") == "Pending"
            and status_of(testbed, "early", namespace)
        ),
        30,
        what="Pending while no dispatcher runs",
    )
    assert pending["conditions"][0]["reason"] == "DispatcherNotRunning"

    gate = FakeGate({"r-known", "r-cli"})
    relay.runs = gate
    status = eventually(
        lambda: (
            status_of(testbed, "early", namespace).get("phase") == "Applied"
            and status_of(testbed, "early", namespace)
        ),
        30,
        what="Applied",
    )
    assert status["message"] == f"Approve of step answer by {me}"
    assert status["appliedAt"]
    (cond,) = status["conditions"]
    assert (cond["type"], cond["status"], cond["reason"]) == ("Applied", "True", "Applied")
    ns, run, event, workflow = gate.calls[0]
    assert (ns, run, workflow) == (namespace, "r-known", WORKFLOW)
    assert (event.step, event.decision, event.approver) == ("answer", "Approve", me)
    stored = testbed.get("approval", "early", namespace)
    assert stored is not None
    created = stored["metadata"]["creationTimestamp"]
    assert event.at == dt.datetime.fromisoformat(created).timestamp()
    events = json.loads(
        testbed.kubectl(
            "get", "events", "-n", namespace, "--field-selector", "involvedObject.name=early",
            "-o", "json",
        ).stdout
    )["items"]  # fmt: skip
    assert [e["reason"] for e in events] == ["Applied"]

    testbed.apply(approval("ghost", me, run="r-ghost"), namespace)
    status = eventually(
        lambda: (
            status_of(testbed, "ghost", namespace).get("phase") == "Ignored"
            and status_of(testbed, "ghost", namespace)
        ),
        30,
        what="Ignored",
    )
    assert status["conditions"][0]["reason"] == "RunNotFound"
    assert status["message"] == f"run r-ghost does not exist in namespace {namespace}"

    # The person's way: shoal approve --wait, as herself, under the approver role.
    grant(testbed, namespace, "carol")
    carol = testbed.user_kubeconfig("carol")
    cli = shoal(
        "approve", "r-cli", "answer", "--workflow", WORKFLOW, "-n", namespace, "--wait",
        kubeconfig=carol,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert "applied: Approve of step answer by carol" in cli.stderr
    assert any(run == "r-cli" and e.approver == "carol" for _, run, e, _ in gate.calls)
    cli = shoal(
        "reject", "r-nope", "answer", "--workflow", WORKFLOW, "-n", namespace, "--wait",
        kubeconfig=carol,
    )  # fmt: skip
    assert cli.returncode == 5, cli.stderr
    assert "ignored (RunNotFound)" in cli.stderr
    # Each Approval went to the run once, whatever the watch delivered meanwhile.
    assert len(gate.calls) == 4


def test_a_rejection_reaches_the_run_through_the_dispatcher(
    testbed: Testbed, approver_roles: None, namespace: str, operator: Any
) -> None:
    """The whole way, with the operator's own run dispatcher: a run waits at the gate, a
    person rejects it with shoal reject, the run records who, and fails the step."""
    from shoal_cli.client import ShoalClient

    testbed.apply(agent("support"), namespace)
    testbed.apply(
        {
            "apiVersion": "shoal.dev/v1alpha1",
            "kind": "Workflow",
            "metadata": {"name": "gated"},
            "spec": {
                "steps": [
                    {
                        "name": "gate",
                        "agent": "support",
                        "approval": {"required": True, "timeoutSeconds": 600},
                    }
                ]
            },
        },
        namespace,
    )
    eventually(lambda: is_ready(testbed, "gated", namespace, "workflow"), 60, what="Ready")

    async def submit() -> str:
        async with await ShoalClient.connect(testbed.nats_url) as client:
            reply = await client.submit_run(namespace, "gated", {})
            assert reply.run, reply
            return reply.run

    async def run_state() -> Any:
        async with await ShoalClient.connect(testbed.nats_url) as client:
            return await client.get_run(namespace, run)

    run = eventually(lambda: asyncio.run(submit()), 60, what="a dispatcher taking runs")
    eventually(
        lambda: asyncio.run(run_state()).steps["gate"].phase == "WaitingApproval",
        30,
        what="the step waiting for approval",
    )
    grant(testbed, namespace, "dana")
    cli = shoal(
        "reject", run, "gate", "--workflow", "gated", "-n", namespace, "-m", "not today", "--wait",
        kubeconfig=testbed.user_kubeconfig("dana"),
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    state = eventually(
        lambda: (s := asyncio.run(run_state())).phase == "Failed" and s, 30, what="run failed"
    )
    step = state.steps["gate"]
    assert (step.phase, step.reason) == ("Failed", "ApprovalRejected")
    assert step.approval is not None
    assert (step.approval.decision, step.approval.approver, step.approval.comment) == (
        "Reject",
        "dana",
        "not today",
    )
