"""Authenticates the customer: looks them up in the (fake) CRM and shares the profile.

In a workflow run the profile goes into the run's shared context (``ctx.shared``, key
``customer``), so later steps of the same run (compliance, support) reuse it instead of
querying the CRM again.
"""

from __future__ import annotations

from typing import Any

from shoal_examples import crm
from shoal_runtime.sdk import Context, PermanentError

PROFILE_KEY = "customer"
"""Where the profile lives in the run context."""


async def handle(input: dict[str, Any], ctx: Context) -> dict[str, Any]:
    customer_id = str(input.get("customerId", ""))
    if not customer_id:
        raise PermanentError("customerId is required")
    profile = crm.lookup(customer_id)
    # ctx.shared is None outside workflow runs (`shoal submit auth`): then nobody is
    # downstream to share with. No version= on the write: auth is this key's only writer,
    # and a retried attempt writes the same value, which leaves the context unchanged.
    if ctx.shared is not None:
        await ctx.shared.put(PROFILE_KEY, profile)
    return {"customerId": customer_id, "authenticated": True, "tier": profile["tier"]}
