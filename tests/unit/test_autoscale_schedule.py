"""Schedule windows: which are active at an instant, in their own time zone, and when
that can change next."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal_api.scaling import ScheduleWindow
from shoal_core.autoscale.schedule import (
    describe_window,
    next_boundary,
    schedule_floor,
    validate_window,
)

# 2026-01-05 is a Monday.
MONDAY = datetime(2026, 1, 5, tzinfo=UTC)


def window(
    cron: str = "0 8 * * 1-5", minutes: int = 600, replicas: int = 3, tz: str = "UTC"
) -> ScheduleWindow:
    return ScheduleWindow(cron=cron, duration_minutes=minutes, min_replicas=replicas, time_zone=tz)


WEEKDAYS = window()


@pytest.mark.parametrize(
    ("now", "floor"),
    [
        (MONDAY.replace(hour=7, minute=59, second=59), 0),
        (MONDAY.replace(hour=8), 3),  # a window starts at its fire time
        (MONDAY.replace(hour=12), 3),
        (MONDAY.replace(hour=17, minute=59, second=59), 3),
        (MONDAY.replace(hour=18), 0),  # ... and ends durationMinutes later
        (MONDAY + timedelta(days=5, hours=9), 0),  # Saturday
        (MONDAY + timedelta(days=4, hours=9), 3),  # Friday
    ],
)
def test_weekday_window_is_active_only_in_its_hours(now: datetime, floor: int) -> None:
    got, active = schedule_floor([WEEKDAYS], now)
    assert got == floor
    assert active == (WEEKDAYS if floor else None)


def test_window_reads_its_cron_in_its_time_zone() -> None:
    berlin = window("0 8 * * *", minutes=60, tz="Europe/Berlin")
    utc = window("0 8 * * *", minutes=60, tz="UTC")
    # January: Berlin is UTC+1, so 08:00 there is 07:00 UTC.
    assert schedule_floor([berlin], MONDAY.replace(hour=7, minute=30))[0] == 3
    assert schedule_floor([utc], MONDAY.replace(hour=7, minute=30))[0] == 0
    assert schedule_floor([berlin], MONDAY.replace(hour=8, minute=30))[0] == 0
    # July: summer time, UTC+2.
    july = datetime(2026, 7, 6, tzinfo=UTC)
    assert schedule_floor([berlin], july.replace(hour=6, minute=30))[0] == 3
    assert schedule_floor([berlin], july.replace(hour=7, minute=30))[0] == 0
    # `now` may come in any time zone; only the instant counts.
    tokyo = MONDAY.replace(hour=7, minute=30).astimezone(ZoneInfo("Asia/Tokyo"))
    assert schedule_floor([berlin], tokyo)[0] == 3


def test_overlapping_windows_take_the_highest_minimum() -> None:
    low = window("0 8 * * *", minutes=600, replicas=2)
    high = window("0 12 * * *", minutes=60, replicas=5)
    zero = window("0 0 * * *", minutes=1440, replicas=0)
    assert schedule_floor([low, high, zero], MONDAY.replace(hour=12, minute=30)) == (5, high)
    assert schedule_floor([low, high, zero], MONDAY.replace(hour=14)) == (2, low)
    assert schedule_floor([low, high, zero], MONDAY.replace(hour=20)) == (0, zero)
    assert schedule_floor([], MONDAY) == (0, None)


def test_a_window_that_fires_again_before_it_ends_goes_on() -> None:
    every_hour = window("0 * * * *", minutes=90)
    assert schedule_floor([every_hour], MONDAY.replace(hour=5, minute=59))[0] == 3


def test_next_boundary_is_the_next_start_or_end() -> None:
    assert next_boundary([WEEKDAYS], MONDAY.replace(hour=7)) == MONDAY.replace(hour=8)
    assert next_boundary([WEEKDAYS], MONDAY.replace(hour=8)) == MONDAY.replace(hour=18)
    assert next_boundary([WEEKDAYS], MONDAY.replace(hour=9)) == MONDAY.replace(hour=18)
    friday_evening = MONDAY + timedelta(days=4, hours=19)
    assert next_boundary([WEEKDAYS], friday_evening) == MONDAY + timedelta(days=7, hours=8)
    lunch = window("0 12 * * *", minutes=30)
    assert next_boundary([WEEKDAYS, lunch], MONDAY.replace(hour=9)) == MONDAY.replace(hour=12)
    assert next_boundary([], MONDAY) is None


def test_next_boundary_is_in_the_time_zone_of_now() -> None:
    berlin = window("0 8 * * *", minutes=60, tz="Europe/Berlin")
    got = next_boundary([berlin], MONDAY)
    assert got == MONDAY.replace(hour=7)
    assert got is not None
    assert got.utcoffset() == timedelta(0)


def test_daylight_saving_changes() -> None:
    night = window("30 2 * * *", minutes=60, tz="Europe/Berlin")
    # 2026-10-25: 02:30 happens twice (CEST, then CET); the window opens the first time.
    autumn = datetime(2026, 10, 25, tzinfo=UTC)
    assert schedule_floor([night], autumn.replace(minute=30))[0] == 3  # 02:30 CEST
    assert schedule_floor([night], autumn.replace(hour=1, minute=29))[0] == 3
    assert schedule_floor([night], autumn.replace(hour=1, minute=30))[0] == 0  # 02:30 CET
    assert next_boundary([night], autumn.replace(hour=1, minute=30)) == datetime(
        2026, 10, 26, 1, 30, tzinfo=UTC
    )
    # 2026-03-29: the clock jumps from 02:00 to 03:00; 02:30 CET is 03:30 CEST.
    spring = datetime(2026, 3, 29, tzinfo=UTC)
    assert schedule_floor([night], spring.replace(hour=1, minute=29))[0] == 0
    assert schedule_floor([night], spring.replace(hour=1, minute=30))[0] == 3
    assert next_boundary([night], spring) == spring.replace(hour=1, minute=30)


WINDOWS = [
    WEEKDAYS,
    window("30 */3 * * *", minutes=45, replicas=5),
    window("0 8 * * 6", minutes=120, replicas=2, tz="America/New_York"),
    window("30 2 * * *", minutes=60, replicas=4, tz="Europe/Berlin"),
    window("0 * * * *", minutes=20, replicas=1, tz="America/New_York"),
]
DST_CHANGES = [
    datetime(2026, 3, 8, 5, tzinfo=UTC),
    datetime(2026, 3, 29, tzinfo=UTC),
    datetime(2026, 10, 25, tzinfo=UTC),
    datetime(2026, 11, 1, 4, tzinfo=UTC),
]


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from([MONDAY, *DST_CHANGES]),
    st.integers(min_value=-6 * 3600, max_value=14 * 24 * 3600),
)
def test_the_floor_holds_until_the_next_boundary(around: datetime, offset: int) -> None:
    now = around + timedelta(seconds=offset)
    boundary = next_boundary(WINDOWS, now)
    assert boundary is not None
    assert boundary > now
    floor = schedule_floor(WINDOWS, now)[0]
    for later in (now + (boundary - now) / 2, boundary - timedelta(microseconds=1)):
        assert schedule_floor(WINDOWS, later)[0] == floor


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (window("61 8 * * *"), "not a valid cron expression"),
        (window("0 8 * *"), "has 4 fields; it needs 5"),
        (window("0 0 8 * * 1-5"), "has 6 fields; it needs 5"),
        (window("@sometimes"), "unknown macro"),
        (window(tz="Mars/Olympus_Mons"), "not a known IANA time zone"),
        (window(tz="../../etc/passwd"), "not a known IANA time zone"),
    ],
)
def test_bad_windows_get_a_message_and_are_skipped(bad: ScheduleWindow, message: str) -> None:
    problem = validate_window(bad)
    assert problem is not None
    assert message in problem
    assert schedule_floor([bad], MONDAY.replace(hour=9)) == (0, None)
    assert next_boundary([bad], MONDAY) is None


def test_good_windows_have_no_message() -> None:
    assert validate_window(WEEKDAYS) is None
    assert validate_window(window("@daily")) is None
    assert validate_window(window("*/15 9-17 * 1,7 mon-fri", tz="Europe/Berlin")) is None


def test_describe_window() -> None:
    assert describe_window(WEEKDAYS) == "schedule 0 8 * * 1-5 (UTC) minReplicas 3"


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        schedule_floor([WEEKDAYS], datetime(2026, 1, 5, 9))
