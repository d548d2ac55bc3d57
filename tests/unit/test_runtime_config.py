"""The runtime's settings from the pod's environment, and clear errors when they are wrong."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from shoal_runtime.config import ConfigError, Settings


def _env(spec: object, **extra: str) -> dict[str, str]:
    return {
        "SHOAL_AGENT_CONFIG": json.dumps({"namespace": "ns", "name": "a", "spec": spec}),
        **extra,
    }


def test_settings_from_the_operators_env() -> None:
    s = Settings.from_env(
        _env(
            {"handler": {"python": "m:f"}, "timeoutSeconds": 10},
            SHOAL_NATS_URL="nats://n:4222",
            SHOAL_POD_NAME="a-1",
            SHOAL_NAMESPACE="ns",
            SHOAL_AGENT="a",
        )
    )
    assert (s.namespace, s.agent, s.pod_name, s.nats_url) == ("ns", "a", "a-1", "nats://n:4222")
    assert s.grace_seconds == 40  # timeout + 30, like terminationGracePeriodSeconds
    assert s.drain_seconds == 35
    assert s.spec.concurrency == 8


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "SHOAL_AGENT_CONFIG is not set"),
        ({"SHOAL_AGENT_CONFIG": "{"}, "not a valid Agent config"),
        (_env({"handler": {"python": "m:f"}, "concurrency": 0}), "not a valid Agent config"),
        (_env({"handler": {"python": "m:f"}}, SHOAL_AGENT="b"), "SHOAL_AGENT=b disagrees"),
        (_env({"handler": {"python": "m:f"}}, SHOAL_HEALTH_PORT="x"), "bad runtime setting"),
    ],
)
def test_bad_settings_fail_with_a_clear_message(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_the_process_exits_with_one_line_for_a_missing_handler_module() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "shoal_runtime"],
        env={**_env({"handler": {"python": "no_such_module:handle"}}), "PATH": "/usr/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 3
    assert "handler module 'no_such_module' cannot be imported" in proc.stderr
    assert "Traceback" not in proc.stderr
