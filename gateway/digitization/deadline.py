"""The digitization deadline after a film receipt (R-DIG-3), as pure functions.

Seed 000 §5.2(1)③: films must be digitized within a period set by the
operations rules, 「1～2日程度以内」 and without hindering care.  Sekisho counts
*business days* after the day of receipt in the hospital's time zone, skipping
Saturdays, Sundays and configured holidays: a film received on Monday with a
one-business-day period must be digitized before Wednesday 00:00; one received
on Friday, before Tuesday 00:00.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

__all__ = ["business_deadline", "is_business_day", "is_late"]


def is_business_day(day: date, holidays: Collection[date]) -> bool:
    return day.weekday() < 5 and day not in holidays


def business_deadline(
    received_at: datetime, business_days: int, holidays: Collection[date], zone: ZoneInfo
) -> datetime:
    """The first moment that is too late (exclusive bound), timezone-aware."""
    if received_at.tzinfo is None:
        raise ValueError("received_at must be timezone-aware")
    if business_days < 1:
        raise ValueError("business_days must be at least 1")
    day = received_at.astimezone(zone).date()
    counted = 0
    while counted < business_days:
        day += timedelta(days=1)
        if is_business_day(day, holidays):
            counted += 1
    return datetime.combine(day + timedelta(days=1), time(0), zone)


def is_late(digitized_at: datetime, deadline: datetime) -> bool:
    return digitized_at >= deadline
