"""Running runtimes against a real nats-server in tests: in-process workers, task
publishing and reading back what JetStream stored."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import nats
from nats.aio.client import Client
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext

from shoal_api import envelope as env
from shoal_api import nats_layout as nl
from shoal_runtime.config import Settings
from shoal_runtime.worker import Worker
from tests.helpers import REPO
from tests.natsutil import declare_agent

NS = "t"
T = TypeVar("T")


def agent_env(url: str, name: str, spec: dict[str, Any], pod: str = "p0") -> dict[str, str]:
    return {
        "SHOAL_NATS_URL": url,
        "SHOAL_NAMESPACE": NS,
        "SHOAL_AGENT": name,
        "SHOAL_POD_NAME": pod,
        "SHOAL_AGENT_CONFIG": json.dumps({"namespace": NS, "name": name, "spec": spec}),
        "SHOAL_HEALTH_PORT": "0",
        "SHOAL_METRICS_PORT": "0",
    }


async def declare(url: str, name: str, spec: dict[str, Any], replicas: int = 1) -> None:
    await declare_agent(url, NS, name, spec, replicas)


@contextlib.asynccontextmanager
async def running(
    url: str, name: str, spec: dict[str, Any], pod: str = "p0", **kw: Any
) -> AsyncIterator[Worker]:
    """An in-process runtime serving ``name`` until the block ends (then it drains)."""
    worker = Worker(Settings.from_env(agent_env(url, name, spec, pod)), **kw)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    while not worker.ready:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield worker
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


def spawn(
    url: str, name: str, spec: dict[str, Any], pod: str, extra: dict[str, str]
) -> subprocess.Popen[bytes]:
    """A runtime as its own process (``python -m shoal_runtime``), as in a pod."""
    environ = {
        **os.environ,
        **agent_env(url, name, spec, pod),
        **extra,
        "PYTHONPATH": str(REPO),
        "SHOAL_LOG_LEVEL": "WARNING",
    }
    return subprocess.Popen([sys.executable, "-m", "shoal_runtime"], env=environ, cwd=REPO)


async def connect(url: str) -> tuple[Client, JetStreamContext]:
    nc = await nats.connect(url)
    return nc, nc.jetstream()


async def submit(
    js: JetStreamContext, agent: str, input: Any, task_id: str | None = None, **fields: Any
) -> env.Task:
    task = env.Task(id=task_id or env.new_task_id(), input=input, **fields)
    await js.publish(
        nl.task_subject(NS, agent, task.priority),
        task.to_json(),
        headers={env.MSG_ID_HEADER: task.msg_id()},
    )
    return task


async def submit_many(js: JetStreamContext, agent: str, inputs: list[Any]) -> list[env.Task]:
    out: list[env.Task] = []
    for start in range(0, len(inputs), 500):
        out += await asyncio.gather(*(submit(js, agent, i) for i in inputs[start : start + 500]))
    return out


async def stored(js: JetStreamContext, stream: str, subjects: str) -> list[dict[str, Any]]:
    """Every message JetStream stored on ``subjects`` (all of them, in order)."""
    info = await js.stream_info(stream)
    if info.state.messages == 0:
        return []
    sub = await js.subscribe(
        subjects,
        stream=stream,
        ordered_consumer=True,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
    )
    out: list[dict[str, Any]] = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=1.0)
            except nats.errors.TimeoutError:
                break
            out.append(json.loads(msg.data))
    finally:
        await sub.unsubscribe()
    return out


async def results(js: JetStreamContext) -> list[env.Result]:
    return [
        env.Result.model_validate(d)
        for d in await stored(js, nl.RESULTS_STREAM, f"shoal.result.{NS}.>")
    ]


async def dead_letters(js: JetStreamContext) -> list[env.DeadLetter]:
    return [
        env.DeadLetter.model_validate(d)
        for d in await stored(js, nl.DLQ_STREAM, f"shoal.dlq.{NS}.>")
    ]


async def until(
    fn: Callable[[], Awaitable[T | None]], within: float = 30, what: str = "condition"
) -> T:
    """Async ``eventually``: polls ``fn`` until truthy or the deadline passes."""
    deadline = time.monotonic() + within
    last: Any = None
    while True:
        try:
            value = await fn()
            if value:
                return value
            last = value
        except Exception as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {within}s; last: {last!r}")
        await asyncio.sleep(0.1)


async def result_map(
    js: JetStreamContext, expected: int, within: float = 60
) -> dict[str, env.Result]:
    """Waits for ``expected`` distinct task results; returns them by task id."""

    async def check() -> dict[str, env.Result] | None:
        by_id = {r.id: r for r in await results(js)}
        return by_id if len(by_id) >= expected else None

    return await until(check, within, f"{expected} results")


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []
