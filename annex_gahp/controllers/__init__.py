"""The reconcile loop's controllers, one per concern, over one snapshot per cycle.

    snapshot (reconcile.py): records, observed instances per annex, demand from the schedd,
              unclaimed slots from the collector, regions that could not be looked at
    provisioning.py   launch / grow / shrink toward `requested`, launch back-off, provision
                      mode's ends
    disruption.py     lease end (and its holds), idle timeout, instances nobody claims, jobs
                      left behind by an annex that ended
    liveness.py       pool-mode instances whose startd never joins (or leaves): terminated and
                      replaced as failed launches, until the annex gives up
    gc.py             start-up recovery (open intents, adoption from tags), orphan reaping,
                      retiring an annex's resources
    status.py         Annex ads and the waiting jobs' attributes
    actions.py        what the controllers do to the world: terminate (and drop startd ads),
                      launch (with its intent row), retire

Controllers never import the request handlers (service.py), the transports or boto3: the
cloud is reached through the `Cloud` they are given, the schedd through `DemandSource`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from annex_gahp import lifecycle

if TYPE_CHECKING:
    from annex_gahp.cloud import Cloud, Observed
    from annex_gahp.schedd import Demand
    from annex_gahp.settings import Settings
    from annex_gahp.store import Annex, Store

# An instance we launched may not show in describe at once (eventual consistency).
SEEN_GRACE = 60


class DemandSource(Protocol):
    """Every schedd call the loop makes (schedd.ScheddDemand). All are about an annex's jobs,
    so each reaches every served schedd (ANNEX_SCHEDDS); counts() sums them."""

    def counts(self) -> dict[tuple[str, str], Demand]: ...

    def hold(self, owner: str, annex: str, reason: str) -> None: ...

    def annotate(
        self, owner: str, annex: str, attrs: dict[str, str], *, running: bool = False
    ) -> None: ...

    def reschedule(self) -> None: ...

    def hold_left_behind(self, owner: str, annex: str, reason: str, ended: int) -> None: ...

    def reroute(self, owner: str, annex: str, ended: int) -> None: ...


class SlotSource(Protocol):
    """The collector's view of the annexes' startds (collector.AnnexSlots)."""

    def slots(self, pool_id: str) -> list[dict[str, Any]]: ...

    def invalidate(self, instance_ids: list[str]) -> None: ...


class Publisher(Protocol):
    def publish(self, views: Iterable[dict[str, Any]]) -> None: ...

    def invalidate(self, owner: str, annex: str) -> None: ...


class PriceRefresher(Protocol):
    """prices.PriceSource: records the prices in force into the store."""

    def refresh(self, store: Store, spot_in_use: dict[str, set[str]], now: int) -> None: ...


@dataclass
class Context:
    """What every controller of one loop shares (settings change on a reconfig)."""

    store: Store
    settings: Settings
    cloud: Cloud
    demand: DemandSource
    publisher: Publisher
    slots: SlotSource | None
    clock: Callable[[], float]
    wake: Callable[[], None]
    # Cost (issue 16): keeps the store's prices current (prices.PriceSource), and publishes
    # the per-user budget ads (collector.BudgetPublisher); None: not in this loop.
    prices: PriceRefresher | None = None
    budget_ads: Publisher | None = None

    def now(self) -> int:
        return int(self.clock())


def recent(
    store: Store, annex: Annex, live: list[Observed], now: int, seen: Iterable[str] = ()
) -> list[str]:
    """Launched by us, not yet visible to describe: counted so we do not launch twice.
    `seen`: ids describe did show but the caller does not count (an interrupted instance
    draining its jobs)."""
    known = {o.id for o in live} | set(seen)
    return [
        i.id
        for i in store.instances(annex.id)
        if i.id not in known
        and i.state in lifecycle.INSTANCE_LIVE
        and now - i.launched < SEEN_GRACE
    ]


def one_line(err: BaseException, limit: int = 300) -> str:
    """An exception's text as one bounded line: SDK errors can carry a whole HTML page (an
    endpoint's 500), which would break the log's one-record-per-line shape and LastError."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
