"""The runtime's settings: the Agent spec the operator put in the pod, plus the pod's env.

Every setting comes from the environment the operator's Deployment defines
(``SHOAL_AGENT_CONFIG`` holds the spec with defaults applied), parsed by the same
pydantic models that generate the CRD, so the runtime and the API server agree. The env
names, ports and drain margin are the pod contract (:mod:`shoal_api.pod_contract`), which
the operator's Deployment builder imports too.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import ValidationError

from shoal_api import pod_contract as pod
from shoal_api.agent import AgentSpec
from shoal_api.pod_contract import CONFIG_ENV, DRAIN_RESERVE_SECONDS

__all__ = ["CONFIG_ENV", "DRAIN_RESERVE_SECONDS", "ConfigError", "Settings"]


class ConfigError(ValueError):
    """The pod's environment does not describe a runnable Agent."""


@dataclass(frozen=True)
class Settings:
    namespace: str
    agent: str
    spec: AgentSpec
    nats_url: str = "nats://127.0.0.1:4222"
    pod_name: str = ""
    health_port: int = pod.HEALTH_PORT
    metrics_port: int = pod.METRICS_PORT
    grace_seconds: float = 90.0
    llm_api_key: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        raw = env.get(CONFIG_ENV)
        if not raw:
            raise ConfigError(f"{CONFIG_ENV} is not set: the operator puts the Agent spec there")
        try:
            doc = json.loads(raw)
            spec = AgentSpec.model_validate(doc["spec"])
            namespace, agent = str(doc["namespace"]), str(doc["name"])
        except (ValueError, KeyError, TypeError) as exc:
            detail = exc.errors()[0] if isinstance(exc, ValidationError) else exc
            raise ConfigError(f"{CONFIG_ENV} is not a valid Agent config: {detail}") from None
        for var, value in ((pod.NAMESPACE_ENV, namespace), (pod.AGENT_ENV, agent)):
            if env.get(var, value) != value:
                raise ConfigError(f"{var}={env[var]} disagrees with {CONFIG_ENV} ({value})")
        try:
            return cls(
                namespace=namespace,
                agent=agent,
                spec=spec,
                nats_url=env.get(pod.NATS_URL_ENV, cls.nats_url),
                pod_name=env.get(pod.POD_NAME_ENV) or socket.gethostname(),
                health_port=int(env.get(pod.HEALTH_PORT_ENV, cls.health_port)),
                metrics_port=int(env.get(pod.METRICS_PORT_ENV, cls.metrics_port)),
                grace_seconds=float(
                    env.get(pod.GRACE_SECONDS_ENV, pod.grace_period_seconds(spec.timeout_seconds))
                ),
                llm_api_key=env.get(pod.LLM_API_KEY_ENV) or None,
            )
        except ValueError as exc:
            raise ConfigError(f"bad runtime setting: {exc}") from None

    @property
    def drain_seconds(self) -> float:
        """How long in-flight work may run on after SIGTERM before it is handed back."""
        return max(1.0, self.grace_seconds - DRAIN_RESERVE_SECONDS)
