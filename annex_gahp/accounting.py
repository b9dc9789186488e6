"""Accounting: the store's records as cost figures (cost.py does the arithmetic).

What an annex, an owner or the pool has cost, what runs now costs per hour, and what a new
request may cost at worst. Everything is computed from the instance records and the recorded
price points, so the figures are the same after a restart.
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING

from annex_gahp import budgets, cost, lifecycle, prices

if TYPE_CHECKING:
    from annex_gahp.settings import Settings
    from annex_gahp.spec import AnnexSpec
    from annex_gahp.store import Annex, InstanceRecord, Store


def usage(record: InstanceRecord, owner: str, name: str, region: str) -> cost.Usage:
    return cost.Usage(
        instance_id=record.id,
        owner=owner,
        annex=name,
        region=region,
        instance_type=record.instance_type,
        lifecycle=record.lifecycle or cost.ON_DEMAND,
        zone=record.zone,
        launched=record.launched,
        ended=record.ended,
        last_seen=record.last_seen,
    )


def usages(store: Store, since: int | None = None) -> list[cost.Usage]:
    return [usage(r, o, n, g) for r, o, n, g in store.all_instances(since)]


# Store -> (its price generation, the table built from it).
_TABLES: weakref.WeakKeyDictionary[Store, tuple[int, cost.Prices]] = weakref.WeakKeyDictionary()


def price_table(store: Store) -> cost.Prices:
    """The recorded price points as cost.Prices, rebuilt only after a price is written: every
    annex's view reads it each cycle and each ANNEX_STATUS, and building it per call cost
    0.7 ms with 120 points (the socket benchmark's requests/s fell from 3,560 to 858)."""
    generation = store.price_generation  # read first: a write after it only rebuilds again
    cached = _TABLES.get(store)
    if cached is None or cached[0] != generation:
        cached = (generation, prices.as_series(store.prices()))
        _TABLES[store] = cached
    return cached[1]


@dataclasses.dataclass(frozen=True)
class AnnexCost:
    so_far: cost.Cost
    per_hour: cost.Cost


def annex_cost(
    store: Store, annex: Annex, table: cost.Prices | None = None, now: int | None = None
) -> AnnexCost:
    table = price_table(store) if table is None else table
    records = store.instances(annex.id)
    mine = [usage(r, annex.owner, annex.name, annex.region) for r in records]
    live = [u for u, r in zip(mine, records) if r.state in lifecycle.INSTANCE_LIVE]
    stamp = int(time.time()) if now is None else now
    return AnnexCost(cost.total(mine, table), cost.rate(live, table, stamp))


def spent(
    all_usages: Iterable[cost.Usage], table: cost.Prices, since: int, owner: str | None = None
) -> cost.Cost:
    return cost.total(
        (u for u in all_usages if owner is None or u.owner == owner), table, since=since
    )


def request_price(
    table: cost.Prices, spec: AnnexSpec, region: str, settings: Settings, now: int
) -> tuple[float | None, str]:
    """The highest price per instance-hour the request may pay, and what had no price."""
    types = spec.instance_types or tuple(settings.default_instance_types)
    worst = 0.0
    for i, itype in enumerate(types):
        if spec.spot_prices:
            worst = max(worst, float(spec.spot_prices[min(i, len(spec.spot_prices) - 1)]))
            continue
        point = cost.price_now(table, cost.PriceKey(region, itype), now) or _from_file(
            settings, cost.PriceKey(region, itype)
        )
        if point is None:
            return None, cost.PriceKey(region, itype).shown()
        worst = max(worst, point.per_hour)
    return worst, ""


def submit_prices(store: Store, settings: Settings, now: int) -> dict[str, float]:
    """The on-demand price per hour in force per `region:type`, as request_price finds it
    (the store's, else the price file's), for condor_submit's budget requirement."""
    found: dict[str, float] = {}
    try:
        data = prices.read_file(settings.price_file) if settings.price_file else {}
    except Exception:  # unreadable: the loop logs it; these prices are missing
        data = {}
    for key, per_hour, _currency in prices.file_points(data):
        if key.lifecycle == cost.ON_DEMAND:
            found[f"{key.region}:{key.instance_type}"] = per_hour
    table = price_table(store)
    for key in table:
        if key.lifecycle == cost.ON_DEMAND and not key.zone:
            point = cost.price_now(table, key, now)
            if point is not None:
                found[f"{key.region}:{key.instance_type}"] = point.per_hour
    return found


def _from_file(settings: Settings, key: cost.PriceKey) -> cost.PricePoint | None:
    """The price file's on-demand price, for a request made before the loop recorded it."""
    try:
        data = prices.read_file(settings.price_file) if settings.price_file else {}
    except Exception:  # unreadable: the loop logs it; here the price is missing
        return None
    for found, per_hour, currency in prices.file_points(data):
        if found == key:
            return cost.PricePoint(0, per_hour, currency)
    return None


def refusal(  # noqa: PLR0917 - one request's facts, as ensure has them
    store: Store,
    settings: Settings,
    spec: AnnexSpec,
    region: str,
    requested: int,
    expires: int,
    now: int,
) -> str | None:
    """Why the helper refuses this new annex under the budgets, or None. A budget that cannot
    be checked because a price is missing refuses too: spending is never guessed as zero."""
    checks = [
        (budgets.parse("ANNEX_BUDGET_PER_USER", settings.budget_per_user), spec.owner, "your "),
        (budgets.parse("ANNEX_BUDGET_PER_POOL", settings.budget_per_pool), None, "the pool's "),
    ]
    checks = [c for c in checks if c[0] is not None]
    cap = float(spec.max_cost) if spec.max_cost else None
    if not checks:
        return None
    table = price_table(store)
    price, missing = request_price(table, spec, region, settings, now)
    if price is None and cap is None:
        return (
            f"no price for {missing} to check the budget against: the admin runs "
            "htcondor-annex prices update (or adds it to ANNEX_PRICE_FILE), or give annex_max_cost"
        )
    worst = cost.worst_case(requested, expires - now, price) if price is not None else cap
    if cap is not None and worst is not None:
        worst = min(worst, cap)
    history = usages(store, since=now - max(b.period for b, _, _ in checks))
    for budget, owner, who in checks:
        used = spent(history, table, now - budget.period, owner)
        why = budgets.refusal(budget, used.amount, worst or 0.0, who)
        if why:
            return why
    return None
