"""Looks up the customer (a deterministic stand-in for a CRM call)."""

from __future__ import annotations

import hashlib
from typing import Any

from shoal_runtime.sdk import Context, PermanentError


async def handle(input: dict[str, Any], ctx: Context) -> dict[str, Any]:
    customer = str(input.get("customerId", ""))
    if not customer:
        raise PermanentError("customerId is required")
    tier = ("basic", "plus", "premium")[hashlib.sha256(customer.encode()).digest()[0] % 3]
    return {"customerId": customer, "authenticated": True, "tier": tier}
