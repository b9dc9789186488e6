"""What the schedd knows about demand: one query per reconcile cycle, whatever the job count."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

from annex_gahp import names

log = logging.getLogger(__name__)

IDLE, RUNNING, HELD = 1, 2, 5
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


def quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class ScheddDemand:
    def __init__(self) -> None:
        import htcondor2  # noqa: PLC0415

        self._htcondor = htcondor2

    def _schedd(self):
        return self._htcondor.Schedd()

    def counts(self) -> dict[tuple[str, str], Demand]:
        """(owner, annex) -> jobs waiting for or running on it. Raises if the schedd is down."""
        ads = self._schedd().query(
            constraint=_DEMAND, projection=["Owner", names.JOB_TARGET, "JobStatus"]
        )
        idle: Counter[tuple[str, str]] = Counter()
        running: Counter[tuple[str, str]] = Counter()
        for ad in ads:
            key = (str(ad.get("Owner")), str(ad.get(names.JOB_TARGET)))
            if ad.get("JobStatus") == RUNNING:
                running[key] += 1
            else:
                idle[key] += 1
        return {k: Demand(idle[k], running[k]) for k in idle.keys() | running.keys()}

    def annotate(
        self, owner: str, annex: str, attrs: dict[str, str], *, running: bool = False
    ) -> None:
        """Write the annex's status into the jobs waiting for it: one edit per attribute for
        all of them, instead of one hook per job per polling period. `running`: the running
        jobs too (provision mode: the job that stands for the annex runs while it lives)."""
        status = f"(JobStatus == {IDLE} || JobStatus == {RUNNING})" if running else None
        constraint = (
            f"Owner == {quote(owner)} && {names.JOB_TARGET} == {quote(annex)}"
            f" && {status or f'JobStatus == {IDLE}'}"
        )
        schedd = self._schedd()
        for attr, value in attrs.items():
            schedd.edit(constraint, attr, value)

    def _waiting(self, owner: str, annex: str) -> str:
        return (
            f"Owner == {quote(owner)} && {names.JOB_TARGET} == {quote(annex)}"
            f" && RoutedFromJobId =?= undefined"
        )

    def _unroute(self, constraint: str) -> None:
        """Forget that these jobs were routed, so the route takes them again once they are
        idle (after a condor_release): the annex they were routed to is gone."""
        try:
            self._schedd().edit(constraint, ROUTED_MARK, "undefined")
        except OSError:
            pass  # no job matched: the schedd refuses such an edit

    def hold_job(self, owner: str, cluster: int, proc: int, reason: str) -> None:
        """Hold one job of `owner` with `reason` (provision mode: unusable user data)."""
        constraint = (
            f"ClusterId == {int(cluster)} && ProcId == {int(proc)} && Owner == {quote(owner)}"
        )
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
