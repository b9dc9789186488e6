"""AnnexSpec: one annex request, validated by the same rules as the submit side.

condor_config.d/20-annex-submit.conf refuses bad requests inside condor_submit, for early and
clear errors; this module is the helper's authority and applies the same rules, in the same
order, with the same messages (the first rule that fails is the one reported). docs/users.md
describes the keywords; the canonical job attribute names are in names.JOB_ATTRS.

Stdlib only (plus this package's stdlib-only modules).
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Mapping

from annex_gahp import cloud, names
from annex_gahp.errors import InputError, LimitExceeded

# Keyword names without the `annex_` prefix, in contract order.
KEYWORDS = ("name", *names.JOB_ATTRS)
# Canonical job attribute -> keyword.
ATTR_KEYWORDS = {names.JOB_TARGET: "name", **{a: k for k, a in names.JOB_ATTRS.items()}}

_INT_KEYS = ("instances",)
_DURATION_KEYS = ("lease", "idle_timeout")
_TIME_KEYS = ("expiry",)
_ID_LIST_KEYS = ("instance_types", "image_ids", "spot_prices", "subnets", "security_groups")
_BOOL_KEYS = ("user_data_template",)
_NOT_TEXT = (*_INT_KEYS, *_DURATION_KEYS, *_TIME_KEYS, *_BOOL_KEYS)
_TEXT_KEYS = tuple(k for k in names.JOB_ATTRS if k not in _NOT_TEXT)
_TRUE = ("true", "yes", "1")
_FALSE = ("false", "no", "0")

NAME_RULE = "a letter, then letters, digits or '-', at most 63 characters"
DURATION_RULE = "use seconds (3600) or units s/m/h/d (90m, 1h30m)"
EXPIRY_RULE = "use 'YYYY-MM-DD HH:MM' (UTC) or ISO 8601 such as 2030-04-06T17:00:00+02:00"

_NAME_RE = re.compile(names.NAME_PATTERN)
_STACK_RE = re.compile(r"^[A-Za-z][A-Za-z0-9-]{0,127}$")
_DIGITS_RE = re.compile(f"^[0-9]{{1,{names.NUMBER_DIGITS_MAX}}}$")
# At most 16 parts of at most 9 digits: no sum of them leaves int64.
_DURATION_RE = re.compile(r"^([0-9]{1,9}[smhd]){1,16}$")
_DURATION_PART = re.compile(r"([0-9]+)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DATE_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
_EXPIRY_RE = re.compile(
    r"^([0-9]{4})-([0-9]{2})-([0-9]{2})[T ]([0-9]{2}):([0-9]{2})"
    r"((?::[0-9]{2}(?:\.[0-9]{1,6})?)?)((?:Z|[+-][0-9]{2}(?::?[0-9]{2})?)?)$"
)
_PRICE_RE = re.compile(r"^([0-9]{1,6}(\.[0-9]{0,8})?|\.[0-9]{1,8})$")
_ZERO_PRICE_RE = re.compile(r"^[0.]+$")
_TAGS_RE = re.compile(r"^[^=,]+=[^,]*(,[^=,]+=[^,]*)*$")
_RESERVED_TAG_RE = re.compile(r"(^|,)(aws:|htcondor-annex:)", re.IGNORECASE)
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_TAG_KEY_LONG_RE = re.compile(f"(^|,)[^=,]{{{names.TAG_KEY_MAX + 1},}}=")
_TAG_VALUE_LONG_RE = re.compile(f"=[^,]{{{names.TAG_VALUE_MAX + 1},}}")
_TAG_PAIR = f"{names.TAG_KEY_CHARS}+={names.TAG_VALUE_CHARS}*"
_TAG_CHARS_RE = re.compile(f"^{_TAG_PAIR}(,{_TAG_PAIR})*$")
# The longest free text each keyword takes (bytes of UTF-8, as ClassAd's size() counts).
TEXT_LIMITS = {
    **{k: names.LIST_TEXT_MAX for k in _ID_LIST_KEYS},
    "user_data_file": names.PATH_TEXT_MAX,
    "tags": names.TAGS_TEXT_MAX,
}


class _Bad:
    """A value that could not be converted; `shown` is how the error message quotes it."""

    def __init__(self, shown: str) -> None:
        self.shown = shown


@dataclasses.dataclass(frozen=True)
class AnnexSpec:
    """One annex request. Empty strings/tuples and None mean "not given": the helper's defaults
    apply (Settings), except mode, strategy and instances, whose defaults are fixed."""

    name: str
    owner: str
    instances: int = 1
    instance_types: tuple[str, ...] = ()
    image_ids: tuple[str, ...] = ()
    spot_prices: tuple[str, ...] = ()  # decimal strings, as EC2 takes them
    lease_seconds: int | None = None
    expiry: int | None = None  # epoch seconds, UTC
    idle_timeout: int | None = None
    region: str = ""  # "" = resolve later (ANNEX_AWS_REGION, AWS config, us-west-1)
    vpc: str = ""
    subnets: tuple[str, ...] = ()
    keypair: str = ""
    security_groups: tuple[str, ...] = ()
    mode: str = "pool"
    central_manager: str = ""
    user_data_file: str = ""  # absolute path
    user_data_template: bool = False  # render the user data with jinja2 (provision mode)
    tags: tuple[tuple[str, str], ...] = ()
    strategy: str = "fleet"
    stack_name: str = ""

    def expires_at(self, now: int, settings) -> int:
        """The annex's end: the expiry if given, else now + the lease (or ANNEX_DEFAULT_LEASE)."""
        if self.expiry is not None:
            return int(self.expiry)
        lease = self.lease_seconds if self.lease_seconds is not None else settings.default_lease
        return int(now) + int(lease)

    def pinned(self, now: int, settings) -> AnnexSpec:
        """The same request with its end fixed as an absolute expiry (how the helper stores an
        annex once created, so that later merges compare ends, not durations)."""
        return dataclasses.replace(self, lease_seconds=None, expiry=self.expires_at(now, settings))

    def effective_region(self, settings, aws_config_region: str = "") -> str:
        """Region resolution order: the job, ANNEX_AWS_REGION, the helper's AWS config,
        us-west-1."""
        return self.region or settings.region or aws_config_region or "us-west-1"

    def effective_instance_types(self, settings) -> tuple[str, ...]:
        return self.instance_types or tuple(settings.default_instance_types)

    def effective_idle_timeout(self, settings) -> int:
        return self.idle_timeout if self.idle_timeout is not None else settings.idle_timeout

    def to_keywords(self) -> dict[str, str]:
        """Keyword form (no `annex_` prefix), only what was given: from_keywords() reads it back."""
        out: dict[str, str] = {"name": self.name, "instances": str(self.instances)}
        for key in (*_ID_LIST_KEYS,):
            if getattr(self, key):
                out[key] = ",".join(getattr(self, key))
        if self.lease_seconds is not None:
            out["lease"] = str(self.lease_seconds)
        if self.expiry is not None:
            out["expiry"] = str(self.expiry)
        if self.idle_timeout is not None:
            out["idle_timeout"] = str(self.idle_timeout)
        for key in ("region", "vpc", "keypair", "central_manager", "user_data_file", "stack_name"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        if self.tags:
            out["tags"] = ",".join(f"{k}={v}" for k, v in self.tags)
        if self.user_data_template:
            out["user_data_template"] = "true"
        out["mode"] = self.mode
        out["strategy"] = self.strategy
        return out

    def to_job_attrs(self) -> dict[str, object]:
        """The canonical job attributes, as the schedd transform sets them."""
        kw = self.to_keywords()
        out: dict[str, object] = {names.JOB_TARGET: kw.pop("name")}
        for key, value in kw.items():
            attr = names.JOB_ATTRS[key]
            if key in (*_INT_KEYS, *_DURATION_KEYS, *_TIME_KEYS):
                out[attr] = int(value)
            elif key in _BOOL_KEYS:
                out[attr] = value == "true"
            else:
                out[attr] = value
        return out


# ---- conversions, each as the transform does it ------------------------------------------


def _trim(text: str) -> str:
    return re.sub(r"^\s*(.*?)\s*$", r"\1", text, flags=re.DOTALL)


def _shown(value: object) -> str:
    return value if isinstance(value, str) else str(value)


def _in_range(value: int) -> bool:
    """What a ClassAd integer (int64) holds with room to add to it."""
    return -(10**names.NUMBER_DIGITS_MAX) < value < 10**names.NUMBER_DIGITS_MAX


def _to_int(value: object) -> int | _Bad:
    if isinstance(value, int) and not isinstance(value, bool):
        return value if _in_range(value) else _Bad(str(value))
    if isinstance(value, str) and _DIGITS_RE.match(_trim(value)):
        return int(_trim(value))
    return _Bad(_shown(value))


def _duration_seconds(text: str) -> int | None:
    """The transform's duration rule on trimmed, lower-cased text; None if not a duration."""
    if _DIGITS_RE.match(text):
        return int(text)
    if _DURATION_RE.match(text):
        return sum(int(n) * _UNITS[u] for n, u in _DURATION_PART.findall(text))
    return None


def _to_duration(value: object) -> int | _Bad:
    if isinstance(value, int) and not isinstance(value, bool):
        return value if _in_range(value) else _Bad(str(value))
    if isinstance(value, str):
        seconds = _duration_seconds(_trim(value).lower())
        if seconds is not None:
            return seconds
    return _Bad(_shown(value))


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


def parse_expiry(text: str) -> int | None:
    """Epoch seconds, or YYYY-MM-DD[( |T)HH:MM[:SS[.ffffff]][Z|+HH[:MM]|-HH[:MM]]] (no offset:
    UTC; a date alone: its midnight) -> epoch seconds; None if it is neither."""
    text = _trim(text)
    if _DIGITS_RE.match(text):
        return int(text)
    if _DATE_RE.match(text):
        text += "T00:00"
    match = _EXPIRY_RE.match(text)
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


def _to_expiry(value: object) -> int | _Bad:
    if isinstance(value, int) and not isinstance(value, bool):
        return value if _in_range(value) else _Bad(str(value))
    if isinstance(value, str):
        epoch = parse_expiry(value)
        if epoch is not None:
            return epoch
    return _Bad(_shown(value))


def _to_bool(value: object) -> bool | _Bad:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return _Bad(str(value)) if value not in (0, 1) else bool(value)
    if isinstance(value, str):
        word = _trim(value).lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    return _Bad(_shown(value))


def _id_list(text: str) -> str:
    return re.sub(r"^,+|,+$", "", re.sub(r"[\s,]+", ",", text))


def _tag_list(text: str) -> str:
    return re.sub(r"^,+|,+$", "", re.sub(r"\s*,[\s,]*", ",", _trim(text)))


def _normalise_text(key: str, value: str) -> str:
    if key in _ID_LIST_KEYS:
        return _id_list(value)
    if key == "tags":
        return _tag_list(value)
    if key in ("mode", "strategy"):
        return _trim(value).lower()
    return _trim(value)


# ---- the rules -------------------------------------------------------------------------------


def _split(text: str) -> tuple[str, ...]:
    return tuple(text.split(",")) if text else ()


def from_keywords(
    kv: Mapping[str, str | int | None],
    owner: str,
    settings,
    *,
    now: int | None = None,
    iwd: str = "",
) -> AnnexSpec:
    """Validate keywords (names without the `annex_` prefix) into an AnnexSpec.

    Values are text as written in a submit file or ints; None or "" means not given. `iwd` is
    the directory a relative annex_user_data_file is taken from. Raises InputError, or
    LimitExceeded where an admin limit (ANNEX_MAX_*, ANNEX_ALLOWED_*) binds, with the message
    condor_submit prints for the same mistake.
    """
    now = int(time.time()) if now is None else int(now)
    unknown = sorted(set(kv) - set(KEYWORDS))
    if unknown:
        raise InputError(
            f"annex_{unknown[0]} is not an annex keyword: the keywords are "
            + ", ".join(f"annex_{k}" for k in KEYWORDS)
        )
    # None, and text that is empty or blank, mean "not given" (as an empty submit keyword);
    # an empty name is a bad name, as +AnnexName = "" is on the submit side.
    given = {
        k: v
        for k, v in kv.items()
        if v is not None and (k == "name" or not (isinstance(v, str) and not v.strip()))
    }

    # The name.
    if "name" not in given:
        raise InputError(f"annex_* keywords need annex_name = <name>: {NAME_RULE}")
    raw_name = given.pop("name")
    name = _trim(raw_name) if isinstance(raw_name, str) else str(raw_name)

    # Conversions first (as the transform), then the checks in the submit requirements' order.
    values: dict[str, object] = {}
    not_text: list[str] = []
    for key in names.JOB_ATTRS:
        if key not in given:
            continue
        value = given[key]
        if key in _INT_KEYS:
            values[key] = _to_int(value)
        elif key in _DURATION_KEYS:
            values[key] = _to_duration(value)
        elif key in _TIME_KEYS:
            values[key] = _to_expiry(value)
        elif key in _BOOL_KEYS:
            values[key] = _to_bool(value)
        elif not isinstance(value, str):
            not_text.append(key)
        else:
            text = _normalise_text(key, value)
            if text:
                values[key] = text
    values.setdefault("instances", 1)
    values.setdefault("mode", "pool")
    values.setdefault("strategy", "fleet")

    if not _NAME_RE.match(name):
        raise InputError(f"annex_name = '{name}' is not a valid annex name: use {NAME_RULE}")
    for key in _TEXT_KEYS:
        if key in not_text:
            attr = names.JOB_ATTRS[key]
            raise InputError(f"+{attr} must be a quoted string (or use annex_{key} = ...)")
    if "user_data_file" in values and not str(values["user_data_file"]).startswith("/"):
        if not iwd:
            raise InputError("annex_user_data_file must be an absolute path")
        values["user_data_file"] = f"{iwd.rstrip('/')}/{values['user_data_file']}"
    for key in _TEXT_KEYS:
        _check_text(key, values.get(key))

    instances = values["instances"]
    if isinstance(instances, _Bad) or instances < 1:
        shown = instances.shown if isinstance(instances, _Bad) else str(instances)
        raise InputError(
            f"annex_instances = '{shown}' is not allowed: give a whole number of at least 1"
        )
    if instances > settings.max_instances:
        raise LimitExceeded(
            f"annex_instances = {instances} is over the limit of {settings.max_instances}"
            " instances per annex (ANNEX_MAX_INSTANCES)"
        )

    lease, expiry, idle = values.get("lease"), values.get("expiry"), values.get("idle_timeout")
    if lease is not None and expiry is not None:
        raise InputError("annex_lease and annex_expiry exclude each other: give one of them")
    _check_duration("lease", lease)
    if lease is not None and lease > settings.max_lease:
        raise LimitExceeded(
            f"annex_lease = {lease} seconds is over the limit of {settings.max_lease}"
            " seconds (ANNEX_MAX_LEASE)"
        )
    if isinstance(expiry, _Bad):
        raise InputError(f"annex_expiry = '{expiry.shown}' is not a time: {EXPIRY_RULE}")
    if expiry is not None and expiry <= now:
        raise InputError("annex_expiry is in the past: give a time in the future")
    if expiry is not None and expiry > now + settings.max_lease:
        raise LimitExceeded(
            f"annex_expiry is more than {settings.max_lease} seconds from now,"
            " over the limit (ANNEX_MAX_LEASE)"
        )
    _check_duration("idle_timeout", idle)

    mode, strategy = values["mode"], values["strategy"]
    if mode not in names.MODES:
        raise InputError(f"annex_mode = '{mode}' is not allowed: use pool or provision")
    if strategy not in names.STRATEGIES:
        raise InputError(f"annex_strategy = '{strategy}' is not allowed: use fleet or stack")
    if mode == "provision" and "user_data_file" not in values:
        raise InputError(
            "annex_mode = provision needs annex_user_data_file:"
            " the file with your pilot's user data"
        )
    if mode == "provision" and ("central_manager" in values or idle is not None):
        which = "annex_central_manager" if "central_manager" in values else "annex_idle_timeout"
        raise InputError(
            f"{which} only applies to annex_mode = pool: remove it, or use annex_mode = pool"
        )
    if mode != "provision" and "user_data_file" in values:
        raise InputError(
            "annex_user_data_file only applies to annex_mode = provision:"
            " remove it, or add annex_mode = provision"
        )
    template = values.get("user_data_template", False)
    if isinstance(template, _Bad):
        raise InputError(
            f"annex_user_data_template = '{template.shown}' is not allowed: use true or false"
        )
    if template and mode != "provision":
        raise InputError(
            "annex_user_data_template only applies to annex_mode = provision:"
            " remove it, or add annex_mode = provision"
        )
    for key, only in cloud.ONLY_FOR.items():
        if strategy != only and key in values:
            raise InputError(
                f"annex_{key} only applies to annex_strategy = {only}:"
                f" remove it, or add annex_strategy = {only}"
            )
    stack_name = str(values.get("stack_name", ""))
    if stack_name and not _STACK_RE.match(stack_name):
        raise InputError(
            f"annex_stack_name = '{stack_name}' is not a valid stack name:"
            " use a letter, then letters, digits or '-', at most 128 characters"
        )
    for key, instead in cloud.REFUSED.get(strategy, {}).items():
        if key in values:
            raise InputError(
                f"annex_{key} is not supported with annex_strategy = {strategy}: {instead}"
            )

    types = _split(str(values.get("instance_types", "")))
    images = _split(str(values.get("image_ids", "")))
    prices = _split(str(values.get("spot_prices", "")))
    type_count = len(types) if types else len(tuple(settings.default_instance_types))
    for key, items in (("image_ids", images), ("spot_prices", prices)):
        if items and len(items) not in (1, type_count):
            raise InputError(
                f"annex_{key} has {len(items)} entries: give one, or one per instance type"
                f" ({type_count})"
            )
    if prices and not all(_PRICE_RE.match(p) and not _ZERO_PRICE_RE.match(p) for p in prices):
        raise InputError(
            f"annex_spot_prices = '{','.join(prices)}' is not allowed:"
            " give positive decimal prices such as 0.05"
        )
    region = str(values.get("region", ""))
    if region:
        check_region(region, settings.allowed_regions)
    for key, items, allowed, knob in (
        ("instance_types", types, settings.allowed_instance_types, "ANNEX_ALLOWED_INSTANCE_TYPES"),
        ("image_ids", images, settings.allowed_image_ids, "ANNEX_ALLOWED_IMAGE_IDS"),
        ("region", (region,) if region else (), settings.allowed_regions, "ANNEX_ALLOWED_REGIONS"),
    ):
        if items and allowed and not set(items) <= set(allowed):
            raise LimitExceeded(
                f"annex_{key} = '{','.join(items)}' is not allowed here: choose from"
                f" {','.join(allowed)} ({knob})"
            )
    tags_text = str(values.get("tags", ""))
    if tags_text and (not _TAGS_RE.match(tags_text) or _RESERVED_TAG_RE.search(tags_text)):
        raise InputError(
            f"annex_tags = '{tags_text}' is not allowed: give key=value pairs separated by"
            " commas, keys not starting with aws: or htcondor-annex:"
        )
    _check_tags(tags_text)
    tags = tuple(tuple(item.split("=", 1)) for item in _split(tags_text))

    return AnnexSpec(
        name=name,
        owner=owner,
        instances=int(instances),
        instance_types=types,
        image_ids=images,
        spot_prices=prices,
        lease_seconds=lease,
        expiry=expiry,
        idle_timeout=idle,
        region=region,
        vpc=str(values.get("vpc", "")),
        subnets=_split(str(values.get("subnets", ""))),
        keypair=str(values.get("keypair", "")),
        security_groups=_split(str(values.get("security_groups", ""))),
        mode=str(mode),
        central_manager=str(values.get("central_manager", "")),
        user_data_file=str(values.get("user_data_file", "")),
        user_data_template=bool(template),
        tags=tags,  # type: ignore[arg-type]
        strategy=str(strategy),
        stack_name=stack_name,
    )


def _check_text(key: str, value: object) -> None:
    """Free text: no control characters (NUL, newline, escape...), and not too long."""
    if not isinstance(value, str):
        return
    if _CONTROL_RE.search(value):
        raise InputError(
            f"annex_{key} contains a control character (such as NUL, tab or newline): remove it"
        )
    limit = TEXT_LIMITS.get(key, names.TEXT_MAX)
    if len(value.encode("utf-8", "surrogatepass")) > limit:
        raise InputError(f"annex_{key} is longer than {limit} characters: shorten it")


def _check_tags(text: str) -> None:
    """AWS's tag limits (names.TAG_*), after the format and reserved-prefix rule."""
    if not text:
        return
    count = len(_split(text))
    if count > names.USER_TAGS_MAX:
        raise InputError(
            f"annex_tags has {count} tags: give at most {names.USER_TAGS_MAX}"
            f" (AWS allows {names.TAG_LIMIT} per resource, {names.TAGS_KEPT_FOR_US}"
            " are kept for htcondor-annex)"
        )
    if _TAG_KEY_LONG_RE.search(text) or _TAG_VALUE_LONG_RE.search(text):
        raise InputError(
            f"annex_tags has a key longer than {names.TAG_KEY_MAX} or a value longer than"
            f" {names.TAG_VALUE_MAX} characters: shorten it"
        )
    if not _TAG_CHARS_RE.match(text):
        raise InputError(
            "annex_tags may only hold letters, digits, spaces and _ . : / = + - @"
            " (AWS's tag characters)"
        )


def _check_duration(key: str, value: object) -> None:
    if value is None:
        return
    if isinstance(value, _Bad) or value <= 0:  # type: ignore[operator]
        shown = value.shown if isinstance(value, _Bad) else str(value)
        raise InputError(f"annex_{key} = '{shown}' is not a positive duration: {DURATION_RULE}")


def _absent(value: object) -> bool:
    """None, ClassAd undefined (classad2.Value.Undefined prints as 'Undefined'), or ''."""
    if value is None:
        return True
    return not isinstance(value, (str, int)) and str(value).strip().lower() in ("undefined", "")


def from_job_attrs(
    attrs: Mapping[str, object], owner: str, settings, *, now: int | None = None
) -> AnnexSpec:
    """Validate a job ad's annex attributes (canonical names; the spellings a job that bypassed
    the transform may carry are read too, with the transform's precedence: annex_<keyword>,
    then +Annex<Keyword>, then TargetAnnexName for the name). Attribute names are matched
    without regard to case, as in ClassAds."""
    lower = {str(k).lower(): v for k, v in attrs.items()}

    def pick(*candidates: str) -> object:
        for candidate in candidates:
            value = lower.get(candidate.lower())
            if not _absent(value):
                if not isinstance(value, (str, int)) or isinstance(value, bool):
                    value = str(value)
                return value
        return None

    kv: dict[str, object] = {"name": pick("annex_name", "AnnexName", names.JOB_TARGET)}
    for key, attr in names.JOB_ATTRS.items():
        kv[key] = pick(f"annex_{key}", attr)
    if kv["name"] is None:
        del kv["name"]
    iwd = pick("Iwd")
    return from_keywords(
        kv,  # type: ignore[arg-type]
        owner,
        settings,
        now=now,
        iwd=iwd if isinstance(iwd, str) else "",
    )


def merge(existing: AnnexSpec, new: AnnexSpec, settings, *, now: int | None = None) -> AnnexSpec:
    """What an annex becomes when another job (or cluster) names it.

    - instances: the larger request, up to ANNEX_MAX_INSTANCES;
    - lease: the longer one, counted like the annex's own lease from when the annex was created
      (a request without a lease counts as ANNEX_DEFAULT_LEASE);
    - expiry: when either request gives an absolute end, the result is the later end (a lease
      counted from `now`, default the current time), at most now + ANNEX_MAX_LEASE, as an
      expiry; pass `existing` pinned (AnnexSpec.pinned) for its end to be its real one;
    - idle timeout: the longer one;
    - mode, strategy, region and every placement setting (instance types, images, spot prices,
      vpc, subnets, key pair, security groups, central manager, user data, tags, stack name):
      the new request may leave them out or repeat them exactly; a different value is refused,
      because the annex already runs with the first request's settings. (An empty region in
      `existing` means "not resolved yet" and takes the new one.)
    """
    now = int(time.time()) if now is None else int(now)
    if (existing.name, existing.owner) != (new.name, new.owner):
        raise InputError(
            f"annex '{new.name}' of {new.owner} is not annex '{existing.name}' of {existing.owner}"
        )
    for key in ("mode", "strategy"):
        if getattr(new, key) != getattr(existing, key):
            raise InputError(_conflict(existing, key, getattr(existing, key), getattr(new, key)))
    region = existing.region
    if new.region and new.region != existing.region:
        if existing.region:
            raise InputError(_conflict(existing, "region", existing.region, new.region))
        region = new.region
    for key in (
        "instance_types", "image_ids", "spot_prices", "vpc", "subnets", "keypair",
        "security_groups", "central_manager", "user_data_file", "user_data_template", "tags",
        "stack_name",
    ):  # fmt: skip
        mine, theirs = getattr(existing, key), getattr(new, key)
        if theirs and theirs != mine:
            raise InputError(_conflict(existing, key, _text(mine), _text(theirs)))
    lease: int | None = None
    expiry: int | None = None
    if existing.expiry is None and new.expiry is None:
        if existing.lease_seconds is not None or new.lease_seconds is not None:
            lease = max(
                existing.lease_seconds or settings.default_lease,
                new.lease_seconds or settings.default_lease,
            )
    else:
        expiry = min(
            max(existing.expires_at(now, settings), new.expires_at(now, settings)),
            now + settings.max_lease,
        )
    idle = None
    if existing.idle_timeout is not None or new.idle_timeout is not None:
        idle = max(existing.effective_idle_timeout(settings), new.effective_idle_timeout(settings))
    return dataclasses.replace(
        existing,
        instances=min(max(existing.instances, new.instances), settings.max_instances),
        lease_seconds=lease,
        expiry=expiry,
        idle_timeout=idle,
        region=region,
    )


def _text(value: object) -> str:
    if isinstance(value, tuple):
        return ",".join("=".join(v) if isinstance(v, tuple) else v for v in value)
    return str(value)


def _conflict(existing: AnnexSpec, key: str, mine: str, theirs: str) -> str:
    return (
        f"annex '{existing.name}' already runs with annex_{key} = '{mine or '(default)'}';"
        f" this job asks for '{theirs}':"
        f" leave annex_{key} out, repeat it, or use another annex_name"
    )


# ---- regions -------------------------------------------------------------------------------

# Every AWS region name is short lowercase ASCII: checked before any pattern of botocore's
# (whose `\w` would let other scripts' letters and `_` through).
_REGION_SHAPE_RE = re.compile(r"^[a-z0-9-]{1,32}$")


def _region_shown(value: str) -> str:
    """A hostile value bounded and printable, for a one-line refusal."""
    shown = value.encode("unicode_escape").decode("ascii")
    return shown if len(shown) <= 40 else f"{shown[:40]}... ({len(value)} characters)"


def check_region(region: str, allowed: tuple[str, ...] = (), knob: str = "annex_region") -> str:
    """Refuse, before anything is recorded, a region AWS does not have or the admin's
    ANNEX_ALLOWED_REGIONS leaves out. `knob` is what the refusal names: the submit keyword, or
    the config knob the region came from."""
    from annex_gahp.cloud.aws.regions import known_regions  # noqa: PLC0415 - botocore

    known, patterns = known_regions()
    if not (
        _REGION_SHAPE_RE.match(region)
        and (region in known or any(p.match(region) for p in patterns))
    ):
        raise InputError(
            f"{knob} = '{_region_shown(region)}' is not an AWS region: give one such as"
            " us-east-1 or eu-west-1"
        )
    if allowed and region not in allowed:
        raise LimitExceeded(
            f"{knob} = '{region}' is not allowed here: choose from {','.join(allowed)}"
            " (ANNEX_ALLOWED_REGIONS)"
        )
    return region
