"""The schedd for unit tests: one fake at each of the two layers the helper talks through.

- `FakeSchedd` stands in for `annex_gahp.schedd.ScheddDemand` (what the reconcile loop and the
  service call): every public method of the real class, with the same signature
  (tests/unit/test_fake_schedd.py fails when the two differ), answering from plain data the
  test sets and recording every request (holds, annotations, reroutes, reschedules) for the
  test to assert on. Nothing is optional: a loop that calls a method the real class lacks, or
  a real method the fake lacks, fails here and not in a pool.
- `BindingSchedd` stands in for `htcondor2.Schedd` under a real ScheddDemand (`demand_over`),
  for the tests of ScheddDemand itself: the queue is a list of ads, and every query, edit and
  act is recorded as a line.
"""

from __future__ import annotations

import re
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from annex_gahp.schedd import IDLE, LOCAL, RUNNING, Demand, QueuedJob, ScheddDemand


@dataclass
class Annotation:
    owner: str
    annex: str
    attrs: dict[str, str]
    running: bool


@dataclass
class FakeSchedd:
    """ScheddDemand's surface. Set `jobs` (what counts() answers), `queue` (what job() answers),
    `left` (the jobs left_since_last_look() says have gone), `down` (every call raises as a
    schedd that does not answer); `during_counts` runs inside counts(), i.e. inside a reconcile
    cycle after its snapshot of the records (a request landing from the socket then).
    One schedd: `schedd_of` answers "" (the local one) for every job, and a call about one job
    that names any other schedd fails, as a wrong routing would. Several schedds are tested
    under the real ScheddDemand (`demand_over` with several BindingSchedds)."""

    jobs: dict[tuple[str, str], Demand] = field(default_factory=dict)
    queue: dict[tuple[int, int], QueuedJob] = field(default_factory=dict)
    left: set[tuple[int, int]] = field(default_factory=set)
    down: bool = False
    during_counts: Callable[[], object] = field(default_factory=lambda: lambda: None)
    # What was asked, in order.
    annotations: list[Annotation] = field(default_factory=list)
    told: list[tuple[str, int, int, dict[str, str]]] = field(default_factory=list)
    held: list[tuple[str, str, str]] = field(default_factory=list)
    held_jobs: list[tuple[str, int, int, str]] = field(default_factory=list)
    left_behind: list[tuple[str, str, str, int]] = field(default_factory=list)
    rerouted: list[tuple[str, str, int]] = field(default_factory=list)
    reschedules: int = 0
    counted: int = 0
    served: list[str] = field(default_factory=list)

    @property
    def annotated(self) -> dict[tuple[str, str], dict[str, str]]:
        """(owner, annex) -> the attributes last written into its waiting jobs."""
        return {(a.owner, a.annex): a.attrs for a in self.annotations}

    def _answer(self) -> None:
        if self.down:
            raise OSError("Failed to connect to schedd (the fake's `down`)")

    @staticmethod
    def _mine(schedd: str) -> None:
        assert schedd == LOCAL, f"a call for schedd {schedd!r} reached the one-schedd fake"

    def serve(self, schedds: Sequence[str]) -> None:
        self.served = list(schedds)

    def schedd_of(self, global_job_id: object, cluster: int, proc: int) -> str:
        return LOCAL

    def counts(self) -> dict[tuple[str, str], Demand]:
        self._answer()
        self.counted += 1
        self.during_counts()
        return dict(self.jobs)

    def left_since_last_look(
        self, cluster: int, proc: int, idle_since: int, *, schedd: str = LOCAL
    ) -> bool:
        self._mine(schedd)
        return (cluster, proc) in self.left

    def job(self, cluster: int, proc: int, *, schedd: str = LOCAL) -> QueuedJob | None:
        self._mine(schedd)
        self._answer()
        return self.queue.get((cluster, proc))

    def annotate(
        self, owner: str, annex: str, attrs: dict[str, str], *, running: bool = False
    ) -> None:
        self._answer()
        self.annotations.append(Annotation(owner, annex, dict(attrs), running))

    def tell_job(
        self, owner: str, cluster: int, proc: int, attrs: dict[str, str], *, schedd: str = LOCAL
    ) -> None:
        self._mine(schedd)
        self._answer()
        self.told.append((owner, cluster, proc, dict(attrs)))

    def hold_job(
        self, owner: str, cluster: int, proc: int, reason: str, *, schedd: str = LOCAL
    ) -> None:
        self._mine(schedd)
        self._answer()
        self.held_jobs.append((owner, cluster, proc, reason))

    def reschedule(self) -> None:
        self._answer()
        self.reschedules += 1

    def hold(self, owner: str, annex: str, reason: str) -> None:
        self._answer()
        self.held.append((owner, annex, reason))

    def hold_left_behind(self, owner: str, annex: str, reason: str, ended: int) -> None:
        self._answer()
        self.left_behind.append((owner, annex, reason, ended))

    def reroute(self, owner: str, annex: str, ended: int) -> None:
        self._answer()
        self.rerouted.append((owner, annex, ended))


# --- one layer down: htcondor2.Schedd under the real ScheddDemand ------------------------------

_BY_ID = re.compile(r"ClusterId == (\d+) && ProcId == (\d+)")


class BindingSchedd:
    """The htcondor2.Schedd calls ScheddDemand makes, with the bindings' parameter names.

    `ads` is the queue. A query by id (ScheddDemand.job) answers that job; any other query (the
    demand query) answers every idle or running job. `down`: every call raises as a schedd that
    does not answer. `edit_error`: what edit raises (a schedd
    whose constraint matched no job: OSError on 23.9, HTCondorException from 23.10);
    `hold_success`: what act reports done. Every call is recorded in `calls` as one line:
    the constraint of a query, `edit <attr> where <constraint>`, `<action> where <constraint>`,
    `reschedule`."""

    def __init__(
        self, *, edit_error: type[BaseException] | None = None, hold_success: int = 1
    ) -> None:
        self.ads: list[dict[str, Any]] = []
        self.calls: list[str] = []
        self.edits: list[tuple[str, str, str]] = []
        self.acts: list[tuple[Any, str, Any]] = []
        self.down = False
        self.edit_error = edit_error
        self.hold_success = hold_success

    def add(
        self,
        cluster: int,
        proc: int = 0,
        owner: str = "alice",
        status: int = IDLE,
        annex: str = "burst",
    ) -> None:
        self.ads.append(
            {
                "ClusterId": cluster,
                "ProcId": proc,
                "Owner": owner,
                "JobStatus": status,
                "TargetAnnexName": annex,
            }
        )

    def query(
        self, constraint: str = "True", projection: list[str] | None = None, limit: int = -1
    ) -> list[dict[str, Any]]:
        self.calls.append(constraint)
        self._answer()
        found = _BY_ID.fullmatch(constraint)
        if found:
            wanted = (int(found[1]), int(found[2]))
            return [a for a in self.ads if (a["ClusterId"], a["ProcId"]) == wanted][:1]
        return [a for a in self.ads if a["JobStatus"] in (IDLE, RUNNING)]

    def edit(self, job_spec: str, attr: str, value: str) -> int:
        self.calls.append(f"edit {attr} where {job_spec}")
        self._answer()
        self.edits.append((job_spec, attr, value))
        if self.edit_error is not None:
            raise self.edit_error("Unable to edit jobs matching constraint")
        return 1

    def act(self, action: Any, job_spec: str, reason: Any = None) -> dict[str, int]:
        self.calls.append(f"{action} where {job_spec}")
        self._answer()
        self.acts.append((action, job_spec, reason))
        return {"TotalSuccess": self.hold_success}

    def reschedule(self) -> None:
        self.calls.append("reschedule")
        self._answer()

    def _answer(self) -> None:
        if self.down:
            raise OSError("Failed to connect to schedd")

    def by_id(self) -> int:
        """How many queries asked for one job by id."""
        return sum(1 for q in self.calls if _BY_ID.fullmatch(q))


# The local schedd's name under demand_over (what its GlobalJobIds start with).
LOCAL_NAME = "ap.example.org"


def demand_over(binding: BindingSchedd | dict[str, BindingSchedd]) -> ScheddDemand:
    """The real ScheddDemand, its htcondor2 module replaced by one whose Schedd is `binding`
    (and JobAction.Hold the string "Hold"). With a dict, name -> binding: the ScheddDemand
    serves those schedds (ANNEX_SCHEDDS), each located by name through the fake collector;
    `located` counts the collector's locates."""
    bindings = binding if isinstance(binding, dict) else {}
    demand = ScheddDemand(list(bindings))
    located: list[str] = []

    def locate(daemon_type: str, name: str | None = None) -> dict[str, str]:
        if name is None:  # the local schedd, from its address file
            return {"Name": LOCAL_NAME}
        located.append(name)
        return {"Name": name}

    def schedd(ad: dict[str, str] | None = None) -> BindingSchedd:
        if ad is None:
            assert isinstance(binding, BindingSchedd), "the local schedd is not served here"
            return binding
        return bindings[ad["Name"]]

    demand._htcondor = types.SimpleNamespace(
        Schedd=schedd,
        Collector=lambda: types.SimpleNamespace(locate=locate),
        DaemonType=types.SimpleNamespace(Schedd="Schedd"),
        JobAction=types.SimpleNamespace(Hold="Hold"),
    )
    demand.located = located  # type: ignore[attr-defined]
    return demand
