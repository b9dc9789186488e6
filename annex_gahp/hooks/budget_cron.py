"""The schedd cron job that lets condor_submit refuse a request over what is left of a budget.

The helper writes what a submit-time check needs (what is left per user and for the pool, the
on-demand price per region:type, the live annexes, its defaults) to `budget-submit.json` in its
state dir every cycle (write()). This program, run by the schedd every ANNEX_BUDGET_CRON_PERIOD
(SCHEDD_CRON_ANNEXBUDGET_* in condor_config.d/20-annex-submit.conf), prints it as ClassAd
attributes; the schedd adds them to its own ad with the prefix `Annex` (AnnexBudgetLeft, ...),
and the submit requirement AnnexBudgetLeft (spec.RULES) reads them as MY.*.

Owner and annex names reach this file from job ads and the helper's records: hostile input.
Only names of a plain alphabet become record keys (quoted ClassAd attribute names); the others
are left out, and the requirement then passes for them (the helper still checks). Missing,
unreadable or stale data prints `BudgetUpdated = undefined`: the requirement passes.

Stdlib only, and fast: it runs every minute in the schedd.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from collections.abc import Mapping

FILE_NAME = "budget-submit.json"
# Older than this (seconds), the data no longer speaks for the helper: nothing is published.
MAX_AGE = 600
# What may be a record key: user, annex and price names as HTCondor and EC2 write them.
_KEY_RE = re.compile(r"^[A-Za-z0-9_.@:/+-]{1,255}$")
_TEXT_RE = re.compile(r"^[A-Za-z0-9 ._/:,-]{0,255}$")


def path(state_dir: str) -> str:
    return os.path.join(state_dir, FILE_NAME)


def write(state_dir: str, data: Mapping[str, object]) -> None:
    """Atomically replace the file (the cron may read it at any moment)."""
    final = path(state_dir)
    tmp = f"{final}.tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        json.dump(data, out, sort_keys=True)
    os.chmod(tmp, 0o644)  # the schedd's cron reads it, as the condor user
    os.replace(tmp, final)


def _number(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value) or value < 0:
        return None
    return repr(round(float(value), 6))


def _text(value: object) -> str | None:
    if not isinstance(value, str) or not _TEXT_RE.match(value):
        return None
    return f'"{value}"'


def _record(values: object, *, number: bool = True) -> str:
    """`[ 'key' = value; ... ]`, keys that are not plain names left out. ClassAd attribute
    names are case-insensitive: of keys that differ only in case, the largest value is kept
    (the requirement errs on the side of passing)."""
    kept: dict[str, tuple[str, str]] = {}
    for key, value in (values.items() if isinstance(values, dict) else ()):
        shown = _number(value) if number else ("true" if value is True else None)
        if not isinstance(key, str) or not _KEY_RE.match(key) or shown is None:
            continue
        folded = key.lower()
        if folded in kept and number and float(kept[folded][1]) >= float(shown):
            continue
        kept[folded] = (key, shown)
    return "[ " + " ".join(f"'{k}' = {v};" for k, v in kept.values()) + " ]"


def render(data: object, now: float) -> str:
    """The cron's output: `Name = value` lines (the schedd prefixes each name with Annex)."""
    updated = data.get("updated") if isinstance(data, dict) else None
    if _number(updated) is None or not now - MAX_AGE <= float(updated) <= now + 60:
        return "BudgetUpdated = undefined\n"
    assert isinstance(data, dict)
    lines = {
        "BudgetUpdated": str(int(updated)),
        "BudgetUser": _number(data.get("user")),
        "BudgetUserText": _text(data.get("user_text")),
        "BudgetLeft": _record(data.get("left")),
        "BudgetPoolLeft": _number(data.get("pool_left")),
        "BudgetPoolText": _text(data.get("pool_text")),
        "BudgetCurrency": _text(data.get("currency")),
        "BudgetPrices": _record(data.get("prices")),
        "BudgetLive": _record(data.get("live"), number=False),
        "BudgetRegion": _text(data.get("region")),
        "BudgetTypes": _text(",".join(t for t in data.get("types") or () if isinstance(t, str))),
        "BudgetLease": _number(data.get("lease")),
    }
    return "".join(f"{k} = {v if v is not None else 'undefined'}\n" for k, v in lines.items())


def main(argv: list[str] | None = None) -> int:
    """`annex_budget_cron STATE_DIR`: print the budget attributes for the schedd's ad."""
    args = sys.argv[1:] if argv is None else argv
    data: object = None
    if len(args) == 1:
        try:
            with open(path(args[0]), encoding="utf-8") as src:
                data = json.load(src)
        except (OSError, ValueError) as err:
            print(f"annex_budget_cron: no budget data: {err}", file=sys.stderr)
    else:
        print("usage: annex_budget_cron STATE_DIR", file=sys.stderr)
    sys.stdout.write(render(data, time.time()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
