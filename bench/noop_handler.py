"""The Shoal handler of bench/runtime_throughput.py: a no-op that returns its input."""

from __future__ import annotations

from typing import Any

from shoal_runtime.sdk import Context


async def handle(input: Any, ctx: Context) -> Any:
    return input
