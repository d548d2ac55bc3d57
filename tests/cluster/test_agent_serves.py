"""End to end on the local cluster: an applied Agent's pods (run by the kubelet stand-in)
serve `shoal submit`, its circuit shows in the Agent's status, and deleting the Agent
stops its runtimes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from shoal_testbed.fixtures import Testbed, eventually
from tests.helpers import REPO, agent, is_ready, runtimes

pytestmark = pytest.mark.cluster


def shoal(testbed: Testbed, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shoal_cli.cli", *args],
        env={**os.environ, "SHOAL_NATS_URL": testbed.nats_url},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


def test_an_applied_agent_serves_shoal_submit(
    testbed: Testbed, operator: Any, namespace: str
) -> None:
    testbed.apply(
        agent(
            "classify",
            handler={"python": "shoal_examples.triage:handle_small"},
            contract={"input": {"type": "object", "required": ["text"]}},
            runtime={"replicas": 2},
        ),
        namespace,
    )
    eventually(lambda: is_ready(testbed, "classify", namespace), 60, what="Agent Ready")
    eventually(lambda: len(runtimes(testbed, namespace, "classify")) == 2, 60, what="2 runtimes")

    done = shoal(
        testbed,
        *("submit", "classify", "-n", namespace, "--wait", "--timeout", "60"),
        *("--input", json.dumps({"text": "I want a refund for this charge"}), "-o", "json"),
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == "Succeeded"
    assert result["output"] == {"category": "billing", "model": "small"}

    refused = shoal(
        testbed,
        *("submit", "classify", "-n", namespace, "--wait", "--timeout", "60"),
        *("--input", json.dumps({"no_text": True})),
    )
    assert refused.returncode == 1
    assert "ContractViolation" in refused.stderr
    listed = shoal(testbed, "dlq", "list", "-n", namespace, "-o", "json")
    assert listed.returncode == 0, listed.stderr
    assert "ContractViolation" in listed.stdout

    testbed.kubectl("delete", "agent", "classify", "-n", namespace, "--wait=true")
    eventually(lambda: not runtimes(testbed, namespace, "classify"), 60, what="runtimes gone")
