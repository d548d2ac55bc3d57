"""``shoal approve`` / ``shoal reject``: a decision on a waiting step, as an Approval
object created with the caller's own Kubernetes credentials.

The API server authenticates the caller, RBAC decides whether they may create Approvals
in the namespace, and an admission policy checks that ``spec.approver`` is the caller;
so the approver is filled in from a SelfSubjectReview, never from a flag.
"""

from __future__ import annotations

import asyncio
import secrets
import string
import time
from dataclasses import dataclass
from typing import Any, Literal

from shoal_api.approval import ApprovalSpec
from shoal_api.base import API_VERSION, GROUP, VERSION
from shoal_cli.kubeapi import KubeApi

Decision = Literal["Approve", "Reject"]
NAME_MAX = 253
_SUFFIX_ALPHABET = string.ascii_lowercase + string.digits


def approvals_path(namespace: str, name: str | None = None) -> str:
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/approvals"
    return f"{path}/{name}" if name else path


def approval_name(run: str, step: str, suffix: str | None = None) -> str:
    """``<run>-<step>-<random>``: readable in ``kubectl get approvals``, and unique, so a
    second decision (say, after a mistaken one was ignored) is a new object. Run ids may
    hold capitals and underscores, which object names may not."""
    suffix = suffix or "".join(secrets.choice(_SUFFIX_ALPHABET) for _ in range(5))
    stem = f"{run}-{step}".lower().replace("_", "-")[: NAME_MAX - len(suffix) - 1]
    return f"{stem.strip('-')}-{suffix}"


def approval_object(namespace: str, name: str, spec: ApprovalSpec) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "Approval",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec.to_wire(),
    }


@dataclass(frozen=True)
class Decided:
    """What the CLI reports: the object it created, and its status when waited for."""

    approval: dict[str, Any]
    approver: str

    @property
    def name(self) -> str:
        return str(self.approval["metadata"]["name"])

    @property
    def phase(self) -> str | None:
        phase = (self.approval.get("status") or {}).get("phase")
        return str(phase) if phase else None

    @property
    def reason(self) -> str:
        conds = (self.approval.get("status") or {}).get("conditions") or []
        return next((str(c.get("reason", "")) for c in conds if c.get("type") == "Applied"), "")

    @property
    def message(self) -> str:
        return str((self.approval.get("status") or {}).get("message", ""))


class WaitTimeoutError(Exception):
    def __init__(self, decided: Decided) -> None:
        super().__init__(f"approval {decided.name} not relayed to its run yet")
        self.decided = decided


async def decide(
    api: KubeApi,
    namespace: str,
    *,
    workflow: str,
    run: str,
    step: str,
    decision: Decision,
    comment: str = "",
    wait: float | None = None,
) -> Decided:
    """Creates the Approval as the caller; with ``wait``, polls until the operator has
    relayed it (Applied or Ignored) or ``wait`` seconds pass (:class:`WaitTimeoutError`)."""
    approver = await api.whoami()
    spec = ApprovalSpec(
        workflow=workflow,
        run=run,
        step=step,
        decision=decision,
        approver=approver,
        comment=comment,
    )
    body = approval_object(namespace, approval_name(run, step), spec)
    created = await api.request("POST", approvals_path(namespace), body)
    decided = Decided(created, approver)
    if wait is None:
        return decided
    deadline = time.monotonic() + wait
    while decided.phase in (None, "Pending"):
        if time.monotonic() >= deadline:
            raise WaitTimeoutError(decided)
        # People wait on this, not machines: a poll every half second is plenty and
        # needs no watch permission.
        await asyncio.sleep(0.5)
        current = await api.request("GET", approvals_path(namespace, decided.name))
        decided = Decided(current, approver)
    return decided
