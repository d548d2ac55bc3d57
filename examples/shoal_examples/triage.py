"""Classifies customer inquiries into billing | technical | spam | general.

``handle`` is the batching Agent of examples/triage.yaml (``spec.batching``): it gets a
list of inputs and answers with a list. Each answer carries its own ``confidence``
(a batch shares one context), so only the unsure ones are escalated to ``triage-large``.
"""

from __future__ import annotations

from typing import Any

from shoal_runtime.sdk import Context

KEYWORDS = {
    "billing": ("invoice", "refund", "charge", "payment", "bill", "price"),
    "technical": ("error", "crash", "login", "password", "bug", "broken", "install"),
    "spam": ("winner", "lottery", "click here", "free money", "crypto offer"),
}


def classify(text: str) -> tuple[str, float]:
    lowered = text.lower()
    hits = {c: sum(k in lowered for k in words) for c, words in KEYWORDS.items()}
    best = max(hits, key=lambda c: hits[c])
    if hits[best] == 0:
        return "general", 0.4
    return best, min(0.95, 0.55 + 0.2 * hits[best])


async def handle(inputs: list[dict[str, Any]], ctx: Context) -> list[dict[str, Any]]:
    answers = [classify(i["text"]) for i in inputs]
    return [{"category": c, "confidence": round(conf, 2)} for c, conf in answers]


async def handle_small(input: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """The cheap fallback: keywords only, no confidence."""
    category, _ = classify(input["text"])
    return {"category": category, "model": "small"}


async def handle_large(input: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """The stronger model: never less than fairly sure."""
    category, conf = classify(input["text"])
    ctx.report_confidence(max(conf, 0.8))
    return {"category": category, "model": "large"}
