"""Nothing acknowledged is lost and nothing completes twice: runtimes as real processes
killed (SIGKILL) or stopped (SIGTERM) under load."""

from __future__ import annotations

import asyncio
import collections
import signal
import time
from pathlib import Path

import pytest

from shoal_api import nats_layout as nl
from shoal_testbed.fixtures import NatsServer
from tests.runtime.support import (
    NS,
    connect,
    declare,
    lines,
    result_map,
    results,
    spawn,
    submit_many,
    until,
)

pytestmark = pytest.mark.nats


def _spec(**over: object) -> dict[str, object]:
    return {
        "handler": {"python": "tests.runtime.handlers:record"},
        "concurrency": 64,
        "timeoutSeconds": 1,
        **over,
    }


def test_sigkill_of_one_of_three_runtimes_loses_nothing(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    record = tmp_path / "record"
    n = 10_000
    spec = _spec()

    async def main() -> None:
        await declare(nats_server.url, "rec", spec, replicas=3)
        nc, js = await connect(nats_server.url)
        procs = [
            spawn(nats_server.url, "rec", spec, f"rec-{i}", {"SHOAL_TEST_RECORD": str(record)})
            for i in range(3)
        ]
        try:
            tasks = await submit_many(js, "rec", [{"n": i, "sleep": 0.002} for i in range(n)])
            # Kill one runtime once work is flowing, with tasks in its hands.
            await until(lambda: _async(len(lines(record)) > n // 5), 60, "a fifth done")
            procs[0].send_signal(signal.SIGKILL)
            got = await result_map(js, n, within=240)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                p.wait(60)
        assert set(got) == {t.id for t in tasks}, "a task has no result"
        assert all(r.status == "Succeeded" for r in got.values())
        stored = collections.Counter(r.id for r in await results(js))
        assert max(stored.values()) == 1, "a task has two result records"
        info = await js.consumer_info(nl.TASKS_STREAM, nl.consumer_name(NS, "rec"))
        assert info.num_pending == 0
        assert info.num_ack_pending == 0
        await nc.close()

    asyncio.run(main())


def test_sigterm_under_load_drains_within_the_grace_period(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    record = tmp_path / "record"
    n = 2_000
    grace = 12.0
    spec = _spec(concurrency=32)

    async def main() -> None:
        await declare(nats_server.url, "rec", spec, replicas=2)
        nc, js = await connect(nats_server.url)
        extra = {"SHOAL_TEST_RECORD": str(record), "SHOAL_GRACE_SECONDS": str(grace)}
        first = spawn(nats_server.url, "rec", spec, "rec-0", extra)
        second = spawn(nats_server.url, "rec", spec, "rec-1", extra)
        try:
            tasks = await submit_many(js, "rec", [{"n": i, "sleep": 0.05} for i in range(n)])
            await until(lambda: _async(len(lines(record)) > n // 10), 60, "a tenth done")
            first.send_signal(signal.SIGTERM)
            stopped_at = time.monotonic()
            code = await asyncio.to_thread(first.wait, grace + 5)
            took = time.monotonic() - stopped_at
            got = await result_map(js, n, within=240)
        finally:
            for p in (first, second):
                if p.poll() is None:
                    p.kill()
                p.wait(30)
        assert code == 0
        assert took <= grace
        assert set(got) == {t.id for t in tasks}
        executed = collections.Counter(lines(record))
        assert set(executed) == set(got)
        assert max(executed.values()) == 1, "a task ran to completion twice"
        stored = collections.Counter(r.id for r in await results(js))
        assert max(stored.values()) == 1
        await nc.close()

    asyncio.run(main())


async def _async(value: bool) -> bool:
    return value
