"""Priority bands against a real nats-server: higher bands first, a share for the lower
ones, and a lone band at full speed."""

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
from tests.runtime.support import NS, connect, declare, lines, running, submit, until

pytestmark = pytest.mark.nats

HIGH, NORMAL, LOW = 9, 5, 1


def _spec(concurrency: int) -> dict[str, Any]:
    return {"handler": {"python": "tests.runtime.handlers:record"}, "concurrency": concurrency}


async def _publish(
    js: Any, agent: str, prefix: str, priority: int, count: int, sleep: float = 0.0
) -> None:
    for start in range(0, count, 200):
        await asyncio.gather(
            *(
                submit(js, agent, {"n": i, "sleep": sleep}, f"{prefix}-{i}", priority=priority)
                for i in range(start, min(start + 200, count))
            )
        )


async def _completed(record: Path, count: int, within: float = 60) -> list[str]:
    """The ids the handler recorded, in completion order, once there are ``count``."""
    deadline = time.monotonic() + within
    while len(done := lines(record)) < count:
        assert time.monotonic() < deadline, f"{len(done)} of {count} completions in {within}s"
        await asyncio.sleep(0.01)
    return done


@pytest.fixture
def record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "record"
    monkeypatch.setenv("SHOAL_TEST_RECORD", str(path))
    return path


def test_a_high_backlog_overtakes_an_older_low_one(nats_server: NatsServer, record: Path) -> None:
    async def main() -> None:
        spec = _spec(concurrency=1)
        await declare(nats_server.url, "rec", spec)
        nc, js = await connect(nats_server.url)
        await _publish(js, "rec", "lo", LOW, 200)
        await _publish(js, "rec", "hi", HIGH, 50)
        async with running(nats_server.url, "rec", spec):
            done = await _completed(record, 250)
        await nc.close()
        last_high = max(i for i, task in enumerate(done) if task.startswith("hi-"))
        low_before = sum(task.startswith("lo-") for task in done[:last_high])
        # Served FIFO, all 200 low tasks would come first. With only high and low backlogged
        # low gets 1 of each 8 (weights 7:1): about 7 while the 50 high ones run.
        assert 1 <= low_before <= 20, done[: last_high + 1]

    asyncio.run(main())


def test_every_band_gets_its_weighted_share_of_a_backlog(
    nats_server: NatsServer, record: Path
) -> None:
    async def main() -> None:
        spec = _spec(concurrency=1)
        await declare(nats_server.url, "rec", spec)
        nc, js = await connect(nats_server.url)
        # Oldest first: FIFO would serve them in exactly the wrong order.
        await _publish(js, "rec", "lo", LOW, 100)
        await _publish(js, "rec", "mid", NORMAL, 100)
        await _publish(js, "rec", "hi", HIGH, 300)
        async with running(nats_server.url, "rec", spec):
            done = await _completed(record, 100)
        await nc.close()
        first = done[:100]
        counts = {p: sum(t.startswith(f"{p}-") for t in first) for p in ("hi", "mid", "lo")}
        # 7:2:1 (nl.BANDS' weights) while every band has work: lower bands are not starved
        # by a high backlog that outlasts them.
        assert 62 <= counts["hi"] <= 78, counts
        assert 13 <= counts["mid"] <= 27, counts
        assert 5 <= counts["lo"] <= 15, counts

    asyncio.run(main())


def test_low_tasks_complete_under_a_continuous_high_backlog(
    nats_server: NatsServer, record: Path
) -> None:
    async def main() -> None:
        spec = _spec(concurrency=4)
        await declare(nats_server.url, "rec", spec)
        nc, js = await connect(nats_server.url)
        # 10 ms each: 4 at a time serve 400 tasks a second, less than published here.
        await _publish(js, "rec", "hi", HIGH, 400, sleep=0.01)
        lows = 0
        async with running(nats_server.url, "rec", spec):
            # Keep the high band backlogged all along; low work trickles in behind it.
            while lows < 10:
                await _publish(js, "rec", f"lo{lows}", LOW, 1)
                await _publish(js, "rec", f"hi{lows}", HIGH, 100, sleep=0.01)
                lows += 1
                await asyncio.sleep(0.05)

            async def all_low_done() -> list[str] | None:
                done = lines(record)
                return done if sum(t.startswith("lo") for t in done) >= 10 else None

            done = await until(all_low_done, 60, "all low tasks")
            info = await js.consumer_info(nl.TASKS_STREAM, nl.consumer_name(NS, "rec", "high"))
            high_left = info.num_pending or 0
        await nc.close()
        assert high_left > 0, "the high backlog ran dry: the test proved nothing"
        assert len(done) < 400 + 10 * 100

    asyncio.run(main())


def test_a_lone_low_band_is_served_at_full_speed(nats_server: NatsServer, record: Path) -> None:
    async def main() -> None:
        spec = _spec(concurrency=32)
        await declare(nats_server.url, "rec", spec)
        nc, js = await connect(nats_server.url)
        async with running(nats_server.url, "rec", spec):
            # Idle long enough for every band to have its peek open.
            await asyncio.sleep(1.5)
            started = time.monotonic()
            one = await submit(js, "rec", {"n": 0}, priority=LOW)
            await _completed(record, 1, within=10)
            first = time.monotonic() - started
            await _publish(js, "rec", "lo", LOW, 2000)
            started = time.monotonic()
            done = await _completed(record, 2001, within=60)
            took = time.monotonic() - started
        await nc.close()
        assert done[0] == one.id
        # A task arriving at an idle runtime is picked up at once (not at a poll).
        assert first < 0.5, first
        assert took < 20, took

    asyncio.run(main())


def test_band_consumers_replace_a_consumer_from_before_bands(nats_server: NatsServer) -> None:
    async def main() -> None:
        spec = _spec(concurrency=2)
        nc, js = await connect(nats_server.url)
        admin = await JetStreamAdmin.connect(nats_server.url)
        await admin.ensure_streams()
        await admin.ensure_buckets()
        parsed = AgentSpec.model_validate(spec)
        bands = jetstream.consumers(NS, "rec", parsed, 1)
        # What an operator before bands declared: one consumer for every priority.
        old = {**bands[0], "filter_subject": nl.agent_task_filter(NS, "rec")}
        del old["filter_subjects"]
        await admin.ensure_consumer(old)
        await _publish(js, "rec", "hi", HIGH, 3)
        await _publish(js, "rec", "mid", NORMAL, 4)
        await _publish(js, "rec", "lo", LOW, 2)

        info = await admin.ensure_consumers(bands)
        assert queue_counts(info) == (9, 0)
        names = {nl.consumer_name(NS, "rec", b.name): b for b in nl.BANDS}
        for name, band in names.items():
            got = await js.consumer_info(nl.TASKS_STREAM, name)
            assert got.config.filter_subjects == nl.band_task_subjects(NS, "rec", band)
            assert got.num_pending == {"high": 3, "normal": 4, "low": 2}[band.name]
        combined = await admin.consumer_info(NS, "rec")
        assert combined is not None
        assert queue_counts(combined) == (9, 0)
        assert combined["delivered"]["consumer_seq"] == 0

        await admin.remove_agent(NS, "rec")
        assert await admin.consumer_info(NS, "rec") is None
        await admin.close()
        await nc.close()

    asyncio.run(main())
