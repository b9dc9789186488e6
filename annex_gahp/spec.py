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

from annex_gahp import cloud, durations, names
from annex_gahp.errors import InputError, LimitExceeded

# Keyword names without the `annex_` prefix, in contract order.
KEYWORDS = ("name", *names.JOB_ATTRS)
# Canonical job attribute -> keyword.
ATTR_KEYWORDS = {names.JOB_TARGET: "name", **{a: k for k, a in names.JOB_ATTRS.items()}}

INT_KEYS = ("instances",)
DURATION_KEYS = ("lease", "idle_timeout")
TIME_KEYS = ("expiry",)
_ID_LIST_KEYS = ("instance_types", "image_ids", "spot_prices", "subnets", "security_groups")
BOOL_KEYS = ("user_data_template",)
_NOT_TEXT = (*INT_KEYS, *DURATION_KEYS, *TIME_KEYS, *BOOL_KEYS)
TEXT_KEYS = tuple(k for k in names.JOB_ATTRS if k not in _NOT_TEXT)
TRUE_WORDS = ("true", "yes", "1")
FALSE_WORDS = ("false", "no", "0")

NAME_RULE = "a letter, then letters, digits or '-', at most 63 characters"
DURATION_RULE = durations.DURATION_RULE
EXPIRY_RULE = durations.EXPIRY_RULE
IMAGE_REFERENCE_RULE = (
    "has a malformed resolve: reference: use resolve:ssm:/aws/service/<name> (letters, digits"
    " and _ . - / in the name)"
)

MAX_COST_RULE = "give a positive amount such as 25 or 2.50"

_NAME_RE = re.compile(names.NAME_PATTERN)
_STACK_RE = re.compile(r"^[A-Za-z][A-Za-z0-9-]{0,127}$")
_DIGITS_RE = re.compile(f"^[0-9]{{1,{names.NUMBER_DIGITS_MAX}}}$")
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
    max_cost: str = ""  # annex_max_cost: a positive decimal amount (budgets.py), "" = none

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


# ---- the submit requirements: one table for condor_submit and for the helper ------------------
# condor_config.d/20-annex-submit.conf is rendered from this table and from the keyword kinds
# above by annex_gahp.submitconfig (`htcondor-annex render-submit-config`); a fast-tier test
# fails when the shipped file differs. from_keywords() applies the same rules in the same
# order with the same messages.

_GUARD = f"{names.JOB_TARGET} is undefined"
_CONTROL_CLASSAD = "[\\\\x00-\\\\x1f\\\\x7f]"


@dataclasses.dataclass(frozen=True)
class Rule:
    """One submit requirement (SUBMIT_REQUIREMENT_<name>). `accept` is the ClassAd condition a
    job that names an annex must meet, `reason` the ClassAd string condor_submit prints after
    `ERROR:`, `why` the comment an admin reads above it. `guard` is when the rule does not
    apply (by default: the job names no annex)."""

    name: str
    accept: str
    reason: str
    why: str = ""
    guard: str = _GUARD


def _any_of(terms: list[str]) -> str:
    return "!(\n" + "\n|| ".join(terms) + ")"


def _first_of(cases: list[tuple[str, str]]) -> str:
    """Nested ifThenElse: the message of the first case whose condition holds, else ""."""
    return "\n".join(f'ifThenElse({cond}, "{msg}",' for cond, msg in cases) + ' ""' + ")" * len(
        cases
    )


def _keyword_rules() -> tuple[Rule, ...]:
    """The rules that repeat for every keyword, generated from the keyword kinds."""
    spelled = [t for k in names.JOB_ATTRS for t in (f"annex_{k}", names.JOB_ATTRS[k])]
    text = {k: names.JOB_ATTRS[k] for k in TEXT_KEYS}
    control = [
        (f'isString({a}) && regexp("{_CONTROL_CLASSAD}", {a})', _control_message(k))
        for k, a in text.items()
    ]
    lengths = [
        (f"isString({a}) && size({a}) > {TEXT_LIMITS.get(k, names.TEXT_MAX)}",
         _length_message(k))
        for k, a in text.items()
    ]  # fmt: skip
    not_text = [
        (f"{a} isnt undefined && !isString({a})", _not_text_message(k))
        for k, a in text.items()
    ]  # fmt: skip
    return (
        Rule(
            "AnnexNoName",
            _any_of([f"{t} isnt undefined" for t in spelled]),
            f'"annex_* keywords need annex_name = <name>: {NAME_RULE}"',
            "Any annex keyword without annex_name.",
            guard=f"{names.JOB_TARGET} isnt undefined",
        ),
        Rule(
            "AnnexBadName",
            f'(isString({names.JOB_TARGET}) && regexp("{names.NAME_PATTERN}", {names.JOB_TARGET}))',
            f"strcat(\"annex_name = '\", ifThenElse(isString({names.JOB_TARGET}),"
            f" {names.JOB_TARGET}, string({names.JOB_TARGET})),"
            f" \"' is not a valid annex name: use {NAME_RULE}\")",
            "The annex name: what an EC2 tag, a ClassAd string and a stack name all accept.",
        ),
        Rule(
            "AnnexText",
            "!(\n" + "\n|| ".join(f"({c})" for c, _ in not_text) + ")",
            _first_of(not_text),
            "Text keywords written as +Annex* must be quoted strings.",
        ),
        Rule(
            "AnnexControl",
            _any_of([f"({c})" for c, _ in control]),
            _first_of(control),
            "Free text: no control characters (NUL, tab, newline, escape...) in any value."
            " Messages do not quote the value.",
        ),
        Rule(
            "AnnexTextLength",
            _any_of([f"({c})" for c, _ in lengths]),
            _first_of(lengths),
            "Every value bounded (names.TEXT_MAX and friends; spec.TEXT_LIMITS), in bytes of"
            " UTF-8 as size() counts them.",
        ),
    )


def _control_message(key: str) -> str:
    return f"annex_{key} contains a control character (such as NUL, tab or newline): remove it"


def _length_message(key: str) -> str:
    limit = TEXT_LIMITS.get(key, names.TEXT_MAX)
    return f"annex_{key} is longer than {limit} characters: shorten it"


def _not_text_message(key: str) -> str:
    return f"+{names.JOB_ATTRS[key]} must be a quoted string (or use annex_{key} = ...)"


def _shown_reason(key: str, rest: str) -> str:
    """`annex_<key> = '<value as the transform left it>' <rest>`, as a ClassAd string."""
    attr = names.JOB_ATTRS[key]
    return (
        f"strcat(\"annex_{key} = '\", ifThenElse(isString({attr}), {attr}, string({attr})),"
        f" \"' {rest}\")"
    )


# ---- what is left of the budgets, as the schedd's cron job publishes it ---------------------
# hooks/budget_cron.py puts the helper's view into the schedd's ad (MY, with the prefix Annex);
# condor_submit evaluates submit requirements with the schedd's ad as MY and the job as TARGET.
# Every term passes when the data is missing or stale, or a price is unknown: the helper, which
# judges every new annex again (accounting.refusal), is the authority.
_BUDGET_MAX_TYPES = 4  # the types priced here; a request with more is left to the helper


def _budget_view() -> str:
    """One nested ClassAd record that computes the request's worst case once, as
    accounting.refusal does: instances x lease x the highest price it may pay (its spot
    maximum, else the on-demand price), at most its annex_max_cost; `worst` is undefined when
    it cannot be priced here. Inside the record, TARGET is the job and MY the schedd's ad."""
    n = _BUDGET_MAX_TYPES
    fields = {
        "types": 'split(ifThenElse(isString(TARGET.AnnexInstanceTypes), '
                 'TARGET.AnnexInstanceTypes, MY.AnnexBudgetTypes), ",")',
        "region": "ifThenElse(isString(TARGET.AnnexRegion), TARGET.AnnexRegion,"
                  " MY.AnnexBudgetRegion)",
        "spots": 'split(TARGET.AnnexSpotPrices, ",")',
        **{f"p{i}": f'ifThenElse(size(types) > {i}, MY.AnnexBudgetPrices[strcat(region, ":", '
                    f"types[{i}])] ?: -1.0, 0.0)" for i in range(n)},
        **{f"s{i}": f"ifThenElse(size(spots) > {i}, real(spots[{i}]), 0.0)" for i in range(n)},
        "price": (
            f"ifThenElse(isString(TARGET.AnnexSpotPrices), ifThenElse(size(spots) <= {n}, "
            f"max({{{', '.join(f's{i}' for i in range(n))}}}), undefined), "
            f"ifThenElse(size(types) <= {n} && min({{{', '.join(f'p{i}' for i in range(n))}}})"
            f" >= 0, max({{{', '.join(f'p{i}' for i in range(n))}}}), undefined))"
        ),
        "lease": "ifThenElse(isInteger(TARGET.AnnexLease), TARGET.AnnexLease,"
                 " ifThenElse(isInteger(TARGET.AnnexExpiry), TARGET.AnnexExpiry - time(),"
                 " MY.AnnexBudgetLease))",
        "raw": "ifThenElse(isInteger(TARGET.AnnexInstances), TARGET.AnnexInstances, 1)"
               " * lease / 3600.0 * price",
        "cap": "real(TARGET.AnnexMaxCost)",
        "worst": "ifThenElse(isString(TARGET.AnnexMaxCost), ifThenElse(isReal(raw) && raw < cap,"
                 " raw, cap), raw)",
        "userLeft": "MY.AnnexBudgetLeft[TARGET.Owner] ?: MY.AnnexBudgetUser",
        "overUser": "(worst > userLeft) =?= true",
        "overPool": "(worst > MY.AnnexBudgetPoolLeft) =?= true",
    }  # fmt: skip
    return "[ " + " ".join(f"{k} = {v};" for k, v in fields.items()) + " ]"


def _money(expr: str) -> str:
    """An amount as budgets.money shows it (cents), in ClassAd."""
    cents = f"int(round(({expr}) * 100))"
    return f'strcat(string({cents} / 100), ".", substr(strcat("0", string({cents} % 100)), -2))'


def _budget_left_rules() -> tuple[Rule, ...]:
    view = _budget_view()
    fresh = (
        "MY.AnnexBudgetUpdated >= time() - 600 && "
        'MY.AnnexBudgetLive[strcat(Owner, "/", TargetAnnexName)] =!= true'
    )

    def said(who: str, knob: str, text: str, left: str) -> str:
        return (
            f'strcat("the worst case of this annex (", {_money(view + ".worst")}, " ", '
            f'MY.AnnexBudgetCurrency, ") is over what is left of {who}budget {knob} = ", {text}, '
            f'": ", {_money(left)}, " ", MY.AnnexBudgetCurrency, " left; ask for fewer '
            'instances, a shorter lease or a lower annex_max_cost")'
        )

    user = said("your ", "ANNEX_BUDGET_PER_USER", "MY.AnnexBudgetUserText", view + ".userLeft")
    pool = said("the pool's ", "ANNEX_BUDGET_PER_POOL", "MY.AnnexBudgetPoolText",
                "MY.AnnexBudgetPoolLeft")  # fmt: skip
    return (
        Rule(
            "AnnexBudgetLeft",
            f"(({fresh}) && ({view}.overUser || {view}.overPool)) =!= true",
            f"ifThenElse({view}.overUser, {user}, {pool})",
            "What is left of ANNEX_BUDGET_PER_USER (for the job's Owner) and"
            " ANNEX_BUDGET_PER_POOL, as the helper last saw it, published into the schedd's ad"
            " by the schedd cron job ANNEXBUDGET (annex_budget_cron): a request whose worst"
            " case (instances x lease x price, at most its annex_max_cost) is over it is"
            " refused. It passes when nothing is published (no budget, no helper, data older"
            " than 10 minutes), for an annex that is already running (the helper judges its"
            " growth) and when a price is unknown; the helper checks every request again.",
        ),
    )


RULES: tuple[Rule, ...] = (
    *_keyword_rules(),
    Rule(
        "AnnexInstances",
        "(isInteger(AnnexInstances) && AnnexInstances >= 1)",
        _shown_reason("instances", "is not allowed: give a whole number of at least 1"),
        "How many instances: a whole number, at least 1.",
    ),
    Rule(
        "AnnexMaxInstances",
        "AnnexInstances <= $(ANNEX_MAX_INSTANCES)",
        "strcat(\"annex_instances = \", string(AnnexInstances), \" is over the limit of \", "
        "string($(ANNEX_MAX_INSTANCES)), \" instances per annex (ANNEX_MAX_INSTANCES)\")",
        "The admin's cap per annex (ANNEX_MAX_INSTANCES in 10-annex-gahp.conf).",
    ),
    Rule(
        "AnnexLeaseAndExpiry",
        "AnnexLease is undefined || AnnexExpiry is undefined",
        "\"annex_lease and annex_expiry exclude each other: give one of them\"",
        "A lease (a duration) or an expiry (an absolute end), not both.",
    ),
    Rule(
        "AnnexLease",
        "AnnexLease is undefined || (isInteger(AnnexLease) && AnnexLease > 0)",
        _shown_reason("lease", "is not a positive duration: " + DURATION_RULE),
        "The lease: a positive duration (3600, 90m, 2h, 1h30m).",
    ),
    Rule(
        "AnnexMaxLease",
        "AnnexLease is undefined || AnnexLease <= $(ANNEX_SUBMIT_MAX_LEASE)",
        "strcat(\"annex_lease = \", string(AnnexLease), \" seconds is over the limit of \", "
        "string($(ANNEX_SUBMIT_MAX_LEASE)), \" seconds (ANNEX_MAX_LEASE)\")",
        "The admin's longest lease (ANNEX_MAX_LEASE, in seconds or as a duration).",
    ),
    Rule(
        "AnnexExpiry",
        "AnnexExpiry is undefined || isInteger(AnnexExpiry)",
        _shown_reason("expiry", "is not a time: " + EXPIRY_RULE),
        "The expiry: epoch seconds, 'YYYY-MM-DD HH:MM' (UTC) or ISO 8601.",
    ),
    Rule(
        "AnnexExpiryPast",
        "AnnexExpiry is undefined || AnnexExpiry > time()",
        "\"annex_expiry is in the past: give a time in the future\"",
        "An expiry in the past would retire the annex at once.",
    ),
    Rule(
        "AnnexMaxExpiry",
        "AnnexExpiry is undefined || AnnexExpiry <= time() + $(ANNEX_SUBMIT_MAX_LEASE)",
        "strcat(\"annex_expiry is more than \", string($(ANNEX_SUBMIT_MAX_LEASE)), \" seconds "
        "from now, over the limit (ANNEX_MAX_LEASE)\")",
        "An expiry is a lease too: at most ANNEX_MAX_LEASE from now.",
    ),
    Rule(
        "AnnexIdleTimeout",
        "AnnexIdleTimeout is undefined || (isInteger(AnnexIdleTimeout) && AnnexIdleTimeout > 0)",
        _shown_reason("idle_timeout", "is not a positive duration: " + DURATION_RULE),
        "The idle timeout: a positive duration.",
    ),
    Rule(
        "AnnexMode",
        "AnnexMode =?= \"pool\" || AnnexMode =?= \"provision\"",
        "strcat(\"annex_mode = '\", AnnexMode, \"' is not allowed: use pool or provision\")",
        "pool (instances join this pool) or provision (the user's own pilot).",
    ),
    Rule(
        "AnnexStrategy",
        "AnnexStrategy =?= \"fleet\" || AnnexStrategy =?= \"stack\"",
        "strcat(\"annex_strategy = '\", AnnexStrategy, \"' is not allowed: use fleet or stack\")",
        "fleet (EC2 Fleet) or stack (CloudFormation with Auto Scaling groups).",
    ),
    Rule(
        "AnnexUserData",
        "AnnexMode =!= \"provision\" || AnnexUserDataFile isnt undefined",
        "\"annex_mode = provision needs annex_user_data_file: the file with your pilot's user "
        "data\"",
        "Provision mode boots the user's pilot: its user data file is required.",
    ),
    Rule(
        "AnnexPoolOnly",
        "AnnexMode =!= \"provision\" || (AnnexCentralManager is undefined && AnnexIdleTimeout is "
        "undefined)",
        "strcat(ifThenElse(AnnexCentralManager isnt undefined, \"annex_central_manager\", "
        "\"annex_idle_timeout\"), \" only applies to annex_mode = pool: remove it, or use "
        "annex_mode = pool\")",
        "Settings that only a pool-mode annex uses.",
    ),
    Rule(
        "AnnexProvisionOnly",
        "AnnexMode =?= \"provision\" || AnnexUserDataFile is undefined",
        "\"annex_user_data_file only applies to annex_mode = provision: remove it, or add "
        "annex_mode = provision\"",
        "A user data file only makes sense in provision mode.",
    ),
    Rule(
        "AnnexUserDataTemplate",
        "AnnexUserDataTemplate is undefined || isBoolean(AnnexUserDataTemplate)",
        "strcat(\"annex_user_data_template = '\", ifThenElse(isString(AnnexUserDataTemplate), "
        "AnnexUserDataTemplate, unparse(AnnexUserDataTemplate)), \"' is not allowed: use true or "
        "false\")",
        "Whether the user data is a template: true/yes/1 or false/no/0.",
    ),
    Rule(
        "AnnexTemplateOnly",
        "AnnexMode =?= \"provision\" || AnnexUserDataTemplate =!= true",
        "\"annex_user_data_template only applies to annex_mode = provision: remove it, or add "
        "annex_mode = provision\"",
        "Templates are rendered for provision mode only.",
    ),
    Rule(
        "AnnexStackOnly",
        "AnnexStrategy =?= \"stack\" || AnnexStackName is undefined",
        "\"annex_stack_name only applies to annex_strategy = stack: remove it, or add "
        "annex_strategy = stack\"",
        "A stack name only makes sense with the stack strategy.",
    ),
    Rule(
        "AnnexStackName",
        "AnnexStackName is undefined || regexp(\"^[A-Za-z][A-Za-z0-9-]{0,127}$\", AnnexStackName)",
        "strcat(\"annex_stack_name = '\", AnnexStackName, \"' is not a valid stack name: use a "
        "letter, then letters, digits or '-', at most 128 characters\")",
        "A CloudFormation stack name.",
    ),
    Rule(
        "AnnexVpcStack",
        "AnnexStrategy =!= \"stack\" || AnnexVpc is undefined",
        "\"annex_vpc is not supported with annex_strategy = stack: give annex_subnets in that "
        "VPC instead, or use annex_strategy = fleet\"",
        "The stack strategy's Auto Scaling groups take subnets only (cloud/aws/stack.py); the "
        "fleet strategy honours annex_vpc (cloud/aws/fleet.resolve_vpc).",
    ),
    Rule(
        "AnnexImageCount",
        "AnnexImageIds is undefined || size(split(AnnexImageIds, \",\")) == 1 || "
        "size(split(AnnexImageIds, \",\")) == $(ANNEX_SUBMIT_TYPE_COUNT)",
        "strcat(\"annex_image_ids has \", string(size(split(AnnexImageIds, \",\"))), \" entries: "
        "give one, or one per instance type (\", string($(ANNEX_SUBMIT_TYPE_COUNT)), \")\")",
        "One image for every instance type, or one per type.",
    ),
    Rule(
        "AnnexSpotCount",
        "AnnexSpotPrices is undefined || size(split(AnnexSpotPrices, \",\")) == 1 || "
        "size(split(AnnexSpotPrices, \",\")) == $(ANNEX_SUBMIT_TYPE_COUNT)",
        "strcat(\"annex_spot_prices has \", string(size(split(AnnexSpotPrices, \",\"))), \" "
        "entries: give one, or one per instance type (\", string($(ANNEX_SUBMIT_TYPE_COUNT)), "
        "\")\")",
        "One spot price for every instance type, or one per type.",
    ),
    Rule(
        "AnnexSpotPrices",
        "AnnexSpotPrices is undefined || (regexp(\"^$(_annex_price)(,$(_annex_price))*$\", "
        "AnnexSpotPrices) && !regexp(\"(^|,)[0.]+(,|$)\", AnnexSpotPrices))",
        "strcat(\"annex_spot_prices = '\", AnnexSpotPrices, \"' is not allowed: give positive "
        "decimal prices such as 0.05\")",
        "Spot prices: positive decimals (no spot price: on-demand).",
    ),
    Rule(
        "AnnexImageRefs",
        "AnnexImageIds is undefined || !(regexp(\"(^|,)resolve:(?!ssm:/[A-Za-z0-9_./-]{1,1010}"
        "(,|$))\", AnnexImageIds) || regexp(\"(^|,)resolve:ssm:[^,]*([.][.]|//)\", "
        "AnnexImageIds))",
        _shown_reason("image_ids", IMAGE_REFERENCE_RULE),
        "An image named by an SSM parameter, as EC2 takes it: resolve:ssm:/<name>. Which"
        " parameters may be read (ANNEX_IMAGE_PARAMETER_PREFIXES, default /aws/service/) the"
        " helper checks.",
    ),
    Rule(
        "AnnexAllowedTypes",
        "AnnexInstanceTypes is undefined || $(ANNEX_SUBMIT_ALLOWED_TYPES) == \"\" || "
        "stringListSubsetMatch(AnnexInstanceTypes, $(ANNEX_SUBMIT_ALLOWED_TYPES), \",\")",
        "strcat(\"annex_instance_types = '\", AnnexInstanceTypes, \"' is not allowed here: "
        "choose from \", $(ANNEX_SUBMIT_ALLOWED_TYPES), \" (ANNEX_ALLOWED_INSTANCE_TYPES)\")",
        "The admin's allow-list of instance types (ANNEX_ALLOWED_INSTANCE_TYPES; empty: any).",
    ),
    Rule(
        "AnnexAllowedImages",
        "AnnexImageIds is undefined || $(ANNEX_SUBMIT_ALLOWED_IMAGES) == \"\" || "
        "stringListSubsetMatch(AnnexImageIds, $(ANNEX_SUBMIT_ALLOWED_IMAGES), \",\")",
        "strcat(\"annex_image_ids = '\", AnnexImageIds, \"' is not allowed here: choose from \", "
        "$(ANNEX_SUBMIT_ALLOWED_IMAGES), \" (ANNEX_ALLOWED_IMAGE_IDS)\")",
        "The admin's allow-list of images (ANNEX_ALLOWED_IMAGE_IDS; empty: any).",
    ),
    Rule(
        "AnnexAllowedRegion",
        "AnnexRegion is undefined || $(ANNEX_SUBMIT_ALLOWED_REGIONS) == \"\" || "
        "stringListMember(AnnexRegion, $(ANNEX_SUBMIT_ALLOWED_REGIONS), \",\")",
        "strcat(\"annex_region = '\", AnnexRegion, \"' is not allowed here: choose from \", "
        "$(ANNEX_SUBMIT_ALLOWED_REGIONS), \" (ANNEX_ALLOWED_REGIONS)\")",
        "The admin's allow-list of regions (ANNEX_ALLOWED_REGIONS; empty: any).",
    ),
    Rule(
        "AnnexTags",
        "AnnexTags is undefined || (regexp(\"^[^=,]+=[^,]*(,[^=,]+=[^,]*)*$\", AnnexTags) && "
        "!regexp(\"(^|,)(aws:|htcondor-annex:)\", AnnexTags, \"i\"))",
        "strcat(\"annex_tags = '\", AnnexTags, \"' is not allowed: give key=value pairs "
        "separated by commas, keys not starting with aws: or htcondor-annex:\")",
        "Extra EC2 tags as key=value pairs; the aws: and htcondor-annex: prefixes are kept for "
        "AWS and for us.",
    ),
    Rule(
        "AnnexTagCount",
        "AnnexTags is undefined || size(split(AnnexTags, \",\")) <= 42",
        "strcat(\"annex_tags has \", string(size(split(AnnexTags, \",\"))), \" tags: give at "
        "most 42 (AWS allows 50 per resource, 8 are kept for htcondor-annex)\")",
        "AWS's tag limits (names.TAG_*): at most 42 of the user's (50 per resource, 8 kept for "
        "ours).",
    ),
    Rule(
        "AnnexTagLength",
        "AnnexTags is undefined || !(regexp(\"(^|,)[^=,]{129,}=\", AnnexTags) || "
        "regexp(\"=[^,]{257,}\", AnnexTags))",
        "\"annex_tags has a key longer than 128 or a value longer than 256 characters: shorten "
        "it\"",
        "AWS's tag limits: keys of at most 128 and values of at most 256 characters.",
    ),
    Rule(
        "AnnexTagChars",
        "AnnexTags is undefined || regexp(\"^[A-Za-z0-9 _.:/+@-]+=[A-Za-z0-9 "
        "_.:/=+@-]*(,[A-Za-z0-9 _.:/+@-]+=[A-Za-z0-9 _.:/=+@-]*)*$\", AnnexTags)",
        "\"annex_tags may only hold letters, digits, spaces and _ . : / = + - @ (AWS's tag "
        "characters)\"",
        "AWS's tag characters only (EC2 alone is laxer).",
    ),
    Rule(
        "AnnexMaxCost",
        "AnnexMaxCost is undefined || (regexp(\"^$(_annex_price)$\", AnnexMaxCost) && "
        "!regexp(\"^[0.]+$\", AnnexMaxCost))",
        _shown_reason("max_cost", "is not allowed: " + MAX_COST_RULE),
        "The most one annex may spend (a positive amount in the pool's currency).",
    ),
    Rule(
        "AnnexMaxCostBudget",
        "AnnexMaxCost is undefined || $(ANNEX_SUBMIT_BUDGET_PER_USER) == \"\" || "
        "real(AnnexMaxCost) <= real(split($(ANNEX_SUBMIT_BUDGET_PER_USER), \" /\")[0])",
        "strcat(\"annex_max_cost = \", AnnexMaxCost, \" is over your whole budget "
        "(ANNEX_BUDGET_PER_USER = \", $(ANNEX_SUBMIT_BUDGET_PER_USER), \"): ask for less\")",
        "An annex may not be allowed to spend more than the user's whole budget. What is left "
        "of it is checked by the helper (it alone knows the spending): a request whose worst "
        "case is over what is left is refused there, and the job shows why in AnnexLastError.",
    ),
    *_budget_left_rules(),
)


# ---- conversions, each as the transform does it ------------------------------------------


_trim = durations.trim


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


def _to_duration(value: object) -> int | _Bad:
    if isinstance(value, int) and not isinstance(value, bool):
        return value if _in_range(value) else _Bad(str(value))
    if isinstance(value, str):
        seconds = durations.duration(value)
        if seconds is not None:
            return seconds
    return _Bad(_shown(value))


def _to_expiry(value: object) -> int | _Bad:
    if isinstance(value, int) and not isinstance(value, bool):
        return value if _in_range(value) else _Bad(str(value))
    if isinstance(value, str):
        epoch = durations.expiry(value)
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
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
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
        if key in INT_KEYS:
            values[key] = _to_int(value)
        elif key in DURATION_KEYS:
            values[key] = _to_duration(value)
        elif key in TIME_KEYS:
            values[key] = _to_expiry(value)
        elif key in BOOL_KEYS:
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
    for key in TEXT_KEYS:
        if key in not_text:
            raise InputError(_not_text_message(key))
    if "user_data_file" in values and not str(values["user_data_file"]).startswith("/"):
        if not iwd:
            raise InputError("annex_user_data_file must be an absolute path")
        values["user_data_file"] = f"{iwd.rstrip('/')}/{values['user_data_file']}"
    for key in TEXT_KEYS:
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
    check_image_ids(images, tuple(getattr(settings, "image_parameter_prefixes", _AWS_PUBLIC)))
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
        max_cost=_max_cost(values.get("max_cost", ""), settings),
    )


def _max_cost(value: object, settings) -> str:
    """annex_max_cost: a positive amount, not over the user's whole budget (what is left of it
    only the helper knows: accounting.refusal)."""
    text = str(value).strip()
    if text and (not _PRICE_RE.match(text) or _ZERO_PRICE_RE.match(text)):
        raise InputError(f"annex_max_cost = '{text}' is not allowed: {MAX_COST_RULE}")
    budget = str(getattr(settings, "budget_per_user", "") or "")
    if text and budget and float(text) > float(re.split(r"[ /]", budget.strip())[0]):
        raise LimitExceeded(
            f"annex_max_cost = {text} is over your whole budget"
            f" (ANNEX_BUDGET_PER_USER = {budget}): ask for less"
        )
    return text


def _check_text(key: str, value: object) -> None:
    """Free text: no control characters (NUL, newline, escape...), and not too long."""
    if not isinstance(value, str):
        return
    if _CONTROL_RE.search(value):
        raise InputError(_control_message(key))
    if len(value.encode("utf-8", "surrogatepass")) > TEXT_LIMITS.get(key, names.TEXT_MAX):
        raise InputError(_length_message(key))


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
        "stack_name", "max_cost",
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
        idle = max(
            settings.idle_timeout if spec_idle is None else spec_idle
            for spec_idle in (existing.idle_timeout, new.idle_timeout)
        )
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


# An image may be named as EC2 itself accepts: `resolve:ssm:<parameter name>`, the parameter
# holding an ami id (AWS publishes the stock images' ids under /aws/service/).
SSM_REFERENCE = "resolve:ssm:"
_AWS_PUBLIC = ("/aws/service/",)
# SSM's name characters; `..` and `//` refused so a prefix check cannot be talked around.
_SSM_NAME_RE = re.compile(r"^/[A-Za-z0-9_./-]{1,1010}$")


def check_image_reference(
    image: str, prefixes: tuple[str, ...], knob: str = "annex_image_ids", shown: str = ""
) -> str:
    """The parameter name of an image reference, refused unless it is well formed and under
    one of the admin's ANNEX_IMAGE_PARAMETER_PREFIXES (default /aws/service/). `shown`: what
    the refusal quotes (the whole list, as the submit rule does)."""
    shown = shown or _region_shown(image)
    name = image[len(SSM_REFERENCE) :] if image.startswith(SSM_REFERENCE) else ""
    if not _SSM_NAME_RE.match(name) or ".." in name or "//" in name:
        raise InputError(f"{knob} = '{shown}' {IMAGE_REFERENCE_RULE}")
    if not any(name.startswith(p) for p in prefixes if p):
        raise LimitExceeded(
            f"{knob} = '{shown}' names a parameter outside {','.join(prefixes) or 'nothing'}:"
            " only those may be read (ANNEX_IMAGE_PARAMETER_PREFIXES)"
        )
    return name


def check_image_ids(
    images: tuple[str, ...], prefixes: tuple[str, ...], knob: str = "annex_image_ids"
) -> None:
    """Each entry an ami id as given, or a reference check_image_reference accepts."""
    for image in images:
        if image.startswith("resolve:"):
            check_image_reference(image, prefixes, knob, ",".join(images))
