"""The runtime against a real nats-server: results, contracts, dead letters, duplicates."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from shoal_api import envelope as env
from shoal_api import nats_layout as nl
from shoal_api.runtime_state import PodStats
from shoal_testbed.fixtures import NatsServer
from tests.runtime.support import (
    NS,
    connect,
    dead_letters,
    declare,
    result_map,
    results,
    running,
    submit,
    until,
)

pytestmark = pytest.mark.nats


def test_results_are_recorded_and_sync_handlers_run_in_threads(nats_server: NatsServer) -> None:
    async def main() -> None:
        spec = {"handler": {"python": "tests.runtime.handlers:echo_sync"}, "concurrency": 4}
        await declare(nats_server.url, "echo", spec)
        nc, js = await connect(nats_server.url)
        async with running(nats_server.url, "echo", spec):
            tasks = [await submit(js, "echo", {"n": i}) for i in range(20)]
            got = await result_map(js, 20)
        assert {t.id for t in tasks} == set(got)
        for t in tasks:
            r = got[t.id]
            assert r.status == "Succeeded"
            assert r.output == {"echo": t.input, "thread": True}
            assert r.path == ("echo",)
            assert r.attempts == 1
        await nc.close()

    asyncio.run(main())


def test_bad_input_dead_letters_with_reasons_and_the_rest_complete(nats_server: NatsServer) -> None:
    spec: dict[str, Any] = {
        "handler": {"python": "tests.runtime.handlers:picky"},
        "contract": {
            "input": {"type": "object", "properties": {"text": {"type": "string"}}},
            "output": {"type": "object", "required": ["category"]},
        },
        "retry": {"maxAttempts": 2, "backoff": {"initialSeconds": 0.1, "maxSeconds": 0.1}},
    }

    async def main() -> None:
        await declare(nats_server.url, "picky", spec)
        nc, js = await connect(nats_server.url)
        async with running(nats_server.url, "picky", spec):
            # Poison: not an envelope at all, and an envelope with a wrong field.
            subject = nl.task_subject(NS, "picky", 5)
            await js.publish(subject, b"\xff not json", headers={env.MSG_ID_HEADER: "poison-1"})
            await js.publish(subject, b'{"id": "p2", "input": {}, "colour": "red"}')
            schema_bad = await submit(js, "picky", {"text": 42})
            raises = await submit(js, "picky", {"explode": "this one"})
            refuses = await submit(js, "picky", {"refuse": True})
            bad_output = await submit(js, "picky", {"bad_output": True})
            good = [await submit(js, "picky", {"text": f"fine {i}"}) for i in range(10)]

            async def six_dead() -> list[env.DeadLetter] | None:
                dl = await dead_letters(js)
                return dl if len(dl) >= 6 else None

            dead = await until(six_dead, 30, "six dead letters")
            got = await result_map(js, 14)
        by_task = {d.task.id: d for d in dead if d.task is not None}
        malformed = [d for d in dead if d.task is None]
        assert len(malformed) == 2
        assert {d.reason for d in malformed} == {"MalformedEnvelope"}
        assert any("colour" in d.message for d in malformed)
        assert any(d.raw is not None and "not json" in d.raw for d in malformed)
        assert by_task[schema_bad.id].reason == "ContractViolation"
        assert "text" in by_task[schema_bad.id].message
        assert by_task[raises.id].reason == "HandlerError"
        assert "cannot handle 'this one'" in by_task[raises.id].message
        assert by_task[raises.id].attempts == 2
        assert by_task[refuses.id].reason == "HandlerError"
        assert by_task[refuses.id].attempts == 1
        assert by_task[bad_output.id].reason == "OutputContractViolation"
        for t in good:
            assert got[t.id].status == "Succeeded", got[t.id]
            assert got[t.id].output == {"category": "ok"}
        assert got[raises.id].status == "DeadLettered"
        assert got[raises.id].reason == "HandlerError"
        await nc.close()

    asyncio.run(main())


def test_a_redelivered_task_with_a_result_is_acknowledged_without_running(
    nats_server: NatsServer, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = tmp_path / "record"
    monkeypatch.setenv("SHOAL_TEST_RECORD", str(record))
    spec = {"handler": {"python": "tests.runtime.handlers:record"}}

    async def main() -> None:
        await declare(nats_server.url, "rec", spec)
        nc, js = await connect(nats_server.url)
        task = await submit(js, "rec", {"n": 1})
        # A result already exists (a worker stored it and died before acknowledging).
        done = env.Result(id=task.id, agent="rec", status="Succeeded", output={"n": 1})
        await js.publish(
            nl.result_subject(NS, task.id),
            done.to_json(),
            headers={env.MSG_ID_HEADER: task.result_msg_id()},
        )
        sub = await js.pull_subscribe_bind(
            durable=nl.consumer_name(NS, "rec"), stream=nl.TASKS_STREAM
        )
        (msg,) = await sub.fetch(1, timeout=5)
        await msg.nak()  # the first delivery "dies"; JetStream delivers again
        await sub.unsubscribe()
        async with running(nats_server.url, "rec", spec) as worker:

            async def acked() -> bool:
                info = await js.consumer_info(nl.TASKS_STREAM, nl.consumer_name(NS, "rec"))
                return bool(info.num_pending == 0 and info.num_ack_pending == 0)

            await until(acked, 20, "task acknowledged")
            assert worker.metrics.outcome["duplicate"]._value.get() == 1
        assert not record.exists()
        assert len([r for r in await results(js) if r.id == task.id]) == 1
        await nc.close()

    asyncio.run(main())


def test_the_runtime_keeps_serving_across_a_nats_server_restart(nats_server: NatsServer) -> None:
    spec = {"handler": {"python": "tests.runtime.handlers:echo"}}

    async def main() -> None:
        await declare(nats_server.url, "echo", spec)
        async with running(nats_server.url, "echo", spec):
            nc, js = await connect(nats_server.url)
            before = await submit(js, "echo", {"n": 1})
            await result_map(js, 1)
            await nc.close()
            await asyncio.to_thread(nats_server.restart)
            nc, js = await connect(nats_server.url)
            after = await submit(js, "echo", {"n": 2})
            got = await result_map(js, 2, within=30)
        assert got[before.id].output == {"n": 1}
        assert got[after.id].output == {"n": 2}
        await nc.close()

    asyncio.run(main())


def test_progress_heartbeats_keep_a_long_task_from_being_redelivered(
    nats_server: NatsServer, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = tmp_path / "record"
    monkeypatch.setenv("SHOAL_TEST_RECORD", str(record))
    spec = {"handler": {"python": "tests.runtime.handlers:record"}, "timeoutSeconds": 30}

    async def main() -> None:
        await declare(nats_server.url, "long", spec)
        nc, js = await connect(nats_server.url)
        # A consumer whose ack wait (1.5 s) is far shorter than the task (5 s).
        consumer = nl.consumer_name(NS, "long")
        info = await js.consumer_info(nl.TASKS_STREAM, consumer)
        config = info.config
        config.ack_wait, config.backoff = 1.5, None
        await js.add_consumer(nl.TASKS_STREAM, config)
        async with running(nats_server.url, "long", spec):
            task = await submit(js, "long", {"n": 1, "sleep": 5})
            got = await result_map(js, 1, within=30)
        assert got[task.id].attempts == 1
        assert record.read_text().split() == [task.id]
        info = await js.consumer_info(nl.TASKS_STREAM, consumer)
        assert info.num_redelivered == 0
        await nc.close()

    asyncio.run(main())


def test_the_runtime_reports_its_live_figures_to_the_stats_bucket(
    nats_server: NatsServer,
) -> None:
    spec = {"handler": {"python": "tests.runtime.handlers:slow"}, "concurrency": 4}

    async def main() -> None:
        await declare(nats_server.url, "slow", spec)
        nc, js = await connect(nats_server.url)
        kv = await js.key_value(nl.STATS_BUCKET)

        async def stats() -> PodStats | None:
            entry = await kv.get(nl.stats_key(NS, "slow", "p0"))
            return PodStats.model_validate_json(entry.value or b"")

        async with running(nats_server.url, "slow", spec):
            for _ in range(3):
                await submit(js, "slow", {"sleep": 0.2})
            await submit(js, "slow", {"sleep": 4})
            await result_map(js, 3)

            async def settled() -> PodStats | None:
                s = await stats()
                return s if s and s.completed == 3 and s.in_flight == 1 else None

            reported = await until(settled, 10, "stats with 3 done, 1 in flight")
            assert 150 <= reported.p95_ms <= 1000
            assert reported.pod == "p0"
        await nc.close()

    asyncio.run(main())
