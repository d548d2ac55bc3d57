"""Declaring an Agent's JetStream resources the way the operator does, for tests that run
runtimes against a nats-server without Kubernetes."""

from __future__ import annotations

from typing import Any

from shoal_api.agent import AgentSpec
from shoal_operator.builders import jetstream
from shoal_operator.clients.jetstream import JetStreamAdmin


async def declare_agent(
    url: str, namespace: str, name: str, spec: dict[str, Any], replicas: int = 1
) -> AgentSpec:
    """Streams, buckets and the Agent's durable consumers, exactly as the operator declares
    them; returns the parsed spec."""
    parsed = AgentSpec.model_validate(spec)
    admin = await JetStreamAdmin.connect(url)
    try:
        await admin.ensure_streams()
        await admin.ensure_buckets()
        await admin.ensure_consumers(jetstream.consumers(namespace, name, parsed, replicas))
    finally:
        await admin.close()
    return parsed
