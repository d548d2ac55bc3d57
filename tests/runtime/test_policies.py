"""The Agent's declared failure handling, enforced by in-process runtimes on a real
nats-server: circuit breaker and fallback, escalation, cache, budgets, rate limits,
batching and the built-in LLM handler."""

from __future__ import annotations

import asyncio
import collections
import json
import time
from pathlib import Path
from typing import Any

import pytest

from shoal_api import nats_layout as nl
from shoal_api.runtime_state import CircuitRecord
from shoal_testbed.fixtures import NatsServer
from tests.openai_stub import OpenAIStub, completion, error, rate_limited
from tests.runtime.support import (
    NS,
    connect,
    dead_letters,
    declare,
    lines,
    result_map,
    results,
    running,
    submit,
    until,
)

pytestmark = pytest.mark.nats
FAST_RETRY = {"maxAttempts": 2, "backoff": {"initialSeconds": 0.1, "maxSeconds": 0.2}}


def test_circuit_opens_fallback_serves_and_probes_close_it(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = tmp_path / "broken"
    broken.touch()
    monkeypatch.setenv("SHOAL_TEST_BROKEN", str(broken))
    window = 10
    primary = {
        "handler": {"python": "tests.runtime.handlers:flaky"},
        "retry": FAST_RETRY,
        "circuitBreaker": {
            "failureRatePercent": 50,
            "minimumRequests": 4,
            "windowSeconds": window,
            "consecutiveFailures": 100,
            "openSeconds": 2,
            "halfOpenProbes": 2,
        },
        "fallback": {"agent": "backup"},
    }
    backup = {"handler": {"python": "tests.runtime.handlers:served"}}

    async def circuit(js: Any) -> CircuitRecord | None:
        kv = await js.key_value(nl.CIRCUIT_BUCKET)
        entry = await kv.get(nl.agent_key(NS, "primary"))
        return CircuitRecord.model_validate_json(entry.value)

    async def main() -> None:
        await declare(nats_server.url, "primary", primary)
        await declare(nats_server.url, "backup", backup)
        nc, js = await connect(nats_server.url)
        async with (
            running(nats_server.url, "primary", primary) as worker,
            running(nats_server.url, "backup", backup),
        ):
            began = time.time()
            first = [await submit(js, "primary", {"i": i}) for i in range(8)]

            async def opened() -> CircuitRecord | None:
                rec = await circuit(js)
                return rec if rec and rec.state == "Open" else None

            rec = await until(opened, 20, "circuit Open")
            assert rec.since - began <= window
            assert "failure rate" in rec.reason
            got = await result_map(js, 8)
            # Every task completed, the late ones via the fallback without retries.
            assert all(r.status == "Succeeded" for r in got.values())
            assert {r.output["by"] for r in got.values()} == {"backup"}
            assert all(got[t.id].path == ("primary", "backup") for t in first)
            assert worker.metrics.circuit._value.get() == 1

            broken.unlink()  # the backend heals
            healed: list[str] = []

            async def closed() -> bool:
                task = await submit(js, "primary", {"probe": len(healed)})
                healed.append(task.id)
                rec = await circuit(js)
                return rec is not None and rec.state == "Closed"

            await until(closed, 30, "circuit Closed")
            later = await submit(js, "primary", {"after": True})
            got = await result_map(js, 8 + len(healed) + 1)
            assert got[later.id].path == ("primary",)
            assert got[later.id].output == {"ok": True, "by": "primary"}
        await nc.close()

    asyncio.run(main())


def test_low_confidence_escalates_and_the_result_records_the_path(
    nats_server: NatsServer,
) -> None:
    small = {
        "handler": {"python": "tests.runtime.handlers:unsure"},
        "escalation": {"agent": "large", "confidenceBelow": 0.6},
    }
    large = {"handler": {"python": "tests.runtime.handlers:unsure"}}

    async def main() -> None:
        await declare(nats_server.url, "small", small)
        await declare(nats_server.url, "large", large)
        nc, js = await connect(nats_server.url)
        async with (
            running(nats_server.url, "small", small),
            running(nats_server.url, "large", large),
        ):
            unsure = await submit(js, "small", {"confidence": 0.2})
            sure = await submit(js, "small", {"confidence": 0.9})
            got = await result_map(js, 2)
        assert got[unsure.id].path == ("small", "large")
        assert got[unsure.id].output == {"category": "unsure", "by": "large"}
        assert got[sure.id].path == ("small",)
        assert got[sure.id].confidence == 0.9
        await nc.close()

    asyncio.run(main())


def test_a_cache_hit_skips_the_handler(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = tmp_path / "record"
    monkeypatch.setenv("SHOAL_TEST_RECORD", str(record))
    spec = {"handler": {"python": "tests.runtime.handlers:record"}, "cache": {"ttlSeconds": 60}}

    async def main() -> None:
        await declare(nats_server.url, "rec", spec)
        nc, js = await connect(nats_server.url)
        async with running(nats_server.url, "rec", spec) as worker:
            first = await submit(js, "rec", {"n": 7, "q": "same"})
            await result_map(js, 1)
            again = await submit(js, "rec", {"q": "same", "n": 7})  # same input, other order
            other = await submit(js, "rec", {"n": 8})
            got = await result_map(js, 3)
            assert worker.metrics.cache_hits._value.get() == 1
        assert got[again.id].cached
        assert got[again.id].output == got[first.id].output == {"n": 7}
        assert not got[other.id].cached
        assert sorted(lines(record)) == sorted([first.id, other.id])
        await nc.close()

    asyncio.run(main())


def _budget(on_exceeded: str, **extra: Any) -> dict[str, Any]:
    return {
        "handler": {"python": "tests.runtime.handlers:spender"},
        "concurrency": 1,
        "budget": {"tokensPerHour": 250, "onExceeded": on_exceeded},
        **extra,
    }


def test_budget_reject_dead_letters_with_the_reason(nats_server: NatsServer) -> None:
    spec = _budget("Reject")

    async def main() -> None:
        await declare(nats_server.url, "pricey", spec)
        nc, js = await connect(nats_server.url)
        async with running(nats_server.url, "pricey", spec):
            tasks = [await submit(js, "pricey", {"tokens": 100}) for _ in range(5)]
            got = await result_map(js, 5)
        # 0, 100, 200 tokens spent before the first three: they run; then 300 >= 250.
        assert [got[t.id].status for t in tasks] == ["Succeeded"] * 3 + ["DeadLettered"] * 2
        dead = await dead_letters(js)
        assert {d.reason for d in dead} == {"BudgetExceeded"}
        assert "budget" in dead[0].message
        await nc.close()

    asyncio.run(main())


def test_budget_downgrade_routes_to_the_fallback(nats_server: NatsServer) -> None:
    spec = _budget("Downgrade", fallback={"agent": "cheap"})
    cheap = {"handler": {"python": "tests.runtime.handlers:served"}}

    async def main() -> None:
        await declare(nats_server.url, "pricey", spec)
        await declare(nats_server.url, "cheap", cheap)
        nc, js = await connect(nats_server.url)
        async with (
            running(nats_server.url, "pricey", spec),
            running(nats_server.url, "cheap", cheap),
        ):
            tasks = [await submit(js, "pricey", {"tokens": 100}) for _ in range(5)]
            got = await result_map(js, 5)
        paths = [got[t.id].path for t in tasks]
        assert paths == [("pricey",)] * 3 + [("pricey", "cheap")] * 2
        await nc.close()

    asyncio.run(main())


def test_budget_throttle_holds_tasks_until_the_budget_frees(nats_server: NatsServer) -> None:
    spec = _budget("Throttle")

    async def main() -> None:
        await declare(nats_server.url, "pricey", spec)
        nc, js = await connect(nats_server.url)
        async with running(nats_server.url, "pricey", spec):
            tasks = [await submit(js, "pricey", {"tokens": 100}) for _ in range(5)]
            await result_map(js, 3)

            async def usage_merged() -> bool:
                kv = await js.key_value(nl.USAGE_BUCKET)
                entry = await kv.get(nl.agent_key(NS, "pricey"))
                return bool(json.loads(entry.value or b"{}")["current"]["tokens"] == 300)

            await until(usage_merged, 10, "usage merged")
            # Over budget: the rest wait in the queue (not failed, not dead-lettered).
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                assert len(await results(js)) == 3
                await asyncio.sleep(0.25)
            assert await dead_letters(js) == []
            # A new hour: the shared record starts from zero again.
            kv = await js.key_value(nl.USAGE_BUCKET)
            await kv.delete(nl.agent_key(NS, "pricey"))
            got = await result_map(js, 5)
        assert all(got[t.id].status == "Succeeded" for t in tasks)
        await nc.close()

    asyncio.run(main())


def test_rate_limit_holds_across_replicas(nats_server: NatsServer) -> None:
    per_second = 5
    spec = {
        "handler": {"python": "tests.runtime.handlers:stamp"},
        "concurrency": 20,
        "rateLimit": {"tasksPerSecond": per_second},
    }

    async def main() -> None:
        await declare(nats_server.url, "limited", spec, replicas=2)
        nc, js = await connect(nats_server.url)
        async with (
            running(nats_server.url, "limited", spec, pod="a"),
            running(nats_server.url, "limited", spec, pod="b"),
        ):
            await asyncio.gather(*(submit(js, "limited", {"i": i}) for i in range(20)))
            got = await result_map(js, 20, within=30)
        starts = sorted(r.output["at"] for r in got.values())
        per_window = collections.Counter(int(t) for t in starts)
        assert max(per_window.values()) <= per_second, per_window
        assert starts[-1] - starts[0] >= 20 / per_second - 2
        await nc.close()

    asyncio.run(main())


def test_batching_hands_the_handler_lists_and_settles_tasks_one_by_one(
    nats_server: NatsServer,
) -> None:
    spec = {
        "handler": {"python": "tests.runtime.handlers:batch_sum"},
        "concurrency": 16,
        "batching": {"maxSize": 4, "maxWaitMillis": 300},
        "contract": {"input": {"type": "object", "required": ["x"]}},
    }

    async def main() -> None:
        await declare(nats_server.url, "batch", spec)
        nc, js = await connect(nats_server.url)
        async with running(nats_server.url, "batch", spec):
            tasks = await asyncio.gather(*(submit(js, "batch", {"x": i}) for i in range(8)))
            bad = await submit(js, "batch", {"y": 1})
            got = await result_map(js, 9)
        for t in tasks:
            assert got[t.id].output["x"] == t.input["x"]
        assert max(got[t.id].output["batch"] for t in tasks) > 1
        assert all(got[t.id].output["batch"] <= 4 for t in tasks)
        assert got[bad.id].status == "DeadLettered"
        assert got[bad.id].reason == "ContractViolation"
        await nc.close()

    asyncio.run(main())


def test_llm_handler_retries_429_and_500_then_records_usage(nats_server: NatsServer) -> None:
    with OpenAIStub() as stub:
        stub.push(
            rate_limited("0.2"),
            error(500),
            completion('{"category": "billing"}', prompt_tokens=30, completion_tokens=5),
        )
        spec = {
            "handler": {
                "llm": {
                    "baseURL": stub.base_url,
                    "model": "tiny",
                    "systemPrompt": "Classify.",
                    "pricing": {"inputPer1kTokens": "0.5", "outputPer1kTokens": "1"},
                }
            },
            "retry": {"maxAttempts": 3, "backoff": {"initialSeconds": 0.1, "maxSeconds": 0.1}},
            "contract": {"output": {"type": "object", "required": ["category"]}},
        }

        async def main() -> None:
            await declare(nats_server.url, "llm", spec)
            nc, js = await connect(nats_server.url)
            async with running(nats_server.url, "llm", spec):
                task = await submit(js, "llm", {"text": "my invoice is wrong"})
                got = await result_map(js, 1, within=30)
            r = got[task.id]
            assert r.status == "Succeeded"
            assert r.output == {"category": "billing"}
            assert r.attempts == 3
            assert r.usage is not None
            assert (r.usage.input_tokens, r.usage.output_tokens) == (30, 5)
            assert r.usage.cost == "0.02"
            assert len(stub.requests) == 3
            assert stub.requests[0].body["messages"][0] == {
                "role": "system",
                "content": "Classify.",
            }
            await nc.close()

        asyncio.run(main())


def test_tokens_per_minute_hold_tasks_until_the_next_minute(nats_server: NatsServer) -> None:
    spec = {
        "handler": {"python": "tests.runtime.handlers:spender"},
        "concurrency": 1,
        "rateLimit": {"tokensPerMinute": 250},
    }
    now = [6_000_000.0]  # a fake clock at the start of a minute

    async def main() -> None:
        await declare(nats_server.url, "tpm", spec)
        nc, js = await connect(nats_server.url)
        async with running(nats_server.url, "tpm", spec, clock=lambda: now[0]):
            tasks = [await submit(js, "tpm", {"tokens": 100}) for _ in range(4)]
            await result_map(js, 3)
            # 300 tokens spent in this minute: the fourth task waits (queued, not failed).
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                assert len(await results(js)) == 3
                await asyncio.sleep(0.25)
            now[0] += 60  # the next minute
            got = await result_map(js, 4)
        assert all(got[t.id].status == "Succeeded" for t in tasks)
        await nc.close()

    asyncio.run(main())
