"""Cron expressions and time zones of schedules: one home for the rules, on croniter (a
maintained cron library: ranges, steps, names, ``L`` and ``#``, and daylight-saving
changes handled in the schedule's own zone) and the standard library's zoneinfo.

The request model validates with ``check_cron`` and ``check_timezone``; the scheduler
computes slots with ``next_slot`` and ``previous_slot``. A slot is an aware UTC
datetime; stored, it is ``slot_text`` (``2026-01-01T00:05:00.000Z``, the store's
timestamp format), and such strings sort as the times do. Each computation costs croniter
about half a millisecond of pure Python: callers with many to do run them off the
event loop.
"""

from __future__ import annotations

from datetime import datetime, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, CroniterError, croniter

ALIASES = ("@hourly", "@daily", "@midnight", "@weekly", "@monthly", "@yearly", "@annually")
MAX_CRON_LENGTH = 256
FIELDS = "minute hour day-of-month month day-of-week"


def _seconds_first(expr: str) -> bool:
    # Six fields put the seconds first, as node-cron and Spring do; croniter's own default
    # (seconds last) is easy to misread as a five-field expression plus one.
    return len(expr.split()) == 6


def _iter(expr: str, zone: str, start: datetime) -> croniter:
    return croniter(expr, start.astimezone(ZoneInfo(zone)), second_at_beginning=_seconds_first(expr))


def check_cron(value: str) -> str:
    """The expression, whitespace normalized; ValueError with a sentence when croniter
    refuses it, when it has the wrong number of fields, or when no date ever matches."""
    expr = " ".join(value.split())
    if not expr:
        raise ValueError(f"must not be empty; expected 5 fields ({FIELDS}), e.g. '*/5 * * * *'")
    if len(expr) > MAX_CRON_LENGTH:
        raise ValueError(f"is longer than {MAX_CRON_LENGTH} characters")
    if expr.startswith("@"):
        if expr.lower() not in ALIASES:
            raise ValueError(f"unknown alias {expr[:40]!r}; expected one of {', '.join(ALIASES)}")
    elif len(expr.split()) not in (5, 6):
        raise ValueError(f"has {len(expr.split())} fields; expected 5 ({FIELDS}) or 6 (seconds first)")
    try:
        _iter(expr, "UTC", datetime.now(timezone.utc)).get_next(datetime)
    except CroniterBadDateError:
        raise ValueError(f"{expr!r} never fires: no date matches it") from None
    except (CroniterError, ValueError, TypeError, KeyError, IndexError) as exc:  # croniter's refusals vary
        raise ValueError(f"{expr[:80]!r} is not a valid cron expression: {str(exc)[:160]}") from None
    return expr


def check_timezone(value: str) -> str:
    """An IANA zone name zoneinfo knows (``UTC``, ``Europe/Paris``); ValueError otherwise."""
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # unknown, malformed, or a directory ("America")
        raise ValueError(f"unknown time zone {value[:60]!r}; expected an IANA name such as UTC or "
                         "Europe/Paris") from None
    return value


def next_slot(expr: str, zone: str, after: datetime) -> datetime:
    """The first slot strictly after ``after``, in UTC."""
    return _iter(expr, zone, after).get_next(datetime).astimezone(timezone.utc)


def previous_slot(expr: str, zone: str, before: datetime) -> datetime:
    """The most recent slot at or before ``before``, in UTC."""
    candidate = _iter(expr, zone, before).get_prev(datetime).astimezone(timezone.utc)
    following = next_slot(expr, zone, candidate)
    return following if following <= before else candidate


def slot_text(slot: datetime) -> str:
    return slot.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse_time(text: str) -> datetime:
    """A store timestamp (``...Z``) as an aware UTC datetime."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(timezone.utc)
