"""Durations and expiry times as users write them: one grammar, the one the submit transform
(condor_config.d/20-annex-submit.conf) applies inside condor_submit. Stdlib only.

- Duration: whole seconds (`3600`) or numbers with units s/m/h/d (`90m`, `2h`, `1h30m`), any
  case, no blanks inside; at most 16 parts of at most 9 digits, or 18 digits alone (so no
  sum leaves int64).
- Time: epoch seconds, or `YYYY-MM-DD[( |T)HH:MM[:SS[.ffffff]][Z|+HH[:MM]|-HH[:MM]]]`, without
  an offset meaning UTC; a date alone is its midnight (docs/users.md, docs/submit-help.txt).

`duration()`/`expiry()` answer None for text outside the grammar (spec.py keeps such text to
report it as the submit side does); `parse_duration()`/`parse_expiry()` raise ValueError
naming the field.
"""

from __future__ import annotations

import re

DURATION_RULE = "use seconds (3600) or units s/m/h/d (90m, 1h30m)"
EXPIRY_RULE = "use 'YYYY-MM-DD HH:MM' (UTC) or ISO 8601 such as 2030-04-06T17:00:00+02:00"

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DIGITS = re.compile(r"^[0-9]{1,18}$")  # names.NUMBER_DIGITS_MAX; int64 with room to add
_DURATION = re.compile(r"^([0-9]{1,9}[smhd]){1,16}$")
_PART = re.compile(r"([0-9]+)([smhd])")
_DATE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
_TIME = re.compile(
    r"^([0-9]{4})-([0-9]{2})-([0-9]{2})[T ]([0-9]{2}):([0-9]{2})"
    r"((?::[0-9]{2}(?:\.[0-9]{1,6})?)?)((?:Z|[+-][0-9]{2}(?::?[0-9]{2})?)?)$"
)
_TRIM = re.compile(r"^\s*(.*?)\s*$", re.DOTALL)


def trim(text: str) -> str:
    """`text` without surrounding blanks, as the transform's ANNEX_SUBMIT_TRIMMED."""
    return _TRIM.sub(r"\1", text)


def _shown(text: object) -> str:
    """The value for a message, cut short: a hostile one may be megabytes."""
    shown = str(text)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def duration(text: str) -> int | None:
    """Seconds, or None if `text` (trimmed, any case) is not a duration."""
    value = trim(text).lower()
    if _DIGITS.match(value):
        return int(value)
    if _DURATION.match(value):
        return sum(int(n) * _UNITS[u] for n, u in _PART.findall(value))
    return None


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 (the same integer arithmetic as the transform)."""
    yy = year - (1 if month <= 2 else 0)
    era = yy // 400
    yoe = yy - era * 400
    doy = (153 * ((month + 9) % 12) + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def _month_days(year: int, month: int) -> int:
    if month == 2:
        return 29 if (year % 4 == 0 and year % 100 != 0) or year % 400 == 0 else 28
    return 30 if month in (4, 6, 9, 11) else 31


def expiry(text: str) -> int | None:
    """Epoch seconds, or None if `text` (trimmed) is not a time of the grammar above."""
    text = trim(text)
    if _DIGITS.match(text):
        return int(text)
    if _DATE.match(text):
        text += "T00:00"
    match = _TIME.match(text)
    if not match:
        return None
    year, month, day, hour, minute = (int(g) for g in match.groups()[:5])
    second = int((match.group(6) + ":00")[1:3])
    zone = match.group(7).replace(":", "") + "0000"
    zone_h, zone_m = int(zone[1:3]), int(zone[3:5])
    if not (
        1 <= month <= 12
        and 1 <= day <= _month_days(year, month)
        and hour <= 23
        and minute <= 59
        and second <= 59
        and zone_h <= 23
        and zone_m <= 59
    ):
        return None
    offset = (-1 if zone[0] == "-" else 1) * (zone_h * 3600 + zone_m * 60)
    return _days_from_civil(year, month, day) * 86400 + hour * 3600 + minute * 60 + second - offset


def parse_duration(text: str | int, field: str = "lease") -> int:
    """A positive duration in seconds. Raises ValueError naming `field` and what is allowed."""
    if isinstance(text, int) and not isinstance(text, bool):
        seconds = text if 0 <= text < 10**18 else None
    else:
        seconds = duration(str(text))
    if seconds is None or seconds <= 0:
        raise ValueError(f"{field} = '{_shown(text)}' is not a positive duration: {DURATION_RULE}")
    return seconds


def parse_expiry(text: str | int, field: str = "expiry") -> int:
    """A time as epoch seconds. Raises ValueError naming `field` and what is allowed."""
    if isinstance(text, int) and not isinstance(text, bool):
        when = text if 0 <= text < 10**18 else None
    else:
        when = expiry(str(text))
    if when is None:
        raise ValueError(f"{field} = '{_shown(text)}' is not a time: {EXPIRY_RULE}")
    return when


def format_duration(seconds: int) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
