"""Handlers the runtime tests load by ``module:callable``, like users' handlers.

Their behaviour is steered through files named in the task input or in environment
variables, so that runtimes in other processes can be steered too.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from shoal_runtime.sdk import Context, PermanentError


async def echo(input: Any, ctx: Context) -> Any:
    return input


def echo_sync(input: Any, ctx: Context) -> Any:
    return {"echo": input, "thread": True}


async def record(input: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Appends the task id to $SHOAL_TEST_RECORD (one line per completed execution)."""
    await asyncio.sleep(float(input.get("sleep", 0)))
    with open(os.environ["SHOAL_TEST_RECORD"], "a") as f:
        f.write(ctx.task_id + "\n")
    return {"n": input.get("n")}


async def flaky(input: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Fails while the file named by $SHOAL_TEST_BROKEN exists."""
    if Path(os.environ["SHOAL_TEST_BROKEN"]).exists():
        raise RuntimeError("backend unavailable")
    return {"ok": True, "by": ctx.agent}


async def picky(input: dict[str, Any], ctx: Context) -> dict[str, Any]:
    if input.get("explode"):
        raise ValueError(f"cannot handle {input['explode']!r}")
    if input.get("refuse"):
        raise PermanentError("refused on purpose")
    if input.get("bad_output"):
        return {"unexpected": True}
    return {"category": "ok"}


async def unsure(input: dict[str, Any], ctx: Context) -> dict[str, Any]:
    ctx.report_confidence(float(input.get("confidence", 0.2)))
    return {"category": "unsure", "by": ctx.agent}


async def spender(input: dict[str, Any], ctx: Context) -> dict[str, Any]:
    ctx.report_usage(input_tokens=int(input.get("tokens", 100)), output_tokens=0)
    return {"spent": input.get("tokens", 100), "by": ctx.agent}


async def slow(input: dict[str, Any], ctx: Context) -> dict[str, Any]:
    await asyncio.sleep(float(input.get("sleep", 10)))
    return {"slept": True}


async def stamp(input: Any, ctx: Context) -> dict[str, float]:
    return {"at": time.time()}


async def batch_sum(inputs: list[Any], ctx: Context) -> list[Any]:
    if not isinstance(inputs, list):
        raise TypeError("expected a batch")
    return [{"x": i["x"], "batch": len(inputs)} for i in inputs]


async def served(input: Any, ctx: Context) -> dict[str, Any]:
    return {"by": ctx.agent}
