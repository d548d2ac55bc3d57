"""Approvals: the model and its CRD, the admission policy, the run event an Approval
becomes, the operator's relay (with a fake run gate) and the CLI's credentials."""

from __future__ import annotations

import asyncio
import base64
import json
import stat
import sys
from pathlib import Path
from typing import Any, cast

import celpy
import pytest
import yaml
from celpy.adapter import json_to_cel
from celpy.celtypes import BoolType
from pydantic import ValidationError

from shoal_api import approval
from shoal_api.approval import ApprovalSpec, ApprovalStatus
from shoal_api.base import status_patch
from shoal_api.crd import KINDS, custom_resource_definition, policy_file, render_policy
from shoal_api.runs.model import ApprovalDecided
from shoal_api.timestamps import unix_time
from shoal_cli import kubeapi
from shoal_cli.approvals import approval_name
from shoal_operator.clients.kube import ApiError, Kube
from shoal_operator.kinds.approval import ApprovalRelay
from shoal_operator.reconcilers import approval as approval_rec
from shoal_operator.runs import DecideOutcome
from shoal_testbed import pki

REPO = Path(__file__).resolve().parents[2]
NS = "support"
SPEC = {
    "workflow": "customer-inquiry",
    "run": "7f3a",
    "step": "answer",
    "decision": "Approve",
    "approver": "jane@example.com",
    "comment": "ok",
}
CREATED = "2026-01-05T07:00:00Z"
CREATED_UNIX = 1767596400.0


# -- model and CRD ---------------------------------------------------------------------


def test_spec_parses_the_api_md_example() -> None:
    spec = ApprovalSpec.model_validate(SPEC)
    assert spec.to_wire() == SPEC


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("run", "has space"),
        ("run", "x" * 129),
        ("run", ""),
        ("step", "Answer"),
        ("decision", "Maybe"),
        ("approver", ""),
        ("comment", "x" * 1025),
        ("workflow", "-bad"),
    ],
)
def test_spec_rejects(field: str, value: str) -> None:
    with pytest.raises(ValidationError):
        ApprovalSpec.model_validate({**SPEC, field: value})


def test_spec_rejects_unknown_fields() -> None:
    with pytest.raises(ValidationError):
        ApprovalSpec.model_validate({**SPEC, "approvers": ["x"]})


def approval_crd() -> dict[str, Any]:
    kind = next(k for k in KINDS if k.kind == "Approval")
    return custom_resource_definition(kind)


def test_crd_spec_is_immutable_and_shows_who_decided() -> None:
    crd = approval_crd()
    version = crd["spec"]["versions"][0]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["x-kubernetes-validations"] == [
        {"rule": "self == oldSelf", "message": "an Approval is immutable; create a new one"}
    ]
    assert spec["required"] == ["workflow", "run", "step", "decision", "approver"]
    assert spec["properties"]["run"]["pattern"] == approval.RUN_PATTERN
    columns = [c["name"].upper() for c in version["additionalPrinterColumns"]]
    assert columns == ["WORKFLOW", "RUN", "STEP", "DECISION", "APPROVER", "PHASE", "AGE"]
    assert crd["spec"]["names"]["shortNames"] == ["appr"]
    assert crd["spec"]["scope"] == "Namespaced"
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert status["phase"]["enum"] == ["Pending", "Applied", "Ignored"]
    assert {"observedGeneration", "conditions", "message", "appliedAt"} <= set(status)


def test_checked_in_policies_are_current() -> None:
    # make verify regenerates and compares them too; this names the drift in a test.
    for outdir in (REPO / "crds", REPO / "helm/shoal/crds"):
        path, text = policy_file(outdir)
        assert path.read_text() == text, f"{path}: run `make crds`"
    assert policy_file(REPO / "crds")[0] == REPO / "crds/approval-policy.yaml"
    assert policy_file(REPO / "helm/shoal/crds")[0] == (
        REPO / "helm/shoal/templates/approval-policy.yaml"
    )
    kustomization = yaml.safe_load((REPO / "crds/kustomization.yaml").read_text())
    assert "approval-policy.yaml" in kustomization["resources"]


def test_helm_and_kustomize_policies_differ_only_in_the_name() -> None:
    plain = render_policy()
    helm = render_policy(helm=True)
    assert helm.replace("'{{ .Release.Name }}-approval-approver'", "shoal-approval-approver") == (
        plain
    )


def test_policy_denies_creates_by_anybody_but_the_approver() -> None:
    policy, binding = yaml.safe_load_all(render_policy())
    assert binding["spec"] == {
        "policyName": approval.POLICY_NAME,
        "validationActions": ["Deny"],
    }
    rules = policy["spec"]["matchConstraints"]["resourceRules"]
    assert rules == [
        {
            "apiGroups": ["shoal.dev"],
            "apiVersions": ["v1alpha1"],
            "operations": ["CREATE"],
            "resources": ["approvals"],
        }
    ]
    (validation,) = policy["spec"]["validations"]
    env = celpy.Environment()

    def evaluate(expression: str, approver: str, user: str) -> Any:
        program = env.program(env.compile(expression))
        return program.evaluate(
            {
                "object": json_to_cel({"spec": {**SPEC, "approver": approver}}),
                "request": json_to_cel({"userInfo": {"username": user}}),
            }
        )

    assert evaluate(validation["expression"], "jane", "jane") == BoolType(True)
    assert evaluate(validation["expression"], "jane", "bob") == BoolType(False)
    message = evaluate(validation["messageExpression"], "jane", "bob")
    assert message == "spec.approver must be the requesting user (bob)"


def test_people_roles() -> None:
    from shoal_operator.rbac import RULES, people_roles

    approver, viewer = people_roles()
    assert approver["metadata"]["name"] == "shoal-approver"
    assert approver["rules"] == [
        {
            "apiGroups": ["shoal.dev"],
            "resources": ["approvals"],
            "verbs": ["create", "get", "list", "watch"],
        }
    ]
    labels = viewer["metadata"]["labels"]
    assert labels["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert "create" not in viewer["rules"][0]["verbs"]
    # The operator reads approvals and writes their status only.
    theirs = [r for r in RULES if any(x.startswith("approvals") for x in r["resources"])]
    assert theirs == [
        {"apiGroups": ["shoal.dev"], "resources": ["approvals"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["shoal.dev"], "resources": ["approvals/status"], "verbs": ["get", "patch"]},
    ]


# -- the run event and the status ----------------------------------------------------------


def test_decision_event_is_the_admitted_decision() -> None:
    event = approval_rec.decision_event(ApprovalSpec.model_validate(SPEC), CREATED)
    assert event == ApprovalDecided(
        step="answer",
        decision="Approve",
        approver="jane@example.com",
        at=CREATED_UNIX,
        comment="ok",
    )


def test_unix_time() -> None:
    assert unix_time("1970-01-01T00:01:00Z") == 60.0
    assert unix_time("1970-01-01T00:01:00") == 60.0


def test_status_applied_and_ignored() -> None:
    spec = ApprovalSpec.model_validate(SPEC)
    applied, events = approval_rec.status(1, spec, "Applied", "ok then", ApprovalStatus(), "t1")
    status = status_patch(applied)["status"]
    assert status["phase"] == "Applied"
    assert status["appliedAt"] == "t1"
    assert status["observedGeneration"] == 1
    (cond,) = status["conditions"]
    assert (cond["type"], cond["status"], cond["reason"]) == ("Applied", "True", "Applied")
    assert [(e.type, e.reason) for e in events] == [("Normal", "Applied")]
    assert "Approve of step answer in run 7f3a by jane@example.com" in events[0].message

    pending = approval_rec.waiting_status(1, ApprovalStatus(), "t0")
    assert status_patch(pending)["status"]["phase"] == "Pending"
    assert "appliedAt" not in status_patch(pending)["status"]
    assert not approval_rec.relayed(pending)
    ignored, events = approval_rec.status(1, spec, "RunNotFound", "no run 7f3a", pending, "t2")
    status = status_patch(ignored)["status"]
    assert status["phase"] == "Ignored"
    assert approval_rec.relayed(ignored)
    (cond,) = status["conditions"]
    assert (cond["status"], cond["reason"], cond["message"]) == (
        "False",
        "RunNotFound",
        "no run 7f3a",
    )
    assert cond["lastTransitionTime"] == "t2"  # Unknown -> False is a transition
    assert [(e.type, e.reason) for e in events] == [("Warning", "RunNotFound")]


# -- the relay, with a fake run gate ---------------------------------------------------------


class FakeGate:
    def __init__(self, known: set[str], fail: int = 0) -> None:
        self.known = known
        self.fail = fail
        self.calls: list[tuple[str, str, ApprovalDecided, str]] = []

    async def decide(
        self, namespace: str, run: str, event: ApprovalDecided, *, workflow: str
    ) -> tuple[DecideOutcome, str]:
        self.calls.append((namespace, run, event, workflow))
        if self.fail:
            self.fail -= 1
            raise ConnectionError("NATS is away")
        if run in self.known:
            return "Applied", f"{event.decision} of step {event.step} by {event.approver}"
        return "RunNotFound", f"run {run} does not exist in namespace {namespace}"


class ApprovalKube:
    """The API server, as far as Approvals go: status patches honour resourceVersion."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.patches: list[dict[str, Any]] = []
        self.events: list[tuple[str, str, str]] = []
        self.fail_next: int | None = None

    def add(self, name: str, run: str = "7f3a", **status: Any) -> dict[str, Any]:
        obj = {
            "apiVersion": "shoal.dev/v1alpha1",
            "kind": "Approval",
            "metadata": {
                "name": name,
                "namespace": NS,
                "uid": f"uid-{name}",
                "generation": 1,
                "resourceVersion": "1",
                "creationTimestamp": CREATED,
            },
            "spec": {**SPEC, "run": run},
            "status": status,
        }
        self.objects[name] = obj
        copy: dict[str, Any] = json.loads(json.dumps(obj))  # a watch event's: a copy
        return copy

    async def merge_patch(
        self, kind: str, namespace: str, name: str, patch: dict[str, Any], sub: str = ""
    ) -> dict[str, Any]:
        assert (kind, namespace, sub) == ("Approval", NS, "status")
        if self.fail_next is not None:
            code, self.fail_next = self.fail_next, None
            raise ApiError(status=code, reason="Boom")
        obj = self.objects[name]
        if patch["metadata"]["resourceVersion"] != obj["metadata"]["resourceVersion"]:
            raise ApiError(status=409, reason="Conflict")
        self.patches.append(patch)
        obj["status"] = patch["status"]
        obj["metadata"]["resourceVersion"] = str(int(obj["metadata"]["resourceVersion"]) + 1)
        return obj

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        obj = self.objects.get(name)
        return json.loads(json.dumps(obj)) if obj is not None else None

    async def event(self, regarding: dict[str, Any], type_: str, reason: str, message: str) -> None:
        self.events.append((regarding["metadata"]["name"], type_, reason))


def relay_controller(kube: ApprovalKube) -> ApprovalRelay:
    return ApprovalRelay(cast(Kube, kube), clock=lambda: "2026-01-05T07:00:05Z")


def test_relay_waits_for_a_gate_then_applies_once() -> None:
    async def scenario() -> None:
        kube = ApprovalKube()
        ctl = relay_controller(kube)
        body = kube.add("a1")
        await ctl.on_approval(NS, "a1", body)
        assert kube.objects["a1"]["status"]["phase"] == "Pending"
        assert ("support", "a1") in ctl._waiting
        # The watch delivers our own write; still no gate: nothing more is written.
        await ctl.on_approval(NS, "a1", await kube.get("Approval", NS, "a1"))
        assert len(kube.patches) == 1

        gate = FakeGate({"7f3a"})
        ctl.runs = gate
        await ctl.on_approval(NS, "a1", await kube.get("Approval", NS, "a1"))
        assert [(ns, run, wf) for ns, run, _, wf in gate.calls] == [
            (NS, "7f3a", "customer-inquiry")
        ]
        assert gate.calls[0][2] == ApprovalDecided(
            step="answer",
            decision="Approve",
            approver="jane@example.com",
            at=CREATED_UNIX,
            comment="ok",
        )
        status = kube.objects["a1"]["status"]
        assert status["phase"] == "Applied"
        assert status["appliedAt"] == "2026-01-05T07:00:05Z"
        assert status["message"] == "Approve of step answer by jane@example.com"
        assert kube.events == [("a1", "Normal", "Applied")]
        assert not ctl._waiting
        # Watch events after the outcome (our write, a label change) never decide again.
        await ctl.on_approval(NS, "a1", await kube.get("Approval", NS, "a1"))
        assert len(gate.calls) == 1

    asyncio.run(scenario())


def test_relay_of_an_unknown_run_is_ignored() -> None:
    async def scenario() -> None:
        kube = ApprovalKube()
        ctl = relay_controller(kube)
        ctl.runs = FakeGate(set())
        await ctl.on_approval(NS, "a2", kube.add("a2", run="ghost"))
        status = kube.objects["a2"]["status"]
        assert status["phase"] == "Ignored"
        assert status["conditions"][0]["reason"] == "RunNotFound"
        assert kube.events == [("a2", "Warning", "RunNotFound")]

    asyncio.run(scenario())


def test_relay_retries_when_the_gate_fails_and_never_decides_twice() -> None:
    async def scenario() -> None:
        kube = ApprovalKube()
        ctl = relay_controller(kube)
        gate = FakeGate({"7f3a"}, fail=1)
        ctl.runs = gate
        body = kube.add("a3")
        await ctl.on_approval(NS, "a3", body)
        assert kube.patches == []
        assert (NS, "a3") in ctl._waiting
        # The status write fails after the run took the decision: the outcome is kept.
        kube.fail_next = 500
        await ctl.on_approval(NS, "a3", body)
        assert len(gate.calls) == 2
        assert kube.patches == []
        await ctl.on_approval(NS, "a3", body)
        assert len(gate.calls) == 2
        assert kube.objects["a3"]["status"]["phase"] == "Applied"
        assert kube.events == [("a3", "Normal", "Applied")]

    asyncio.run(scenario())


def test_relay_never_overwrites_an_outcome_written_meanwhile() -> None:
    async def scenario() -> None:
        kube = ApprovalKube()
        ctl = relay_controller(kube)
        ctl.runs = FakeGate(set())
        stale = kube.add("a4")
        # Another replica relayed it first (as Applied); our copy is stale.
        await kube.merge_patch(
            "Approval",
            NS,
            "a4",
            {"metadata": {"resourceVersion": "1"}, "status": {"phase": "Applied"}},
            sub="status",
        )
        await ctl.on_approval(NS, "a4", stale)
        assert kube.objects["a4"]["status"] == {"phase": "Applied"}
        assert kube.events == []

    asyncio.run(scenario())


def test_relay_rewrites_on_a_conflict_that_is_no_outcome() -> None:
    async def scenario() -> None:
        kube = ApprovalKube()
        ctl = relay_controller(kube)
        ctl.runs = FakeGate({"7f3a"})
        stale = kube.add("a5")
        kube.objects["a5"]["metadata"]["resourceVersion"] = "7"  # a label was added
        await ctl.on_approval(NS, "a5", stale)
        assert kube.objects["a5"]["status"]["phase"] == "Applied"
        assert kube.patches[-1]["metadata"]["resourceVersion"] == "7"

    asyncio.run(scenario())


def test_standby_neither_decides_nor_writes() -> None:
    class Standby:
        def is_leader(self) -> bool:
            return False

    async def scenario() -> None:
        kube = ApprovalKube()
        ctl = relay_controller(kube)
        ctl.leader = cast(Any, Standby())
        gate = FakeGate({"7f3a"})
        ctl.runs = gate
        await ctl.on_approval(NS, "a6", kube.add("a6"))
        assert gate.calls == []
        assert kube.patches == []
        assert (NS, "a6") in ctl._waiting
        await ctl.on_approval(NS, "a6", None)  # deleted
        assert not ctl._waiting

    asyncio.run(scenario())


# -- the CLI: object names, credentials ------------------------------------------------------


def test_approval_name() -> None:
    assert approval_name("7f3a", "answer", "abcde") == "7f3a-answer-abcde"
    assert approval_name("Run_ID", "answer", "abcde") == "run-id-answer-abcde"
    name = approval_name("r" * 128, "s" * 63)
    assert len(name) <= 253
    assert name.startswith("r" * 128 + "-" + "s" * 63 + "-")
    assert approval_name("r", "s") != approval_name("r", "s")


def write_kubeconfig(path: Path, user: dict[str, Any], **cluster: Any) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": "https://k8s.example:6443/", **cluster}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [
            {"name": "ctx", "context": {"cluster": "c", "user": "u", "namespace": "team"}}
        ],
        "current-context": "ctx",
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_kubeconfig_with_a_token(tmp_path: Path) -> None:
    path = write_kubeconfig(
        tmp_path / "config", {"token": "s3cret"}, **{"insecure-skip-tls-verify": True}
    )
    creds = kubeapi.load(str(path))
    assert creds.server == "https://k8s.example:6443"
    assert creds.headers == {"Authorization": "Bearer s3cret"}
    assert creds.namespace == "team"


def test_kubeconfig_token_file_relative_to_the_kubeconfig(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "token").write_text("from-file\n")
    write_kubeconfig(tmp_path / "config", {"tokenFile": "token"})
    monkeypatch.setenv("KUBECONFIG", f"{tmp_path / 'missing'}:{tmp_path / 'config'}")
    monkeypatch.chdir("/")
    assert kubeapi.load().headers == {"Authorization": "Bearer from-file"}


def test_kubeconfig_with_certificate_data(tmp_path: Path) -> None:
    ca = pki.create_ca(tmp_path, "ca")
    pair = pki.issue_client_cert(ca, tmp_path, "jane", ("team",))

    def b64(path: Path) -> str:
        return base64.b64encode(path.read_bytes()).decode()

    path = write_kubeconfig(
        tmp_path / "config",
        {"client-certificate-data": b64(pair.cert), "client-key-data": b64(pair.key)},
        **{"certificate-authority-data": b64(ca.cert)},
    )
    creds = kubeapi.load(str(path), context="ctx")
    assert creds.headers == {}
    assert creds.verify.verify_mode.name == "CERT_REQUIRED"


def test_kubeconfig_with_an_exec_plugin(tmp_path: Path) -> None:
    plugin = tmp_path / "plugin.py"
    plugin.write_text(
        "import json, os\n"
        "info = json.loads(os.environ['KUBERNETES_EXEC_INFO'])\n"
        "assert info['kind'] == 'ExecCredential', info\n"
        "print(json.dumps({'apiVersion': info['apiVersion'], 'kind': 'ExecCredential',\n"
        "                  'status': {'token': 'exec-' + os.environ['WHO']}}))\n"
    )
    plugin.chmod(plugin.stat().st_mode | stat.S_IXUSR)
    user = {
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1",
            "command": sys.executable,
            "args": [str(plugin)],
            "env": [{"name": "WHO", "value": "jane"}],
            "interactiveMode": "Never",
        }
    }
    creds = kubeapi.load(str(write_kubeconfig(tmp_path / "config", user)))
    assert creds.headers == {"Authorization": "Bearer exec-jane"}


@pytest.mark.parametrize(
    ("user", "context", "error"),
    [
        ({"auth-provider": {"name": "gcp"}}, None, "auth-provider 'gcp' is not supported"),
        ({"token": "x"}, "other", "context 'other' is not in the kubeconfig"),
        ({"exec": {"command": "/nonexistent/plugin", "installHint": "get it"}}, None, "get it"),
    ],
)
def test_kubeconfig_errors(
    tmp_path: Path, user: dict[str, Any], context: str | None, error: str
) -> None:
    path = write_kubeconfig(tmp_path / "config", user)
    with pytest.raises(kubeapi.KubeConfigError, match=error):
        kubeapi.load(str(path), context)
