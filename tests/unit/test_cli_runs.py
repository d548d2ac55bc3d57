"""``shoal run`` and ``shoal runs``: arguments, output and exit codes, against a fake client.

The client itself (and the CLI against a real dispatcher) is tested with NATS elsewhere;
here the fake stands in for ``ShoalClient.connect`` so that every error path is cheap.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
from typer.testing import CliRunner
from typer.testing import Result as CliResult

from shoal_api.runs.model import RunState, StepState
from shoal_api.runs.wire import RunReply
from shoal_cli import cli
from shoal_cli.client import (
    DispatcherUnavailableError,
    RunRejectedError,
    ShoalClient,
    ShoalConnectionError,
)

T0 = 1_767_600_000.0


def state(phase: Any = "Running", **steps: StepState) -> RunState:
    return RunState(
        v=1,
        id="r1",
        workflow="inquiry",
        namespace="support",
        phase=phase,
        created=T0,
        started=T0 + 1,
        steps=steps,
    )


RUNNING = state(a=StepState(phase="Dispatched", agent="triage", attempt=1, started=T0 + 1))
SUCCEEDED = state(
    "Succeeded",
    a=StepState(phase="Succeeded", agent="triage", attempt=1, started=T0 + 1, finished=T0 + 2),
).model_copy(update={"finished": T0 + 2, "output": {"answer": "refunded"}})
FAILED = state(
    "Failed",
    a=StepState(phase="Failed", agent="triage", attempt=3, reason="TaskFailed", message="boom"),
).model_copy(update={"finished": T0 + 2, "reason": "StepFailed", "message": "step a failed"})


@dataclass
class Nc:
    connected_url = urlparse("nats://user:secret@nats.example:4222")


@dataclass
class FakeClient:
    reply: RunReply | Exception = field(default_factory=lambda: RunReply(run="r1", created=True))
    states: list[RunState | BaseException] = field(default_factory=list)
    runs: dict[str, RunState] = field(default_factory=dict)
    calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)
    nc: Nc = field(default_factory=Nc)

    async def submit_run(self, *args: Any, **kwargs: Any) -> RunReply:
        self.calls.append(("submit_run", args, kwargs))
        if isinstance(self.reply, Exception):
            raise self.reply
        return self.reply

    async def get_run(self, namespace: str, run: str) -> RunState | None:
        if "." in run:
            raise ValueError(f"run {run!r} is not a valid run id (A-Z, a-z, 0-9, _, -)")
        return self.runs.get(run)

    async def watch_run(self, namespace: str, run: str) -> AsyncIterator[RunState]:
        for item in self.states:
            if isinstance(item, BaseException):
                raise item
            yield item

    async def list_runs(self, namespace: str, workflow: str | None = None) -> list[RunState]:
        return [r for r in self.runs.values() if workflow in (None, r.workflow)]

    async def close(self) -> None:
        pass


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> FakeClient:
    fake = FakeClient()

    async def connect(url: str | None = None) -> FakeClient:
        return fake

    monkeypatch.setattr(ShoalClient, "connect", connect)
    return fake


def invoke(*args: str) -> CliResult:
    result = CliRunner().invoke(cli.app, list(args))
    # Expected failures end in SystemExit with a code; anything else is a bug in the CLI.
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_run_prints_the_new_run(client: FakeClient, tmp_path: Path) -> None:
    (tmp_path / "in.json").write_text('{"text": "refund"}')
    result = invoke(
        "run", "inquiry", "-n", "support", "--input", f"@{tmp_path}/in.json", "--priority", "7"
    )
    assert (result.exit_code, result.stdout) == (0, "run r1 created\n")
    assert client.calls == [
        (
            "submit_run",
            ("support", "inquiry", {"text": "refund"}),
            {"priority": 7, "idempotency_key": None},
        )
    ]


def test_run_with_a_known_idempotency_key(client: FakeClient) -> None:
    client.reply = RunReply(run="k1", created=False, phase="Running")
    result = invoke("run", "inquiry", "--idempotency-key", "order-42")
    assert result.stdout == "run k1 already exists (idempotency key)\n"
    result = invoke("run", "inquiry", "--idempotency-key", "order-42", "-o", "json")
    assert json.loads(result.stdout) == {
        "run": "k1",
        "created": False,
        "phase": "Running",
        "workflow": "inquiry",
        "namespace": "default",
    }


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (
            RunRejectedError("WorkflowNotFound", "no Workflow inquiry"),
            cli.Exit.NOT_FOUND,
            "error: workflow inquiry not found in namespace support\n",
        ),
        (
            RunRejectedError("InvalidInput", "'customerId' is a required property"),
            cli.Exit.USAGE,
            "error: invalid input for workflow inquiry: 'customerId' is a required property\n",
        ),
        (
            RunRejectedError("InvalidWorkflow", "step answer: Agent support does not exist"),
            cli.Exit.USAGE,
            "error: workflow support/inquiry cannot run: step answer: Agent support does not"
            " exist\n",
        ),
        (
            RunRejectedError("Unavailable", "KV write failed"),
            cli.Exit.UNAVAILABLE,
            "error: the dispatcher could not store the run: KV write failed\n",
        ),
        (
            DispatcherUnavailableError("no dispatcher answered on shoal.run.support.inquiry"),
            cli.Exit.UNAVAILABLE,
            # The URL without the password it was given with.
            "error: no dispatcher answered on NATS at nats://nats.example:4222:"
            " is the Shoal operator running?\n",
        ),
    ],
)
def test_run_refused(client: FakeClient, error: Exception, code: cli.Exit, message: str) -> None:
    client.reply = error
    result = invoke("run", "inquiry", "-n", "support", "--input", "{}")
    assert (result.exit_code, result.stderr) == (code, message)


def test_run_without_nats(monkeypatch: pytest.MonkeyPatch) -> None:
    async def connect(url: str | None = None) -> FakeClient:
        raise ShoalConnectionError(f"cannot connect to NATS at {url}: Connect call failed")

    monkeypatch.setattr(ShoalClient, "connect", connect)
    result = invoke("run", "inquiry", "--nats", "nats://127.0.0.1:1")
    assert result.exit_code == cli.Exit.UNAVAILABLE
    assert result.stderr == (
        "error: cannot connect to NATS at nats://127.0.0.1:1: Connect call failed\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--input", "{oops"], "--input is not valid JSON"),
        (["--input", "@/nonexistent/in.json"], "cannot read input file /nonexistent/in.json"),
        (["--priority", "10"], "Invalid value for '--priority'"),
        (["--idempotency-key", "k" * 257], "--idempotency-key must be 1 to 256 characters"),
        (["-n", "Bad.NS"], "namespace 'Bad.NS' is not a valid name"),
    ],
)
def test_run_bad_arguments_never_reach_nats(
    client: FakeClient, args: list[str], message: str
) -> None:
    result = invoke("run", "inquiry", *args)
    assert result.exit_code == cli.Exit.USAGE
    assert message in result.stderr
    assert client.calls == []


def test_run_watch_succeeds_with_the_output(client: FakeClient) -> None:
    client.states = [RUNNING, SUCCEEDED]
    result = invoke("run", "inquiry", "-n", "support", "--watch")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {"answer": "refunded"}
    # Not a terminal: a line per change instead of a redrawn table.
    assert result.stderr.splitlines() == [
        "run r1 created",
        "run r1: Running (0/1 steps done)",
        "step a: Dispatched to triage",
        "step a: Succeeded on triage in 1.0s",
        "run r1 succeeded in 1.0s",
    ]


def test_run_watch_fails_with_the_reason(client: FakeClient) -> None:
    client.states = [RUNNING, FAILED]
    result = invoke("run", "inquiry", "-n", "support", "--watch")
    assert result.exit_code == cli.Exit.RUN_FAILED
    assert result.stdout == ""
    assert result.stderr.splitlines()[-2:] == [
        "step a: Failed on triage after 3 attempts: TaskFailed: boom",
        "run r1 failed after 1.0s: StepFailed: step a failed",
    ]
    result = invoke("run", "inquiry", "-n", "support", "--watch", "-o", "json")
    assert result.exit_code == cli.Exit.RUN_FAILED
    assert json.loads(result.stdout)["reason"] == "StepFailed"


def test_ctrl_c_while_watching_leaves_the_run_running(client: FakeClient) -> None:
    client.states = [RUNNING, KeyboardInterrupt()]
    result = invoke("run", "inquiry", "-n", "support", "--watch")
    assert result.exit_code == cli.Exit.INTERRUPTED
    assert (
        "stopped watching; run r1 keeps running."
        " Re-attach with: shoal runs get r1 -n support --watch\n"
    ) in result.stderr


def test_runs_get_text(client: FakeClient) -> None:
    client.runs["r1"] = SUCCEEDED
    result = invoke("runs", "get", "r1", "-n", "support")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[:4] == [
        "run:       r1",
        "workflow:  inquiry",
        "namespace: support",
        "phase:     Succeeded",
    ]
    assert ["a", "✓", "Succeeded", "triage", "1", "1.0s"] in [line.split() for line in lines]
    assert result.stdout.endswith('output:\n{\n  "answer": "refunded"\n}\n')


def test_runs_get_json_and_watch(client: FakeClient) -> None:
    client.runs["r1"] = RUNNING
    result = invoke("runs", "get", "r1", "-n", "support", "-o", "json")
    assert (result.exit_code, json.loads(result.stdout)["phase"]) == (0, "Running")
    client.states = [RUNNING, FAILED]
    result = invoke("runs", "get", "r1", "-n", "support", "--watch")
    assert result.exit_code == cli.Exit.RUN_FAILED
    assert "step a: Dispatched to triage" in result.stderr


@pytest.mark.parametrize(
    ("run", "code", "message"),
    [
        ("r9", cli.Exit.NOT_FOUND, "error: run r9 not found in namespace support\n"),
        ("a.b", cli.Exit.USAGE, "error: run 'a.b' is not a valid run id (A-Z, a-z, 0-9, _, -)\n"),
    ],
)
def test_runs_get_missing_or_bad_run(
    client: FakeClient, run: str, code: cli.Exit, message: str
) -> None:
    for watch in ([], ["--watch"]):
        result = invoke("runs", "get", run, "-n", "support", *watch)
        assert (result.exit_code, result.stderr) == (code, message)


def test_runs_list(client: FakeClient) -> None:
    result = invoke("runs", "list", "-n", "support")
    assert (result.exit_code, result.stderr) == (0, "no runs in support\n")
    client.runs = {"r2": RUNNING.model_copy(update={"id": "r2"}), "r1": SUCCEEDED}
    result = invoke("runs", "list", "-n", "support")
    rows = [line.split()[:4] for line in result.stdout.splitlines()]
    assert rows == [
        ["RUN", "WORKFLOW", "PHASE", "STEPS"],
        ["r2", "inquiry", "Running", "0/1"],
        ["r1", "inquiry", "Succeeded", "1/1"],
    ]
    result = invoke("runs", "list", "-n", "support", "--workflow", "other", "-o", "json")
    assert json.loads(result.stdout) == []
