"""What the schedds know about demand: one query per schedd per reconcile cycle, whatever the job
count.

The helper serves the schedds listed in ANNEX_SCHEDDS (default: the local default schedd only).
A job is its schedd plus its cluster.proc: every call about one job goes to the schedd that owns
it (`schedd=`, a listed name; "" is the first listed), never to another schedd's job of the same
id. Calls about an annex's jobs (annotate, holds, reroute) go to every listed schedd, since one
annex serves one owner's jobs in any of them; demand is summed over all of them."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from annex_gahp import compat, names
from annex_gahp.errors import InputError, SetupError

log = logging.getLogger(__name__)

T = TypeVar("T")

# The local default schedd (htcondor2.Schedd() with no address): what is served when
# ANNEX_SCHEDDS is empty.
LOCAL = ""

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


@dataclass
class _Queue:
    """One served schedd: its name, its binding once located, the last demand query's answer
    kept as job ids with when the query began (what a translate hook that merges into a live
    annex is checked against, at no extra query: left_since_last_look). The view is one tuple,
    replaced whole: it is read from the socket threads."""

    name: str
    binding: Any = None
    last_look: tuple[float, frozenset[tuple[int, int]]] | None = None

    @property
    def label(self) -> str:
        return f"schedd {self.name}" if self.name else "the local schedd"


@dataclass
class _Errors:
    """The first failure of a call made on every schedd: the others are still tried (one schedd
    down must not stop the holds in the rest), then it is raised."""

    first: BaseException | None = None
    seen: list[str] = field(default_factory=list)

    def add(self, queue: _Queue, err: BaseException) -> None:
        self.seen.append(f"{queue.label}: {err}")
        if self.first is None:
            self.first = err

    def raise_first(self) -> None:
        if self.first is not None:
            if len(self.seen) > 1:
                log.warning("schedds that did not answer: %s", "; ".join(self.seen))
            raise self.first


class ScheddDemand:
    def __init__(self, schedds: Sequence[str] = ()) -> None:
        import htcondor2  # noqa: PLC0415

        self._htcondor = htcondor2
        self._queues: dict[str, _Queue] = {}
        self.serve(schedds)

    # --- which schedds ---------------------------------------------------------------------

    def serve(self, schedds: Sequence[str]) -> None:
        """Serve these schedds (ANNEX_SCHEDDS, names as the collector has them; empty: the local
        default schedd). A schedd kept across a reconfig keeps its connection and last look."""
        wanted = list(dict.fromkeys(s.strip() for s in schedds if s.strip())) or [LOCAL]
        if wanted != list(self._queues):
            served = ", ".join(wanted) if wanted != [LOCAL] else "the local schedd"
            log.info("serving the jobs of %s (ANNEX_SCHEDDS)", served)
        self._queues = {n: self._queues.get(n) or _Queue(n) for n in wanted}

    def schedd_of(self, global_job_id: object, cluster: int, proc: int) -> str:
        """The served schedd that owns a job, from its GlobalJobId (`<schedd name>#<cluster>.
        <proc>#<qdate>`, set by the schedd; a hook cannot change what the schedd then says
        about that id, which is what every check asks). A job that names no schedd is the one
        served schedd's. Raises when the job names a schedd that is not served (a router left
        on a schedd not listed), or with several schedds, names none."""
        queues = list(self._queues)
        text = global_job_id if isinstance(global_job_id, str) else ""
        name, _, rest = text.partition("#")
        if not rest.startswith(f"{int(cluster)}.{int(proc)}#"):
            if len(queues) == 1:
                return queues[0]
            raise InputError(
                f"job {cluster}.{proc} has no usable GlobalJobId: with several schedds "
                "(ANNEX_SCHEDDS) the helper must know which one owns the job"
            )
        if queues == [LOCAL]:
            local = self._local_name()
            if local is None or local.casefold() == name.casefold():
                return LOCAL
            raise SetupError(
                f"job {cluster}.{proc} is in schedd {name!r}, not in the local schedd {local!r}, "
                "the only one this helper serves: list every schedd in ANNEX_SCHEDDS"
            )
        for served in queues:
            if served.casefold() == name.casefold():
                return served
        raise SetupError(
            f"job {cluster}.{proc} is in schedd {name!r}, which this helper does not serve: "
            f"add it to ANNEX_SCHEDDS (now {' '.join(queues)}) and give it a job router"
        )

    def _local_name(self) -> str | None:
        """The local default schedd's name, from its address file (no collector query); None
        when it cannot be read (then every job is taken as the local schedd's, as before)."""
        htc = self._htcondor
        try:
            name = htc.Collector().locate(htc.DaemonType.Schedd).get("Name")
        except Exception as err:
            log.debug("could not read the local schedd's name: %s", err)
            return None
        return name if isinstance(name, str) and name else None

    def _queue(self, schedd: str) -> _Queue:
        queue = self._queues.get(schedd) if schedd else next(iter(self._queues.values()))
        if queue is None:
            raise SetupError(f"schedd {schedd!r} is not served (ANNEX_SCHEDDS)")
        return queue

    def _call(self, queue: _Queue, call: Callable[[Any], T]) -> T:
        """`call` on the queue's schedd. A named schedd is located through the collector once
        and kept; any failure drops it, so a schedd that restarted on a new port is located
        again at the next call."""
        if queue.binding is None:
            if queue.name:
                htc = self._htcondor
                ad = htc.Collector().locate(htc.DaemonType.Schedd, queue.name)
                queue.binding = htc.Schedd(ad)
            else:
                # The local schedd by its address file, as every tool finds it: not kept.
                return call(self._htcondor.Schedd())
        try:
            return call(queue.binding)
        except BaseException:
            queue.binding = None
            raise

    def _each(self, call: Callable[[_Queue], object]) -> None:
        errors = _Errors()
        for queue in list(self._queues.values()):
            try:
                call(queue)
            except Exception as err:
                errors.add(queue, err)
        errors.raise_first()

    # --- demand: one query per schedd --------------------------------------------------------

    def counts(self) -> dict[tuple[str, str], Demand]:
        """(owner, annex) -> jobs waiting for or running on it, summed over the served schedds.
        Raises if any schedd does not answer (after asking the others): an annex whose jobs
        are all in that schedd must not look idle and retire while it restarts."""
        idle: Counter[tuple[str, str]] = Counter()
        running: Counter[tuple[str, str]] = Counter()
        errors = _Errors()
        for queue in list(self._queues.values()):
            try:
                self._count(queue, idle, running)
            except Exception as err:
                errors.add(queue, err)
        errors.raise_first()
        return {k: Demand(idle[k], running[k]) for k in idle.keys() | running.keys()}

    def _count(
        self, queue: _Queue, idle: Counter[tuple[str, str]], running: Counter[tuple[str, str]]
    ) -> None:
        began = time.time()
        ads = self._call(
            queue,
            lambda s: s.query(
                constraint=_DEMAND,
                projection=["Owner", names.JOB_TARGET, "JobStatus", "ClusterId", "ProcId"],
            ),
        )
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
        queue.last_look = (began, frozenset(ids))

    # --- one job, in the schedd that owns it ---------------------------------------------------

    def left_since_last_look(
        self, cluster: int, proc: int, idle_since: int, *, schedd: str = LOCAL
    ) -> bool:
        """True when the last demand query of the job's schedd began after the job became idle
        (`idle_since`, its EnteredCurrentStatus) and did not find it idle or running: it was
        removed, completed or held in between. A job that became idle since (submitted,
        released) is not known yet: False, as it is when no query has answered yet."""
        view = self._queue(schedd).last_look
        if view is None:
            return False
        began, ids = view
        # Whole seconds: a job idle since the second the query began may have been missed.
        return idle_since < int(began) and (cluster, proc) not in ids

    def job(self, cluster: int, proc: int, *, schedd: str = LOCAL) -> QueuedJob | None:
        """One job as its schedd has it now (one query by id), None when it has left the
        queue. Raises if the schedd does not answer."""
        ads = self._call(
            self._queue(schedd),
            lambda s: s.query(
                constraint=f"ClusterId == {int(cluster)} && ProcId == {int(proc)}",
                projection=["Owner", "JobStatus"],
                limit=1,
            ),
        )
        for ad in ads:
            status = ad.get("JobStatus")
            return QueuedJob(str(ad.get("Owner", "")), status if isinstance(status, int) else 0)
        return None

    def tell_job(
        self, owner: str, cluster: int, proc: int, attrs: dict[str, str], *, schedd: str = LOCAL
    ) -> None:
        """Write `attrs` into one idle job of `owner` that no annex answers for (its request was
        refused). By constraint, so a job that has left the queue or stopped waiting matches
        nothing and is not edited (an edit of a removed job fails the schedd's next commit in
        HTCondor before 23.0.24/24.5.1, docs/router.md)."""
        constraint = f"{_one_job(owner, cluster, proc)} && JobStatus == {IDLE}"

        def edit(s: Any) -> None:
            for attr, value in attrs.items():
                s.edit(constraint, attr, value)

        try:
            self._call(self._queue(schedd), edit)
        except compat.edit_failed():
            pass  # no job matched: it left, or is no longer idle (OSError before 23.10)

    def hold_job(
        self, owner: str, cluster: int, proc: int, reason: str, *, schedd: str = LOCAL
    ) -> None:
        """Hold one job of `owner` with `reason` (provision mode: unusable user data)."""
        constraint = _one_job(owner, cluster, proc)
        queue = self._queue(schedd)
        self._call(queue, lambda s: s.act(self._htcondor.JobAction.Hold, constraint, (reason, 0)))
        log.info("held job %d.%d of %s in %s: %s", cluster, proc, owner, queue.label, reason)

    # --- an annex's jobs, in every schedd ------------------------------------------------------

    def annotate(
        self, owner: str, annex: str, attrs: dict[str, str], *, running: bool = False
    ) -> None:
        """Write the annex's status into the jobs waiting for it: one edit per attribute for
        all of them in each schedd, instead of one hook per job per polling period. `running`:
        the running jobs too (provision mode: the job that stands for the annex runs while it
        lives). A schedd with none of them refuses the first edit, and is left at that. A job
        whose own request was refused (AnnexState "refused", e.g. a conflict with this annex's
        settings) keeps its refusal: the annex's state is not its answer."""
        status = f"(JobStatus == {IDLE} || JobStatus == {RUNNING})" if running else None
        constraint = (
            f"Owner =?= {compat.quote(owner)} && {names.JOB_TARGET} =?= {compat.quote(annex)}"
            f" && {status or f'JobStatus == {IDLE}'}"
            f" && AnnexState =!= {compat.quote(names.JOB_REFUSED)}"
        )

        def edit(s: Any) -> None:
            for attr, value in attrs.items():
                s.edit(constraint, attr, value)

        def one(queue: _Queue) -> None:
            try:
                self._call(queue, edit)
            except compat.edit_failed():
                if len(self._queues) == 1:
                    raise  # (one schedd: status.py edits only while jobs wait, as before)

        self._each(one)

    def reschedule(self) -> None:
        """Ask the schedds to look at their queues now. Checked on 23.9: a local universe job
        whose Requirements just became true starts at once, not at the next SCHEDD_INTERVAL
        (default 300 s) - that is how a routed provision-mode job starts without delay."""
        self._each(lambda q: self._call(q, lambda s: s.reschedule()))

    def _waiting(self, owner: str, annex: str) -> str:
        return (
            f"Owner =?= {compat.quote(owner)} && {names.JOB_TARGET} =?= {compat.quote(annex)}"
            f" && RoutedFromJobId =?= undefined"
        )

    def _unroute(self, queue: _Queue, constraint: str) -> None:
        """Forget that these jobs were routed, so the route takes them again once they are
        idle (after a condor_release): the annex they were routed to is gone."""
        try:
            self._call(queue, lambda s: s.edit(constraint, ROUTED_MARK, "undefined"))
        except compat.edit_failed():
            # No job matched: the schedd refuses such an edit (OSError before 23.10, then
            # HTCondorException). Never raise here: hold() and hold_left_behind() unroute first,
            # and one empty match must not stop the hold, nor the reroute after it.
            pass

    def _hold_all(self, constraint: str, reason: str) -> int:
        """Unroute and hold the jobs matching `constraint` in every schedd: how many were held."""
        held = 0

        def one(queue: _Queue) -> None:
            nonlocal held
            self._unroute(queue, constraint)
            # A plain-string reason is dropped by the 23.9 bindings; (text, code) is kept.
            result = self._call(
                queue, lambda s: s.act(self._htcondor.JobAction.Hold, constraint, (reason, 0))
            )
            held += int(_get(result, "TotalSuccess") or 0)

        self._each(one)
        return held

    def hold(self, owner: str, annex: str, reason: str) -> None:
        """Hold the jobs still waiting for an annex that will not come back."""
        constraint = (
            f"{self._waiting(owner, annex)} && (JobStatus == {IDLE} || JobStatus == {RUNNING})"
        )
        self._hold_all(constraint, reason)
        log.info("held the jobs of %s/%s: %s", owner, annex, reason)

    def hold_left_behind(self, owner: str, annex: str, reason: str, ended: int) -> None:
        """Hold the idle jobs that have waited since before their annex ended (`ended`): they
        do not bring it back by themselves. A job released after that is left alone."""
        constraint = (
            f"{self._waiting(owner, annex)} && JobStatus == {IDLE}"
            f" && EnteredCurrentStatus <= {int(ended)}"
        )
        held = self._hold_all(constraint, reason)
        if held:
            log.info("held %s job(s) of %s/%s left behind", held, owner, annex)

    def reroute(self, owner: str, annex: str, ended: int) -> None:
        """Idle jobs routed to an annex that has ended, and released or queued since: let the
        route take them again, so the helper hears of them (and starts a new annex)."""
        constraint = (
            f"{self._waiting(owner, annex)} && JobStatus == {IDLE}"
            f" && {ROUTED_MARK} =?= {names.JOB_TARGET} && EnteredCurrentStatus > {int(ended)}"
        )
        self._each(lambda q: self._unroute(q, constraint))


def _get(result: Any, key: str) -> Any:
    """A value of an act() result (a ClassAd, or a dict in the tests), None when absent."""
    try:
        return result.get(key)
    except AttributeError:
        return None
