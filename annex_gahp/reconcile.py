"""The reconcile loop: one snapshot per cycle, then the controllers (annex_gahp/controllers/).

Each cycle makes one tag-filtered, paginated describe per region in use, one query per served
schedd (ANNEX_SCHEDDS) and one collector query, however many jobs and annexes there are.
Every cloud call that creates something writes its intent (with the request id its
resources are tagged with) before the call, so a helper killed at any instant adopts on
restart instead of launching twice. Every step is isolated per region and per annex.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from annex_gahp import lifecycle, names, spec
from annex_gahp import settings as settings_mod
from annex_gahp.cloud import Cloud, Observed
from annex_gahp.controllers import (
    Context,
    DemandSource,
    PriceRefresher,
    Publisher,
    SlotSource,
    one_line,
)
from annex_gahp.controllers.actions import Actions
from annex_gahp.controllers.budget import Budget
from annex_gahp.controllers.disruption import Disruption
from annex_gahp.controllers.gc import GarbageCollector
from annex_gahp.controllers.interruptions import Interruptions, Notice, notices
from annex_gahp.controllers.liveness import Liveness, Presence, present
from annex_gahp.controllers.provisioning import Provisioning
from annex_gahp.controllers.status import Status
from annex_gahp.errors import AnnexError
from annex_gahp.lifecycle import Event, RetireReason
from annex_gahp.schedd import Demand
from annex_gahp.settings import Settings
from annex_gahp.store import Annex, Store

log = logging.getLogger(__name__)

# How an annex's LastError starts while its region cannot be observed.
_UNSEEN = "could not look at region"


class Reconciler:
    def __init__(
        self,
        store: Store,
        settings: Settings,
        cloud: Cloud,
        demand: DemandSource,
        publisher: Publisher,
        *,
        clock: Callable[[], float] = time.time,
        slots: SlotSource | None = None,
        wake: Callable[[], None] = lambda: None,
        resolve_region: Callable[[str, Settings], str] = settings_mod.resolve_region,
        prices: PriceRefresher | None = None,
        budget_ads: Publisher | None = None,
    ) -> None:
        self.ctx = Context(
            store, settings, cloud, demand, publisher, slots, clock, wake, prices, budget_ads
        )
        self.store = store
        self.resolve_region = resolve_region
        self.actions = Actions(self.ctx)
        self.interruptions = Interruptions(self.ctx, self.actions)
        self.actions.launched = self.interruptions.launched
        self.status = Status(self.ctx, self.actions)
        self.provisioning = Provisioning(self.ctx, self.actions)
        self.disruption = Disruption(self.ctx, self.actions)
        self.liveness = Liveness(self.ctx, self.actions)
        self.gc = GarbageCollector(self.ctx, self.actions, self.status)
        self.budget = Budget(self.ctx, self.actions)
        # region -> (failed looks in a row, when to look again, why) while it cannot be seen.
        self._unreachable: dict[str, tuple[int, int, str]] = {}
        # Regions whose tags the start-up (fresh state file) could not read yet.
        self._adopt_pending: set[str] = set()

    # A reconfig replaces the settings (and the cloud's) for every controller at once.
    @property
    def settings(self) -> Settings:
        return self.ctx.settings

    @settings.setter
    def settings(self, value: Settings) -> None:
        self.ctx.settings = value

    @property
    def cloud(self) -> Cloud:
        return self.ctx.cloud

    @cloud.setter
    def cloud(self, value: Cloud) -> None:
        self.ctx.cloud = value

    # --- start-up ------------------------------------------------------------------------

    def recover(self) -> None:
        """After a restart: settle calls that were in flight, adopt what only tags remember.

        Every region that may hold this pool's instances is looked at (those of the records,
        the allow-list, the default): a lost state file must not lose the instances of a
        region the first annex did not use. A region that cannot be looked at now is retried
        by the cycles (its open calls stay open; adoption from its tags waits)."""
        annexes = self.store.annexes()
        observed, failed = self._observe(annexes, self._recovery_regions(annexes))
        regions = {a.id: a.region for a in annexes}
        for op in self.store.open_ops():
            region = str(op.intent.get("region") or regions.get(op.annex_id, ""))
            if region in failed:
                log.warning("launch %s left open: region %s not observed", op.request, region)
                continue
            self.gc.settle(op, observed)
        if self.store.fresh:
            self._adopt_pending = set(failed)
            self.gc.adopt_untracked(observed)

    def _recovery_regions(self, annexes: list[Annex]) -> set[str]:
        regions = {a.region for a in annexes} | set(self.settings.allowed_regions)
        try:
            regions.add(self.resolve_region("", self.settings))
        except Exception as err:  # a default that cannot be resolved only narrows the scan
            log.warning("no default region to look at: %s", err)
        return regions

    # --- one cycle -----------------------------------------------------------------------

    def run_once(self) -> None:
        """One cycle. Every step is isolated per region and per annex: a region that cannot be
        observed, or one annex whose step fails (with any exception), leaves every other
        annex created, deleted, retired and extended as usual."""
        annexes = self.store.annexes()
        regions = {a.region for a in annexes} | self._adopt_pending
        observed, failed = self._observe(annexes, regions)
        now_seen = self._adopt_pending - set(failed)
        if now_seen:
            # Regions the start-up could not look at: adopt from their tags now.
            self.gc.adopt_untracked([o for o in observed if o.region in now_seen])
            self._adopt_pending -= now_seen
            annexes = self.store.annexes()
        try:
            demand: dict[tuple[str, str], Demand] | None = self.ctx.demand.counts()
        except Exception as err:  # the schedd restarting must not retire annexes as idle
            log.warning("could not read demand from the schedd: %s", err)
            demand = None
        mine: dict[tuple[str, str], list[Observed]] = defaultdict(list)
        for o in observed:
            mine[o.key].append(o)
        ads = self._slot_ads()
        unclaimed = self.disruption.unclaimed_instances(ads)
        presence = present(ads)
        noticed = notices(ads or [])
        try:
            self.budget.begin_cycle(annexes)
        except Exception as err:  # the budget's failure must not stop the loop
            log.error("could not read the spending: %s", one_line(err), exc_info=True)
        changed: list[Annex] = []
        for annex in annexes:
            key = (annex.owner, annex.name)
            try:
                if annex.region in failed:
                    after = self._unobserved(annex, failed[annex.region])
                else:
                    after = self._step(
                        annex,
                        mine.get(key, []),
                        demand,
                        unclaimed=unclaimed.get(key),
                        presence=presence,
                        noticed=noticed.get(key),
                    )
            except Exception as err:  # one annex's failure, of whatever kind, is its own
                after = self._failed_step(annex, err)
            changed.append(after)
        self.gc.reap(observed)
        self.status.publish(changed)
        if demand:
            self.disruption.left_behind(demand)

    def _slot_ads(self) -> list[dict[str, Any]] | None:
        """The cycle's one collector query: the annexes' startd ads (None: no answer, so no
        instance is known to be unused or missing)."""
        if self.ctx.slots is None:
            return None
        try:
            return self.ctx.slots.slots(self.settings.pool_id)
        except Exception as err:
            log.warning("could not read the annexes' slots from the collector: %s", one_line(err))
            return None

    def _failed_step(self, annex: Annex, err: Exception) -> Annex:
        """Keep the error with the annex (its LastError), logged once while it repeats."""
        if isinstance(err, AnnexError):
            message = one_line(err)
        else:
            message = f"internal error ({type(err).__name__}: {one_line(err)}); see ANNEX_GAHP_LOG"
        if message != annex.last_error:
            log.error("annex %s: %s", annex.key, message, exc_info=not isinstance(err, AnnexError))
        try:
            return self.store.update_annex(annex.id, last_error=message)
        except Exception as store_err:
            log.error("annex %s: could not record its error: %s", annex.key, store_err)
            return annex

    def _observe(
        self, annexes: list[Annex], regions: set[str] | None = None
    ) -> tuple[list[Observed], dict[str, str]]:
        """One describe per region, each on its own: (what was seen, region -> why it could
        not be seen). A region not seen is not a region without instances: its annexes are
        left alone this cycle (no relaunch, no retirement, no reaping)."""
        if regions is None:
            regions = {a.region for a in annexes}
        if not regions:
            regions = {self.resolve_region("", self.settings)}
        now = self.ctx.now()
        observed: list[Observed] = []
        failed: dict[str, str] = {}
        for region in sorted(regions):
            try:
                spec.check_region(region)
            except AnnexError as err:
                # A record from a version that did not check regions: nothing of it can exist
                # in AWS, and no call is made for it.
                failed[region] = str(err)
                continue
            failures, retry_at, why = self._unreachable.get(region, (0, 0, ""))
            if now < retry_at:
                # Looked at again after a back-off (lifecycle.retry_delay): an endpoint that
                # does not answer costs botocore's retries, and the other regions' annexes
                # must not wait them out every cycle.
                failed[region] = why
                continue
            try:
                observed += self.ctx.cloud.observe([region])
            except Exception as err:  # AWS error, endpoint down, throttled past the retries
                failures += 1
                retry_at = now + lifecycle.retry_delay(failures, self.settings.reconcile_interval)
                when = time.strftime("%H:%M:%S UTC", time.gmtime(retry_at))
                failed[region] = f"{_UNSEEN} {region} ({one_line(err)}); next look at {when}"
                self._unreachable[region] = (failures, retry_at, failed[region])
                log.warning("%s; its annexes wait", failed[region])
                continue
            if self._unreachable.pop(region, None):
                log.info("region %s answers again", region)
        return observed, failed

    def _unobserved(self, annex: Annex, why: str) -> Annex:
        """An annex whose region was not observed this cycle: no cloud call for it. Its lease
        end and a delete are still recorded; an annex whose region AWS does not have (a record
        from an older version) has nothing in the cloud, so it retires without a call."""
        now = self.ctx.now()
        if annex.state in lifecycle.ACTIVE and now >= annex.lease_expiration:
            annex = self.actions.retire(annex, RetireReason.LEASE, now)
        changes: dict[str, Any] = {}
        if annex.last_error != why:
            changes["last_error"] = why
        try:
            spec.check_region(annex.region)
        except AnnexError:
            if annex.state == names.RETIRING:
                return self.gc.retired(annex, now)
            if annex.state in (names.REQUESTED, names.PROVISIONING):
                return lifecycle.record(self.store, annex, Event.LAUNCH_FAILED, **changes)
        return self.store.update_annex(annex.id, **changes) if changes else annex

    def _step(
        self,
        annex: Annex,
        seen: list[Observed],
        demand: dict[tuple[str, str], Demand] | None,
        *,
        unclaimed: dict[str, int] | None = None,
        presence: Presence | None = None,
        noticed: dict[str, Notice] | None = None,
    ) -> Annex:
        now = self.ctx.now()
        if annex.last_error.startswith(_UNSEEN):  # its region answers again
            annex = self.store.update_annex(annex.id, last_error="")
        self.gc.record(annex.id, seen, now)
        live = [o for o in seen if o.state in lifecycle.INSTANCE_LIVE]
        if annex.state in lifecycle.ACTIVE:
            # At its budget (annex_max_cost, the owner's or the pool's): it grows no more.
            annex = self.budget.check(annex, now)
        if annex.state in lifecycle.ACTIVE:
            annex = self.disruption.policy(annex, demand, now)
        draining: list[str] = []
        if annex.state in lifecycle.ACTIVE and noticed:
            annex, live, draining = self.interruptions.handle(annex, live, noticed, now)
        if annex.state in lifecycle.ACTIVE and unclaimed:
            annex, live = self.disruption.retire_unclaimed(annex, live, unclaimed, now)
        if annex.state in lifecycle.ACTIVE:
            annex, live = self.liveness.check(annex, live, presence, now)
        if annex.state in lifecycle.ACTIVE:
            annex = self.provisioning.converge(annex, live, now, draining)
            if annex.state == names.RETIRING:
                return annex  # deleted during this cycle: retire it on a fresh observation
        if annex.state == names.RETIRING:
            annex = self.gc.retire(annex, live, now)
        return annex
