"""annex_gahp.durations: the one grammar of durations and times (docs/users.md "Values",
docs/submit-help.txt), shared by the submit rules (spec.py), `extend` and the config knobs."""

from __future__ import annotations

import calendar

import pytest

from annex_gahp import durations, spec

# Every documented form of a duration, with its seconds.
DURATIONS = [
    ("3600", 3600), ("90m", 5400), ("2h", 7200), ("1h30m", 5400), ("1d", 86400),
    ("45s", 45), ("2H", 7200), ("1H30M", 5400), (" 2h ", 7200), ("1d2h3m4s", 93784),
    ("0090m", 5400), ("1h1h", 7200),
]  # fmt: skip
NOT_DURATIONS = [
    "", " ", "1h 30m", "1.5h", "-5", "+5", "h", "1w", "1 h", "abc", "9" * 19, "1s" * 17,
    "1234567890s", "1h-", "٣h",
]  # fmt: skip

T = calendar.timegm((2030, 4, 6, 17, 0, 0))
# Every documented form of a time, with its epoch seconds.
TIMES = [
    ("2030-04-06 17:00", T), ("2030-04-06T17:00", T), ("2030-04-06T17:00:00", T),
    ("2030-04-06T17:00:00.5", T), ("2030-04-06T17:00:00.123456", T),
    ("2030-04-06T19:00:00+02:00", T), ("2030-04-06T17:00:00Z", T), ("2030-04-06T17:00Z", T),
    ("2030-04-06T19:00+0200", T), ("2030-04-06T19:00+02", T), ("2030-04-06T15:30-01:30", T),
    ("2030-04-06", T - 17 * 3600), (str(T), T), (f"  {T} ", T), (" 2030-04-06 17:00\n", T),
]  # fmt: skip
NOT_TIMES = [
    "", "tomorrow", "2030-4-6 17:00", "2030-04-06 17", "2030-04-06T17:00:00.1234567",
    "2030-04-06 25:00", "2030-02-30", "2030-13-01", "2030-04-06T17:00+24:00", "06.04.2030",
    "2030-04-06Z", "20300406T1700", "2030-W14", "-5", "9" * 19,
]  # fmt: skip


@pytest.mark.parametrize(("text", "seconds"), DURATIONS)
def test_every_documented_duration(text: str, seconds: int) -> None:
    assert durations.duration(text) == seconds
    assert durations.parse_duration(text, "annex_lease") == seconds


@pytest.mark.parametrize("text", NOT_DURATIONS)
def test_durations_refused_naming_the_field(text: str) -> None:
    assert durations.duration(text) is None
    with pytest.raises(ValueError) as err:
        durations.parse_duration(text, "ANNEX_DEFAULT_LEASE")
    message = str(err.value)
    assert message.startswith("ANNEX_DEFAULT_LEASE = '")
    assert message.endswith(f"is not a positive duration: {durations.DURATION_RULE}")
    assert len(message) < 200 and "\n" not in message.replace(text, "")


@pytest.mark.parametrize("value", ["0", "0s", "0h0m", 0, -3])
def test_zero_is_a_duration_but_not_a_positive_one(value: object) -> None:
    with pytest.raises(ValueError, match=r"^lease = '.*' is not a positive duration"):
        durations.parse_duration(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(("text", "epoch"), TIMES)
def test_every_documented_time(text: str, epoch: int) -> None:
    assert durations.expiry(text) == epoch
    assert durations.parse_expiry(text, "annex_expiry") == epoch


@pytest.mark.parametrize("text", NOT_TIMES)
def test_times_refused_naming_the_field(text: str) -> None:
    assert durations.expiry(text) is None
    with pytest.raises(ValueError) as err:
        durations.parse_expiry(text)
    assert str(err.value).startswith("expiry = '")
    assert str(err.value).endswith(f"is not a time: {durations.EXPIRY_RULE}")


def test_the_submit_rules_use_this_grammar() -> None:
    # spec converts with durations (one parser): what it accepts is exactly what this accepts.
    from annex_gahp import settings  # noqa: PLC0415

    config = settings.load(lookup={"ANNEX_MAX_LEASE": "30d"}.get)
    for text, seconds in DURATIONS:
        got = spec.from_keywords({"name": "a", "lease": text}, "alice", config, now=0)
        assert got.lease_seconds == seconds
    for text, epoch in TIMES:
        now = epoch - 3600
        got = spec.from_keywords({"name": "a", "expiry": text}, "alice", config, now=now)
        assert got.expiry == epoch
    assert spec.DURATION_RULE == durations.DURATION_RULE
    assert spec.EXPIRY_RULE == durations.EXPIRY_RULE
