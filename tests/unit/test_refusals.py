"""Every refusal of a waiting job's request reaches the job (issue 18, docs/troubleshooting.md
"My job stays idle"): AnnexState = "refused" and the message in AnnexLastError, written into
that one idle job by the real ScheddDemand (over a recorded htcondor2.Schedd), once per
message. The refusals that must not or cannot be written are checked to write nothing.

One test per kind of refusal on JOB_ROUTED's path: a value the helper does not accept (bad
spec, an attribute that evaluates to error, a region AWS does not have), an admin limit (the
lease, a region not allowed, the per-user cap), a conflict with the live annex, an annex that
is retiring, an annex whose lease ended before the job was released, provision mode's user
data. tests/e2e/test_refusals_reach_jobs.py shows the same through the real router and schedd.
"""

from __future__ import annotations

from typing import Any

import pytest
from aws_fixtures import REGION, make_settings
from fake_schedd import BindingSchedd, demand_over

from annex_gahp import compat, lifecycle, names
from annex_gahp.errors import AnnexError, InputError, JobGone, LimitExceeded, PermissionDenied
from annex_gahp.gahp import Caller
from annex_gahp.schedd import HELD
from annex_gahp.service import AnnexService
from annex_gahp.store import Store

ALICE = Caller(uid=1000, user="alice", is_admin=False)
BOB = Caller(uid=1001, user="bob", is_admin=False)
NOW = 1_900_000_000
ONE_JOB = 'ClusterId == {c} && ProcId == 0 && Owner =?= "alice" && JobStatus == 1'


@pytest.fixture
def schedd() -> BindingSchedd:
    return BindingSchedd()


def service_for(tmp_path, schedd: BindingSchedd, **knobs: Any) -> AnnexService:
    return AnnexService(
        Store(str(tmp_path / "state.sqlite")),
        make_settings(**knobs),
        clock=lambda: NOW,
        resolve_region=lambda region, settings: region or REGION,
        jobs=demand_over(schedd),
        hold_job=lambda *job, schedd="": held.append(job),
    )


held: list[tuple[Any, ...]] = []


@pytest.fixture
def service(tmp_path, schedd) -> AnnexService:
    held.clear()
    return service_for(tmp_path, schedd)


def ad(cluster: int = 7, *, name: str = "burst", owner: str = "alice", extra: str = "") -> str:
    return (
        f'Owner = "{owner}"\nClusterId = {cluster}\nProcId = 0\nQDate = {NOW - 60}\n'
        f"EnteredCurrentStatus = {NOW - 60}\nJobStatus = 1\n"
        f'TargetAnnexName = "{name}"\nAnnexInstances = 1\n{extra}'
    )


def refusal(
    service: AnnexService,
    schedd: BindingSchedd,
    cluster: int,
    error: type[AnnexError],
    caller: Caller = ALICE,
    **job: Any,
) -> str:
    """Route job `cluster` (queued, idle), expect `error`, and return its message after
    checking that exactly it, and AnnexState "refused", were written into that job."""
    schedd.add(cluster)
    schedd.edits.clear()
    with pytest.raises(error) as caught:
        service.job_routed(caller, {"ad": ad(cluster, **job)})
    why = str(caught.value)
    assert schedd.edits == [
        (ONE_JOB.format(c=cluster), "AnnexLastError", compat.quote(why)),
        (ONE_JOB.format(c=cluster), "AnnexState", compat.quote(names.JOB_REFUSED)),
    ]
    return why


def nothing_written(schedd: BindingSchedd) -> None:
    assert [e for e in schedd.edits if e[1] in ("AnnexLastError", "AnnexState")] == []


# --- values the helper does not accept ----------------------------------------------------------


def test_a_bad_value_found_by_the_helper(service, schedd):
    # A job edited after submit (condor_qedit) past the submit transform's checks.
    why = refusal(service, schedd, 7, InputError, extra='AnnexLease = "2 hours"\n')
    assert "annex_lease" in why
    assert service.store.live("alice", "burst") is None


def test_an_attribute_that_evaluates_to_error(service, schedd):
    why = refusal(service, schedd, 7, InputError, extra="AnnexInstanceTypes = error\n")
    assert why == "AnnexInstanceTypes evaluates to error: give it a literal value"


def test_a_region_aws_does_not_have(service, schedd):
    why = refusal(service, schedd, 7, InputError, extra='AnnexRegion = "xx-nowhere-9"\n')
    assert "annex_region = 'xx-nowhere-9' is not an AWS region" in why


# --- admin limits -----------------------------------------------------------------------------


def test_a_lease_over_the_admins_limit(service, schedd):
    why = refusal(service, schedd, 7, LimitExceeded, extra="AnnexLease = 999999\n")
    assert "ANNEX_MAX_LEASE" in why


def test_a_region_the_admin_does_not_allow(tmp_path, schedd):
    service = service_for(tmp_path, schedd, allowed_regions=("us-east-1",))
    why = refusal(service, schedd, 7, LimitExceeded, extra='AnnexRegion = "eu-west-1"\n')
    assert "ANNEX_ALLOWED_REGIONS" in why


def test_the_per_user_cap(tmp_path, schedd):
    service = service_for(tmp_path, schedd, max_instances_per_user=1)
    schedd.add(6)
    service.job_routed(ALICE, {"ad": ad(6, name="first")})
    why = refusal(service, schedd, 7, LimitExceeded)
    assert "ANNEX_MAX_INSTANCES_PER_USER (1)" in why


# --- the annex of that name ---------------------------------------------------------------------


def test_a_conflict_with_the_live_annex(service, schedd):
    schedd.add(6)
    service.job_routed(ALICE, {"ad": ad(6)})
    why = refusal(service, schedd, 7, InputError, extra='AnnexInstanceTypes = "c5.large"\n')
    assert "already runs with annex_instance_types" in why
    assert "this job asks for 'c5.large'" in why


def test_an_annex_that_is_retiring_and_the_job_once_it_is_gone(service, schedd):
    """Retiring resolves itself: the job stays idle with the reason, and the router's next
    try after the annex is gone gets a new annex, whose state replaces the refusal. (An annex
    retired by delete or its lease is not brought back by jobs that waited since before: the
    next test.)"""
    schedd.add(6)
    service.job_routed(ALICE, {"ad": ad(6)})
    annex = service.store.live("alice", "burst")
    service.retire(annex, lifecycle.RetireReason.ENDED)
    why = refusal(service, schedd, 7, InputError)
    assert why.startswith("annex burst is retiring (ended)")
    gone = service.store.get(annex.id)
    lifecycle.record(service.store, gone, lifecycle.Event.GONE, retired_at=NOW)
    told = f'AnnexState = "{names.JOB_REFUSED}"\nAnnexLastError = {compat.quote(why)}\n'
    answer = service.job_routed(ALICE, {"ad": ad(7, extra=told)})["ad"]
    assert 'AnnexState = "requested"' in answer and 'AnnexLastError = ""' in answer


def test_an_annex_whose_lease_ended_before_the_job_was_released(service, schedd):
    schedd.add(6)
    service.job_routed(ALICE, {"ad": ad(6)})
    annex = service.store.live("alice", "burst")
    service.retire(annex, lifecycle.RetireReason.DELETED, now=NOW - 10)
    gone = service.store.get(annex.id)
    lifecycle.record(service.store, gone, lifecycle.Event.GONE, retired_at=NOW)
    why = refusal(service, schedd, 7, InputError)
    assert "was deleted at" in why and "condor_release" in why


# --- provision mode -----------------------------------------------------------------------------


def test_provision_user_data_that_cannot_be_used_is_told_and_the_job_held(service, schedd):
    extra = 'AnnexMode = "provision"\nAnnexUserDataFile = "/home/alice/pilot.sh"\n'
    schedd.add(7)
    with pytest.raises(InputError):
        service.job_routed(ALICE, {"ad": ad(7, extra=extra), "user_data_error": "too large"})
    assert [e[1:] for e in schedd.edits] == [
        ("AnnexLastError", '"too large"'),
        ("AnnexState", compat.quote(names.JOB_REFUSED)),
    ]
    assert held == [("alice", 7, 0, "too large")]


# --- written once, and never where it must not be -----------------------------------------------


def test_a_refusal_the_job_already_carries_is_not_written_again(service, schedd):
    why = refusal(service, schedd, 7, InputError, extra='AnnexLease = "2 hours"\n')
    schedd.edits.clear()
    told = f'AnnexState = "refused"\nAnnexLastError = {compat.quote(why)}\n'
    with pytest.raises(InputError):
        service.job_routed(ALICE, {"ad": ad(7, extra='AnnexLease = "2 hours"\n' + told)})
    nothing_written(schedd)


def test_another_users_ad_is_refused_without_writing_into_their_job(service, schedd):
    schedd.add(7)
    with pytest.raises(InputError):  # read before its owner is: still not written
        service.job_routed(BOB, {"ad": ad(7, extra="AnnexInstanceTypes = error\n")})
    with pytest.raises(PermissionDenied):
        service.job_routed(BOB, {"ad": ad(7)})
    nothing_written(schedd)


def test_a_job_the_schedd_says_is_someone_elses_is_not_written(service, schedd):
    schedd.add(7, owner="bob")
    with pytest.raises(PermissionDenied):
        service.job_routed(ALICE, {"ad": ad(7)})
    nothing_written(schedd)


def test_a_job_that_no_longer_waits_is_not_written(service, schedd):
    schedd.add(7, status=HELD)
    with pytest.raises(JobGone):
        service.job_routed(ALICE, {"ad": ad(7)})
    with pytest.raises(JobGone):
        service.job_routed(ALICE, {"ad": ad(8)})  # not in the queue at all
    nothing_written(schedd)


def test_the_status_loop_leaves_a_refused_jobs_answer_alone(schedd):
    """A job refused for a conflict names a live annex: the annex's state, written into its
    waiting jobs each cycle, must not replace the refusal."""
    demand_over(schedd).annotate("alice", "burst", {"AnnexState": '"running"'})
    assert schedd.edits[0][0].endswith('&& AnnexState =!= "refused"')
