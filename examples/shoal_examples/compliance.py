"""Checks a customer against compliance rules (blocked ids start with "x")."""

from __future__ import annotations

from typing import Any

from shoal_runtime.sdk import Context


async def handle(input: dict[str, Any], ctx: Context) -> dict[str, Any]:
    customer = str(input.get("customerId", ""))
    blocked = customer.lower().startswith("x")
    return {"customerId": customer, "allowed": not blocked, "checks": ["sanctions", "kyc"]}
