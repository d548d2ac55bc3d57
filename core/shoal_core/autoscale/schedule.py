"""Schedule windows: the floor pre-warm windows set at a given instant.

A window starts at every fire time of its cron expression (5 fields, or a macro such as
``@daily``), read in the window's IANA time zone, and lasts ``durationMinutes``. It is
active when the latest fire time at or before ``now`` is less than ``durationMinutes``
ago, so a window that fires again before it ends simply goes on.

Windows that :func:`validate_window` rejects are skipped by the other functions: the
operator reports them once in the policy's status instead of failing every second.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, tzinfo
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from shoal_api.scaling import ScheduleWindow

MACROS = frozenset(
    {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
)
# croniter's get_prev() is strictly before its base; a window that fires exactly at
# `now` has started, so the search starts a hair later.
_JUST_AFTER = timedelta(microseconds=1)


def validate_window(w: ScheduleWindow) -> str | None:
    """Why ``w`` cannot be used (a bad cron expression or an unknown time zone), else None."""
    return _problem(w.cron, w.time_zone)


# The operator asks every second about the same few windows; parsing is the slow part.
@lru_cache(maxsize=1024)
def _problem(cron: str, time_zone: str) -> str | None:
    fields = cron.split()
    if cron.startswith("@"):
        if cron not in MACROS:
            return f"cron {cron!r}: unknown macro (one of {', '.join(sorted(MACROS))})"
    elif len(fields) != 5:
        # croniter also takes a seconds or a year field; Kubernetes CronJobs do not.
        return (
            f"cron {cron!r} has {len(fields)} fields; it needs 5"
            " (minute hour day-of-month month day-of-week)"
        )
    elif not croniter.is_valid(cron):
        return f"cron {cron!r} is not a valid cron expression"
    if _zone(time_zone) is None:
        return f"time zone {time_zone!r} is not a known IANA time zone (e.g. Europe/Berlin)"
    return None


def describe_window(w: ScheduleWindow) -> str:
    """The window in the words of ``Plan.reasons``: ``schedule 0 8 * * 1-5 (UTC) minReplicas 3``."""
    return f"schedule {w.cron} ({w.time_zone}) minReplicas {w.min_replicas}"


def schedule_floor(
    windows: Sequence[ScheduleWindow], now: datetime
) -> tuple[int, ScheduleWindow | None]:
    """The highest ``minReplicas`` among the windows active at ``now`` (an aware datetime),
    and that window; ``(0, None)`` when none is active."""
    at = _utc(now)
    best: tuple[int, ScheduleWindow | None] = (0, None)
    for w in windows:
        zone = _usable_zone(w)
        if zone is None:
            continue
        started = _last_fire(w.cron, zone, at)
        if at - started < timedelta(minutes=w.duration_minutes) and (
            best[1] is None or w.min_replicas > best[0]
        ):
            best = (w.min_replicas, w)
    return best


def next_boundary(windows: Sequence[ScheduleWindow], now: datetime) -> datetime | None:
    """The next instant after ``now`` at which a window starts or ends, in ``now``'s time
    zone; None without usable windows.

    The floor cannot change before it, so a caller evaluates :func:`schedule_floor` again
    only then. It may be an instant where nothing changes (a window firing again while it
    is still active), never later than a real change.
    """
    at = _utc(now)
    soonest: datetime | None = None
    for w in windows:
        zone = _usable_zone(w)
        if zone is None:
            continue
        end = _last_fire(w.cron, zone, at) + timedelta(minutes=w.duration_minutes)
        for c in (_next_fire(w.cron, zone, at), end):
            if c > at and (soonest is None or c < soonest):
                soonest = c
    return None if soonest is None else soonest.astimezone(now.tzinfo)


# Fire times are wall-clock times in the window's zone. croniter's own handling of aware
# datetimes misses fires around a daylight-saving change, so it only ever sees naive wall
# times here, and each is turned into an instant the PEP 495 way (fold=0): a wall time
# that occurs twice fires the first time, one skipped by a spring-forward fires as if the
# clock had not moved (02:30 CET, i.e. 03:30 CEST). Near a change wall time and instants
# are out of step by the size of the change, so the search looks that much further.


def _last_fire(cron: str, zone: tzinfo, at: datetime) -> datetime:
    """The latest fire instant <= ``at`` (UTC)."""
    local, margin = _wall(at, zone), _shift(zone, at)
    fires = croniter(cron, local + margin + _JUST_AFTER)
    best: datetime | None = None
    while True:
        wall: datetime = fires.get_prev(datetime)
        instant = _instant(wall, zone)
        if instant <= at and (best is None or instant > best):
            best = instant
        if wall <= local - margin and best is not None:
            return best


def _next_fire(cron: str, zone: tzinfo, at: datetime) -> datetime:
    """The earliest fire instant > ``at`` (UTC)."""
    local, margin = _wall(at, zone), _shift(zone, at)
    fires = croniter(cron, local - margin)
    best: datetime | None = None
    while True:
        wall: datetime = fires.get_next(datetime)
        instant = _instant(wall, zone)
        if instant > at and (best is None or instant < best):
            best = instant
        if wall > local + margin and best is not None:
            return best


def _wall(at: datetime, zone: tzinfo) -> datetime:
    return at.astimezone(zone).replace(tzinfo=None)


def _instant(wall: datetime, zone: tzinfo) -> datetime:
    return wall.replace(tzinfo=zone, fold=0).astimezone(UTC)


def _shift(zone: tzinfo, at: datetime) -> timedelta:
    """How far wall time and instants can be out of step within a day of ``at``."""
    offsets = [
        (at + timedelta(days=d)).astimezone(zone).utcoffset() or timedelta(0) for d in (-1, 0, 1)
    ]
    return max(offsets) - min(offsets)


def _utc(now: datetime) -> datetime:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be an aware datetime (with a time zone)")
    return now.astimezone(UTC)


def _usable_zone(w: ScheduleWindow) -> tzinfo | None:
    return None if validate_window(w) is not None else _zone(w.time_zone)


@lru_cache(maxsize=256)
def _zone(name: str) -> tzinfo | None:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        # ValueError: a key that is not a relative path, such as "/etc/passwd" or "".
        return None
