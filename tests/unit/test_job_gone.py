"""JOB_ROUTED for a job that has left the queue (docs/router.md, "Jobs that leave before their
hook runs"): the job router runs the translate hook for jobs removed after it picked them up,
so the helper creates an annex only for a job the schedd still has waiting (one query, on the
create path only), and refuses a job its last demand query no longer saw (no query at all).

The service runs against the product's ScheddDemand with a small in-memory schedd in place of
htcondor2 (tests/e2e/test_router_gone.py does the same with the real router and schedd).
"""

from __future__ import annotations

from typing import Any

import pytest
from aws_fixtures import REGION, make_settings
from fake_schedd import BindingSchedd, demand_over

from annex_gahp.errors import AnnexError, InputError, JobGone, LimitExceeded, PermissionDenied
from annex_gahp.gahp import Caller
from annex_gahp.schedd import COMPLETED, HELD, REMOVED, RUNNING, ScheddDemand
from annex_gahp.service import AnnexService
from annex_gahp.store import Store

ALICE = Caller(uid=1000, user="alice", is_admin=False)
NOW = 1_900_000_000


@pytest.fixture
def queue(monkeypatch) -> tuple[ScheddDemand, BindingSchedd]:
    monkeypatch.setattr("annex_gahp.schedd.time.time", lambda: NOW + 0.5)  # demand query start
    schedd = BindingSchedd()
    return demand_over(schedd), schedd


@pytest.fixture
def service(tmp_path, queue) -> AnnexService:
    store = Store(str(tmp_path / "state.sqlite"))
    return AnnexService(
        store,
        make_settings(),
        clock=lambda: NOW,
        resolve_region=lambda region, settings: REGION,
        jobs=queue[0],
    )


def ad(
    cluster: int = 7,
    proc: int = 0,
    instances: int = 1,
    since: int = NOW - 60,
    *,
    name: str = "burst",
    extra: str = "",
) -> str:
    return (
        f'Owner = "alice"\nClusterId = {cluster}\nProcId = {proc}\nQDate = {since}\n'
        f'EnteredCurrentStatus = {since}\nJobStatus = 1\nTargetAnnexName = "{name}"\n'
        f"AnnexInstances = {instances}\n{extra}"
    )


def routed(service: AnnexService, **job: Any) -> dict[str, str]:
    return service.job_routed(ALICE, {"ad": ad(**job)})


# --- the create path: one query for the job --------------------------------------------------


def test_a_waiting_job_creates_its_annex_after_one_query(service, queue):
    _, schedd = queue
    schedd.add(7)
    routed(service)
    annex = service.store.live("alice", "burst")
    assert annex is not None and annex.requested == 1
    assert schedd.calls == ["ClusterId == 7 && ProcId == 0"]


@pytest.mark.parametrize(
    ("status", "words"),
    [
        (None, "job 7.0 is no longer in the queue"),
        (REMOVED, "job 7.0 was removed"),
        (COMPLETED, "job 7.0 has completed"),
        (HELD, "job 7.0 is held (once released, the job router routes it again)"),
    ],
)
def test_a_job_that_is_not_waiting_creates_nothing(service, queue, status, words):
    _, schedd = queue
    if status is not None:
        schedd.add(7, status=status)
    with pytest.raises(JobGone) as caught:
        routed(service)
    assert str(caught.value) == f"{words}: no annex is created for it"
    assert caught.value.code == "JOB_GONE"
    assert service.store.annexes(include_retired=True) == []


def test_a_job_id_of_someone_else_creates_nothing(service, queue):
    _, schedd = queue
    schedd.add(7, owner="bob")
    with pytest.raises(PermissionDenied, match=r"job 7\.0 belongs to bob, not alice"):
        routed(service)
    assert service.store.annexes(include_retired=True) == []


def test_a_schedd_that_does_not_answer_creates_nothing_and_says_the_router_retries(
    service, queue
):
    _, schedd = queue
    schedd.add(7)
    schedd.down = True
    with pytest.raises(AnnexError, match=r"could not ask the schedd whether job 7\.0 still waits"):
        routed(service)
    assert service.store.annexes(include_retired=True) == []
    schedd.down = False
    routed(service)  # the router's next try
    assert service.store.live("alice", "burst") is not None


def test_a_running_job_may_create_its_annex(service, queue):
    # It started on a slot of an earlier annex of that name before the router got to it.
    _, schedd = queue
    schedd.add(7, status=RUNNING)
    routed(service)
    assert service.store.live("alice", "burst") is not None


# --- the merge path: no query ----------------------------------------------------------------


def test_merging_into_a_live_annex_asks_the_schedd_nothing(service, queue):
    _, schedd = queue
    for proc in range(50):
        schedd.add(7, proc)
    for proc in range(50):
        routed(service, proc=proc, instances=1 + proc % 3)
    assert schedd.by_id() == 1  # the first job's, which created the annex
    assert service.store.live("alice", "burst").requested == 3


def test_a_job_the_last_demand_query_missed_is_refused_without_a_query(service, queue):
    demand, schedd = queue
    schedd.add(7, 0)
    schedd.add(7, 1)
    routed(service, proc=0)
    schedd.ads = [a for a in schedd.ads if a["ProcId"] != 1]  # condor_rm 7.1
    demand.counts()  # the reconcile loop's query, after the job had become idle
    asked = len(schedd.calls)
    with pytest.raises(JobGone, match=r"job 7\.1 was no longer idle or running at the helper"):
        routed(service, proc=1, instances=5)
    assert len(schedd.calls) == asked
    assert service.store.live("alice", "burst").requested == 1  # its 5 were not merged


def test_a_job_idle_only_since_the_last_demand_query_is_not_refused(service, queue):
    demand, schedd = queue
    schedd.add(7, 0)
    routed(service, proc=0)
    demand.counts()  # began at NOW + 0.5
    schedd.add(7, 1)  # submitted (or released) in that second, or later
    routed(service, proc=1, instances=2, since=NOW)
    assert service.store.live("alice", "burst").requested == 2


def test_without_a_schedd_nothing_is_checked(tmp_path):
    store = Store(str(tmp_path / "state.sqlite"))
    service = AnnexService(store, make_settings(), resolve_region=lambda r, s: REGION)
    routed(service)  # stdio mode and tests: no schedd to ask
    assert store.live("alice", "burst") is not None


# --- ScheddDemand's part ---------------------------------------------------------------------


def test_demand_query_keeps_the_waiting_ids_and_when_it_began(queue):
    demand, schedd = queue
    schedd.add(7, 0)
    schedd.add(7, 1, status=RUNNING)
    schedd.add(7, 2, status=HELD)
    assert demand.left_since_last_look(7, 2, NOW - 100) is False  # no query yet: unknown
    counts = demand.counts()
    assert (counts[("alice", "burst")].idle, counts[("alice", "burst")].running) == (1, 1)
    assert demand._queue("").last_look == (NOW + 0.5, frozenset({(7, 0), (7, 1)}))
    assert demand.left_since_last_look(7, 2, NOW - 1) is True  # held before the query
    assert demand.left_since_last_look(7, 9, NOW - 1) is True  # gone before the query
    assert demand.left_since_last_look(7, 0, NOW - 1) is False  # seen waiting
    assert demand.left_since_last_look(7, 9, NOW) is False  # idle since that very second


def test_holding_jobs_still_works_after_a_demand_query(queue):
    # The ids kept by the demand query once shadowed a helper of hold() and broke every
    # lease-end hold (a reconcile cycle that fails as a whole).
    demand, schedd = queue
    schedd.add(7, 0)
    demand.counts()
    demand.hold("alice", "burst", "the lease ends")
    demand.hold_left_behind("alice", "burst", "it was deleted", NOW)
    assert sum(q.startswith("Hold where Owner =?= \"alice\"") for q in schedd.calls) == 2


# --- a refused request says why in the job ---------------------------------------------------


def test_a_request_refused_by_the_per_user_cap_is_written_into_the_job_once(tmp_path, queue):
    """The router leaves a refused job unrouted and asks again every polling period: the
    job's AnnexLastError says which cap, written when it changes and only into that job while
    it is idle (a constraint that matches nothing once it has left)."""
    demand, schedd = queue
    service = AnnexService(
        Store(str(tmp_path / "state.sqlite")),
        make_settings(max_instances_per_user=1),
        clock=lambda: NOW,
        resolve_region=lambda region, settings: REGION,
        jobs=demand,
    )
    schedd.add(7)
    schedd.add(8)
    routed(service)  # burst takes alice's one instance
    schedd.calls.clear()
    with pytest.raises(LimitExceeded) as caught:
        routed(service, cluster=8, name="other")
    why = str(caught.value)
    assert "ANNEX_MAX_INSTANCES_PER_USER (1)" in why
    edits = [q for q in schedd.calls if q.startswith("edit ")]
    assert edits == [
        f'edit {attr} where ClusterId == 8 && ProcId == 0 && Owner =?= "alice" && JobStatus == 1'
        for attr in ("AnnexLastError", "AnnexState")  # AnnexState = "refused"
    ]
    assert service.store.live("alice", "other") is None

    schedd.calls.clear()
    with pytest.raises(LimitExceeded):  # the job already says so: nothing written again
        routed(
            service,
            cluster=8,
            name="other",
            extra=f'AnnexLastError = "{why}"\nAnnexState = "refused"\n',
        )
    assert [q for q in schedd.calls if q.startswith("edit ")] == []


def test_every_refusal_of_a_routed_request_is_written_into_the_job(service, queue):
    """Not only the caps: a value the helper refuses (here a region AWS does not have, which
    condor_submit cannot know) and a conflict with a live annex reach the job's AnnexLastError,
    so its owner sees why it stays idle."""
    _, schedd = queue
    schedd.add(7)
    schedd.add(8)
    with pytest.raises(InputError) as bad:
        routed(service, cluster=7, extra='AnnexRegion = "xx-nowhere-9"\n')
    assert "annex_region" in str(bad.value)
    routed(service, cluster=8)  # burst, 1 instance
    schedd.add(9)
    with pytest.raises(InputError) as conflict:
        routed(service, cluster=9, instances=1, extra='AnnexInstanceTypes = "c5.large"\n')
    edits = [q for q in schedd.calls if q.startswith("edit ")]
    assert edits == [
        f'edit {attr} where ClusterId == {c} && ProcId == 0 && Owner =?= "alice"'
        " && JobStatus == 1"
        for c in (7, 9)
        for attr in ("AnnexLastError", "AnnexState")  # AnnexState = "refused"
    ], (str(bad.value), str(conflict.value))
    assert service.store.live("alice", "burst").requested == 1
