"""The runtimes' shared state in NATS KV (circuit breaker, usage) mirrored into Agent
status, with an Event per circuit transition; and the KV watch behind it."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import nats
import pytest

from shoal_api import nats_layout as nl
from shoal_api.runtime_state import CircuitRecord, HourUsage, StateModel, UsageRecord
from shoal_operator.clients.jetstream import JetStreamAdmin
from shoal_testbed.fixtures import NatsServer, Testbed, eventually
from tests.helpers import agent


def kv_put(url: str, bucket: str, key: str, value: bytes) -> None:
    async def go() -> None:
        nc = await nats.connect(url)
        try:
            kv = await nc.jetstream().key_value(bucket)
            await kv.put(key, value)
        finally:
            await nc.close()

    asyncio.run(go())


def put_record(testbed: Testbed, bucket: str, ns: str, name: str, record: StateModel) -> None:
    kv_put(testbed.nats_url, bucket, nl.agent_key(ns, name), record.to_json())


def agent_events(testbed: Testbed, ns: str, name: str, reason: str) -> list[dict[str, Any]]:
    items = json.loads(testbed.kubectl("get", "events", "-n", ns, "-o", "json").stdout)["items"]
    return [e for e in items if e["reason"] == reason and e["involvedObject"]["name"] == name]


def status_of(testbed: Testbed, ns: str, name: str, field: str) -> Any:
    return ((testbed.get("agent", name, ns) or {}).get("status") or {}).get(field)


def reconciled(testbed: Testbed, ns: str, name: str) -> bool:
    obj = testbed.get("agent", name, ns) or {}
    generation = obj.get("metadata", {}).get("generation")
    return bool(generation) and (obj.get("status") or {}).get("observedGeneration") == generation


def test_circuit_transitions_reach_status_and_events(
    testbed: Testbed, operator: Any, namespace: str
) -> None:
    testbed.apply(agent("flaky"), namespace)
    eventually(lambda: reconciled(testbed, namespace, "flaky"), 30, what="Agent reconciled")

    opened = CircuitRecord(
        state="Open",
        since=time.time(),
        failure_rate_percent=75,
        reason="15 of 20 calls failed",
        changed_by="flaky-0",
    )
    put_record(testbed, nl.CIRCUIT_BUCKET, namespace, "flaky", opened)
    circuit = eventually(
        lambda: (
            (c := status_of(testbed, namespace, "flaky", "circuit")) and c["state"] == "Open" and c
        ),
        30,
        what="status.circuit Open",
    )
    assert circuit["failureRatePercent"] == 75
    assert circuit["since"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(opened.since))
    event = eventually(
        lambda: agent_events(testbed, namespace, "flaky", "CircuitOpened"),
        30,
        what="CircuitOpened Event",
    )[0]
    assert event["type"] == "Warning"
    assert "75%" in event["message"]
    assert "15 of 20 calls failed" in event["message"]
    # The circuit is no condition: a fallback may be serving meanwhile.
    obj = testbed.get("agent", "flaky", namespace) or {}
    degraded = next(c for c in obj["status"]["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "False"
    assert "Open" in testbed.kubectl("get", "agent", "flaky", "-n", namespace).stdout

    closed = CircuitRecord(state="Closed", since=time.time(), reason="3 probes succeeded")
    put_record(testbed, nl.CIRCUIT_BUCKET, namespace, "flaky", closed)
    eventually(
        lambda: (status_of(testbed, namespace, "flaky", "circuit") or {}).get("state") == "Closed",
        30,
        what="status.circuit Closed",
    )
    event = eventually(
        lambda: agent_events(testbed, namespace, "flaky", "CircuitClosed"),
        30,
        what="CircuitClosed Event",
    )[0]
    assert event["type"] == "Normal"
    assert "3 probes succeeded" in event["message"]
    assert len(agent_events(testbed, namespace, "flaky", "CircuitOpened")) == 1


def test_usage_reaches_status(testbed: Testbed, operator: Any, namespace: str) -> None:
    # Within one clock hour the expected figures are exact; across the boundary this
    # hour's usage would start to decay.
    if (left := 3600 - time.time() % 3600) < 60:
        time.sleep(left + 1)
    testbed.apply(agent("busy"), namespace)
    eventually(lambda: reconciled(testbed, namespace, "busy"), 30, what="Agent reconciled")

    hour = int(time.time() // 3600)

    def record(tasks: int, tokens: int, cost: str) -> UsageRecord:
        return UsageRecord(
            current=HourUsage(hour=hour, tasks=tasks, tokens=tokens, cost=Decimal(cost))
        )

    def usage_is(expected: dict[str, Any]) -> Callable[[], bool]:
        return lambda: status_of(testbed, namespace, "busy", "usage") == expected

    put_record(testbed, nl.USAGE_BUCKET, namespace, "busy", record(12, 3400, "0.068"))
    eventually(
        usage_is({"tasksLastHour": 12, "tokensLastHour": 3400, "costLastHour": "0.0680"}),
        30,
        what="status.usage",
    )
    # Runtimes merge again and again: the status follows (throttled, never stuck).
    put_record(testbed, nl.USAGE_BUCKET, namespace, "busy", record(20, 5000, "0.1"))
    eventually(
        usage_is({"tasksLastHour": 20, "tokensLastHour": 5000, "costLastHour": "0.1000"}),
        30,
        what="status.usage updated",
    )


# -- the KV watch and reads, on a nats-server of the test's own -------------------------


async def _next(queue: asyncio.Queue[tuple[str, str, bool]]) -> tuple[str, str, bool]:
    return await asyncio.wait_for(queue.get(), 15)


def test_watch_reports_agent_keys_and_survives_a_nats_restart(nats_server: NatsServer) -> None:
    async def scenario() -> None:
        admin = await JetStreamAdmin.connect(nats_server.url)
        writer = await nats.connect(nats_server.url, max_reconnect_attempts=-1)
        seen: asyncio.Queue[tuple[str, str, bool]] = asyncio.Queue()
        watch: asyncio.Task[None] | None = None
        try:
            await admin.ensure_buckets()
            kv = await writer.jetstream().key_value(nl.CIRCUIT_BUCKET)
            await kv.put("team-a.before", b"{}")
            watch = asyncio.create_task(
                admin.watch_agents(
                    nl.CIRCUIT_BUCKET, lambda ns, a, replay: seen.put_nowait((ns, a, replay))
                )
            )
            assert await _next(seen) == ("team-a", "before", True)
            # Keys below an Agent's (limiter windows, cache entries) are not its record.
            await kv.put("team-a.live.tasks", b"{}")
            await kv.put("team-a.live", b"{}")
            assert await _next(seen) == ("team-a", "live", False)

            await asyncio.to_thread(nats_server.restart)
            # The restarted watch replays what exists, then reports new writes again.
            replayed = {await _next(seen), await _next(seen)}
            assert replayed == {("team-a", "before", True), ("team-a", "live", True)}

            async def put_until_seen() -> None:
                # The writer may still be reconnecting: retry its put until it lands.
                while True:
                    try:
                        await kv.put("team-b.after", b"{}")
                        return
                    except Exception:
                        await asyncio.sleep(0.2)

            await asyncio.wait_for(put_until_seen(), 15)
            assert await _next(seen) == ("team-b", "after", False)
        finally:
            if watch is not None:
                watch.cancel()
                await asyncio.gather(watch, return_exceptions=True)
            await writer.close()
            await admin.close()

    asyncio.run(scenario())


def test_records_read_missing_and_malformed_as_none(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        admin = await JetStreamAdmin.connect(nats_server.url)
        try:
            await admin.ensure_buckets()
            circuit = await admin.js.key_value(nl.CIRCUIT_BUCKET)
            usage = await admin.js.key_value(nl.USAGE_BUCKET)
            assert await admin.circuit_record("team-a", "absent") is None
            assert await admin.usage_record("team-a", "absent") is None

            record = CircuitRecord(state="HalfOpen", since=1.5, probes=2)
            await circuit.put("team-a.ok", record.to_json())
            assert await admin.circuit_record("team-a", "ok") == record
            spent = UsageRecord().add(10, 1, 100, Decimal("0.5"))
            await usage.put("team-a.ok", spent.to_json())
            assert await admin.usage_record("team-a", "ok") == spent

            await circuit.put("team-a.bad", b"not json")
            await usage.put("team-a.bad", b'{"current": {"tasks": "many"}}')
            for _ in range(2):
                assert await admin.circuit_record("team-a", "bad") is None
                assert await admin.usage_record("team-a", "bad") is None
            # Deleted: gone as far as the mirror is concerned.
            await circuit.delete("team-a.ok")
            assert await admin.circuit_record("team-a", "ok") is None
        finally:
            await admin.close()

    with caplog.at_level("WARNING", logger="shoal_operator.clients.jetstream"):
        asyncio.run(scenario())
    malformed = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert len(malformed) == 2  # once per record, not once per read
