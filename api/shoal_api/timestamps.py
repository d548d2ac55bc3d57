"""The one way Shoal spells a point in time: Kubernetes' metav1.Time (RFC 3339, UTC,
whole seconds, ``Z``) and metav1.MicroTime (microseconds). Status, Events, Leases, run
views and metrics all use these, so equal instants always compare equal as text."""

from __future__ import annotations

import datetime as dt
import time

_SECONDS = "%Y-%m-%dT%H:%M:%SZ"
_MICROS = "%Y-%m-%dT%H:%M:%S.%fZ"


def rfc3339(unix: float) -> str:
    """Unix time as metav1.Time (``2026-01-05T07:00:00Z``); fractions are dropped."""
    return dt.datetime.fromtimestamp(unix, dt.UTC).strftime(_SECONDS)


def now_rfc3339() -> str:
    return rfc3339(time.time())


def micro_time(unix: float | None = None) -> str:
    """Unix time (default: now) as metav1.MicroTime (Lease renewTime, Event eventTime)."""
    return dt.datetime.fromtimestamp(time.time() if unix is None else unix, dt.UTC).strftime(
        _MICROS
    )


def unix_time(text: str) -> float:
    """An RFC 3339 time (``Z``, an offset, or none: UTC) as Unix time."""
    at = dt.datetime.fromisoformat(text)
    if at.tzinfo is None:
        at = at.replace(tzinfo=dt.UTC)
    return at.timestamp()
