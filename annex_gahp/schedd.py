"""What the schedd knows about demand: one query per reconcile cycle, whatever the job count."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass

from annex_gahp import compat, names

log = logging.getLogger(__name__)

IDLE, RUNNING, REMOVED, COMPLETED, HELD, SUBMISSION_ERR = 1, 2, 3, 4, 5, 6
# What the route sets on a job it edited (30-annex-router.conf); it does not route it again.
ROUTED_MARK = "AnnexRoutedName"

# Routed copies (RoutedFromJobId defined) mirror their source job: count each job once.
_DEMAND = (
    f"{names.JOB_TARGET} =!= undefined && RoutedFromJobId =?= undefined"
    f" && (JobStatus == {IDLE} || JobStatus == {RUNNING})"
)


@dataclass(frozen=True)
class Demand:
    idle: int = 0
    running: int = 0

    @property
    def total(self) -> int:
        return self.idle + self.running


def _one_job(owner: str, cluster: int, proc: int) -> str:
    owner_is = f"Owner =?= {compat.quote(owner)}"
    return f"ClusterId == {int(cluster)} && ProcId == {int(proc)} && {owner_is}"


@dataclass(frozen=True)
class QueuedJob:
    """One job as the schedd has it now."""

    owner: str
    status: int


class ScheddDemand:
    def __init__(self) -> None:
        import htcondor2  # noqa: PLC0415

        self._htcondor = htcondor2
        # The demand query's answer kept as job ids, with when the query began: what a
        # translate hook that merges into a live annex is checked against, at no extra query
        # (left_since_last_look). One tuple, replaced whole: read from the socket threads.
        self._last_look: tuple[float, frozenset[tuple[int, int]]] | None = None

    def _schedd(self):
        return self._htcondor.Schedd()

    def counts(self) -> dict[tuple[str, str], Demand]:
        """(owner, annex) -> jobs waiting for or running on it. Raises if the schedd is down."""
        began = time.time()
        ads = self._schedd().query(
            constraint=_DEMAND,
            projection=["Owner", names.JOB_TARGET, "JobStatus", "ClusterId", "ProcId"],
        )
        idle: Counter[tuple[str, str]] = Counter()
        running: Counter[tuple[str, str]] = Counter()
        ids: set[tuple[int, int]] = set()
        for ad in ads:
            key = (str(ad.get("Owner")), str(ad.get(names.JOB_TARGET)))
            if ad.get("JobStatus") == RUNNING:
                running[key] += 1
            else:
                idle[key] += 1
            cluster, proc = ad.get("ClusterId"), ad.get("ProcId")
            if isinstance(cluster, int) and isinstance(proc, int):
                ids.add((cluster, proc))
        self._last_look = (began, frozenset(ids))
        return {k: Demand(idle[k], running[k]) for k in idle.keys() | running.keys()}

    def left_since_last_look(self, cluster: int, proc: int, idle_since: int) -> bool:
        """True when the last demand query began after the job became idle (`idle_since`,
        its EnteredCurrentStatus) and did not find it idle or running: it was removed,
        completed or held in between. A job that became idle since (submitted, released) is
        not known yet: False, as it is when no query has answered yet."""
        view = self._last_look
        if view is None:
            return False
        began, ids = view
        # Whole seconds: a job idle since the second the query began may have been missed.
        return idle_since < int(began) and (cluster, proc) not in ids

    def job(self, cluster: int, proc: int) -> QueuedJob | None:
        """One job as the schedd has it now (one query by id), None when it has left the
        queue. Raises if the schedd does not answer."""
        ads = self._schedd().query(
            constraint=f"ClusterId == {int(cluster)} && ProcId == {int(proc)}",
            projection=["Owner", "JobStatus"],
            limit=1,
        )
        for ad in ads:
            status = ad.get("JobStatus")
            return QueuedJob(str(ad.get("Owner", "")), status if isinstance(status, int) else 0)
        return None

    def annotate(
        self, owner: str, annex: str, attrs: dict[str, str], *, running: bool = False
    ) -> None:
        """Write the annex's status into the jobs waiting for it: one edit per attribute for
        all of them, instead of one hook per job per polling period. `running`: the running
        jobs too (provision mode: the job that stands for the annex runs while it lives).
        A job whose own request was refused (AnnexState "refused", e.g. a conflict with this
        annex's settings) keeps its refusal: the annex's state is not its answer."""
        status = f"(JobStatus == {IDLE} || JobStatus == {RUNNING})" if running else None
        constraint = (
            f"Owner =?= {compat.quote(owner)} && {names.JOB_TARGET} =?= {compat.quote(annex)}"
            f" && {status or f'JobStatus == {IDLE}'}"
            f" && AnnexState =!= {compat.quote(names.JOB_REFUSED)}"
        )
        schedd = self._schedd()
        for attr, value in attrs.items():
            schedd.edit(constraint, attr, value)

    def tell_job(self, owner: str, cluster: int, proc: int, attrs: dict[str, str]) -> None:
        """Write `attrs` into one idle job of `owner` that no annex answers for (its request was
        refused). By constraint, so a job that has left the queue or stopped waiting matches
        nothing and is not edited (an edit of a removed job fails the schedd's next commit in
        HTCondor before 23.0.24/24.5.1, docs/router.md)."""
        constraint = f"{_one_job(owner, cluster, proc)} && JobStatus == {IDLE}"
        schedd = self._schedd()
        try:
            for attr, value in attrs.items():
                schedd.edit(constraint, attr, value)
        except compat.edit_failed():
            pass  # no job matched: it left, or is no longer idle (OSError before 23.10)

    def _waiting(self, owner: str, annex: str) -> str:
        return (
            f"Owner =?= {compat.quote(owner)} && {names.JOB_TARGET} =?= {compat.quote(annex)}"
            f" && RoutedFromJobId =?= undefined"
        )

    def _unroute(self, constraint: str) -> None:
        """Forget that these jobs were routed, so the route takes them again once they are
        idle (after a condor_release): the annex they were routed to is gone."""
        try:
            self._schedd().edit(constraint, ROUTED_MARK, "undefined")
        except compat.edit_failed():
            # No job matched: the schedd refuses such an edit (OSError before 23.10, then
            # HTCondorException). Never raise here: hold() and hold_left_behind() unroute first,
            # and one empty match must not stop the hold, nor the reroute after it.
            pass

    def hold_job(self, owner: str, cluster: int, proc: int, reason: str) -> None:
        """Hold one job of `owner` with `reason` (provision mode: unusable user data)."""
        constraint = _one_job(owner, cluster, proc)
        self._schedd().act(self._htcondor.JobAction.Hold, constraint, (reason, 0))
        log.info("held job %d.%d of %s: %s", cluster, proc, owner, reason)

    def reschedule(self) -> None:
        """Ask the schedd to look at its queue now. Checked on 23.9: a local universe job
        whose Requirements just became true starts at once, not at the next SCHEDD_INTERVAL
        (default 300 s) - that is how a routed provision-mode job starts without delay."""
        self._schedd().reschedule()

    def hold(self, owner: str, annex: str, reason: str) -> None:
        """Hold the jobs still waiting for an annex that will not come back."""
        constraint = (
            f"{self._waiting(owner, annex)} && (JobStatus == {IDLE} || JobStatus == {RUNNING})"
        )
        self._unroute(constraint)
        # A plain-string reason is dropped by the 23.9 bindings; (text, code) is kept.
        self._schedd().act(self._htcondor.JobAction.Hold, constraint, (reason, 0))
        log.info("held the jobs of %s/%s: %s", owner, annex, reason)

    def hold_left_behind(self, owner: str, annex: str, reason: str, ended: int) -> None:
        """Hold the idle jobs that have waited since before their annex ended (`ended`): they
        do not bring it back by themselves. A job released after that is left alone."""
        constraint = (
            f"{self._waiting(owner, annex)} && JobStatus == {IDLE}"
            f" && EnteredCurrentStatus <= {int(ended)}"
        )
        self._unroute(constraint)
        result = self._schedd().act(self._htcondor.JobAction.Hold, constraint, (reason, 0))
        if result.get("TotalSuccess"):
            log.info("held %s job(s) of %s/%s left behind", result["TotalSuccess"], owner, annex)

    def reroute(self, owner: str, annex: str, ended: int) -> None:
        """Idle jobs routed to an annex that has ended, and released or queued since: let the
        route take them again, so the helper hears of them (and starts a new annex)."""
        constraint = (
            f"{self._waiting(owner, annex)} && JobStatus == {IDLE}"
            f" && {ROUTED_MARK} =?= {names.JOB_TARGET} && EnteredCurrentStatus > {int(ended)}"
        )
        self._unroute(constraint)
