"""The Approval resource: a person's decision on a workflow step waiting for approval.

A decision is a Kubernetes write so that the API server authenticates the person and
RBAC decides who may decide. ``spec.approver`` must equal the authenticated caller: the
ValidatingAdmissionPolicy below enforces it, so ``approver`` is a fact, not a claim. The
operator relays the decision to the run (which records who and when) and reports in
``status`` whether the run took it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from shoal_api.base import (
    GROUP,
    VERSION,
    ApiModel,
    Conditions,
    Name,
    OptionalTime,
    cel,
    validations,
)

RUN_PATTERN = r"^[A-Za-z0-9_-]+$"
POLICY_NAME = "shoal-approval-approver"
APPROVER_RULE = "object.spec.approver == request.userInfo.username"


class ApprovalSpec(ApiModel):
    """A decision on one step of one run. Immutable: a changed mind is a new Approval."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": validations(
            # Who decided what is evidence; editing it afterwards would rewrite history
            # (and the admission policy only checks the approver at create).
            cel("self == oldSelf", "an Approval is immutable; create a new one")
        )
    }

    workflow: Name
    """The Workflow of the run; the decision is ignored when the run is not of it."""
    run: Annotated[str, Field(min_length=1, max_length=128, pattern=RUN_PATTERN)]
    """The run id, as `shoal run` printed it."""
    step: Name
    """The step waiting for approval."""
    decision: Literal["Approve", "Reject"]
    """Approve dispatches the step; Reject fails it (reason ApprovalRejected)."""
    approver: Annotated[str, Field(min_length=1)]
    """Who decides: the Kubernetes user creating this object (enforced at admission)."""
    comment: Annotated[str, Field(max_length=1024)] = ""
    """Why, for the run's record."""


class ApprovalStatus(ApiModel):
    """What became of the decision."""

    observed_generation: Annotated[int, Field(ge=0)] = 0
    """The .metadata.generation the operator last acted on."""
    conditions: Conditions = ()
    """Applied: True when the run took the decision, False (with the reason) when not."""
    phase: Literal["Pending", "Applied", "Ignored"] | None = None
    """Pending (not relayed yet), Applied (the run took it) or Ignored (see message)."""
    message: Annotated[str, Field(max_length=4096)] = ""
    """What the run said, in a sentence."""
    applied_at: OptionalTime = None
    """When the operator relayed the decision to the run (RFC 3339)."""


class Approval(ApiModel):
    """A person's decision on a workflow step that waits for approval."""

    spec: ApprovalSpec
    status: ApprovalStatus | None = None


def admission_policy(name: str = POLICY_NAME) -> list[dict[str, Any]]:
    """The ValidatingAdmissionPolicy (and its binding) that makes ``spec.approver`` the
    authenticated caller. Shipped next to the CRDs: without it, whoever may create an
    Approval could decide in anybody's name."""
    labels = {"app.kubernetes.io/part-of": "shoal"}
    return [
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {
                    "resourceRules": [
                        {
                            "apiGroups": [GROUP],
                            "apiVersions": [VERSION],
                            # The spec is immutable (CRD rule), so create is the one
                            # write that sets an approver.
                            "operations": ["CREATE"],
                            "resources": ["approvals"],
                        }
                    ]
                },
                "validations": [
                    {
                        "expression": APPROVER_RULE,
                        "messageExpression": "'spec.approver must be the requesting user ('"
                        " + request.userInfo.username + ')'",
                        # 403 like an RBAC denial: the caller may not act for another.
                        "reason": "Forbidden",
                    }
                ],
            },
        },
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": name, "labels": labels},
            "spec": {"policyName": name, "validationActions": ["Deny"]},
        },
    ]
