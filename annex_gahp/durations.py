"""Durations, expiry times and comma lists as users write them. Stdlib only."""

from __future__ import annotations

import datetime as dt
import re

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_PART = re.compile(r"([0-9]{1,9})([smhd])")
_DIGITS = re.compile(r"^[0-9]{1,18}$")  # names.NUMBER_DIGITS_MAX; int64 with room to add
_MAX_PARTS = 16


def _shown(text: object) -> str:
    """The value for a message, cut short: a hostile one may be megabytes."""
    shown = repr(text)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def parse_duration(text: str | int) -> int:
    """`3600`, `90m`, `2h`, `1h30m` -> seconds. Raises ValueError naming what is allowed."""
    if isinstance(text, int) and not isinstance(text, bool):
        seconds = text
        if seconds >= 10**18:
            raise ValueError(f"{_shown(text)} is too long a duration: at most 18 digits")
    else:
        value = str(text).strip().lower()
        if _DIGITS.match(value):
            seconds = int(value)
        else:
            parts = _PART.findall(value)
            if (
                not value
                or len(parts) > _MAX_PARTS
                or "".join(n + u for n, u in parts) != value
            ):
                raise ValueError(
                    f"{_shown(text)} is not a duration:"
                    " use seconds (3600) or units s/m/h/d (90m, 1h30m)"
                )
            seconds = sum(int(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"{_shown(text)} is not a positive duration")
    return seconds


def parse_expiry(text: str | int) -> int:
    """`2016-04-06 17:00` (UTC), ISO 8601 (with or without offset), or epoch -> epoch seconds."""
    if isinstance(text, int) and not isinstance(text, bool):
        if not 0 <= text < 10**18:
            raise ValueError(f"{_shown(text)} is not a time: epoch seconds have at most 18 digits")
        return text
    value = str(text).strip()
    if _DIGITS.match(value):
        return int(value)
    try:
        when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{_shown(text)} is not a time: use 'YYYY-MM-DD HH:MM' (UTC) or ISO 8601"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp())


def parse_list(text: str | None) -> tuple[str, ...]:
    """`a, b,c` -> ('a', 'b', 'c'); empty or None -> ()."""
    if not text:
        return ()
    return tuple(item.strip() for item in str(text).split(",") if item.strip())


def format_duration(seconds: int) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
