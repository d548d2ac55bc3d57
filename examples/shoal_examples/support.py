"""Drafts the answer to the customer; ``handle_basic`` is the template fallback."""

from __future__ import annotations

from typing import Any

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
    return {"answer": f"{opening} (re: {text[:80]})", "category": category}


async def handle_basic(input: dict[str, Any], ctx: Context) -> dict[str, Any]:
    return {"answer": TEMPLATES["general"], "category": "general"}
