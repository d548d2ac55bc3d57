"""The client SDK and the ``shoal`` CLI (submit, dlq) against a real nats-server.

There is no runtime in these tests: the test plays it, pulling tasks from the Agent's
durable consumer and publishing results and dead letters as the runtime does.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.js.client import JetStreamContext
from typer.testing import CliRunner
from typer.testing import Result as CliResult

from shoal_api import nats_layout as nl
from shoal_api.envelope import (
    MSG_ID_HEADER,
    DeadLetter,
    Hop,
    Result,
    Task,
    dead_letter_for,
    parse_task,
)
from shoal_cli.cli import app, describe
from shoal_cli.client import (
    ResultTimeoutError,
    ShoalClient,
    ShoalConnectionError,
    StreamsMissingError,
)
from shoal_testbed.cluster import free_port
from shoal_testbed.fixtures import NatsServer
from tests.natsutil import declare_agent
from tests.runtime.support import until

NS = "ns1"
SPEC = {"handler": {"python": "x.y:z"}}


def invoke(*args: str, stdin: str | None = None) -> CliResult:
    result = CliRunner().invoke(app, list(args), input=stdin)
    # Expected failures end in SystemExit with a code; anything else is a bug in the CLI.
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


async def invoke_async(*args: str) -> CliResult:
    """The CLI in a thread (it runs its own event loop), so the test can play the
    runtime meanwhile."""
    return await asyncio.to_thread(invoke, *args)


@pytest.fixture
def url(nats_server: NatsServer) -> str:
    """A nats-server with Shoal's streams and the consumers of Agents echo and other."""

    async def declare() -> None:
        await declare_agent(nats_server.url, NS, "echo", SPEC)
        await declare_agent(nats_server.url, NS, "other", SPEC)

    asyncio.run(declare())
    return nats_server.url


class FakeRuntime:
    """What the runtime does on the wire, driven by the test."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()

    async def take(self, agent: str = "echo") -> tuple[str, str, Task]:
        """The next task of ``agent`` (acked), highest priority band first: its subject,
        msg-id header and envelope."""
        name = await until(lambda: self._first_band_with_work(agent), 10, f"a task for {agent}")
        sub = await self.js.pull_subscribe_bind(consumer=name, stream=nl.TASKS_STREAM)
        try:
            (msg,) = await sub.fetch(1, timeout=10)
        finally:
            await sub.unsubscribe()
        await msg.ack()
        return msg.subject, (msg.headers or {}).get(MSG_ID_HEADER, ""), parse_task(msg.data)

    async def _first_band_with_work(self, agent: str) -> str | None:
        for name in nl.consumer_names(NS, agent):
            if (await self.js.consumer_info(nl.TASKS_STREAM, name)).num_pending:
                return name
        return None

    async def pending(self, agent: str = "echo") -> int:
        """Tasks waiting for ``agent``, in all its priority bands."""
        total = 0
        for name in nl.consumer_names(NS, agent):
            total += (await self.js.consumer_info(nl.TASKS_STREAM, name)).num_pending or 0
        return total

    async def publish_result(self, task: Task, **fields: Any) -> Result:
        fields = {"agent": "echo", "status": "Succeeded", "path": ("echo",), **fields}
        result = Result(id=task.id, replays=task.replays, **fields)
        await self.js.publish(
            nl.result_subject(NS, task.id),
            result.to_json(),
            headers={MSG_ID_HEADER: task.result_msg_id()},
        )
        return result

    async def dead_letter(self, agent: str, task: Task | None, raw: bytes = b"") -> int:
        record = dead_letter_for(NS, agent, "HandlerError", "boom", task, raw=raw or None)
        ack = await self.js.publish(nl.dlq_subject(NS, agent), record.to_json())
        return ack.seq

    async def dlq_seqs(self) -> list[int]:
        client = ShoalClient(self.nc)
        return [seq for seq, _ in await client.dead_letters(NS, limit=None)]


@asynccontextmanager
async def runtime(url: str) -> AsyncIterator[FakeRuntime]:
    nc = await nats.connect(url)
    try:
        yield FakeRuntime(nc)
    finally:
        await nc.close()


@asynccontextmanager
async def client(url: str) -> AsyncIterator[ShoalClient]:
    async with await ShoalClient.connect(url) as c:
        yield c


# -- submit --------------------------------------------------------------------------------


@pytest.mark.nats
def test_submit_publishes_a_valid_envelope_with_its_msg_id(url: str, tmp_path: Path) -> None:
    (tmp_path / "in.json").write_text('{"text": "from a file"}')
    by_arg = invoke(
        "submit", "echo", "-n", NS, "--nats", url, "-i", '{"text": "hi"}', "--priority", "7"
    )
    by_file = invoke("submit", "echo", "-n", NS, "--nats", url, "-i", f"@{tmp_path / 'in.json'}")
    by_stdin = invoke(
        "submit", "echo", "-n", NS, "--nats", url, "-i", "-", stdin='["from", "stdin"]'
    )
    for result in (by_arg, by_file, by_stdin):
        assert result.exit_code == 0, result.output

    async def check() -> None:
        async with runtime(url) as rt:
            subject, msg_id, task = await rt.take()
            assert subject == nl.task_subject(NS, "echo", 7)
            assert task.id == by_arg.stdout.strip()
            assert msg_id == task.msg_id() == f"{task.id}.0"
            assert (task.input, task.priority, task.attempt, task.replays) == (
                {"text": "hi"},
                7,
                1,
                0,
            )
            _, _, task = await rt.take()
            assert (task.id, task.input) == (by_file.stdout.strip(), {"text": "from a file"})
            _, _, task = await rt.take()
            assert (task.id, task.input) == (by_stdin.stdout.strip(), ["from", "stdin"])

    asyncio.run(check())


@pytest.mark.nats
def test_a_resubmitted_id_is_queued_once(url: str) -> None:
    args = ("submit", "echo", "-n", NS, "--nats", url, "--id", "order-42", "-i", "1")
    first, second = invoke(*args), invoke(*args)
    assert (first.exit_code, second.exit_code) == (0, 0)
    assert first.stdout.strip() == second.stdout.strip() == "order-42"
    assert "submitted already" not in first.stderr
    assert "submitted already" in second.stderr

    async def check() -> None:
        async with runtime(url) as rt:
            assert await rt.pending() == 1

    asyncio.run(check())


@pytest.mark.nats
def test_run_task_waits_for_the_result(url: str) -> None:
    async def scenario() -> None:
        async with client(url) as c, runtime(url) as rt:
            running = asyncio.create_task(c.run_task(NS, "echo", {"n": 1}, timeout=20))
            _, _, task = await rt.take()
            assert task.input == {"n": 1}
            sent = await rt.publish_result(task, output={"n": 2})
            assert await running == sent

    asyncio.run(scenario())


@pytest.mark.nats
def test_wait_result_finds_a_result_published_before_it_started(url: str) -> None:
    async def scenario() -> None:
        async with client(url) as c, runtime(url) as rt:
            submitted = await c.submit(NS, "echo", "x", task_id="early-bird")
            assert await c.get_result(NS, submitted.id) is None
            _, _, task = await rt.take()
            sent = await rt.publish_result(task, output="done")
            assert await c.get_result(NS, task.id) == sent
            assert await c.wait_result(NS, task.id, timeout=10) == sent

    asyncio.run(scenario())


@pytest.mark.nats
def test_a_watch_passes_over_results_of_earlier_replays(url: str) -> None:
    async def scenario() -> None:
        async with client(url) as c, runtime(url) as rt:
            task = Task(id="again", input=1)
            await rt.publish_result(task, status="DeadLettered", reason="HandlerError")
            replayed = task.model_copy(update={"replays": 1})
            async with c.watch_result(NS, task.id, min_replays=1) as watch:
                with pytest.raises(ResultTimeoutError):
                    await watch.wait(0.5)
                sent = await rt.publish_result(replayed, output="second time lucky")
                assert await watch.wait(10) == sent

    asyncio.run(scenario())


@pytest.mark.nats
def test_submit_wait_prints_output_and_where_the_task_went(url: str) -> None:
    async def scenario() -> CliResult:
        async with runtime(url) as rt:
            cli = asyncio.create_task(
                invoke_async("submit", "echo", "-n", NS, "--nats", url, "-i", "{}", "--wait")
            )
            _, _, task = await rt.take()
            await rt.publish_result(
                task, agent="echo-large", path=("echo", "echo-large"), output={"answer": 42}
            )
            return await cli

    result = asyncio.run(scenario())
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"answer": 42}
    assert "succeeded: served by echo-large after echo passed it on" in result.stderr


@pytest.mark.nats
def test_submit_wait_json_prints_the_result_record(url: str) -> None:
    async def scenario() -> CliResult:
        async with runtime(url) as rt:
            cli = asyncio.create_task(
                invoke_async("submit", "echo", "-n", NS, "--nats", url, "--wait", "-o", "json")
            )
            _, _, task = await rt.take()
            await rt.publish_result(task, output="ok", cached=True)
            return await cli

    result = asyncio.run(scenario())
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert (record["status"], record["output"], record["cached"]) == ("Succeeded", "ok", True)


@pytest.mark.nats
def test_submit_wait_exits_1_when_the_task_is_dead_lettered(url: str) -> None:
    async def scenario() -> CliResult:
        async with runtime(url) as rt:
            cli = asyncio.create_task(
                invoke_async("submit", "echo", "-n", NS, "--nats", url, "--wait")
            )
            _, _, task = await rt.take()
            await rt.publish_result(
                task, status="DeadLettered", reason="HandlerError", message="boom"
            )
            return await cli

    result = asyncio.run(scenario())
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert "dead-lettered by echo: HandlerError: boom" in result.stderr


@pytest.mark.nats
def test_submit_wait_exits_4_when_no_result_comes_in_time(url: str) -> None:
    started = time.monotonic()
    result = invoke(
        "submit", "echo", "-n", NS, "--nats", url, "--id", "slow", "--wait", "--timeout", "0.5"
    )
    assert result.exit_code == 4, result.output
    assert time.monotonic() - started < 10
    assert "error: no result for task slow within 0.5s" in result.stderr


# -- failures ------------------------------------------------------------------------------


def test_bad_input_is_exit_2_with_one_clear_line(tmp_path: Path) -> None:
    missing = invoke("submit", "echo", "-i", f"@{tmp_path / 'nope.json'}")
    assert missing.exit_code == 2
    assert (
        missing.stderr
        == f"error: cannot read input file {tmp_path / 'nope.json'}: No such file or directory\n"
    )

    (tmp_path / "bad.json").write_text("{not json")
    bad = invoke("submit", "echo", "-i", f"@{tmp_path / 'bad.json'}")
    assert bad.exit_code == 2
    assert bad.stderr.startswith(f"error: {tmp_path / 'bad.json'} is not valid JSON:")
    assert bad.stderr.count("\n") == 1

    bare = invoke("submit", "echo", "-i", "hello")
    assert bare.exit_code == 2
    assert "a string needs quotes" in bare.stderr

    for args in (("submit", "no.dots"), ("submit", "echo", "--id", "a b"), ("dlq", "replay")):
        assert invoke(*args).exit_code == 2, args


def test_unreachable_nats_is_exit_3_without_a_traceback() -> None:
    port = free_port()  # nothing listens there
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "shoal_cli.cli",
            "submit",
            "echo",
            "--nats",
            f"nats://127.0.0.1:{port}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.startswith(f"error: cannot connect to NATS at nats://127.0.0.1:{port}")
    assert proc.stderr.count("\n") == 1, proc.stderr


def test_connect_fails_fast_instead_of_retrying() -> None:
    async def attempt() -> float:
        started = time.monotonic()
        with pytest.raises(ShoalConnectionError):
            await ShoalClient.connect(f"nats://127.0.0.1:{free_port()}", timeout=30)
        return time.monotonic() - started

    assert asyncio.run(attempt()) < 10


@pytest.mark.nats
def test_missing_streams_are_exit_3_and_name_the_operator(nats_server: NatsServer) -> None:
    result = invoke("submit", "echo", "-n", NS, "--nats", nats_server.url)
    assert result.exit_code == 3, result.output
    assert "streams do not exist" in result.stderr
    assert "operator running" in result.stderr

    async def sdk() -> None:
        async with client(nats_server.url) as c:
            with pytest.raises(StreamsMissingError):
                await c.wait_result(NS, "x", timeout=1)
            with pytest.raises(StreamsMissingError):
                await c.get_result(NS, "x")
            with pytest.raises(StreamsMissingError):
                await c.dead_letters(NS)

    asyncio.run(sdk())


# -- dead letters --------------------------------------------------------------------------


async def seed(rt: FakeRuntime) -> dict[str, int]:
    """Dead letters: two from echo (one escalated there from other), one from other, one
    whose envelope could not be parsed, and one of another namespace."""
    escalated = Task(
        id="escalated",
        input={"q": 2},
        priority=8,
        attempt=3,
        path=(Hop(agent="other", reason="escalation", detail="low confidence"),),
    )
    seqs = {
        "plain": await rt.dead_letter("echo", Task(id="plain", input={"q": 1}, attempt=4)),
        "escalated": await rt.dead_letter("echo", escalated),
        "other": await rt.dead_letter("other", Task(id="of-other", input=None)),
        "malformed": await rt.dead_letter("echo", None, raw=b"{not an envelope"),
    }
    foreign = dead_letter_for("ns2", "echo", "HandlerError", "elsewhere", Task(id="foreign"))
    await rt.js.publish(nl.dlq_subject("ns2", "echo"), foreign.to_json())
    return seqs


@pytest.mark.nats
def test_dlq_list_shows_the_dead_letters_of_the_namespace(url: str) -> None:
    async def seeded() -> dict[str, int]:
        async with runtime(url) as rt:
            return await seed(rt)

    seqs = asyncio.run(seeded())
    table = invoke("dlq", "list", "-n", NS, "--nats", url)
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["SEQ", "AGENT", "REASON", "TASK", "AGE", "MESSAGE"]
    rows = [line.split() for line in lines[1:]]
    assert [(r[0], r[1], r[3]) for r in rows] == [
        (str(seqs["plain"]), "echo", "plain"),
        (str(seqs["escalated"]), "echo", "escalated"),
        (str(seqs["other"]), "other", "of-other"),
        (str(seqs["malformed"]), "echo", "(unparsable)"),
    ]
    assert all(r[2] == "HandlerError" and r[-1] == "boom" for r in rows)

    as_json = invoke("dlq", "list", "-n", NS, "--nats", url, "--agent", "echo", "-o", "json")
    assert as_json.exit_code == 0, as_json.output
    entries = json.loads(as_json.stdout)
    assert [e["seq"] for e in entries] == [seqs["plain"], seqs["escalated"], seqs["malformed"]]
    assert DeadLetter.model_validate({k: v for k, v in entries[1].items() if k != "seq"}).task

    newest = invoke("dlq", "list", "-n", NS, "--nats", url, "--limit", "2", "-o", "json")
    assert [e["seq"] for e in json.loads(newest.stdout)] == [seqs["other"], seqs["malformed"]]

    empty = invoke("dlq", "list", "-n", "ns3", "--nats", url)
    assert (empty.exit_code, empty.stdout) == (0, "")
    assert "no dead letters in ns3" in empty.stderr


@pytest.mark.nats
def test_dlq_replay_all_republishes_to_the_original_agent_and_skips_malformed(url: str) -> None:
    async def scenario() -> None:
        async with runtime(url) as rt:
            seqs = await seed(rt)
            result = await invoke_async("dlq", "replay", "-n", NS, "--nats", url, "--all")
            assert result.exit_code == 0, result.output
            assert f"skipped {seqs['malformed']}: no parsable task" in result.stderr
            assert "3 replayed, 1 skipped" in result.stderr

            # Priority 8 (the high band) comes out before the older priority 5.
            subject, msg_id, escalated = await rt.take("echo")
            assert (escalated.id, escalated.attempt, escalated.replays) == ("escalated", 1, 1)
            assert subject == nl.task_subject(NS, "echo", 8)
            assert [h.agent for h in escalated.path] == ["other"]
            assert msg_id == escalated.msg_id() == "escalated.1.escalation.other"

            subject, msg_id, plain = await rt.take("echo")
            assert (plain.id, plain.input, plain.attempt, plain.replays) == (
                "plain",
                {"q": 1},
                1,
                1,
            )
            assert (subject, msg_id) == (nl.task_subject(NS, "echo", 5), "plain.1")

            _, _, of_other = await rt.take("other")
            assert (of_other.id, of_other.replays) == ("of-other", 1)
            assert (await rt.pending("echo"), await rt.pending("other")) == (0, 0)

            # Replayed entries leave the DLQ; the one that cannot be replayed stays.
            assert await rt.dlq_seqs() == [seqs["malformed"]]

    asyncio.run(scenario())


@pytest.mark.nats
def test_dlq_replay_by_seq_and_agent(url: str) -> None:
    async def scenario() -> None:
        async with runtime(url) as rt:
            seqs = await seed(rt)
            result = await invoke_async(
                "dlq", "replay", "-n", NS, "--nats", url,
                "--seq", str(seqs["plain"]), "--seq", str(seqs["other"]), "--seq", "999",
                "--agent", "echo", "--keep",
            )  # fmt: skip
            assert result.exit_code == 0, result.output
            assert f"replayed {seqs['plain']}: task plain -> shoal.task.ns1.echo.5" in result.stdout
            assert f"skipped {seqs['other']}: dead-lettered by other" in result.stderr
            assert "skipped 999: no dead letter of ns1" in result.stderr

            _, _, plain = await rt.take("echo")
            assert (plain.id, plain.replays) == ("plain", 1)
            assert (await rt.pending("echo"), await rt.pending("other")) == (0, 0)
            assert seqs["plain"] in await rt.dlq_seqs()  # --keep

            # The same replay again is a duplicate publish: nothing queued twice.
            async with client(url) as c:
                report = await c.replay(NS, [seqs["plain"]])
            assert report.replayed == []
            assert report.skipped[0].reason.startswith("replayed already")
            assert await rt.pending("echo") == 0

    asyncio.run(scenario())


@pytest.mark.nats
def test_dlq_replay_does_not_touch_other_namespaces(url: str) -> None:
    async def scenario() -> None:
        async with runtime(url) as rt:
            await seed(rt)
            async with client(url) as c:
                (foreign,) = [s for s, dl in await c.dead_letters("ns2")]
                report = await c.replay(NS, [foreign])
            assert report.replayed == []
            assert report.skipped[0].reason == "no dead letter of ns1"

    asyncio.run(scenario())


# -- describe ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"path": ("echo",)}, "succeeded: served by echo"),
        ({"path": ("echo",), "cached": True}, "succeeded: cached result of echo"),
        ({"path": ("echo",), "attempts": 3}, "succeeded: served by echo in 3 attempts"),
        (
            {"agent": "big", "path": ("echo", "mid", "big")},
            "succeeded: served by big after echo -> mid passed it on",
        ),
        (
            {
                "status": "DeadLettered",
                "reason": "Timeout",
                "message": "took 30s",
                "path": ("echo",),
            },
            "dead-lettered by echo: Timeout: took 30s",
        ),
        ({"agent": "big", "path": ()}, "succeeded: served by big after echo passed it on"),
        (
            {
                "agent": "large",
                "path": ("echo", "large"),
                "hops": (Hop(agent="echo", reason="escalation", detail="confidence 0.20 < 0.6"),),
            },
            "succeeded: served by large after escalation from echo (confidence 0.20 < 0.6)",
        ),
    ],
)
def test_describe(fields: dict[str, Any], expected: str) -> None:
    result = Result(id="t", **{"agent": "echo", "status": "Succeeded", **fields})
    assert describe(result, "echo") == expected


@pytest.mark.nats
def test_a_wait_survives_a_nats_restart(nats_server: NatsServer, url: str) -> None:
    async def scenario() -> None:
        async with client(url) as c, c.watch_result(NS, "through-restart") as watch:
            await asyncio.to_thread(nats_server.restart)
            async with runtime(url) as rt:
                sent = await rt.publish_result(Task(id="through-restart"), output=1)
            assert await watch.wait(60) == sent

    asyncio.run(scenario())
