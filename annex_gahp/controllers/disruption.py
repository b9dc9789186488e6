"""Disruption: ending capacity nobody should pay for any more. An annex's lease end (its jobs
held just before), its idle timeout, single instances no job claims while jobs wait, and the
jobs an annex that ended leaves behind."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from annex_gahp.controllers import Context, one_line, recent
from annex_gahp.controllers.actions import Actions
from annex_gahp.lifecycle import RetireReason
from annex_gahp.schedd import Demand
from annex_gahp.store import Annex

if TYPE_CHECKING:
    from annex_gahp.cloud import Observed

log = logging.getLogger(__name__)

# Ends after which the jobs left behind are held rather than bringing the annex back.
ENDINGS = (RetireReason.LEASE.value, RetireReason.DELETED.value, RetireReason.BUDGET.value)


def ended_message(annex: Annex, reason: str) -> str:
    """The hold reason for jobs whose annex ended: which annex, when, and what to do."""
    if reason == RetireReason.BUDGET.value:
        # Its LastError says which budget (controllers/budget.py): a new annex would spend more.
        why = annex.last_error.removeprefix("stopped: ") or "it reached its budget"
        return (
            f"annex {annex.name} stopped: {why}. condor_rm these jobs, or condor_release them "
            "once there is budget left (a new annex)."
        )
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


class Disruption:
    def __init__(self, ctx: Context, actions: Actions) -> None:
        self.ctx = ctx
        self.actions = actions
        # instance id -> when a slot of it was last seen claimed (or first seen at all).
        self._busy_at: dict[str, int] = {}

    # --- lease and idle timeout ------------------------------------------------------------

    def policy(
        self,
        annex: Annex,
        demand: dict[tuple[str, str], Demand] | None,
        now: int,
    ) -> Annex:
        store, settings = self.ctx.store, self.ctx.settings
        provision = annex.spec.mode == "provision"
        # Pool mode: the jobs are held two cycles before the end, while their startds still
        # answer. A shadow whose startd is already gone waits out its JobLeaseDuration (40 min
        # by default) before it lets a held job go, so a condor_release would not run the job
        # until then. (Provision mode: the job that stands for the annex ends by itself, exit 2.)
        ahead = 2 * settings.reconcile_interval
        if not provision and now >= annex.lease_expiration - ahead:
            # The cycle's snapshot may predate an extend: holding jobs is not undone, so ask
            # the record as it is now.
            annex = store.get(annex.id) or annex
            if now >= annex.lease_expiration - ahead:
                try:
                    message = ended_message(annex, RetireReason.LEASE.value)
                    self.ctx.demand.hold(annex.owner, annex.name, message)
                except Exception as err:  # the schedd's failure must not keep the lease alive
                    log.warning("could not hold the jobs of %s: %s", annex.key, one_line(err))
        if now >= annex.lease_expiration:
            return self.actions.retire(annex, RetireReason.LEASE, now)
        if demand is None:
            return annex
        wanted = demand.get((annex.owner, annex.name), Demand())
        if provision and wanted.idle:
            self.actions.start_local_jobs()
        changes: dict[str, Any] = {}
        if (wanted.idle, wanted.running) != (annex.demand_idle, annex.demand_running):
            changes.update(demand_idle=wanted.idle, demand_running=wanted.running)
        if wanted.total:
            if annex.idle_since is not None:
                changes["idle_since"] = None
        elif annex.idle_since is None:
            changes["idle_since"] = now
        if changes:
            annex = store.update_annex(annex.id, **changes)
        timeout = annex.spec.idle_timeout or settings.idle_timeout
        if annex.idle_since is not None and now - annex.idle_since >= timeout:
            return self.actions.retire(annex, RetireReason.IDLE, now)
        return annex

    # --- instances nobody uses -------------------------------------------------------------

    def unclaimed_instances(
        self, ads: list[dict[str, Any]] | None
    ) -> dict[tuple[str, str], dict[str, int]]:
        """(owner, annex) -> {instance id: unclaimed since}, from the cycle's one collector
        query (`ads`; None: it got no answer, so nothing is known to be unused).

        An instance counts as unclaimed when none of its slots is claimed; since when is the
        latest of its slots' EnteredCurrentState and the last time this loop saw one of them
        claimed (a partitionable slot stays Unclaimed while its dynamic slots run jobs). An
        instance whose startd has not reported is not in the answer: never retired as unused.
        """
        if ads is None:
            return {}
        now = self.ctx.now()
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

    def retire_unclaimed(
        self, annex: Annex, live: list[Observed], unclaimed: dict[str, int], now: int
    ) -> tuple[Annex, list[Observed]]:
        """Terminate the instances unclaimed for the idle timeout, and ask for that many less.

        The clock runs only while the annex has jobs: with none, the annex's own idle timeout
        (in policy) decides, and a job released or submitted later finds every instance
        with a fresh clock rather than one that ran out while nobody asked.
        """
        store = self.ctx.store
        if not (annex.demand_idle or annex.demand_running):
            for instance in unclaimed:
                self._busy_at[instance] = now
            return annex, live
        timeout = annex.spec.idle_timeout or self.ctx.settings.idle_timeout
        running = {o.id for o in live if o.state == "running"}
        ids = sorted(i for i, since in unclaimed.items() if i in running and now - since >= timeout)
        if not ids:
            return annex, live
        have = len(live) + len(recent(store, annex, live, now))
        self.actions.terminate(annex.region, ids)
        # Recorded at once, so the launch-grace count in converge does not see them as live.
        self.actions.record_terminating(annex, ids, now)
        changes: dict[str, Any] = {}
        if annex.demand_idle:
            changes["last_error"] = (
                f"{len(ids)} instance(s) retired after {timeout} s unclaimed while jobs waited: "
                "the waiting jobs do not match them (check request_memory, request_cpus, "
                "requirements)"
            )
        with store.transaction():
            # The count is lowered from the record as it is at the write: an extend that
            # raised it since the cycle's snapshot keeps what it was acknowledged.
            current = store.get(annex.id) or annex
            requested = max(0, min(annex.requested, have) - len(ids))
            if current.requested != annex.requested:
                requested = current.requested
            annex = store.update_annex(annex.id, requested=requested, **changes)
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

    # --- jobs whose annex has ended --------------------------------------------------------

    def left_behind(self, demand: dict[tuple[str, str], Demand]) -> None:
        """Idle jobs naming an annex that has ended and has no successor yet.

        Jobs that have waited since before an annex ended by its lease or by
        `htcondor-annex delete` are held with the reason (once, with the same message as at
        the end); they never bring it back by themselves. Jobs idle since (released by their
        owner) are handed back to the route, whose hook asks for a new annex. After an idle
        retirement every idle job is handed back: there was no job to leave behind.
        """
        store, schedd = self.ctx.store, self.ctx.demand
        for (owner, name), wanted in demand.items():
            try:
                if not wanted.idle or store.live(owner, name) is not None:
                    continue
                last = store.last_retired(owner, name)
                if last is None or last.retired_at is None:
                    continue  # never had an annex: the route's hook creates (or refuses) it
                if last.spec.mode != "pool":
                    continue  # provision mode: its job stands for the annex and ends with it
                if last.retire_reason in ENDINGS:
                    message = ended_message(last, last.retire_reason)
                    schedd.hold_left_behind(owner, name, message, last.retired_at)
                    schedd.reroute(owner, name, last.retired_at)
                else:
                    schedd.reroute(owner, name, 0)
            except Exception as err:
                log.warning("could not settle the waiting jobs of %s/%s: %s", owner, name, err)
