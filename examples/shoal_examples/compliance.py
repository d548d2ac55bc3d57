"""Checks a customer against compliance rules: a customer in a sanctioned region is
flagged. Served by two Agents with the capability ``compliance-check``; the Workflow's
``agentSelector`` picks one per task.

The customer's profile comes from the run context when ``auth`` stored it there (no second
CRM query); only outside a run, or if it is missing, is the CRM asked.
"""

from __future__ import annotations

import contextlib
from typing import Any

from shoal_examples import crm
from shoal_examples.auth import PROFILE_KEY
from shoal_runtime.sdk import Context, ContextConflict, PermanentError

# Illustrative only: a real check would ask a maintained sanctions list.
SANCTIONED_REGIONS = frozenset({"CU", "IR", "KP", "SY"})


async def profile_of(customer_id: str, ctx: Context) -> tuple[crm.Profile, str]:
    """The customer's profile and where it came from: ``run-context`` or ``crm``."""
    if ctx.shared is None:
        return crm.lookup(customer_id), "crm"
    stored, version = await ctx.shared.get(PROFILE_KEY)
    # The id check guards against a profile of somebody else (a step fed another id).
    if isinstance(stored, dict) and stored.get("customerId") == customer_id:
        ctx.log.info(
            "%s reused the profile of %s from run %s's context (no CRM query)",
            ctx.agent,
            customer_id,
            ctx.run,
        )
        return stored, "run-context"
    profile = crm.lookup(customer_id)
    # Conditional on the version read above: never overwrite what another step stored in
    # the meantime. On a conflict that step stored it first, and either copy will do.
    with contextlib.suppress(ContextConflict):
        await ctx.shared.put(PROFILE_KEY, profile, version=version)
    return profile, "crm"


async def handle(input: dict[str, Any], ctx: Context) -> dict[str, Any]:
    customer_id = str(input.get("customerId", ""))
    if not customer_id:
        raise PermanentError("customerId is required")
    profile, source = await profile_of(customer_id, ctx)
    region = str(profile.get("region", ""))
    flags = [f"sanctioned-region:{region}"] if region in SANCTIONED_REGIONS else []
    # `checkedBy` and `profileSource` are for people reading the run (`shoal runs get`):
    # which Agent the selector picked, and whether the run context saved a CRM query.
    return {
        "customerId": customer_id,
        "allowed": not flags,
        "flags": flags,
        "checkedBy": ctx.agent,
        "profileSource": source,
    }
