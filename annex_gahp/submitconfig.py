# ruff: noqa: E501 - the ClassAd text below is the config file verbatim, one expression a line
"""Render condor_config.d/20-annex-submit.conf from the submit rules in annex_gahp/spec.py.

The keywords (names.JOB_ATTRS), how each is converted (spec's keyword kinds) and the submit
requirements (spec.RULES) have one source, spec.py; the config that condor_submit and the
schedd apply is generated from it. Run after changing either:

    htcondor-annex render-submit-config --output condor_config.d/20-annex-submit.conf
    python3 -m annex_gahp.submitconfig --output condor_config.d/20-annex-submit.conf

tests/unit/test_submitconfig.py fails when the shipped file differs from the rendering.
Stdlib only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from annex_gahp import names, spec

SHIPPED = Path(__file__).resolve().parents[1] / "condor_config.d" / "20-annex-submit.conf"
COMMAND = "htcondor-annex render-submit-config --output condor_config.d/20-annex-submit.conf"

_GENERATED = (
    "# GENERATED from annex_gahp/spec.py by `htcondor-annex render-submit-config`: do not edit\n"
    "# by hand; change spec.py (the keywords, their kinds, spec.RULES) and render again.\n"
    "#\n"
)

_HEAD = r'''# htcondor-annex-gahp: the submit side of the annex interface.
#
# Users ask for an annex in their submit file, with typed annex_* keywords or the classic
# +Annex* attributes (docs/users.md has the table). This file:
#   1. declares the annex_* keywords (EXTENDED_SUBMIT_COMMANDS), with a help text;
#   2. folds every spelling into one canonical set of job attributes (one schedd transform,
#      "AnnexSubmit"), for jobs that name an annex and for no others;
#   3. refuses, inside condor_submit, every request the helper would refuse, with one ERROR
#      line naming the keyword and what is allowed (SUBMIT_REQUIREMENT_NAMES, Annex*).
# annex_gahp/spec.py applies the same rules with the same messages: the helper re-validates.
#
# Admin limits are read from the knobs of 10-annex-gahp.conf (ANNEX_MAX_INSTANCES,
# ANNEX_MAX_LEASE, ANNEX_ALLOWED_INSTANCE_TYPES, ANNEX_ALLOWED_IMAGE_IDS, ANNEX_ALLOWED_REGIONS,
# ANNEX_DEFAULT_INSTANCE_TYPES): change them there, not here.
#
# Canonical job attributes, as set by the transform (names in annex_gahp/names.py):
#   TargetAnnexName      string, the annex name
#   AnnexInstances       int >= 1 (default 1)
#   AnnexLease           int seconds          AnnexIdleTimeout   int seconds
#   AnnexExpiry          int, epoch seconds (UTC)
#   AnnexMode            "pool" (default) | "provision", lower-case
#   AnnexStrategy        "fleet" (default) | "stack", lower-case
#   AnnexInstanceTypes, AnnexImageIds, AnnexSpotPrices, AnnexSubnets, AnnexSecurityGroups,
#   AnnexTags            comma-separated strings without blanks ("a,b"; tags "k=v,k2=v 2")
#   AnnexUserDataFile    string, an absolute path (relative paths are taken from the job's Iwd)
#   AnnexRegion, AnnexVpc, AnnexKeypair, AnnexCentralManager, AnnexStackName   strings
# Attributes the user did not give stay absent (the helper applies its defaults), except the
# three defaults above. A number, duration or time the transform cannot convert is kept as the
# text the user wrote, and a non-string where text is expected (+AnnexRegion = us-east-1,
# unquoted) becomes error, for the submit requirements below to refuse with a clear message.
# (Submit requirements cannot look at how an attribute was written - unparse() sees nothing
# of the job there - so the transform, which can, does that part.)

# Where condor_submit -capabilities finds the help text: copy docs/submit-help.txt there.
ANNEX_SUBMIT_HELPFILE = $(ETC)/annex-submit-help.txt
EXTENDED_SUBMIT_HELPFILE = $(ANNEX_SUBMIT_HELPFILE)

# Every keyword is declared as text: the transform converts, the requirements explain. (The
# integer type would silently turn annex_instances = 1.5 into 1; "filename" makes the user
# data file's path absolute, relative to the submit directory.)
'''

_BLOCKS = r'''

# ---- expression building blocks for the transform -------------------------------------------
# They read the attribute named by the transform's temporary macro _annex_a.

# The value without surrounding blanks (for strings only).
ANNEX_SUBMIT_TRIMMED = regexps("^\\s*(.*?)\\s*$", $(_annex_a), "\\1")
# A comma list split on commas and blanks, e.g. " m5.large, c5.large " -> "m5.large,c5.large".
ANNEX_SUBMIT_IDLIST = replaceAll("^,+|,+$", replaceAll("[\\s,]+", $(_annex_a), ","), "")
# Tags: split on commas only (values may hold blanks), blanks around items dropped.
ANNEX_SUBMIT_TAGLIST = replaceAll("^,+|,+$", replaceAll("\\s*,[\\s,]*", $(ANNEX_SUBMIT_TRIMMED), ","), "")
# A file name: absolute, relative ones taken from the job's initial directory.
ANNEX_SUBMIT_PATH = ifThenElse(substr($(ANNEX_SUBMIT_TRIMMED), 0, 1) == "/" || $(ANNEX_SUBMIT_TRIMMED) == "", \
    $(ANNEX_SUBMIT_TRIMMED), strcat(Iwd, "/", $(ANNEX_SUBMIT_TRIMMED)))
# A whole number: an integer, or a string of at most 18 digits (names.NUMBER_DIGITS_MAX: more
# would leave int64; the requirements then refuse the text as not a number).
ANNEX_SUBMIT_INT = ifThenElse(isInteger($(_annex_a)), $(_annex_a), \
    ifThenElse(isString($(_annex_a)) && regexp("^[0-9]{1,18}$", $(ANNEX_SUBMIT_TRIMMED)), int($(ANNEX_SUBMIT_TRIMMED)), error))

# Durations: 3600, 90m, 2h, 1h30m (units s, m, h, d) -> seconds. "1h30m" becomes the
# arithmetic "1*3600+30*60+0", checked by the pattern first and then evaluated.
_annex_dur_s = toLower($(ANNEX_SUBMIT_TRIMMED))
ANNEX_SUBMIT_DURATION @=annexdur
  ifThenElse(isInteger($(_annex_a)), $(_annex_a),
  ifThenElse(!isString($(_annex_a)), error,
  ifThenElse(regexp("^[0-9]{1,18}$", $(_annex_dur_s)), int($(_annex_dur_s)),
  ifThenElse(regexp("^([0-9]{1,9}[smhd]){1,16}$", $(_annex_dur_s)),
    eval(strcat(replaceAll("d", replaceAll("h", replaceAll("m", replaceAll("s",
      replaceAll("(^|[smhd])0+([0-9])", $(_annex_dur_s), "\\1\\2"),
      "*1+"), "*60+"), "*3600+"), "*86400+"), "0")),
    error))))
@annexdur

# Expiry: epoch seconds, or YYYY-MM-DD[( |T)HH:MM[:SS[.ffffff]][Z|+HH[:MM]|-HH[:MM]]], no
# offset meaning UTC -> epoch seconds, days counted from 1970-01-01 in the civil calendar.
# A date alone means its midnight. (regexps() gives an error for a group that took no part in
# the match, so every group here always takes part, possibly empty.)
ANNEX_SUBMIT_EXPIRY_RE = "^([0-9]{4})-([0-9]{2})-([0-9]{2})[T ]([0-9]{2}):([0-9]{2})((?::[0-9]{2}(?:\\.[0-9]{1,6})?)?)((?:Z|[+-][0-9]{2}(?::?[0-9]{2})?)?)$"
_annex_x_full = ifThenElse(regexp("^[0-9]{4}-[0-9]{2}-[0-9]{2}$", $(ANNEX_SUBMIT_TRIMMED)), strcat($(ANNEX_SUBMIT_TRIMMED), "T00:00"), $(ANNEX_SUBMIT_TRIMMED))
_annex_x_y = int(regexps($(ANNEX_SUBMIT_EXPIRY_RE), $(_annex_x_full), "\\1"))
_annex_x_mo = int(regexps($(ANNEX_SUBMIT_EXPIRY_RE), $(_annex_x_full), "\\2"))
_annex_x_d = int(regexps($(ANNEX_SUBMIT_EXPIRY_RE), $(_annex_x_full), "\\3"))
_annex_x_h = int(regexps($(ANNEX_SUBMIT_EXPIRY_RE), $(_annex_x_full), "\\4"))
_annex_x_mi = int(regexps($(ANNEX_SUBMIT_EXPIRY_RE), $(_annex_x_full), "\\5"))
# ":SS.fff" padded: "" -> ":00".
_annex_x_s = int(substr(strcat(regexps($(ANNEX_SUBMIT_EXPIRY_RE), $(_annex_x_full), "\\6"), ":00"), 1, 2))
# The offset without ":" and padded: "" -> "0000", "Z" -> "Z0000", "+05:30" -> "+05300000".
_annex_x_tzp = strcat(replaceAll(":", regexps($(ANNEX_SUBMIT_EXPIRY_RE), $(_annex_x_full), "\\7"), ""), "0000")
_annex_x_tzh = int(substr($(_annex_x_tzp), 1, 2))
_annex_x_tzm = int(substr($(_annex_x_tzp), 3, 2))
_annex_x_off = ifThenElse(substr($(_annex_x_tzp), 0, 1) == "-", -1, 1) * ($(_annex_x_tzh) * 3600 + $(_annex_x_tzm) * 60)
_annex_x_yy = ($(_annex_x_y) - ifThenElse($(_annex_x_mo) <= 2, 1, 0))
_annex_x_doy = ((153 * (($(_annex_x_mo) + 9) % 12) + 2) / 5 + $(_annex_x_d) - 1)
_annex_x_yoe = ($(_annex_x_yy) - ($(_annex_x_yy) / 400) * 400)
_annex_x_days = (($(_annex_x_yy) / 400) * 146097 + $(_annex_x_yoe) * 365 + $(_annex_x_yoe) / 4 - $(_annex_x_yoe) / 100 + $(_annex_x_doy) - 719468)
_annex_x_mdays = ifThenElse($(_annex_x_mo) == 2, \
    ifThenElse(($(_annex_x_y) % 4 == 0 && $(_annex_x_y) % 100 != 0) || $(_annex_x_y) % 400 == 0, 29, 28), \
    ifThenElse($(_annex_x_mo) == 4 || $(_annex_x_mo) == 6 || $(_annex_x_mo) == 9 || $(_annex_x_mo) == 11, 30, 31))
_annex_x_valid = $(_annex_x_mo) >= 1 && $(_annex_x_mo) <= 12 && $(_annex_x_d) >= 1 && $(_annex_x_d) <= $(_annex_x_mdays) \
    && $(_annex_x_h) <= 23 && $(_annex_x_mi) <= 59 && $(_annex_x_s) <= 59 && $(_annex_x_tzh) <= 23 && $(_annex_x_tzm) <= 59
ANNEX_SUBMIT_EXPIRY @=annexexp
  ifThenElse(isInteger($(_annex_a)), $(_annex_a),
  ifThenElse(!isString($(_annex_a)), error,
  ifThenElse(regexp("^[0-9]{1,18}$", $(ANNEX_SUBMIT_TRIMMED)), int($(ANNEX_SUBMIT_TRIMMED)),
  ifThenElse(regexp($(ANNEX_SUBMIT_EXPIRY_RE), $(_annex_x_full)) && $(_annex_x_valid),
    $(_annex_x_days) * 86400 + $(_annex_x_h) * 3600 + $(_annex_x_mi) * 60 + $(_annex_x_s) - $(_annex_x_off),
    error))))
@annexexp

'''

_TRANSFORM_HEAD = r'''# ---- the transform ---------------------------------------------------------------------------
# Precedence when a job gives several spellings: annex_<keyword>, then +Annex<Keyword>, then (for
# the name only) TargetAnnexName. The non-canonical spellings are then set to undefined: HTCondor
# 23.9's transforms cannot remove an attribute of the cluster ad (DELETE is silently ignored
# there), and an undefined AnnexName is what every reader of the ad treats as absent. Optional
# attributes given as "" are likewise set to undefined. Idempotent: a job that already carries
# canonical attributes (e.g. a job router's routed copy) comes out the same.
JOB_TRANSFORM_NAMES = $(JOB_TRANSFORM_NAMES) AnnexSubmit
JOB_TRANSFORM_AnnexSubmit @=annextransform
  REQUIREMENTS annex_name isnt undefined || (unparse(AnnexName) != "" && unparse(AnnexName) != "undefined") || (unparse(TargetAnnexName) != "" && unparse(TargetAnnexName) != "undefined")

'''

_TRANSFORM_TAIL = r'''  # Contract defaults.
  EVALMACRO _annex_ok AnnexInstances is undefined
  if $(_annex_ok)
    SET AnnexInstances 1
  endif
  EVALMACRO _annex_ok AnnexMode is undefined
  if $(_annex_ok)
    SET AnnexMode "pool"
  endif
  EVALMACRO _annex_ok AnnexStrategy is undefined
  if $(_annex_ok)
    SET AnnexStrategy "fleet"
  endif

  # Only slots of this annex, and record which annex each run used.
  EVALMACRO _annex_ok !regexp("AnnexName (=\\?=|is) MY\\.TargetAnnexName", unparse(Requirements))
  if $(_annex_ok)
    if defined MY.Requirements
      SET Requirements ($(MY.Requirements)) && (TARGET.AnnexName =?= MY.TargetAnnexName)
    else
      SET Requirements (TARGET.AnnexName =?= MY.TargetAnnexName)
    endif
  endif
  EVALSET JobMachineAttrs ifThenElse(JobMachineAttrs is undefined || JobMachineAttrs == "", "AnnexName", ifThenElse(stringListIMember("AnnexName", JobMachineAttrs), JobMachineAttrs, strcat(JobMachineAttrs, ",AnnexName")))
@annextransform
'''

_REQUIREMENT_SETUP = r'''
# ---- provision mode: the job stands for its annex --------------------------------------------
# A job with annex_mode = provision becomes a LOCAL universe job running annex_provision_job
# (as its owner, on this access point): it watches the annex and ends when the annex ends, with
# an exit code that says how; condor_rm of it deletes the annex (docs/users.md). It may start
# only once the route Annex has handed it to the helper (the route sets AnnexRoutedName): its
# translate hook reads the user data with the owner's rights and the helper creates the annex.
# And only once the annex is past requested/provisioning (AnnexState, kept by the helper): so
# the job is Idle while its instances are pending and Running once one runs (or it ended).
# Why here and not in the route (checked on HTCondor 23.9, docs/router.md): the router does
# change JobUniverse of a job edited in place, but the schedd keeps the universe it read at
# submit time, so such a job is never started as a local universe job; a transform's universe
# is the one the schedd reads. The user's executable and arguments are replaced.
JOB_TRANSFORM_NAMES = $(JOB_TRANSFORM_NAMES) AnnexProvision
JOB_TRANSFORM_AnnexProvision @=annexprovision
  REQUIREMENTS TargetAnnexName isnt undefined && AnnexMode =?= "provision"
  SET JobUniverse 12
  SET Cmd "$(ANNEX_BIN_DIR)/annex_provision_job"
  SET Args ""
  SET Arguments ""
  SET Requirements (MY.AnnexRoutedName =?= MY.TargetAnnexName) && (MY.AnnexState isnt undefined) && (MY.AnnexState =!= "requested") && (MY.AnnexState =!= "provisioning")
@annexprovision

# ---- submit requirements: one refusal each, checked in this order ----------------------------
# Each passes at once for a job without an annex (TargetAnnexName is set by the transform only).
# Values are quoted as the transform left them: converted if they could be, else as written.

# ANNEX_MAX_LEASE in seconds (the knob may be written as a duration such as 24h).
_annex_max_lease_s = toLower("$(ANNEX_MAX_LEASE)")
ANNEX_SUBMIT_MAX_LEASE @=annexmaxlease
  ifThenElse(regexp("^[0-9]+$", $(_annex_max_lease_s)), int($(_annex_max_lease_s)),
    eval(strcat(replaceAll("d", replaceAll("h", replaceAll("m", replaceAll("s",
      replaceAll("(^|[smhd])0+([0-9])", $(_annex_max_lease_s), "\\1\\2"),
      "*1+"), "*60+"), "*3600+"), "*86400+"), "0")))
@annexmaxlease
# The admin's lists, as comma lists ("" = any).
ANNEX_SUBMIT_ALLOWED_TYPES = replaceAll("^,+|,+$", replaceAll("[\\s,]+", "$(ANNEX_ALLOWED_INSTANCE_TYPES)", ","), "")
ANNEX_SUBMIT_ALLOWED_IMAGES = replaceAll("^,+|,+$", replaceAll("[\\s,]+", "$(ANNEX_ALLOWED_IMAGE_IDS)", ","), "")
ANNEX_SUBMIT_ALLOWED_REGIONS = replaceAll("^,+|,+$", replaceAll("[\\s,]+", "$(ANNEX_ALLOWED_REGIONS)", ","), "")
ANNEX_SUBMIT_DEFAULT_TYPES = replaceAll("^,+|,+$", replaceAll("[\\s,]+", "$(ANNEX_DEFAULT_INSTANCE_TYPES)", ","), "")
# How many instance types the annex will use: the job's, else ANNEX_DEFAULT_INSTANCE_TYPES.
ANNEX_SUBMIT_TYPE_COUNT = ifThenElse(AnnexInstanceTypes isnt undefined, size(split(AnnexInstanceTypes, ",")), size(split($(ANNEX_SUBMIT_DEFAULT_TYPES), ",")))
# ANNEX_BUDGET_PER_USER (e.g. 500 USD/30d) as a ClassAd string ("": no budget).
ANNEX_SUBMIT_BUDGET_PER_USER = "$(ANNEX_BUDGET_PER_USER)"
# A positive decimal price.
_annex_price = ([0-9]{1,6}(\\.[0-9]{0,8})?|\\.[0-9]{1,8})

# What is left of the budgets, for the AnnexBudgetLeft requirement: the schedd runs
# annex_budget_cron every ANNEX_BUDGET_CRON_PERIOD seconds (default 60); it prints the helper's
# view (budget-submit.json in ANNEX_STATE_DIR) as AnnexBudget* attributes of the schedd's ad.
# A new SCHEDD_CRON job starts only when the schedd (re)starts, not on condor_reconfig.
SCHEDD_CRON_JOBLIST = $(SCHEDD_CRON_JOBLIST) ANNEXBUDGET
SCHEDD_CRON_ANNEXBUDGET_EXECUTABLE = $(ANNEX_BIN_DIR)/annex_budget_cron
SCHEDD_CRON_ANNEXBUDGET_ARGS = $(ANNEX_STATE_DIR)
SCHEDD_CRON_ANNEXBUDGET_MODE = Periodic
SCHEDD_CRON_ANNEXBUDGET_PERIOD = $(ANNEX_BUDGET_CRON_PERIOD:60)
SCHEDD_CRON_ANNEXBUDGET_PREFIX = Annex
SCHEDD_CRON_ANNEXBUDGET_RECONFIG_RERUN = True

'''


# How each kind of keyword is converted by the transform (the ClassAd side of spec's
# conversions): the expression that makes the canonical value, for text read by _annex_a.
_TEXT_CONVERSIONS = {
    "instance_types": "$(ANNEX_SUBMIT_IDLIST)",
    "image_ids": "$(ANNEX_SUBMIT_IDLIST)",
    "spot_prices": "$(ANNEX_SUBMIT_IDLIST)",
    "subnets": "$(ANNEX_SUBMIT_IDLIST)",
    "security_groups": "$(ANNEX_SUBMIT_IDLIST)",
    "tags": "$(ANNEX_SUBMIT_TAGLIST)",
    "mode": "toLower($(ANNEX_SUBMIT_TRIMMED))",
    "strategy": "toLower($(ANNEX_SUBMIT_TRIMMED))",
    "user_data_file": "$(ANNEX_SUBMIT_PATH)",
}
_NUMBER_CONVERSIONS = {
    **{k: "$(ANNEX_SUBMIT_INT)" for k in spec.INT_KEYS},
    **{k: "$(ANNEX_SUBMIT_DURATION)" for k in spec.DURATION_KEYS},
    **{k: "$(ANNEX_SUBMIT_EXPIRY)" for k in spec.TIME_KEYS},
}
# Every keyword is declared as text ("filename" makes a path absolute, relative to the submit
# directory): the transform converts, the requirements explain.
_SUBMIT_TYPES = {"user_data_file": "filename"}


def _block(lines: list[str], indent: str = "  ") -> str:
    return "".join(f"{indent}{line}\n" if line else "\n" for line in lines)


def _if(cond: str, body: list[str]) -> list[str]:
    return [f"EVALMACRO _annex_ok {cond}", "if $(_annex_ok)", *("  " + b for b in body), "endif"]


def extended_commands() -> str:
    lines = ["$(EXTENDED_SUBMIT_COMMANDS)", 'annex_name = "string"']
    lines += [f'annex_{k} = "{_SUBMIT_TYPES.get(k, "string")}"' for k in names.JOB_ATTRS]
    return "EXTENDED_SUBMIT_COMMANDS @=annexcmds\n" + _block(lines) + "@annexcmds\n"


def _copies() -> list[str]:
    """Each spelling into the canonical attribute, later ones winning."""
    target = names.JOB_TARGET
    lines = _if(
        'unparse(AnnexName) != "" && unparse(AnnexName) != "undefined"',
        [f"COPY AnnexName {target}", "SET AnnexName undefined"],
    )
    for key, attr in (("name", target), *names.JOB_ATTRS.items()):
        lines += _if(
            f"annex_{key} isnt undefined",
            [f"COPY annex_{key} {attr}", f"SET annex_{key} undefined"],
        )
    return lines


def _conversion(key: str, attr: str) -> list[str]:
    lines = [f"# annex_{key}", f"_annex_a = {attr}"]
    if key in _NUMBER_CONVERSIONS:
        expr = _NUMBER_CONVERSIONS[key]
        lines += _if(
            f'isString({attr}) && $(ANNEX_SUBMIT_TRIMMED) == ""', [f"SET {attr} undefined"]
        )
        kept = _if(
            f'!isString({attr}) && unparse({attr}) != "" && unparse({attr}) != "undefined"',
            [f"EVALSET {attr} unparse({attr})"],
        )
        lines += [
            f"EVALMACRO _annex_ok isInteger({expr})",
            "if $(_annex_ok)",
            f"  EVALSET {attr} {expr}",
            "else",
            *("  " + k for k in kept),
            "endif",
        ]
        return lines
    if key in spec.BOOL_KEYS:
        lines[0] += (
            f": {'/'.join(spec.TRUE_WORDS)} or {'/'.join(spec.FALSE_WORDS)} (any case) -> a"
            " boolean; other text is"
        )
        lines.insert(1, "# kept for the requirement below to refuse.")
        lines += _if(
            f'isString({attr}) && $(ANNEX_SUBMIT_TRIMMED) == ""', [f"SET {attr} undefined"]
        )
        for words, value in ((spec.TRUE_WORDS, "true"), (spec.FALSE_WORDS, "false")):
            lines += _if(
                f'isString({attr}) && regexp("^({"|".join(words)})$",'
                " toLower($(ANNEX_SUBMIT_TRIMMED)))",
                [f"SET {attr} {value}"],
            )
        return lines
    expr = _TEXT_CONVERSIONS.get(key, "$(ANNEX_SUBMIT_TRIMMED)")
    bad = _if(
        f'unparse({attr}) != "" && unparse({attr}) != "undefined"', [f"SET {attr} error"]
    )
    lines += [
        f"EVALMACRO _annex_ok isString({attr})",
        "if $(_annex_ok)",
        f"  EVALSET {attr} {expr}",
        *("  " + line for line in _if(f'{attr} == ""', [f"SET {attr} undefined"])),
        "else",
        *("  " + b for b in bad),
        "endif",
    ]
    return lines


def transform() -> str:
    target = names.JOB_TARGET
    lines = [*_copies(), ""]
    lines += [
        "# annex_name",
        f"_annex_a = {target}",
        f"EVALMACRO _annex_ok isString({target})",
        "if $(_annex_ok)",
        f"  EVALSET {target} $(ANNEX_SUBMIT_TRIMMED)",
        "else",
        f"  EVALSET {target} unparse({target})",
        "endif",
    ]
    for key, attr in names.JOB_ATTRS.items():
        lines += _conversion(key, attr)
    return _TRANSFORM_HEAD + _block(lines) + "\n" + _TRANSFORM_TAIL


def _indented(text: str) -> str:
    """A multi-line ClassAd expression in a `@=` block: first line at 2, the rest at 4."""
    first, *rest = text.split("\n")
    return "  " + first + "\n" + "".join(f"    {line}\n" for line in rest)


def requirement(rule: spec.Rule) -> str:
    out = "".join(f"# {line}\n" for line in _wrap(rule.why)) if rule.why else ""
    knob = f"SUBMIT_REQUIREMENT_{rule.name}"
    accept = f"{rule.guard} || {rule.accept}"
    if "\n" in accept:
        out += f"{knob} @=annexreq\n{_indented(accept)}@annexreq\n"
    else:
        out += f"{knob} = {accept}\n"
    if "\n" in rule.reason:
        out += f"{knob}_REASON @=annexreq\n" + "".join(
            f"    {line}\n" for line in rule.reason.split("\n")
        ) + "@annexreq\n"
    else:
        out += f"{knob}_REASON = {rule.reason}\n"
    return out


def _wrap(text: str, width: int = 98) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def requirements() -> str:
    names_line = " ".join(rule.name for rule in spec.RULES)
    listed = " \\\n    ".join(_wrap(names_line, 90))
    out = f"SUBMIT_REQUIREMENT_NAMES = $(SUBMIT_REQUIREMENT_NAMES) {listed}\n"
    return out + "".join("\n" + requirement(rule) for rule in spec.RULES)


def render() -> str:
    """The whole of condor_config.d/20-annex-submit.conf."""
    return "".join(
        (
            _GENERATED,
            _HEAD,
            extended_commands(),
            _BLOCKS,
            transform(),
            _REQUIREMENT_SETUP,
            requirements(),
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m annex_gahp.submitconfig", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--output", help="write here (default: standard output)")
    args = parser.parse_args(argv)
    return write(args.output)


def write(output: str | None) -> int:
    text = render()
    if output:
        Path(output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
