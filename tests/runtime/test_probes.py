"""A runtime process's health, readiness and metrics endpoints, and readiness turning
false first on SIGTERM while in-flight work finishes."""

from __future__ import annotations

import asyncio
import signal

import httpx
import pytest

from shoal_testbed.cluster import free_port
from shoal_testbed.fixtures import NatsServer, eventually
from tests.runtime.support import connect, declare, result_map, spawn, submit

pytestmark = pytest.mark.nats


def _get(port: int, path: str) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2)


def test_probes_metrics_and_readiness_on_sigterm(nats_server: NatsServer) -> None:
    spec = {"handler": {"python": "tests.runtime.handlers:slow"}, "timeoutSeconds": 20}
    health, metrics = free_port(), free_port()
    asyncio.run(declare(nats_server.url, "slow", spec))
    proc = spawn(
        nats_server.url,
        "slow",
        spec,
        "slow-0",
        {"SHOAL_HEALTH_PORT": str(health), "SHOAL_METRICS_PORT": str(metrics)},
    )
    try:
        eventually(lambda: _get(health, "/readyz").status_code == 200, 30, what="ready")
        assert _get(health, "/livez").status_code == 200
        assert _get(health, "/nope").status_code == 404

        async def one_quick_then_one_slow() -> None:
            nc, js = await connect(nats_server.url)
            await submit(js, "slow", {"sleep": 0})
            await result_map(js, 1)
            await submit(js, "slow", {"sleep": 3})
            await nc.close()

        asyncio.run(one_quick_then_one_slow())
        text = _get(metrics, "/metrics").text
        assert 'shoal_tasks_total{agent="slow",namespace="t",outcome="succeeded"} 1.0' in text
        assert "shoal_task_duration_seconds_bucket" in text
        eventually(
            lambda: (
                'shoal_tasks_in_flight{agent="slow",namespace="t"} 1.0'
                in _get(metrics, "/metrics").text
            ),
            10,
            what="the slow task in flight",
        )
        proc.send_signal(signal.SIGTERM)
        # Not ready while the slow task finishes; then the process exits cleanly.
        eventually(lambda: _get(health, "/readyz").status_code == 503, 5, what="not ready")
        assert proc.wait(20) == 0

        async def slow_result() -> None:
            nc, js = await connect(nats_server.url)
            got = await result_map(js, 2)
            assert all(r.status == "Succeeded" for r in got.values())
            await nc.close()

        asyncio.run(slow_result())
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
