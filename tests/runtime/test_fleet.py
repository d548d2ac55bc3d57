"""A fleet on one nats-server: every Agent's band consumers fit on the tasks stream, and
an Agent far past the server's implicit per-stream cap (1,000 consumers, 333 Agents)
still gets its tasks in band order."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from shoal_api import nats_layout as nl
from shoal_api.agent import AgentSpec
from shoal_operator.builders import jetstream
from shoal_operator.clients.jetstream import JetStreamAdmin, queue_counts
from shoal_testbed.fixtures import NatsServer
from tests.runtime.support import NS, connect, lines, running, submit

pytestmark = pytest.mark.nats

FLEET = 1_500
# The operator reconciles Agents on several workers at once.
WORKERS = 8
SPEC: dict[str, Any] = {"handler": {"python": "tests.runtime.handlers:record"}, "concurrency": 1}


def _agent(i: int) -> str:
    return f"agent-{i:05d}"


async def _declare_fleet(admin: JetStreamAdmin, count: int) -> list[str]:
    """Declares ``count`` Agents' consumers with the Agent reconcile's own call; returns
    the failures (``agent: error``)."""
    parsed = AgentSpec.model_validate(SPEC)
    failures: list[str] = []
    todo = iter(range(count))

    async def worker() -> None:
        for i in todo:
            try:
                info = await admin.ensure_consumers(jetstream.consumers(NS, _agent(i), parsed, 1))
                assert queue_counts(info) == (0, 0)
            except Exception as exc:
                failures.append(f"{_agent(i)}: {exc}")

    await asyncio.gather(*(worker() for _ in range(WORKERS)))
    return failures


def test_a_fleet_of_1500_agents_gets_every_band_consumer_and_band_order(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = tmp_path / "record"
    monkeypatch.setenv("SHOAL_TEST_RECORD", str(record))

    async def main() -> None:
        admin = await JetStreamAdmin.connect(nats_server.url)
        await admin.ensure_streams()
        await admin.ensure_buckets()
        failures = await _declare_fleet(admin, FLEET)
        assert not failures, f"{len(failures)} of {FLEET} Agents failed, first: {failures[:3]}"
        stream = await admin._request(f"STREAM.INFO.{nl.TASKS_STREAM}")
        assert stream["state"]["consumer_count"] == FLEET * nl.CONSUMERS_PER_AGENT
        assert stream["config"]["max_consumers"] == nl.TASKS_MAX_CONSUMERS

        # The last Agent declared (far past 333): one task of each band, queued oldest
        # lowest before its runtime starts, are served high, normal, low.
        last = _agent(FLEET - 1)
        nc, js = await connect(nats_server.url)
        low = await submit(js, last, {"n": 0}, "lo", priority=1)
        normal = await submit(js, last, {"n": 1}, "mid", priority=5)
        high = await submit(js, last, {"n": 2}, "hi", priority=9)
        info = await admin.consumer_info(NS, last)
        assert info is not None
        assert queue_counts(info) == (3, 0)
        async with running(nats_server.url, last, SPEC):
            deadline = time.monotonic() + 30
            while len(done := lines(record)) < 3:
                assert time.monotonic() < deadline, f"completed {done} in 30s"
                await asyncio.sleep(0.01)
        assert done == [high.id, normal.id, low.id]
        await nc.close()
        await admin.close()

    asyncio.run(main())


def test_a_tasks_stream_from_before_the_capacity_is_raised_in_place(
    nats_server: NatsServer,
) -> None:
    """An upgrade: the stream an older operator declared (no max_consumers, so the
    server's 1,000) keeps its tasks and consumers and gets the capacity."""

    async def main() -> None:
        admin = await JetStreamAdmin.connect(nats_server.url)
        old = {**next(s for s in jetstream.streams() if s["name"] == nl.TASKS_STREAM)}
        del old["max_consumers"]
        await admin._request(f"STREAM.CREATE.{nl.TASKS_STREAM}", old)
        parsed = AgentSpec.model_validate(SPEC)
        await admin.ensure_consumers(jetstream.consumers(NS, "old", parsed, 1))
        nc, js = await connect(nats_server.url)
        await submit(js, "old", {"n": 0}, "kept", priority=5)
        before = await admin._request(f"STREAM.INFO.{nl.TASKS_STREAM}")
        assert before["config"]["max_consumers"] == -1

        await admin.ensure_streams()
        after = await admin._request(f"STREAM.INFO.{nl.TASKS_STREAM}")
        assert after["config"]["max_consumers"] == nl.TASKS_MAX_CONSUMERS
        assert after["created"] == before["created"]
        assert after["state"]["messages"] == 1
        assert after["state"]["consumer_count"] == nl.CONSUMERS_PER_AGENT
        info = await admin.consumer_info(NS, "old")
        assert info is not None
        assert queue_counts(info) == (1, 0)
        assert after["config"]["subjects"] == [nl.TASK_SUBJECTS]
        await nc.close()
        await admin.close()

    asyncio.run(main())
