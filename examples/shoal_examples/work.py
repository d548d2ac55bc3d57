"""Simulated work for load tests and the autoscaling demo: sleeps ``input.seconds``.

With ``$SHOAL_WORK_LOG`` set, each completed task id is appended to that file (one line
per execution), so a test can prove no task ran twice across scale-out and scale-in.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from shoal_runtime.sdk import Context


def _log(path: str, task_id: str) -> None:
    with open(path, "a") as f:
        f.write(task_id + "\n")


async def handle(input: dict[str, Any], ctx: Context) -> dict[str, Any]:
    await asyncio.sleep(float(input.get("seconds", 0.1)))
    if path := os.environ.get("SHOAL_WORK_LOG"):
        await asyncio.to_thread(_log, path, ctx.task_id)
    return {"done": input.get("n"), "pod": os.environ.get("SHOAL_POD_NAME", "")}
