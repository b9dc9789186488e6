"""Cost arithmetic: instance-hours and money from the helper's records (issue 16).

Pure functions over plain values. An instance is billed from its launch record to its end:
the first time the helper saw it ending (shutting-down, terminated), or else the last time it
was seen (a running instance: up to one reconcile interval short; one that vanished unseen:
when it was last known to run). Every figure is recomputed from those records, never added
up cycle by cycle, so a helper killed at any instant and restarted counts nothing twice.

A price is a step function of time: `PricePoint(since, per_hour)` for one (region, zone,
instance type, lifecycle). A price change mid-annex bills each part of the instance's time at
the price then in force. A price the helper does not know is said (`Cost.unpriced`), never
taken as zero.

Stdlib only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

HOUR = 3600
ON_DEMAND = "on-demand"
SPOT = "spot"


@dataclasses.dataclass(frozen=True)
class PricePoint:
    """From `since` (epoch seconds) on, one instance-hour costs `per_hour` (in `currency`)."""

    since: int
    per_hour: float
    currency: str = "USD"


@dataclasses.dataclass(frozen=True)
class PriceKey:
    region: str
    instance_type: str
    lifecycle: str = ON_DEMAND
    zone: str = ""  # "": the region's price (on-demand, or a spot price for any zone)

    def shown(self) -> str:
        where = self.zone or self.region
        return f"{self.instance_type} {self.lifecycle} in {where}"


# Every price the helper knows: key -> its points, oldest first.
Prices = Mapping[PriceKey, Sequence[PricePoint]]


@dataclasses.dataclass(frozen=True)
class Usage:
    """One instance's billable record (store.InstanceRecord plus its annex's facts)."""

    instance_id: str
    owner: str
    annex: str
    region: str
    instance_type: str
    lifecycle: str
    zone: str
    launched: int
    ended: int | None
    last_seen: int

    @property
    def end(self) -> int:
        return self.ended if self.ended is not None else self.last_seen


@dataclasses.dataclass(frozen=True)
class Cost:
    """Money and instance-hours of some instances; `unpriced` names what had no price (its
    hours are counted, its money is not: the amount is then a lower bound)."""

    amount: float = 0.0
    hours: float = 0.0
    currency: str = "USD"
    unpriced: tuple[str, ...] = ()

    @property
    def known(self) -> bool:
        return not self.unpriced

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            self.amount + other.amount,
            self.hours + other.hours,
            self.currency if self.amount or not other.amount else other.currency,
            tuple(dict.fromkeys(self.unpriced + other.unpriced)),
        )


def points_for(prices: Prices, usage: Usage) -> tuple[PriceKey, Sequence[PricePoint]]:
    """The price series of an instance: its zone's, else its region's."""
    key = PriceKey(usage.region, usage.instance_type, usage.lifecycle or ON_DEMAND, usage.zone)
    if usage.zone and prices.get(key):
        return key, prices[key]
    key = dataclasses.replace(key, zone="")
    return key, prices.get(key, ())


def integrate(points: Sequence[PricePoint], start: int, end: int) -> float | None:
    """Money for one instance running from `start` to `end` under this price series; None if
    part of that time has no price (before the first point). Partial hours count by the
    second, as EC2 bills Linux instances."""
    if end <= start:
        return 0.0
    ordered = sorted(points, key=lambda p: p.since)
    if not ordered or ordered[0].since > start:
        # The first price known is later than the launch: the oldest price stands for the time
        # before it (a price file written after the launch), unless there is none at all.
        if not ordered:
            return None
        ordered = [dataclasses.replace(ordered[0], since=start), *ordered[1:]]
    total = 0.0
    for i, point in enumerate(ordered):
        upto = ordered[i + 1].since if i + 1 < len(ordered) else end
        lo, hi = max(start, point.since), min(end, upto)
        if hi > lo:
            total += point.per_hour * (hi - lo) / HOUR
    return total


def usage_cost(
    usage: Usage, prices: Prices, *, since: int | None = None, until: int | None = None
) -> Cost:
    """One instance's cost within [since, until] (its whole life by default)."""
    start = usage.launched if since is None else max(usage.launched, since)
    end = usage.end if until is None else min(usage.end, until)
    if end <= start:
        return Cost()
    hours = (end - start) / HOUR
    key, points = points_for(prices, usage)
    amount = integrate(points, start, end)
    if amount is None:
        return Cost(0.0, hours, unpriced=(key.shown(),))
    return Cost(amount, hours, points[0].currency if points else "USD")


def total(
    usages: Iterable[Usage], prices: Prices, *, since: int | None = None, until: int | None = None
) -> Cost:
    out = Cost()
    for usage in usages:
        out = out + usage_cost(usage, prices, since=since, until=until)
    return out


def price_now(prices: Prices, key: PriceKey, now: int) -> PricePoint | None:
    """The price in force at `now` for `key` (its zone's, else its region's)."""
    series = prices.get(key) or prices.get(dataclasses.replace(key, zone="")) or ()
    current = [p for p in series if p.since <= now]
    if current:
        return max(current, key=lambda p: p.since)
    return min(series, key=lambda p: p.since) if series else None


def rate(usages: Iterable[Usage], prices: Prices, now: int) -> Cost:
    """What the running instances cost per hour now (`amount` is per hour)."""
    out = Cost()
    for usage in usages:
        key = PriceKey(usage.region, usage.instance_type, usage.lifecycle or ON_DEMAND, usage.zone)
        point = price_now(prices, key, now)
        if point is None:
            out = out + Cost(unpriced=(key.shown(),))
        else:
            out = out + Cost(point.per_hour, 0.0, point.currency)
    return out


def group(
    usages: Iterable[Usage],
    prices: Prices,
    by: str,
    *,
    since: int | None = None,
    until: int | None = None,
) -> dict[str, Cost]:
    """Cost per owner, annex (`owner/annex`), instance type or lifecycle."""
    keys = {
        "owner": lambda u: u.owner,
        "annex": lambda u: f"{u.owner}/{u.annex}",
        "type": lambda u: u.instance_type or "unknown",
        "lifecycle": lambda u: u.lifecycle or ON_DEMAND,
    }
    if by not in keys:
        raise ValueError(f"--by {by!r}: use one of {', '.join(keys)}")
    out: dict[str, Cost] = {}
    for usage in usages:
        name = keys[by](usage)
        out[name] = out.get(name, Cost()) + usage_cost(usage, prices, since=since, until=until)
    return dict(sorted(out.items()))


def worst_case(count: int, seconds: int, per_hour: float) -> float:
    """The most an annex may cost: instances x lease x price."""
    return max(0, count) * max(0, seconds) / HOUR * per_hour
