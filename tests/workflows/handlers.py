"""Step handlers of the workflow tests, loaded by ``module:callable`` like users' own.

Each appends one JSON line per execution to ``$SHOAL_TEST_TIMELINE`` (when set), with the
step, task, Agent and the execution window: the tests read the timeline to check what
ran, how often, and what overlapped.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

from shoal_runtime.sdk import Context, PermanentError


def _note(ctx: Context, start: float, **extra: Any) -> None:
    path = os.environ.get("SHOAL_TEST_TIMELINE")
    if not path:
        return
    line = {
        "run": ctx.run,
        "step": ctx.step,
        "task": ctx.task_id,
        "agent": ctx.agent,
        "start": start,
        "end": time.time(),
        **extra,
    }
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


async def work(input: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Sleeps ``input.sleep`` seconds; answers with what it was given and who it was."""
    start = time.time()
    await asyncio.sleep(float(input.get("sleep", 0)))
    _note(ctx, start)
    return {"by": ctx.agent, "got": input, "category": input.get("category", "billing")}


async def fail(input: dict[str, Any], ctx: Context) -> dict[str, Any]:
    start = time.time()
    _note(ctx, start, failed=True)
    raise PermanentError("this Agent always fails")


async def remember(input: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Stores ``input.value`` under ``input.key`` in the run's shared context."""
    start = time.time()
    assert ctx.shared is not None, "a run's task has a shared context"
    current, version = await ctx.shared.get(input["key"])
    if current is None:
        version = await ctx.shared.put(input["key"], input["value"], version=version)
    _note(ctx, start)
    return {"version": version}


async def recall(input: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Reads ``input.key`` from the run's shared context."""
    start = time.time()
    assert ctx.shared is not None
    value, version = await ctx.shared.get(input["key"])
    _note(ctx, start)
    return {"value": value, "version": version}
