"""Drafts the answer to the customer; ``handle_basic`` is the template fallback (the
``support-basic`` Agent), used when ``support`` keeps failing."""

from __future__ import annotations

from typing import Any

from shoal_examples.auth import PROFILE_KEY
from shoal_runtime.sdk import Context

TEMPLATES = {
    "billing": "We have received your billing question and will correct any error within 2 days.",
    "technical": "Our engineers are looking into the problem; try signing out and in again.",
    "general": "Thank you for your message; we will get back to you shortly.",
}


async def handle(input: dict[str, Any], ctx: Context) -> dict[str, Any]:
    category = str(input.get("category", "general"))
    text = str(input.get("text", ""))
    opening = TEMPLATES.get(category, TEMPLATES["general"])
    # In a run, auth left the profile in the run context: greet the customer by name
    # without another CRM query. Outside a run there is no name; the answer stays valid.
    greeting = "Hello!"
    if ctx.shared is not None:
        profile, _ = await ctx.shared.get(PROFILE_KEY)
        if isinstance(profile, dict) and profile.get("name"):
            greeting = f"Hello {profile['name']}!"
    return {"answer": f"{greeting} {opening} (re: {text[:80]})", "category": category}


async def handle_basic(input: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """The fallback: no model, no context, one safe template."""
    return {"answer": TEMPLATES["general"], "category": "general", "fallback": True}
