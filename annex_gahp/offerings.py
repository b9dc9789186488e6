"""Unavailable offerings: capacity pools a launch skips for a while (issue 14, item 2).

An offering is EC2's capacity pool: (instance type, availability zone, lifecycle) in a region.
A capacity error from CreateFleet (InsufficientInstanceCapacity, SpotMaxPriceTooLow, ...) or a
spot interruption marks one unavailable for ANNEX_UNAVAILABLE_OFFERING_TTL (3m by default, as
Karpenter's); every annex of the pool in that region skips it until then, and it is tried again
after. The marks are kept in the store (they survive a restart, and the status views read them);
this module decides: what a mark covers, which are in force, how they read.

A zone of "" means every zone: a capacity error for an override without a subnet (AWS chose
the zone) cannot be pinned to one, so the type is avoided everywhere. An interruption names its
zone; it steers a launch only where the annex's subnets pick zones.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from annex_gahp.store import Annex, Store

SPOT = "spot"
ON_DEMAND = "on-demand"


@dataclasses.dataclass(frozen=True, order=True)
class Offering:
    region: str
    instance_type: str
    zone: str  # "" = every zone of the region
    lifecycle: str  # SPOT or ON_DEMAND

    def covers(self, other: Offering) -> bool:
        """Marked unavailable, does this make `other` unavailable too?"""
        return (
            self.region == other.region
            and self.instance_type == other.instance_type
            and self.lifecycle == other.lifecycle
            and (not self.zone or self.zone == other.zone)
        )

    def label(self) -> str:
        """`m5.large in us-east-1a (spot)`: what LastError and the Annex ad show."""
        return f"{self.instance_type} in {self.zone or self.region} ({self.lifecycle})"


@dataclasses.dataclass(frozen=True)
class Mark:
    offering: Offering
    until: int  # epoch seconds
    reason: str  # the AWS error code, or "interruption"


def lifecycle_of(annex: Annex) -> str:
    """Spot when the annex gives spot prices (spec: absent = on-demand)."""
    return SPOT if annex.spec.spot_prices else ON_DEMAND


def mark(store: Store, offerings: Iterable[Offering], reason: str, ttl: int, now: int) -> None:
    """Mark `offerings` unavailable until now + ttl (a later mark extends an earlier one)."""
    store.mark_unavailable([(o, now + ttl, reason) for o in offerings])


def in_force(store: Store, region: str, now: int | None = None) -> list[Mark]:
    """The region's marks that have not expired (expired ones are dropped as they are read)."""
    now = int(time.time()) if now is None else now
    return store.unavailable(region, now)


def avoided(store: Store, annex: Annex, types: Iterable[str], now: int | None = None) -> list[Mark]:
    """The marks that bear on this annex's choices (its region, types and lifecycle)."""
    wanted = set(types)
    lifecycle = lifecycle_of(annex)
    return [
        m
        for m in in_force(store, annex.region, now)
        if m.offering.instance_type in wanted and m.offering.lifecycle == lifecycle
    ]


def blocked(marks: Iterable[Mark], offering: Offering) -> Mark | None:
    """The mark that makes `offering` unavailable, if any."""
    for m in marks:
        if m.offering.covers(offering):
            return m
    return None


def every_type_blocked(annex: Annex, types: Iterable[str], marks: list[Mark]) -> bool:
    """Every instance type of the annex is avoided in every zone: no launch can succeed, so
    none is made (the loop waits for the first mark to expire)."""
    lifecycle = lifecycle_of(annex)
    choices = [Offering(annex.region, t, "", lifecycle) for t in types]
    return bool(choices) and all(blocked(marks, c) is not None for c in choices)


def describe(marks: Iterable[Mark]) -> str:
    """`m5.large in us-east-1 (spot, InsufficientInstanceCapacity, until 12:03:00 UTC)`, ..."""
    parts = []
    for m in sorted(marks, key=lambda m: m.offering):
        when = time.strftime("%H:%M:%S UTC", time.gmtime(m.until))
        parts.append(
            f"{m.offering.instance_type} in {m.offering.zone or m.offering.region}"
            f" ({m.offering.lifecycle}, {m.reason}, until {when})"
        )
    return ", ".join(parts)


def all_unavailable_message(annex: Annex, marks: list[Mark]) -> str:
    """LastError (and the jobs' AnnexLastError) when no choice of the annex is left."""
    return (
        f"every instance type of annex {annex.name} is unavailable for now: "
        f"{describe(marks)}; the next launch is tried when the first of these expires "
        "(ANNEX_UNAVAILABLE_OFFERING_TTL), or give more annex_instance_types"
    )


def labels(marks: Iterable[Mark]) -> list[str]:
    """The Annex ad's AvoidedOfferings: one `type/zone-or-region/lifecycle` per mark."""
    return sorted(
        {
            f"{m.offering.instance_type}/{m.offering.zone or m.offering.region}/"
            f"{m.offering.lifecycle}"
            for m in marks
        }
    )
