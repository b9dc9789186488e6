"""The reconcile loop: compare what the records want with what the cloud has, and act.

Each cycle makes one tag-filtered, paginated describe per region in use and one schedd query,
however many jobs and annexes there are. Every cloud call that creates something writes its
intent (with the request id its resources are tagged with) before the call, so a helper killed
at any instant adopts on restart instead of launching twice.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from annex_gahp import faults, lifecycle, names, pilotdata, spec
from annex_gahp.errors import AnnexError
from annex_gahp.lifecycle import Event, InstanceEvent, RetireReason
from annex_gahp.schedd import Demand
from annex_gahp.service import AnnexService
from annex_gahp.store import Annex, Op, Store

log = logging.getLogger(__name__)

# How an annex's LastError starts while its region cannot be observed.
_UNSEEN = "could not look at region"
# An instance we launched may not show in describe at once (eventual consistency).
SEEN_GRACE = 60


@dataclass(frozen=True)
class Observed:
    """One instance as the cloud reports it, reduced to what decisions need."""

    id: str
    state: str
    instance_type: str
    region: str
    tags: dict[str, str]

    @property
    def key(self) -> tuple[str, str]:
        return (self.tags.get(names.TAG_OWNER, ""), self.tags.get(names.TAG_NAME, ""))

    @property
    def request(self) -> str:
        return self.tags.get(names.TAG_REQUEST, "")

    @property
    def expires(self) -> int:
        try:
            return int(self.tags.get(names.TAG_EXPIRES, "0"))
        except ValueError:
            return 0


@dataclass(frozen=True)
class LaunchOutcome:
    instance_ids: list[str]
    errors: list[str] = field(default_factory=list)
    # The cloud took the request even if no instance id is known yet (an Auto Scaling group
    # launches in its own time): not a failure when `instance_ids` is empty.
    accepted: bool = False


class Cloud(Protocol):
    def observe(self, regions: Iterable[str]) -> list[Observed]: ...

    def prepare(self, annex: Annex) -> dict[str, str]: ...

    def launch(self, annex: Annex, count: int, request: str) -> LaunchOutcome: ...

    def terminate(self, region: str, ids: list[str]) -> None: ...

    def set_expiry(self, annex: Annex, ids: list[str]) -> None: ...

    def release(self, annex: Annex) -> None: ...


class DemandSource(Protocol):
    def counts(self) -> dict[tuple[str, str], Demand]: ...

    def hold(self, owner: str, annex: str, reason: str) -> None: ...

    def annotate(self, owner: str, annex: str, attrs: dict[str, str]) -> None: ...


class SlotSource(Protocol):
    """The collector's view of the annexes' startds (collector.AnnexSlots)."""

    def slots(self, pool_id: str) -> list[dict[str, Any]]: ...

    def invalidate(self, instance_ids: list[str]) -> None: ...


class Publisher(Protocol):
    def publish(self, views: Iterable[dict[str, Any]]) -> None: ...

    def invalidate(self, owner: str, annex: str) -> None: ...


class Reconciler:
    def __init__(
        self,
        store: Store,
        service: AnnexService,
        cloud: Cloud,
        demand: DemandSource,
        publisher: Publisher,
        *,
        clock: Callable[[], float] = time.time,
        slots: SlotSource | None = None,
    ) -> None:
        self.store = store
        self.service = service
        self.settings = service.settings
        self.cloud = cloud
        self.demand = demand
        self.publisher = publisher
        self.clock = clock
        self._last_publish = 0.0
        self._published: dict[int, dict[str, Any]] = {}
        self._orphans_seen: dict[str, int] = {}
        self.slots = slots
        # instance id -> when a slot of it was last seen claimed (or first seen at all).
        self._busy_at: dict[str, int] = {}
        # region -> (failed looks in a row, when to look again, why) while it cannot be seen.
        self._unreachable: dict[str, tuple[int, int, str]] = {}
        # Regions whose tags the start-up (fresh state file) could not read yet.
        self._adopt_pending: set[str] = set()

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
            self._settle(op, observed)
        if self.store.fresh:
            self._adopt_pending = set(failed)
            self._adopt_untracked(observed)

    def _recovery_regions(self, annexes: list[Annex]) -> set[str]:
        regions = {a.region for a in annexes} | set(self.settings.allowed_regions)
        try:
            regions.add(self.service._resolve_region("", self.settings))
        except Exception as err:  # a default that cannot be resolved only narrows the scan
            log.warning("no default region to look at: %s", err)
        return regions

    def _settle(self, op: Op, observed: list[Observed]) -> None:
        found = [o for o in observed if o.request == op.request]
        if op.kind == "launch":
            self.store.record_instances(
                op.annex_id,
                op.request,
                [(o.id, o.state, o.instance_type) for o in found],
                int(self.clock()),
            )
            log.warning(
                "launch %s was interrupted; adopted %d instance(s) tagged with it",
                op.request,
                len(found),
            )
            adopted = {"instances": [o.id for o in found], "adopted": True}
            self.store.finish_op(op.id, result=adopted)
        else:
            # Everything else is idempotent and is simply redone by the next cycle.
            self.store.finish_op(op.id, error="interrupted; redone by the next cycle")

    def _adopt_untracked(self, observed: list[Observed]) -> None:
        """A lost state file must not mean lost instances: rebuild annexes from their tags."""
        groups: dict[tuple[str, str], list[Observed]] = defaultdict(list)
        for o in observed:
            if o.state in lifecycle.INSTANCE_LIVE and all(o.key):
                groups[o.key].append(o)
        now = int(self.clock())
        for (owner, name), members in groups.items():
            if self.store.live(owner, name):
                continue
            expires = max(o.expires for o in members) or now + self.settings.default_lease
            annex = lifecycle.create(
                self.store,
                Event.ADOPT,
                owner=owner,
                name=name,
                spec=spec.AnnexSpec(name=name, owner=owner, instances=len(members)),
                region=members[0].region,
                requested=len(members),
                lease_expiration=expires,
                now=now,
                adopted=True,
            )
            self._record(annex.id, members, now)
            log.warning(
                "adopted annex %s from tags: %d instance(s), lease until %d",
                annex.key,
                len(members),
                expires,
            )

    def _record(self, annex_id: int, seen: list[Observed], now: int) -> None:
        """Remember what the cloud reported for this annex, grouped by launch request."""
        for request in {o.request for o in seen}:
            self.store.record_instances(
                annex_id,
                request,
                [(o.id, o.state, o.instance_type) for o in seen if o.request == request],
                now,
            )

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
            self._adopt_untracked([o for o in observed if o.region in now_seen])
            self._adopt_pending -= now_seen
            annexes = self.store.annexes()
        try:
            demand: dict[tuple[str, str], Demand] | None = self.demand.counts()
        except Exception as err:  # the schedd restarting must not retire annexes as idle
            log.warning("could not read demand from the schedd: %s", err)
            demand = None
        mine: dict[tuple[str, str], list[Observed]] = defaultdict(list)
        for o in observed:
            mine[o.key].append(o)
        unclaimed = self._unclaimed_instances()
        changed: list[Annex] = []
        for annex in annexes:
            key = (annex.owner, annex.name)
            try:
                if annex.region in failed:
                    after = self._unobserved(annex, failed[annex.region])
                else:
                    after = self._step(annex, mine.get(key, []), demand, unclaimed.get(key))
            except Exception as err:  # one annex's failure, of whatever kind, is its own
                after = self._failed_step(annex, err)
            changed.append(after)
        self._reap(observed)
        self._publish(changed)
        if demand:
            self._left_behind(demand)

    def _failed_step(self, annex: Annex, err: Exception) -> Annex:
        """Keep the error with the annex (its LastError), logged once while it repeats."""
        if isinstance(err, AnnexError):
            message = _one_line(err)
        else:
            message = f"internal error ({type(err).__name__}: {_one_line(err)}); see ANNEX_GAHP_LOG"
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
            regions = {self.service._resolve_region("", self.settings)}
        now = int(self.clock())
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
                observed += self.cloud.observe([region])
            except Exception as err:  # AWS error, endpoint down, throttled past the retries
                failures += 1
                retry_at = now + lifecycle.retry_delay(failures, self.settings.reconcile_interval)
                when = time.strftime("%H:%M:%S UTC", time.gmtime(retry_at))
                failed[region] = f"{_UNSEEN} {region} ({_one_line(err)}); next look at {when}"
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
        now = int(self.clock())
        if annex.state in lifecycle.ACTIVE and now >= annex.lease_expiration:
            annex = self._retire_for(annex, RetireReason.LEASE, now)
        changes: dict[str, Any] = {}
        try:
            spec.check_region(annex.region)
        except AnnexError:
            if annex.state == names.RETIRING:
                pilotdata.remove(self.settings.state_dir, annex.id)
                annex = lifecycle.record(self.store, annex, Event.GONE, retired_at=now)
                self._forget(annex)
                log.info("annex %s retired (%s)", annex.key, annex.retire_reason)
                return annex
            if annex.state in (names.REQUESTED, names.PROVISIONING):
                if annex.last_error != why:
                    changes["last_error"] = why
                return lifecycle.record(self.store, annex, Event.LAUNCH_FAILED, **changes)
        if annex.last_error != why:
            changes["last_error"] = why
        return self.store.update_annex(annex.id, **changes) if changes else annex

    def _step(
        self,
        annex: Annex,
        seen: list[Observed],
        demand: dict[tuple[str, str], Demand] | None,
        unclaimed: dict[str, int] | None = None,
    ) -> Annex:
        now = int(self.clock())
        if annex.last_error.startswith(_UNSEEN):  # its region answers again
            annex = self.store.update_annex(annex.id, last_error="")
        self._record(annex.id, seen, now)
        live = [o for o in seen if o.state in lifecycle.INSTANCE_LIVE]
        if annex.state in lifecycle.ACTIVE:
            annex = self._policy(annex, live, demand, now)
        if annex.state in lifecycle.ACTIVE and unclaimed:
            annex, live = self._retire_unclaimed(annex, live, unclaimed, now)
        if annex.state in lifecycle.ACTIVE:
            annex = self._converge(annex, live, now)
            if annex.state == names.RETIRING:
                return annex  # deleted during this cycle: retire it on a fresh observation
        if annex.state == names.RETIRING:
            annex = self._retire(annex, live, now)
        return annex

    def _policy(
        self,
        annex: Annex,
        live: list[Observed],
        demand: dict[tuple[str, str], Demand] | None,
        now: int,
    ) -> Annex:
        provision = annex.spec.mode == "provision"
        # Pool mode: the jobs are held two cycles before the end, while their startds still
        # answer. A shadow whose startd is already gone waits out its JobLeaseDuration (40 min
        # by default) before it lets a held job go, so a condor_release would not run the job
        # until then. (Provision mode: the job that stands for the annex ends by itself, exit 2.)
        ahead = 2 * self.settings.reconcile_interval
        if not provision and now >= annex.lease_expiration - ahead:
            # The cycle's snapshot may predate an extend: holding jobs is not undone, so ask
            # the record as it is now.
            annex = self.store.get(annex.id) or annex
            if now >= annex.lease_expiration - ahead:
                try:
                    self.demand.hold(
                        annex.owner, annex.name, ended_message(annex, RetireReason.LEASE.value)
                    )
                except Exception as err:  # the schedd's failure must not keep the lease alive
                    log.warning("could not hold the jobs of %s: %s", annex.key, _one_line(err))
        if now >= annex.lease_expiration:
            return self._retire_for(annex, RetireReason.LEASE, now)
        if demand is None:
            return annex
        wanted = demand.get((annex.owner, annex.name), Demand())
        if provision and wanted.idle:
            self._start_local_jobs()
        changes: dict[str, Any] = {}
        if (wanted.idle, wanted.running) != (annex.demand_idle, annex.demand_running):
            changes.update(demand_idle=wanted.idle, demand_running=wanted.running)
        if wanted.total:
            if annex.idle_since is not None:
                changes["idle_since"] = None
        elif annex.idle_since is None:
            changes["idle_since"] = now
        if changes:
            annex = self.store.update_annex(annex.id, **changes)
        timeout = annex.spec.idle_timeout or self.settings.idle_timeout
        if annex.idle_since is not None and now - annex.idle_since >= timeout:
            return self._retire_for(annex, RetireReason.IDLE, now)
        return annex

    def _retire_for(self, annex: Annex, reason: RetireReason, now: int) -> Annex:
        annex, retired = lifecycle.retire(self.store, annex, reason, now=now)
        if retired:
            self.service.wake()
        return annex

    def _record_terminating(self, annex: Annex, ids: list[str], now: int) -> None:
        """Recorded at once: still within the launch grace, they would count as live."""
        state = lifecycle.instance_next(lifecycle.I_RUNNING, InstanceEvent.TERMINATE)
        self.store.record_instances(annex.id, "", [(i, state, "") for i in ids], now)

    def _terminate(self, region: str, ids: list[str]) -> None:
        """Terminate, then drop the instances' startd ads from the collector: a startd that
        dies with its instance leaves ads behind for CLASSAD_LIFETIME, and the negotiator would
        keep matching jobs of the same annex name to slots that are gone."""
        self.cloud.terminate(region, ids)
        if self.slots is not None and ids:
            try:
                self.slots.invalidate(ids)
            except Exception as err:
                log.warning("could not drop the slots of %s from the collector: %s", ids, err)

    # --- instances nobody uses ---------------------------------------------------------------

    def _unclaimed_instances(self) -> dict[tuple[str, str], dict[str, int]]:
        """(owner, annex) -> {instance id: unclaimed since}, from one collector query.

        An instance counts as unclaimed when none of its slots is claimed; since when is the
        latest of its slots' EnteredCurrentState and the last time this loop saw one of them
        claimed (a partitionable slot stays Unclaimed while its dynamic slots run jobs). An
        instance whose startd has not reported is not in the answer: never retired as unused.
        """
        if self.slots is None:
            return {}
        now = int(self.clock())
        try:
            ads = self.slots.slots(self.settings.pool_id)
        except Exception as err:  # no collector answer: nothing is known to be unused
            log.warning("could not read the annexes' slots from the collector: %s", err)
            return {}
        per: dict[str, tuple[tuple[str, str], bool, int]] = {}
        for ad in ads:
            instance = ad.get("AnnexInstanceId")
            if not isinstance(instance, str) or not instance.startswith("i-"):
                continue
            key = (str(ad.get("AnnexOwner", "")), str(ad.get("AnnexName", "")))
            _, claimed, since = per.get(instance, (key, False, 0))
            entered = ad.get("EnteredCurrentState")
            per[instance] = (
                key,
                claimed or ad.get("State") != "Unclaimed",
                max(since, entered if isinstance(entered, int) else now),
            )
        result: dict[tuple[str, str], dict[str, int]] = defaultdict(dict)
        for instance, (key, claimed, since) in per.items():
            if claimed:
                self._busy_at[instance] = now
                continue
            result[key][instance] = max(since, self._busy_at.setdefault(instance, now))
        for instance in set(self._busy_at) - set(per):
            del self._busy_at[instance]
        return result

    def _retire_unclaimed(
        self, annex: Annex, live: list[Observed], unclaimed: dict[str, int], now: int
    ) -> tuple[Annex, list[Observed]]:
        """Terminate the instances unclaimed for the idle timeout, and ask for that many less.

        The clock runs only while the annex has jobs: with none, the annex's own idle timeout
        (in _policy) decides, and a job released or submitted later finds every instance
        with a fresh clock rather than one that ran out while nobody asked.
        """
        if not (annex.demand_idle or annex.demand_running):
            for instance in unclaimed:
                self._busy_at[instance] = now
            return annex, live
        timeout = annex.spec.idle_timeout or self.settings.idle_timeout
        running = {o.id for o in live if o.state == "running"}
        ids = sorted(i for i, since in unclaimed.items() if i in running and now - since >= timeout)
        if not ids:
            return annex, live
        have = len(live) + len(self._recent(annex, live, now))
        self._terminate(annex.region, ids)
        # Recorded at once, so the launch-grace count in _converge does not see them as live.
        self._record_terminating(annex, ids, now)
        changes: dict[str, Any] = {}
        if annex.demand_idle:
            changes["last_error"] = (
                f"{len(ids)} instance(s) retired after {timeout} s unclaimed while jobs waited: "
                "the waiting jobs do not match them (check request_memory, request_cpus, "
                "requirements)"
            )
        with self.store.transaction():
            # The count is lowered from the record as it is at the write: an extend that
            # raised it since the cycle's snapshot keeps what it was acknowledged.
            current = self.store.get(annex.id) or annex
            requested = max(0, min(annex.requested, have) - len(ids))
            if current.requested != annex.requested:
                requested = current.requested
            annex = self.store.update_annex(annex.id, requested=requested, **changes)
        log.info(
            "annex %s: %d instance(s) unclaimed for %d s, terminated: %s; now wants %d",
            annex.key,
            len(ids),
            timeout,
            " ".join(ids),
            requested,
        )
        for instance in ids:
            self._busy_at.pop(instance, None)
        return annex, [o for o in live if o.id not in ids]

    # --- jobs whose annex has ended -------------------------------------------------------

    def _left_behind(self, demand: dict[tuple[str, str], Demand]) -> None:
        """Idle jobs naming an annex that has ended and has no successor yet.

        Jobs that have waited since before an annex ended by its lease or by
        `htcondor-annex delete` are held with the reason (once, with the same message as at
        the end); they never bring it back by themselves. Jobs idle since (released by their
        owner) are handed back to the route, whose hook asks for a new annex. After an idle
        retirement every idle job is handed back: there was no job to leave behind.
        """
        hold_left = getattr(self.demand, "hold_left_behind", None)
        reroute = getattr(self.demand, "reroute", None)
        if hold_left is None or reroute is None:
            return
        for (owner, name), wanted in demand.items():
            try:
                if not wanted.idle or self.store.live(owner, name) is not None:
                    continue
                last = self.store.last_retired(owner, name)
                if last is None or last.retired_at is None:
                    continue  # never had an annex: the route's hook creates (or refuses) it
                if last.spec.mode != "pool":
                    continue  # provision mode: its job stands for the annex and ends with it
                if last.retire_reason in ENDINGS:
                    hold_left(owner, name, ended_message(last, last.retire_reason), last.retired_at)
                    reroute(owner, name, last.retired_at)
                else:
                    reroute(owner, name, 0)
            except Exception as err:
                log.warning("could not settle the waiting jobs of %s/%s: %s", owner, name, err)

    def _recent(self, annex: Annex, live: list[Observed], now: int) -> list[str]:
        """Launched by us, not yet visible to describe: counted so we do not launch twice."""
        known = {o.id for o in live}
        return [
            i.id
            for i in self.store.instances(annex.id)
            if i.id not in known
            and i.state in lifecycle.INSTANCE_LIVE
            and now - i.launched < SEEN_GRACE
        ]

    def _start_local_jobs(self) -> None:
        """Provision-mode jobs are local universe jobs that wait until the route has handed
        them to us (their Requirements); the schedd starts such a job at its next queue scan
        (SCHEDD_INTERVAL, 300 s by default) unless asked to look now: ask, once per cycle."""
        now = self.clock()
        if now - getattr(self, "_rescheduled_at", 0.0) < 1.0:
            return
        self._rescheduled_at = now
        reschedule = getattr(self.demand, "reschedule", None)
        if reschedule is None:
            return
        try:
            reschedule()
        except Exception as err:
            log.warning("could not ask the schedd to start provision-mode jobs: %s", err)

    def _provision_ended(self, annex: Annex, have: int) -> Annex | None:
        """Provision mode: the annex ends when every instance it got has ended (its pilots are
        done: `ended`), or when none could be launched (`failed`, with the error kept)."""
        if have:
            return None
        launched = len(self.store.instances(annex.id))
        if launched and launched >= annex.requested:
            log.info("annex %s: all %d instance(s) ended by themselves", annex.key, launched)
            return self._retire_for(annex, RetireReason.ENDED, int(self.clock()))
        if not launched and annex.state == names.FAILED:
            return self._retire_for(annex, RetireReason.FAILED, int(self.clock()))
        return None

    def _converge(self, annex: Annex, live: list[Observed], now: int) -> Annex:
        have = len(live) + len(self._recent(annex, live, now))
        if annex.spec.mode == "provision":
            ended = self._provision_ended(annex, have)
            if ended is not None:
                return ended
            # The job stands for the instances it got: one that ended (its pilot finished) is
            # not replaced, as a grid-universe ec2 job's VM is not.
            have = max(have, len(self.store.instances(annex.id)))
        running = sum(1 for o in live if o.state == "running")
        if have < annex.requested and lifecycle.may_launch(annex, now):
            annex = self._launch(annex, annex.requested - have, now)
        elif have > annex.requested:
            surplus = sorted(live, key=lambda o: (o.state == "running", o.id))
            ids = [o.id for o in surplus[: have - annex.requested]]
            self._terminate(annex.region, ids)
            # Recorded at once: still within the launch grace, they would count as live and
            # the next cycle would shrink again (by the live instances this time).
            self._record_terminating(annex, ids, now)
            log.info("annex %s shrinks by %d: %s", annex.key, len(ids), " ".join(ids))
        if live and annex.state in (names.REQUESTED, names.FAILED):
            # Its instances exist but the launch's state change was never written: the helper
            # died between CreateFleet and recording it, and the restart adopted them.
            annex = lifecycle.record(self.store, annex, Event.LAUNCH)
        if running and annex.state == names.PROVISIONING:
            annex = lifecycle.record(self.store, annex, Event.UP)
        stale = [o.id for o in live if o.expires != annex.lease_expiration]
        if stale:
            self.cloud.set_expiry(annex, stale)
        return annex

    def _launch(self, annex: Annex, count: int, now: int) -> Annex:
        try:
            prepared = self.cloud.prepare(annex)
        except AnnexError as err:
            # The token, the launch template or (provision mode) the user's data could not be
            # made: this attempt failed like a launch call would, and is retried after the
            # back-off - not every cycle, minting and storing a token each time.
            return self._launch_failed(annex, str(err), now)
        except Exception as err:
            # A bug, or an SDK that breaks: nothing was launched yet (no intent written), so
            # the same holds, and the other annexes' cycle goes on.
            log.exception("annex %s: preparing the launch failed", annex.key)
            what = f"internal error ({type(err).__name__}: {err}); see ANNEX_GAHP_LOG"
            return self._launch_failed(annex, what, now)
        if prepared and (
            prepared.get("template_id") != annex.template_id
            or prepared.get("token_parameter") != annex.token_parameter
        ):
            annex = self.store.update_annex(
                annex.id,
                template_id=prepared.get("template_id", ""),
                token_parameter=prepared.get("token_parameter", ""),
            )
        faults.checkpoint("create.prepared")
        op = self.store.begin_op(annex.id, "launch", {"count": count, "region": annex.region})
        faults.checkpoint("create.intent")
        try:
            outcome = self.cloud.launch(annex, count, op.request)
        except AnnexError as err:
            self.store.finish_op(op.id, error=str(err))
            return self._launch_failed(annex, str(err), now)
        except Exception as err:
            # Not an AWS answer (a bug, an SDK that breaks): the attempt counts as failed and
            # waits out the back-off like one. Anything it did launch carries the request tag
            # and the annex's tags, so the next cycle's observation records it.
            log.exception("annex %s: the launch call failed", annex.key)
            what = f"internal error ({type(err).__name__}: {err}); see ANNEX_GAHP_LOG"
            self.store.finish_op(op.id, error=what)
            return self._launch_failed(annex, what, now)
        faults.checkpoint("create.launched")
        self.store.finish_op(
            op.id,
            result={"instances": outcome.instance_ids, "errors": outcome.errors},
        )
        pending = lifecycle.instance_next(lifecycle.I_NEW, InstanceEvent.LAUNCHED)
        self.store.record_instances(
            annex.id, op.request, [(i, pending, "") for i in outcome.instance_ids], now
        )
        faults.checkpoint("create.finished")
        log.info(
            "annex %s: launched %d of %d (request %s)%s",
            annex.key,
            len(outcome.instance_ids),
            count,
            op.request,
            f"; {'; '.join(outcome.errors)}" if outcome.errors else "",
        )
        if not outcome.instance_ids and not outcome.accepted:
            return self._launch_failed(annex, "; ".join(outcome.errors) or "no capacity", now)
        error = "; ".join(outcome.errors)
        return lifecycle.record(
            self.store, annex, Event.LAUNCH, last_error=error, **lifecycle.LAUNCHED
        )

    def _launch_failed(self, annex: Annex, error: str, now: int) -> Annex:
        """Count the failed attempt and set when the next may be made; LastError says both,
        unless nothing will be tried again (a provision-mode annex that got no instance ends:
        _provision_ended)."""
        fields = lifecycle.launch_failed(annex, now, self.settings.reconcile_interval)
        failures, retry_at = fields["launch_failures"], fields["retry_at"]
        ends = annex.spec.mode == "provision" and not self.store.instances(annex.id)
        if not ends:
            when = time.strftime("%H:%M:%S UTC", time.gmtime(retry_at))
            error = f"{error} (attempt {failures} failed; next attempt at {when})"
        log.warning("annex %s: launch failed: %s", annex.key, error)
        return lifecycle.record(self.store, annex, Event.LAUNCH_FAILED, last_error=error, **fields)

    def _retire(self, annex: Annex, live: list[Observed], now: int) -> Annex:
        if live:
            self._terminate(annex.region, [o.id for o in live])
            log.info("annex %s: terminating %d instance(s)", annex.key, len(live))
            faults.checkpoint("retire.terminated")
            return annex
        self.cloud.release(annex)
        pilotdata.remove(self.settings.state_dir, annex.id)
        # Its instances are gone (none is live): their records say so, for the last report.
        records = self.store.instances(annex.id)
        ended = [
            (i.id, lifecycle.instance_next(i.state, InstanceEvent.GONE), "")
            for i in records
            if i.state in lifecycle.INSTANCE_LIVE
        ]
        if ended:
            self.store.record_instances(annex.id, "", ended, now)
        faults.checkpoint("retire.released")
        annex = lifecycle.record(self.store, annex, Event.GONE, retired_at=now)
        self._forget(annex)
        if annex.spec.mode == "provision" and annex.demand_idle:
            # A provision job that has not started yet starts on a state other than
            # requested/provisioning: tell it this one, or it would wait for good.
            self._annotate_jobs(annex, self.service.describe(annex))
        log.info("annex %s retired (%s)", annex.key, annex.retire_reason)
        return annex

    def _forget(self, annex: Annex) -> None:
        """A retired annex's ad leaves the collector."""
        try:
            self.publisher.invalidate(annex.owner, annex.name)
        except Exception as err:
            log.warning("could not invalidate the ad of %s: %s", annex.key, err)
        self._published.pop(annex.id, None)

    def _reap(self, observed: list[Observed]) -> None:
        """Terminate pool instances no live record owns, once they outlive the grace period."""
        now = int(self.clock())
        orphans: dict[str, list[str]] = defaultdict(list)
        for o in observed:
            if o.state not in lifecycle.INSTANCE_LIVE:
                continue
            try:
                if self._is_orphan(o, now):
                    orphans[o.region].append(o.id)
            except Exception as err:
                log.warning("could not decide whether %s is an orphan: %s", o.id, err)
        for region, ids in orphans.items():
            try:
                self._terminate(region, ids)
            except Exception as err:  # one region's failure leaves the others reaped
                log.warning("could not reap %s in %s: %s", " ".join(ids), region, err)
                continue
            for instance_id in ids:
                self._orphans_seen.pop(instance_id, None)

    def _is_orphan(self, o: Observed, now: int) -> bool:
        """A live instance of this pool no live record owns, past the grace period."""
        owner_id = self.store.instance_owner(o.id)
        owner = self.store.get(owner_id) if owner_id is not None else None
        if owner is not None and owner.state != names.RETIRED:
            self._orphans_seen.pop(o.id, None)
            return False
        live = self.store.live(*o.key)
        if live is not None:
            return False  # recorded on the next cycle of that annex
        first = self._orphans_seen.setdefault(o.id, now)
        retired = owner is not None  # its annex is gone: no reason to wait
        if retired or now - first >= self.settings.reaper_grace:
            log.warning("reaping %s (%s/%s): no live annex owns it", o.id, *o.key)
            return True
        return False

    def _publish(self, annexes: list[Annex]) -> None:
        now = self.clock()
        due = now - self._last_publish >= self.settings.update_interval
        views = []
        for annex in annexes:
            if annex.state == names.RETIRED:
                continue
            try:
                view = self.service.describe(annex)
                if due or self._published.get(annex.id) != view:
                    self._annotate_jobs(annex, view)
                    views.append(view)
                    self._published[annex.id] = view
            except Exception as err:  # one annex's ad or jobs; the others are published
                log.warning("could not publish annex %s: %s", annex.key, err)
        if not views:
            return
        try:
            self.publisher.publish(views)
        except Exception as err:
            log.warning("could not publish Annex ads: %s", err)
            self._published.clear()
            return
        if due:
            self._last_publish = now

    def _annotate_jobs(self, annex: Annex, view: dict[str, Any]) -> None:
        # Provision mode: the running job stands for the annex and shows its instances too.
        provision = view.get("Mode") == "provision"
        if not annex.demand_idle and not (provision and annex.demand_running):
            return  # nobody waits; the schedd refuses an edit that matches no job
        previous = self._published.get(annex.id)
        if previous is not None and all(previous.get(k) == view.get(k) for k in _JOB_VISIBLE):
            return
        try:
            self.demand.annotate(
                annex.owner,
                annex.name,
                self.service.job_status_attrs(annex, annex.owner, annex.name),
                **({"running": True} if provision else {}),
            )
            if provision and annex.demand_idle:
                self._start_local_jobs()  # their Requirements may have just become true
        except Exception as err:
            log.warning("could not update the jobs of %s: %s", annex.key, err)


def _one_line(err: BaseException, limit: int = 300) -> str:
    """An exception's text as one bounded line: SDK errors can carry a whole HTML page (an
    endpoint's 500), which would break the log's one-record-per-line shape and LastError."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# What the job ads show; a change in any of these is written into the waiting jobs.
_JOB_VISIBLE = (
    "AnnexState",
    "RequestedInstances",
    "RunningInstances",
    "LeaseExpiration",
    "LastError",
    "BindingLimit",
    "PendingInstances",
    "FailedInstances",
    "RetireReason",
)


# Ends after which the jobs left behind are held rather than bringing the annex back.
ENDINGS = (RetireReason.LEASE.value, RetireReason.DELETED.value)


def ended_message(annex: Annex, reason: str) -> str:
    """The hold reason for jobs whose annex ended: which annex, when, and what to do."""
    if reason == RetireReason.LEASE.value:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(annex.lease_expiration))
        what = f"the lease of annex {annex.name} ends at {when}, and its instances with it"
        keep = (
            f"; to keep an annex longer, run htcondor-annex extend --name {annex.name} "
            "--lease DURATION before its lease ends"
        )
    else:
        ended = annex.retired_at or annex.updated
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ended))
        what = (
            f"annex {annex.name} was deleted (htcondor-annex delete) at {when}, its instances too"
        )
        keep = ""
    return (
        f"{what}. condor_release these jobs to start a new "
        f"annex {annex.name} for them (new instances, a new lease), or condor_rm them{keep}."
    )
