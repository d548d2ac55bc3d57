"""``shoal approve`` and ``shoal reject``: a decision on a step waiting for approval, written
as an Approval through the Kubernetes API (not NATS), so the API server authenticates the
approver and RBAC and the admission policy decide who may."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from pydantic import ValidationError

from shoal_api.approval import ApprovalSpec
from shoal_cli import approvals, kubeapi
from shoal_cli.commands.common import (
    Exit,
    Output,
    app,
    err,
    fail,
)
from shoal_cli.run_view import to_json as _json


def _decide(
    decision: approvals.Decision,
    run: str,
    step: str,
    namespace: str | None,
    workflow: str,
    comment: str,
    wait: bool,
    timeout: float,
    kubeconfig: str | None,
    context: str | None,
    output: Output,
) -> None:
    verb = "approve" if decision == "Approve" else "reject"
    try:
        ApprovalSpec(
            workflow=workflow, run=run, step=step, decision=decision, approver="-", comment=comment
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        fail(Exit.USAGE, f"invalid {'.'.join(str(p) for p in first['loc'])}: {first['msg']}")
    try:
        creds = kubeapi.load(kubeconfig, context)
    except kubeapi.KubeConfigError as exc:
        fail(Exit.USAGE, str(exc))
    ns = namespace or creds.namespace or "default"

    async def go() -> approvals.Decided:
        async with kubeapi.KubeApi(creds) as api:
            return await approvals.decide(
                api,
                ns,
                workflow=workflow,
                run=run,
                step=step,
                decision=decision,
                comment=comment,
                wait=timeout if wait else None,
            )

    try:
        decided = asyncio.run(go())
    except kubeapi.KubeApiError as exc:
        if exc.status == 401:
            fail(Exit.FORBIDDEN, f"the Kubernetes API did not accept your credentials: {exc}")
        if exc.status == 403:
            # Both say 403: RBAC, and the policy tying spec.approver to the caller.
            who = "admission policy" if "admissionpolicy" in exc.message.lower() else "RBAC"
            fail(Exit.FORBIDDEN, f"you may not {verb} in namespace {ns} ({who}): {exc}")
        if exc.status == 404 and exc.kind == "namespaces":
            fail(Exit.NOT_FOUND, f"namespace {ns} not found")
        if exc.status == 404:
            fail(
                Exit.UNAVAILABLE,
                f"no Approval resource in this cluster (is Shoal installed?): {exc}",
            )
        if exc.status == 422:
            fail(Exit.USAGE, str(exc))
        fail(Exit.UNAVAILABLE, f"the Kubernetes API answered {exc.status} {exc.reason}: {exc}")
    except kubeapi.KubeUnreachableError as exc:
        fail(Exit.UNAVAILABLE, str(exc))
    except approvals.WaitTimeoutError as exc:
        typer.echo(exc.decided.name)
        fail(Exit.TIMEOUT, f"{exc} within {timeout:g}s (the operator relays it when it can)")
    except KeyboardInterrupt:
        fail(Exit.INTERRUPTED, "interrupted")
    if output is Output.json:
        typer.echo(_json(decided.approval))
    else:
        typer.echo(decided.name)
        err.print(
            f"{decision} of step {step} in run {run} (workflow {workflow}) recorded"
            f" as {decided.approver}: approval {decided.name} in namespace {ns}"
        )
    if decided.phase == "Applied":
        err.print(f"applied: {decided.message}")
    elif decided.phase == "Ignored":
        err.print(f"ignored ({decided.reason}): {decided.message}")
        raise typer.Exit(Exit.NOT_FOUND if decided.reason == "RunNotFound" else Exit.RUN_FAILED)


RunArg = Annotated[str, typer.Argument(metavar="RUN", help="The run id.")]
StepArg = Annotated[str, typer.Argument(metavar="STEP", help="The step waiting for approval.")]
ApprovalNamespaceOpt = Annotated[
    str | None,
    typer.Option(
        "--namespace",
        "-n",
        envvar="SHOAL_NAMESPACE",
        help="Namespace of the run. Default: the kubeconfig context's, else default.",
        show_default=False,
    ),
]
WorkflowOpt = Annotated[str, typer.Option("--workflow", help="The Workflow of the run.")]
CommentOpt = Annotated[str, typer.Option("--comment", "-m", help="Why, for the run's record.")]
DecisionWaitOpt = Annotated[
    bool,
    typer.Option(
        "--wait",
        help="Wait until the run took the decision; exit 1 if the step was not waiting,"
        " 5 if there is no such run.",
    ),
]
DecisionTimeoutOpt = Annotated[
    float, typer.Option(min=0, help="With --wait: give up after this many seconds.")
]
KubeconfigOpt = Annotated[
    str | None,
    typer.Option(help="Kubeconfig file. Default: $KUBECONFIG, ~/.kube/config, in-cluster."),
]
ContextOpt = Annotated[
    str | None, typer.Option(help="Kubeconfig context. Default: its current-context.")
]


@app.command()
def approve(
    run: RunArg,
    step: StepArg,
    workflow: WorkflowOpt,
    namespace: ApprovalNamespaceOpt = None,
    comment: CommentOpt = "",
    wait: DecisionWaitOpt = False,
    timeout: DecisionTimeoutOpt = 30.0,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    output: Annotated[Output, typer.Option("--output", "-o")] = Output.text,
) -> None:
    """Approve a step waiting for approval: an Approval created as you, so Kubernetes RBAC
    decides whether you may (ClusterRole shoal-approver); prints its name."""
    _decide(
        "Approve",
        run,
        step,
        namespace,
        workflow,
        comment,
        wait,
        timeout,
        kubeconfig,
        context,
        output,
    )


@app.command()
def reject(
    run: RunArg,
    step: StepArg,
    workflow: WorkflowOpt,
    namespace: ApprovalNamespaceOpt = None,
    comment: CommentOpt = "",
    wait: DecisionWaitOpt = False,
    timeout: DecisionTimeoutOpt = 30.0,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    output: Annotated[Output, typer.Option("--output", "-o")] = Output.text,
) -> None:
    """Reject a step waiting for approval (the step fails, reason ApprovalRejected); as
    approve, an Approval created as you."""
    _decide(
        "Reject",
        run,
        step,
        namespace,
        workflow,
        comment,
        wait,
        timeout,
        kubeconfig,
        context,
        output,
    )
