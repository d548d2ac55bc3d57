"""The example Agents of examples/ served by real runtimes: triage batches, escalates
its unsure answers to triage-large, and caches."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from shoal_testbed.fixtures import NatsServer
from tests.helpers import example_docs
from tests.runtime.support import connect, declare, result_map, running, submit

pytestmark = pytest.mark.nats


def _spec(name: str) -> dict[str, Any]:
    docs = example_docs(recursive=True)
    spec: dict[str, Any] = next(
        d["spec"] for d in docs if d["kind"] == "Agent" and d["metadata"]["name"] == name
    )
    return spec


def test_triage_example_classifies_escalates_and_caches(nats_server: NatsServer) -> None:
    specs = {name: _spec(name) for name in ("triage", "triage-small", "triage-large")}

    async def main() -> None:
        for name, spec in specs.items():
            await declare(nats_server.url, name, spec)
        nc, js = await connect(nats_server.url)
        async with (
            running(nats_server.url, "triage", specs["triage"]),
            running(nats_server.url, "triage-small", specs["triage-small"]),
            running(nats_server.url, "triage-large", specs["triage-large"]),
        ):
            billing = await submit(js, "triage", {"text": "My invoice shows a double charge"})
            vague = await submit(js, "triage", {"text": "Hello, a question"})
            got = await result_map(js, 2)
            again = await submit(js, "triage", {"text": "My invoice shows a double charge"})
            got = await result_map(js, 3)
        assert got[billing.id].output == {"category": "billing", "confidence": 0.95}
        assert got[billing.id].path == ("triage",)
        assert got[vague.id].path == ("triage", "triage-large")
        assert got[vague.id].output == {"category": "general", "model": "large"}
        assert got[again.id].cached
        await nc.close()

    asyncio.run(main())
