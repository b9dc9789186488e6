"""Budgets: an amount per rolling period (`500 USD/30d`), what is spent and what is left.

ANNEX_BUDGET_PER_USER caps each owner's spending, ANNEX_BUDGET_PER_POOL the whole pool's,
each over the last `period` seconds (rolling: what was spent 31 days ago no longer counts in a
30d budget). A request is judged by its worst case: instances x lease x the highest price it
may pay (its spot maximum, else the on-demand price), or its annex_max_cost if that is lower.

Stdlib only.
"""

from __future__ import annotations

import dataclasses
import re

from annex_gahp import durations
from annex_gahp.errors import InputError

_BUDGET_RE = re.compile(
    r"^\s*(?P<amount>[0-9]{1,12}(\.[0-9]{0,6})?|\.[0-9]{1,6})\s*(?P<currency>[A-Za-z]{3})\s*"
    r"/\s*(?P<period>[0-9a-z]+)\s*$"
)
BUDGET_RULE = "an amount, a currency and a period, such as 500 USD/30d"


@dataclasses.dataclass(frozen=True)
class Budget:
    amount: float
    currency: str
    period: int  # seconds
    knob: str  # where it came from, for messages

    def shown(self) -> str:
        days, rest = divmod(self.period, 86400)
        period = f"{days}d" if not rest else durations.format_duration(self.period)
        return f"{money(self.amount)} {self.currency}/{period}"


def parse(knob: str, text: str) -> Budget | None:
    """`500 USD/30d` -> Budget; empty -> None (no budget)."""
    if not text or not text.strip():
        return None
    match = _BUDGET_RE.match(text)
    if match is None:
        raise InputError(f"{knob} = {text!r} is not a budget: give {BUDGET_RULE}")
    try:
        period = durations.parse_duration(match["period"], knob)
    except ValueError:
        raise InputError(f"{knob} = {text!r} has no valid period: give {BUDGET_RULE}") from None
    amount = float(match["amount"])
    if amount <= 0 or period <= 0:
        raise InputError(f"{knob} = {text!r} must be a positive amount over a positive period")
    return Budget(amount, match["currency"].upper(), period, knob)


def money(amount: float) -> str:
    """Amounts as users read them: cents, more digits only below a cent."""
    if amount and abs(amount) < 0.01:
        return f"{amount:.6f}".rstrip("0")
    return f"{amount:.2f}"


def left(budget: Budget, spent: float) -> float:
    return max(0.0, budget.amount - spent)


def refusal(budget: Budget, spent: float, worst: float, who: str) -> str | None:
    """Why a request whose worst case is `worst` does not fit, or None if it does."""
    room = left(budget, spent)
    if worst <= room:
        return None
    return (
        f"the worst case of this annex ({money(worst)} {budget.currency}) is over what is left "
        f"of {who}budget {budget.knob} = {budget.shown()}: {money(room)} {budget.currency} left "
        f"({money(spent)} spent); ask for fewer instances, a shorter lease or a lower "
        "annex_max_cost"
    )


def max_cost(text: str) -> float | None:
    """annex_max_cost: a positive decimal amount (in the pool's currency), or None."""
    if text is None or str(text).strip() == "":
        return None
    try:
        value = float(str(text).strip())
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise InputError(
            f"annex_max_cost = {text!r} is not allowed: give a positive amount such as 25 or 2.50"
        )
    return value
