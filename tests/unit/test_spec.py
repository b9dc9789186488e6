"""annex_gahp.spec: the helper's copy of the submit-side rules.

The invalid submit examples carry the exact ERROR line condor_submit prints (tests/e2e checks
that against a real schedd); here the same files go through spec.from_keywords, which must
refuse them with the same message. So the two validators cannot drift apart silently.
"""

from __future__ import annotations

import calendar
import dataclasses
import datetime as dt
import random
import re
import time
from pathlib import Path

import pytest

from annex_gahp import durations, names, settings, spec
from annex_gahp.errors import InputError, LimitExceeded

EXAMPLES = Path(__file__).resolve().parents[2] / "submit-examples"
NOW = 1_800_000_000  # 2027-01-15 08:00:00 UTC


def make_settings(**knobs: str) -> settings.Settings:
    return settings.load(lookup=dict(knobs).get)


S = make_settings()


def kw(**values):
    return spec.from_keywords({"name": "a1", **values}, "alice", S, now=NOW)


# ---- the submit examples ---------------------------------------------------------------------


class Expr:
    """An unquoted +Attr value: a ClassAd expression, not text."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return self.text


def parse_submit(path: Path) -> tuple[dict[str, object], dict[str, str], str | None]:
    """(keywords, config knobs, expected error) from a submit example, as condor_submit and the
    transform would read it (enough of the submit language for our examples)."""
    keywords: dict[str, object] = {}
    plus: dict[str, object] = {}
    config: dict[str, str] = {}
    expect = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if m := re.match(r"#\s*config:\s*(\w+)\s*=\s*(.*)$", line):
            config[m.group(1)] = m.group(2)
        elif m := re.match(r"#\s*expect:\s*ERROR:\s*(.*)$", line):
            expect = m.group(1)
        elif m := re.match(r"annex_(\w+)\s*=\s*(.*)$", line):
            keywords[m.group(1)] = m.group(2).strip()
        elif m := re.match(r"\+(\w+)\s*=\s*(.*)$", line):
            value = m.group(2).strip()
            if value.startswith('"'):
                plus[m.group(1)] = value[1:-1]
            elif re.fullmatch(r"-?\d+", value):
                plus[m.group(1)] = int(value)
            else:
                plus[m.group(1)] = Expr(value)
    by_attr = {a.lower(): k for a, k in spec.ATTR_KEYWORDS.items()}
    by_attr["annexname"] = "name"
    for attr, value in plus.items():
        keywords.setdefault(by_attr[attr.lower()], value)
    for key, value in list(keywords.items()):
        if isinstance(value, str) and re.search(r"\$\w*\(", value):  # macro (expiry.sub)
            keywords[key] = time.strftime("%Y-%m-%d %H:%M:%S+0000", time.gmtime(NOW + 3 * 3600))
    return keywords, config, expect


INVALID = sorted((EXAMPLES / "invalid").glob("*.sub"))
VALID = sorted(EXAMPLES.glob("*.sub"))


def test_there_is_an_example_per_refusal():
    assert len(INVALID) >= 25
    assert {p.name for p in VALID} >= {
        "burst.sub", "spot.sub", "expiry.sub", "provision.sub", "stack.sub",
        "shared-1.sub", "shared-2.sub",
    }  # fmt: skip
    for path in INVALID:
        assert parse_submit(path)[2], f"{path.name} has no '# expect: ERROR: ...' line"


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_examples_are_refused_with_the_submit_message(path):
    keywords, config, expect = parse_submit(path)
    with pytest.raises((InputError, LimitExceeded)) as err:
        spec.from_keywords(
            keywords, "alice", make_settings(**config), now=int(time.time()), iwd="/home/alice"
        )
    assert str(err.value) == expect


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_valid_examples_are_accepted(path):
    keywords, config, expect = parse_submit(path)
    assert expect is None
    got = spec.from_keywords(
        keywords, "alice", make_settings(**config), now=NOW, iwd="/home/alice/ex"
    )
    assert got.name == keywords["name"]
    assert got.instances >= 1


def test_example_values():
    spot = spec.from_keywords(parse_submit(EXAMPLES / "spot.sub")[0], "alice", S, now=NOW)
    assert spot.instance_types == ("m5.large", "m5a.large", "m4.large")
    assert spot.spot_prices == ("0.05",)
    assert spot.subnets == ("subnet-0a1b2c3d", "subnet-4e5f6a7b")
    assert spot.lease_seconds == 7200 and spot.idle_timeout == 1200
    assert spot.tags == (("project", "genomics"), ("cost-center", "4711"))
    prov = spec.from_keywords(
        parse_submit(EXAMPLES / "provision.sub")[0], "alice", S, now=NOW, iwd="/home/alice/ex"
    )
    assert prov.mode == "provision"
    assert prov.user_data_file == "/home/alice/ex/pilot-user-data.sh"
    classic = spec.from_keywords(parse_submit(EXAMPLES / "classic.sub")[0], "alice", S, now=NOW)
    assert (classic.name, classic.instances, classic.lease_seconds) == ("classic", 2, 5400)


# ---- single rules ------------------------------------------------------------------------------


def test_defaults():
    got = kw()
    assert (got.instances, got.mode, got.strategy) == (1, "pool", "fleet")
    assert got.lease_seconds is None and got.expiry is None and got.region == ""
    assert got.instance_types == () and got.tags == ()
    assert got.expires_at(NOW, S) == NOW + S.default_lease


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("3600", 3600), ("90m", 5400), ("2h", 7200), ("1h30m", 5400), (" 1H30M ", 5400),
     ("090m", 5400), ("1d", 86400), ("45s", 45), (600, 600)],
)  # fmt: skip
def test_durations(text, seconds):
    assert kw(lease=text).lease_seconds == seconds
    assert kw(idle_timeout=text).idle_timeout == seconds


def test_empty_means_not_given():
    got = kw(lease=" ", instances="", expiry="", region="", instance_types=" , ")
    assert (got.lease_seconds, got.instances, got.expiry) == (None, 1, None)
    assert (got.region, got.instance_types) == ("", ())


@pytest.mark.parametrize("text", ["0", "0m", "1.5h", "2 hours", "h", "-5", "1h 30m", 0, -1])
def test_bad_durations(text):
    with pytest.raises(InputError, match=r"^annex_lease = '.*' is not a positive duration"):
        kw(lease=text)


def test_lease_limit_names_the_knob():
    with pytest.raises(LimitExceeded) as err:
        kw(lease="25h")
    assert str(err.value) == (
        "annex_lease = 90000 seconds is over the limit of 86400 seconds (ANNEX_MAX_LEASE)"
    )
    assert (
        spec.from_keywords(
            {"name": "a", "lease": "25h"}, "alice", make_settings(ANNEX_MAX_LEASE="2d"), now=NOW
        ).lease_seconds
        == 90000
    )


@pytest.mark.parametrize(
    ("text", "iso"),
    [
        ("2027-01-15 10:00", "2027-01-15T10:00:00+00:00"),
        ("2027-01-15T10:00", "2027-01-15T10:00:00+00:00"),
        ("2027-01-15T10:00:30Z", "2027-01-15T10:00:30+00:00"),
        ("2027-01-15T12:00:00+02:00", "2027-01-15T10:00:00+00:00"),
        ("2027-01-15T04:30:00.25-0530", "2027-01-15T10:00:00+00:00"),
        ("2027-01-15T11:00+01", "2027-01-15T10:00:00+00:00"),
        ("2027-01-16", "2027-01-16T00:00:00+00:00"),
        ("1800007200", "2027-01-15T10:00:00+00:00"),
    ],
)
def test_expiry_formats(text, iso):
    assert kw(expiry=text).expiry == int(dt.datetime.fromisoformat(iso).timestamp())


@pytest.mark.parametrize(
    "text",
    ["2027-02-29 10:00", "2027-01-15 24:00", "2027-01-15 10:60", "2027-13-01 10:00",
     "2027-01-15T10:00+24:00", "15.01.2027 10:00", "tomorrow", "2027-01-15Z", "2027-1-5 1:00"],
)  # fmt: skip
def test_bad_expiry(text):
    with pytest.raises(InputError) as err:
        kw(expiry=text)
    assert str(err.value) == (
        f"annex_expiry = '{text}' is not a time: use 'YYYY-MM-DD HH:MM' (UTC) or ISO 8601 such as"
        " 2030-04-06T17:00:00+02:00"
    )


def test_expiry_arithmetic_matches_the_calendar():
    rng = random.Random(7)  # noqa: S311 - reproducible dates, not secrets
    for _ in range(2000):
        when = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(
            seconds=rng.randrange(0, 200 * 365 * 86400)
        )
        text = when.strftime("%Y-%m-%d %H:%M:%S")
        assert durations.expiry(text) == calendar.timegm(when.timetuple()), text
    assert durations.expiry("2024-02-29 00:00") == calendar.timegm((2024, 2, 29, 0, 0, 0))
    assert durations.expiry("2100-02-29 00:00") is None
    assert durations.expiry("2000-02-29 00:00") == calendar.timegm((2000, 2, 29, 0, 0, 0))


def test_expiry_window():
    with pytest.raises(
        InputError, match=r"^annex_expiry is in the past: give a time in the future$"
    ):
        kw(expiry=str(NOW))
    with pytest.raises(LimitExceeded) as err:
        kw(expiry=str(NOW + 86401))
    assert str(err.value) == (
        "annex_expiry is more than 86400 seconds from now, over the limit (ANNEX_MAX_LEASE)"
    )
    got = kw(expiry=str(NOW + 86400))
    assert got.expires_at(NOW + 10, S) == NOW + 86400
    with pytest.raises(InputError, match="exclude each other"):
        kw(expiry=str(NOW + 60), lease="1h")


def test_names():
    assert kw(name="a" * 63).name == "a" * 63
    assert kw(name="  Burst-2 ").name == "Burst-2"
    for bad in ("a" * 64, "2x", "a_b", "a.b", "", "-a"):
        with pytest.raises(InputError, match=r"is not a valid annex name"):
            kw(name=bad)
    with pytest.raises(InputError, match=r"^annex_\* keywords need annex_name"):
        spec.from_keywords({"instances": "2"}, "alice", S)
    with pytest.raises(InputError, match="annex_instanses is not an annex keyword"):
        kw(instanses="2")


def test_instances():
    assert kw(instances="7").instances == 7
    assert kw(instances=50).instances == 50
    for bad in ("0", "-1", "2.5", "two", 0, True):
        with pytest.raises(InputError, match=r"^annex_instances = '.*' is not allowed"):
            kw(instances=bad)
    with pytest.raises(LimitExceeded, match=r"over the limit of 50 instances per annex"):
        kw(instances="51")
    s = make_settings(ANNEX_MAX_INSTANCES="3")
    with pytest.raises(LimitExceeded, match=r"^annex_instances = 4 is over the limit of 3 "):
        spec.from_keywords({"name": "a", "instances": "4"}, "alice", s)


def test_lists_and_counts():
    got = kw(instance_types=" m5.large,, c5.large  m4.large ", image_ids="ami-1",
             spot_prices="0.05,.1,1", security_groups="sg-1 sg-2")  # fmt: skip
    assert got.instance_types == ("m5.large", "c5.large", "m4.large")
    assert got.spot_prices == ("0.05", ".1", "1")
    assert got.security_groups == ("sg-1", "sg-2")
    # Without instance types the count compares with ANNEX_DEFAULT_INSTANCE_TYPES.
    with pytest.raises(InputError, match=r"annex_image_ids has 2 entries: .* type \(1\)$"):
        kw(image_ids="ami-1,ami-2")
    two = make_settings(ANNEX_DEFAULT_INSTANCE_TYPES="m5.large c5.large")
    assert spec.from_keywords(
        {"name": "a", "image_ids": "ami-1,ami-2"}, "alice", two
    ).image_ids == ("ami-1", "ami-2")
    for bad in ("0", "0.00", "-1", "1e-3", "$1", "abc"):
        with pytest.raises(InputError, match="give positive decimal prices"):
            kw(spot_prices=bad)


def test_tags():
    assert kw(tags="project=x , team = blue sky ,empty=").tags == (
        ("project", "x"), ("team ", " blue sky"), ("empty", ""),
    )  # fmt: skip
    for bad in ("project", "=x", "aws:cloudformation=1", "HTCondor-Annex:owner=bob"):
        with pytest.raises(InputError, match=r"^annex_tags = .* keys not starting with aws:"):
            kw(tags=bad)


def test_modes_and_strategies():
    assert kw(mode=" POOL ", strategy="Stack").strategy == "stack"
    with pytest.raises(InputError, match=r"^annex_mode = 'cloud' is not allowed: use pool or"):
        kw(mode="Cloud")
    with pytest.raises(InputError, match=r"^annex_strategy = 'spot' is not allowed: use fleet"):
        kw(strategy="spot")
    with pytest.raises(InputError, match="annex_mode = provision needs annex_user_data_file"):
        kw(mode="provision")
    got = kw(mode="provision", user_data_file="/x/pilot.sh")
    assert got.user_data_file == "/x/pilot.sh"
    with pytest.raises(InputError, match="must be an absolute path"):
        kw(mode="provision", user_data_file="pilot.sh")
    with pytest.raises(
        InputError, match=r"^annex_central_manager only applies to annex_mode = pool"
    ):
        kw(mode="provision", user_data_file="/x", central_manager="cm")
    with pytest.raises(
        InputError, match=r"^annex_user_data_file only applies to annex_mode = prov"
    ):
        kw(user_data_file="/x")
    with pytest.raises(InputError, match=r"^annex_stack_name only applies to annex_strategy"):
        kw(stack_name="s")
    assert kw(strategy="stack", stack_name="s-1").stack_name == "s-1"
    with pytest.raises(InputError, match="is not a valid stack name"):
        kw(strategy="stack", stack_name="s_1")


def test_allow_lists():
    s = make_settings(
        ANNEX_ALLOWED_INSTANCE_TYPES="m5.large, c5.large",
        ANNEX_ALLOWED_IMAGE_IDS="ami-1",
        ANNEX_ALLOWED_REGIONS="us-east-1",
    )

    def mk(**v):
        return spec.from_keywords({"name": "a", **v}, "alice", s)

    assert mk(instance_types="c5.large,m5.large", image_ids="ami-1", region="us-east-1")
    assert mk().region == ""  # not given: resolved (and checked) by the helper later
    with pytest.raises(LimitExceeded) as err:
        mk(instance_types="m5.large,x1.32xlarge")
    assert str(err.value) == (
        "annex_instance_types = 'm5.large,x1.32xlarge' is not allowed here: choose from"
        " m5.large,c5.large (ANNEX_ALLOWED_INSTANCE_TYPES)"
    )
    with pytest.raises(LimitExceeded, match=r"ANNEX_ALLOWED_IMAGE_IDS\)$"):
        mk(image_ids="ami-2")
    with pytest.raises(LimitExceeded, match=r"choose from us-east-1 \(ANNEX_ALLOWED_REGIONS\)$"):
        mk(region="eu-west-1")


def test_text_values_must_be_text():
    with pytest.raises(InputError) as err:
        kw(region=5)
    assert str(err.value) == "+AnnexRegion must be a quoted string (or use annex_region = ...)"


def test_job_attrs_read_back_as_the_keywords():
    got = kw(instances="3", instance_types="m5.large,c5.large", spot_prices="0.1",
             lease="2h", region="us-east-1", tags="a=b,c=d", strategy="stack",
             stack_name="st", idle_timeout="10m", subnets="subnet-1")  # fmt: skip
    # As the transform leaves the job ad: converted numbers, normalised lists.
    attrs = {
        names.JOB_TARGET: "a1", "AnnexInstances": 3, "AnnexInstanceTypes": "m5.large,c5.large",
        "AnnexSpotPrices": "0.1", "AnnexLease": 7200, "AnnexRegion": "us-east-1",
        "AnnexTags": "a=b,c=d", "AnnexStrategy": "stack", "AnnexStackName": "st",
        "AnnexIdleTimeout": 600, "AnnexSubnets": "subnet-1", "AnnexMode": "pool",
    }  # fmt: skip
    assert spec.from_job_attrs(attrs, "alice", S, now=NOW) == got


class Undefined:
    def __str__(self) -> str:
        return "Undefined"


def test_from_job_attrs():
    ad = {
        "TargetAnnexName": "burst",
        "AnnexInstances": 2,
        "AnnexLease": "2h",  # a job that bypassed the transform: string forms still read
        "annexmode": "POOL",  # attribute names are case-insensitive
        "AnnexRegion": Undefined(),  # what the transform leaves of removed spellings
        "AnnexName": Undefined(),
        "annex_instance_types": "c5.large",
        "AnnexInstanceTypes": "m5.large",  # the keyword spelling wins, as in the transform
        "Owner": "alice",
        "QDate": NOW,
    }
    got = spec.from_job_attrs(ad, "alice", S, now=NOW)
    assert (got.name, got.instances, got.lease_seconds, got.mode) == ("burst", 2, 7200, "pool")
    assert got.region == "" and got.instance_types == ("c5.large",)
    assert spec.from_job_attrs({"AnnexName": "old"}, "alice", S).name == "old"
    assert (
        spec.from_job_attrs(
            {"AnnexName": "x", "TargetAnnexName": "y", "annex_name": "z"}, "alice", S
        ).name
        == "z"
    )
    rel = spec.from_job_attrs(
        {"TargetAnnexName": "p", "AnnexMode": "provision", "AnnexUserDataFile": "u.sh",
         "Iwd": "/home/alice/jobs"}, "alice", S
    )  # fmt: skip
    assert rel.user_data_file == "/home/alice/jobs/u.sh"
    with pytest.raises(InputError, match="need annex_name"):
        spec.from_job_attrs({"AnnexInstances": 2}, "alice", S)


# ---- sharing ---------------------------------------------------------------------------------


def test_merge_grows_and_keeps_the_longer_lease():
    first = kw(instances="2", instance_types="m5.large", lease="1h")
    second = kw(instances="3", lease="2h")
    got = spec.merge(first, second, S, now=NOW)
    assert (got.instances, got.lease_seconds, got.expiry) == (3, 7200, None)
    assert got.instance_types == ("m5.large",)
    with pytest.raises(InputError, match=r"already runs with annex_instance_types = '.default.'"):
        spec.merge(second, first, S, now=NOW)  # the first cluster left the types to the default
    smaller = spec.merge(first, kw(instances="1"), S, now=NOW)
    assert (smaller.instances, smaller.lease_seconds) == (2, 3600)
    assert spec.merge(kw(), kw(), S, now=NOW).lease_seconds is None


def test_merge_with_expiry_takes_the_later_end_within_the_cap():
    pinned = kw(lease="1h").pinned(NOW - 600, S)
    assert (pinned.lease_seconds, pinned.expiry) == (None, NOW + 3000)
    got = spec.merge(pinned, kw(lease="2h"), S, now=NOW)
    assert (got.lease_seconds, got.expiry) == (None, NOW + 7200)
    got = spec.merge(pinned, kw(lease="10m"), S, now=NOW)
    assert got.expiry == NOW + 3000
    far = dataclasses.replace(pinned, expiry=NOW + 10 * 86400)
    assert spec.merge(far, kw(), S, now=NOW).expiry == NOW + S.max_lease


def test_merge_caps_instances_and_takes_the_longer_idle_timeout():
    s = make_settings(ANNEX_MAX_INSTANCES="4")
    big = dataclasses.replace(kw(), instances=9)
    assert spec.merge(kw(instances="2"), big, s, now=NOW).instances == 4
    got = spec.merge(kw(idle_timeout="5m"), kw(), S, now=NOW)
    assert got.idle_timeout == max(300, S.idle_timeout)


@pytest.mark.parametrize(
    ("first", "second", "key"),
    [
        ({}, {"mode": "provision", "user_data_file": "/u"}, "mode"),
        ({}, {"strategy": "stack"}, "strategy"),
        ({"region": "us-east-1"}, {"region": "eu-west-1"}, "region"),
        ({"instance_types": "m5.large"}, {"instance_types": "c5.large"}, "instance_types"),
        ({}, {"instance_types": "c5.large"}, "instance_types"),
        ({"tags": "a=b"}, {"tags": "a=c"}, "tags"),
    ],
)
def test_merge_refuses_conflicting_settings(first, second, key):
    with pytest.raises(InputError) as err:
        spec.merge(kw(**first), kw(**second), S, now=NOW)
    assert f"annex 'a1' already runs with annex_{key} = " in str(err.value)
    assert "use another annex_name" in str(err.value)


def test_merge_accepts_repeats_and_unresolved_region():
    first = kw(instance_types="m5.large", tags="a=b")
    assert spec.merge(first, kw(instance_types="m5.large", tags="a=b"), S, now=NOW) == first
    assert spec.merge(kw(), kw(region="eu-west-1"), S, now=NOW).region == "eu-west-1"
    with pytest.raises(InputError, match="is not annex"):
        spec.merge(kw(), spec.from_keywords({"name": "b"}, "alice", S), S)


# ---- limits (issue #12): every value bounded, no control characters, AWS's tag limits -------


def _refusal(**kw: object) -> str:
    with pytest.raises((InputError, LimitExceeded)) as err:
        spec.from_keywords({"name": "burst", **kw}, "alice", S, now=NOW)  # type: ignore[arg-type]
    return str(err.value)


@pytest.mark.parametrize("key", ["instances", "lease", "idle_timeout", "expiry"])
def test_numbers_with_thousands_of_digits_are_refused_naming_the_field(key):
    # Python's int() gives up at 4300 digits with a ValueError of its own: that was INTERNAL.
    for digits in (19, 4301, 5000, 100_000):
        message = _refusal(**{key: "9" * digits})
        assert message.startswith(f"annex_{key} = '"), message
    with pytest.raises(InputError, match="annex_instances"):
        spec.from_job_attrs({"TargetAnnexName": "b", "AnnexInstances": 10**30}, "alice", S)


def test_eighteen_digit_numbers_still_reach_the_limits():
    assert "ANNEX_MAX_INSTANCES" in _refusal(instances="9" * 18)
    assert "ANNEX_MAX_LEASE" in _refusal(lease="9" * 18)


@pytest.mark.parametrize(
    "key", ["instance_types", "image_ids", "region", "vpc", "subnets", "keypair",
            "security_groups", "central_manager", "tags", "stack_name", "spot_prices"],
)  # fmt: skip
@pytest.mark.parametrize("char", ["\x00", "\x01", "\x1b", "\x7f"])
def test_control_characters_are_refused_naming_the_field(key, char):
    value = f"x{char}y=z" if key == "tags" else f"x{char}y"
    kw = {key: value}
    if key == "stack_name":
        kw["strategy"] = "stack"
    assert _refusal(**kw) == (
        f"annex_{key} contains a control character (such as NUL, tab or newline): remove it"
    )


def test_control_characters_in_mode_and_names():
    assert "annex_mode contains a control character" in _refusal(mode="pool\x00")
    assert "annex_name" in _refusal(name="burst\x00")  # the name's own pattern refuses it


@pytest.mark.parametrize(
    ("key", "limit"),
    [("keypair", 255), ("vpc", 255), ("central_manager", 255), ("region", 255),
     ("subnets", 2048), ("security_groups", 2048), ("instance_types", 2048)],
)  # fmt: skip
def test_free_text_is_bounded(key, limit):
    assert _refusal(**{key: "a" * (limit + 1)}) == (
        f"annex_{key} is longer than {limit} characters: shorten it"
    )


def test_tag_limits_are_aws_limits():
    ours = 42
    spec.from_keywords(
        {"name": "b", "tags": ",".join(f"k{i}=v" for i in range(ours))}, "alice", S, now=NOW
    )
    assert _refusal(tags=",".join(f"k{i}=v" for i in range(ours + 1))).startswith(
        "annex_tags has 43 tags: give at most 42"
    )
    spec.from_keywords({"name": "b", "tags": f"{'k' * 128}={'v' * 256}"}, "alice", S, now=NOW)
    assert "key longer than 128" in _refusal(tags=f"{'k' * 129}=v")
    assert "value longer than 256" in _refusal(tags=f"k={'v' * 257}")
    assert "AWS's tag characters" in _refusal(tags="k=a;b")
    assert "AWS's tag characters" in _refusal(tags="k$(x)=a")


@pytest.mark.parametrize(
    "tags", ["aws:createdBy=x", "AWS:x=y", "a=b,aws:x=y", "htcondor-annex:owner=bob",
             "HTCondor-Annex:Owner=bob", "x=y,htcondor-annex:name=other"],
)  # fmt: skip
def test_reserved_tag_prefixes_are_refused(tags):
    assert _refusal(tags=tags).startswith("annex_tags = '")
    assert "keys not starting with aws: or htcondor-annex:" in _refusal(tags=tags)


def test_spot_prices_are_bounded():
    spec.from_keywords({"name": "b", "spot_prices": "123456.12345678"}, "alice", S, now=NOW)
    assert "positive decimal prices" in _refusal(spot_prices="1234567")
    assert "positive decimal prices" in _refusal(spot_prices="0.123456789")


def test_durations_module_bounds_numbers():
    for text in ("9" * 5000, "9" * 19, "1s" * 17, "9999999999d"):
        with pytest.raises(ValueError, match=r"^lease = '.*' is not a positive duration") as err:
            durations.parse_duration(text, "lease")
        assert len(str(err.value)) < 200
    with pytest.raises(ValueError, match=r"^expiry = '9+\.\.\.' is not a time"):
        durations.parse_expiry("9" * 5000)
