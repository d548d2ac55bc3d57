"""A fake CRM: the customer records that ``auth`` (and, without a run context,
``compliance``) look up. A real deployment would call a CRM's API here; a dict keeps the
examples deterministic and offline."""

from __future__ import annotations

from typing import Any

from shoal_runtime.sdk import PermanentError

Profile = dict[str, Any]

CUSTOMERS: dict[str, Profile] = {
    "c-1001": {"customerId": "c-1001", "name": "Ada Example", "tier": "premium", "region": "GB"},
    "c-1002": {"customerId": "c-1002", "name": "Grace Example", "tier": "plus", "region": "US"},
    # Lives in a sanctioned region: compliance flags it (the approver sees the flag).
    "c-1003": {"customerId": "c-1003", "name": "Sam Example", "tier": "basic", "region": "KP"},
}


def lookup(customer_id: str) -> Profile:
    """The customer's profile (a copy: callers may change it).

    An unknown id is a PermanentError: asking again cannot make the customer exist, so
    the task is dead-lettered at once instead of being retried."""
    try:
        return dict(CUSTOMERS[customer_id])
    except KeyError:
        raise PermanentError(f"unknown customer {customer_id!r}") from None
