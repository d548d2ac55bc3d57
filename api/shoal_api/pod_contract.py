"""The contract between an Agent's pod and the runtime inside it: what the operator's
Deployment (``shoal_operator.builders.deployment``) sets and what the runtime
(``shoal_runtime.config``, ``shoal_runtime.__main__``) reads and serves.

Both sides import these names, so a port, a path or an env var cannot drift apart;
``tests/unit/test_pod_contract.py`` feeds a built Deployment's env to the runtime's
settings to prove it.
"""

from __future__ import annotations

# -- the container ------------------------------------------------------------------------

RUNTIME_MODULE = "shoal_runtime"
"""The runtime is started as ``python -m shoal_runtime``."""
RUNTIME_COMMAND: tuple[str, ...] = ("python", "-m", RUNTIME_MODULE)

# -- environment the operator sets --------------------------------------------------------

CONFIG_ENV = "SHOAL_AGENT_CONFIG"
"""The Agent spec with defaults applied, as canonical JSON ``{namespace, name, spec}``."""
NAMESPACE_ENV = "SHOAL_NAMESPACE"
AGENT_ENV = "SHOAL_AGENT"
NATS_URL_ENV = "SHOAL_NATS_URL"
POD_NAME_ENV = "SHOAL_POD_NAME"
LLM_API_KEY_ENV = "SHOAL_LLM_API_KEY"

# -- environment with defaults that only a local stand-in or a test overrides -------------

HEALTH_PORT_ENV = "SHOAL_HEALTH_PORT"
METRICS_PORT_ENV = "SHOAL_METRICS_PORT"
GRACE_SECONDS_ENV = "SHOAL_GRACE_SECONDS"
PORT_OVERRIDE_ENVS: tuple[str, ...] = (HEALTH_PORT_ENV, METRICS_PORT_ENV)
"""What the test bed's kubelet stand-in overrides so that many pods share one loopback."""

# -- ports and probes ---------------------------------------------------------------------

HEALTH_PORT = 8080
METRICS_PORT = 9090
HEALTH_PORT_NAME = "health"
METRICS_PORT_NAME = "metrics"
LIVENESS_PATH = "/livez"
READINESS_PATH = "/readyz"
METRICS_PATH = "/metrics"

# -- termination --------------------------------------------------------------------------

DRAIN_MARGIN_SECONDS = 30
"""Seconds beyond the Agent's timeout that a terminating pod gets to hand back work."""
DRAIN_RESERVE_SECONDS = 5.0
"""The part of the grace period the runtime keeps for handing back unfinished work and
closing its connection; in-flight tasks may run on for the rest."""


def grace_period_seconds(timeout_seconds: int) -> int:
    """The pod's ``terminationGracePeriodSeconds`` for an Agent with this timeout."""
    return timeout_seconds + DRAIN_MARGIN_SECONDS
