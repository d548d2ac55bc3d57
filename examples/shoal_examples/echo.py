"""Returns its input: the smallest possible handler."""

from __future__ import annotations

from typing import Any

from shoal_runtime.sdk import Context


async def handle(input: Any, ctx: Context) -> Any:
    return input
