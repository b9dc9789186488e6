"""Several schedds on one access point (issue 18, item 4; ANNEX_SCHEDDS): the real ScheddDemand
over two fake schedds that hold the SAME job ids (7.0 in both, owned by different users), so a
call routed to the wrong schedd is seen acting on the wrong job.

- a job is its schedd plus cluster.proc: the job router of each schedd runs our translate hook,
  whose ad carries the schedd's GlobalJobId (`<schedd>#<cluster>.<proc>#<qdate>`); every call
  about that one job (the check before an annex is created, the last look, AnnexLastError, the
  hold of provision mode) goes to that schedd only;
- calls about an annex's jobs (status edits, holds, reroutes) go to every schedd, and demand is
  summed over them: one query per schedd per cycle, whatever the job count.
"""

from __future__ import annotations

import pytest
from aws_fixtures import REGION, make_settings, moto_server_url, moto_url  # noqa: F401
from fake_schedd import LOCAL_NAME, BindingSchedd, demand_over
from test_reconcile import build

from annex_gahp import names, spec
from annex_gahp.errors import InputError, JobGone, PermissionDenied, SetupError
from annex_gahp.gahp import Caller
from annex_gahp.schedd import HELD, IDLE, RUNNING, Demand, ScheddDemand
from annex_gahp.service import AnnexService
from annex_gahp.store import Store

ONE, TWO = "ap.example.org", "schedd_glideins2@ap.example.org"
ALICE = Caller(uid=1000, user="alice", is_admin=False)
NOW = 1_900_000_000


@pytest.fixture
def schedds(monkeypatch) -> tuple[ScheddDemand, BindingSchedd, BindingSchedd]:
    """Two schedds, each with a job 7.0: bob's in ONE, alice's in TWO."""
    monkeypatch.setattr("annex_gahp.schedd.time.time", lambda: NOW + 0.5)
    one, two = BindingSchedd(), BindingSchedd()
    one.add(7, 0, owner="bob", annex="burst")
    two.add(7, 0, owner="alice", annex="burst")
    return demand_over({ONE: one, TWO: two}), one, two


def service_over(tmp_path, demand: ScheddDemand, **settings) -> AnnexService:
    return AnnexService(
        Store(str(tmp_path / "state.sqlite")),
        make_settings(**settings),
        clock=lambda: NOW,
        resolve_region=lambda region, s: REGION,
        jobs=demand,
        hold_job=demand.hold_job,
    )


def ad(schedd: str | None, cluster: int = 7, proc: int = 0, extra: str = "") -> str:
    gid = f'GlobalJobId = "{schedd}#{cluster}.{proc}#{NOW - 60}"\n' if schedd else ""
    return (
        f'Owner = "alice"\nClusterId = {cluster}\nProcId = {proc}\nQDate = {NOW - 60}\n'
        f'EnteredCurrentStatus = {NOW - 60}\nJobStatus = 1\nTargetAnnexName = "burst"\n'
        f"{gid}{extra}"
    )


def by_id(binding: BindingSchedd) -> list[str]:
    return [c for c in binding.calls if c.startswith("ClusterId == ")]


def edits(binding: BindingSchedd) -> list[str]:
    return [c for c in binding.calls if c.startswith("edit ")]


# --- which schedd owns a job ------------------------------------------------------------------


def test_a_job_belongs_to_the_schedd_its_global_job_id_names(schedds):
    demand = schedds[0]
    assert demand.schedd_of(f"{TWO}#7.0#123", 7, 0) == TWO
    assert demand.schedd_of(f"{ONE}#7.0#123", 7, 0) == ONE
    assert demand.schedd_of(f"{TWO.upper()}#7.0#123", 7, 0) == TWO  # daemon names: any case


def test_a_job_of_a_schedd_not_served_or_with_no_schedd_is_refused(schedds):
    demand = schedds[0]
    with pytest.raises(SetupError, match="add it to ANNEX_SCHEDDS"):
        demand.schedd_of("schedd_glideins3@ap.example.org#7.0#123", 7, 0)
    with pytest.raises(InputError, match="no usable GlobalJobId"):
        demand.schedd_of(None, 7, 0)
    # A GlobalJobId of another job is no evidence of this one's schedd.
    with pytest.raises(InputError, match="no usable GlobalJobId"):
        demand.schedd_of(f"{TWO}#8.0#123", 7, 0)


def test_the_local_schedd_alone_takes_its_own_jobs_and_refuses_another_schedds():
    """ANNEX_SCHEDDS empty, but a router left on a second schedd: its job 7.0 must not be
    taken for the local schedd's 7.0."""
    local = demand_over(BindingSchedd())
    assert local.schedd_of(f"{LOCAL_NAME}#7.0#1", 7, 0) == ""
    assert local.schedd_of(None, 7, 0) == ""  # (an ad with no GlobalJobId: as before)
    with pytest.raises(SetupError, match="list every schedd in ANNEX_SCHEDDS"):
        local.schedd_of(f"{TWO}#7.0#1", 7, 0)


def test_one_listed_schedd_takes_a_job_that_names_none():
    listed = ScheddDemand([TWO])
    assert listed.schedd_of(None, 7, 0) == TWO
    with pytest.raises(SetupError):
        listed.schedd_of(f"{ONE}#7.0#1", 7, 0)


def test_reconfig_keeps_the_schedds_it_still_serves(schedds):
    demand, _one, _two = schedds
    demand.counts()
    kept = demand._queue(TWO)
    demand.serve([TWO, " ", TWO])
    assert list(demand._queues) == [TWO] and demand._queue(TWO) is kept
    assert kept.last_look is not None
    demand.serve([])
    assert list(demand._queues) == [""]


# --- demand: summed, one query per schedd -----------------------------------------------------


def test_demand_is_summed_over_the_schedds_with_one_query_each(schedds):
    demand, one, two = schedds
    one.add(8, 0, owner="alice", annex="burst", status=RUNNING)
    two.add(9, 0, owner="alice", annex="burst")
    for cluster in range(10, 60):  # fifty more jobs cost no more queries
        two.add(cluster, 0, owner="alice", annex="burst")
    counts = demand.counts()
    assert counts[("alice", "burst")] == Demand(idle=52, running=1)
    assert counts[("bob", "burst")] == Demand(idle=1)
    assert len(one.calls) == len(two.calls) == 1
    demand.counts()
    assert demand.located == [ONE, TWO]  # located once each, then kept


def test_a_schedd_that_does_not_answer_fails_the_count_after_the_others_are_read(schedds):
    demand, one, _two = schedds
    one.down = True
    with pytest.raises(OSError):
        demand.counts()  # never a partial count: the annex of its jobs would look idle
    assert demand._queue(TWO).last_look is not None  # the other schedd was still read
    one.down = False
    assert demand.counts()[("alice", "burst")] == Demand(idle=1)
    assert demand.located == [ONE, TWO, ONE]  # the failed one located again


def test_the_last_look_of_each_schedd_is_its_own(schedds):
    demand, one, _two = schedds
    one.ads[0]["JobStatus"] = HELD  # bob's 7.0 in ONE left; alice's 7.0 in TWO waits
    demand.counts()
    assert demand.left_since_last_look(7, 0, NOW - 60, schedd=ONE) is True
    assert demand.left_since_last_look(7, 0, NOW - 60, schedd=TWO) is False


# --- one job: only in its own schedd --------------------------------------------------------


def test_a_job_of_the_second_schedd_creates_its_annex_checked_there_only(tmp_path, schedds):
    demand, one, two = schedds
    service = service_over(tmp_path, demand)
    service.job_routed(ALICE, {"ad": ad(TWO)})
    assert service.store.live("alice", "burst") is not None
    assert by_id(two) == ["ClusterId == 7 && ProcId == 0"] and by_id(one) == []


def test_bobs_job_of_the_same_id_in_the_other_schedd_is_not_alices(tmp_path, schedds):
    """alice's hook claims 7.0 of ONE, which is bob's: refused, whatever her 7.0 in TWO is."""
    demand, _one, two = schedds
    service = service_over(tmp_path, demand)
    with pytest.raises(PermissionDenied, match=f"job 7.0 of schedd {ONE} belongs to bob"):
        service.job_routed(ALICE, {"ad": ad(ONE)})
    assert service.store.live("alice", "burst") is None
    assert by_id(two) == []


def test_a_job_gone_from_its_schedd_is_gone_even_if_the_other_has_that_id(tmp_path, schedds):
    demand, one, two = schedds
    two.ads.clear()  # alice's 7.0 left TWO; bob's 7.0 still waits in ONE
    service = service_over(tmp_path, demand)
    with pytest.raises(JobGone, match=f"job 7.0 of schedd {TWO} is no longer in the queue"):
        service.job_routed(ALICE, {"ad": ad(TWO)})
    assert by_id(one) == []


def test_a_refusal_is_written_into_the_job_in_its_own_schedd(tmp_path, schedds):
    demand, one, two = schedds
    service = service_over(tmp_path, demand)
    with pytest.raises(InputError):
        service.job_routed(ALICE, {"ad": ad(TWO, extra="AnnexInstances = -3\n")})
    assert edits(one) == []
    assert edits(two) == [
        f'edit {attr} where ClusterId == 7 && ProcId == 0 && Owner =?= "alice"'
        f" && JobStatus == {IDLE}"
        for attr in ("AnnexLastError", "AnnexState")
    ]


def test_a_job_of_a_schedd_not_served_gets_nothing_and_touches_no_schedd(tmp_path, schedds):
    demand, one, two = schedds
    service = service_over(tmp_path, demand)
    with pytest.raises(SetupError, match="ANNEX_SCHEDDS"):
        service.job_routed(ALICE, {"ad": ad("elsewhere@ap.example.org")})
    assert one.calls == two.calls == []
    assert service.store.live("alice", "burst") is None


def test_provision_mode_holds_the_job_in_its_own_schedd(tmp_path, schedds):
    demand, one, two = schedds
    demand.hold_job("alice", 7, 0, "bad user data", schedd=TWO)
    assert one.acts == []
    assert two.acts == [
        ("Hold", 'ClusterId == 7 && ProcId == 0 && Owner =?= "alice"', ("bad user data", 0))
    ]


# --- an annex's jobs: in every schedd ---------------------------------------------------------


def test_status_edits_reach_the_jobs_in_every_schedd(schedds):
    demand, one, two = schedds
    one.edit_error = OSError  # no job of alice's waits in ONE: its schedd refuses the edit
    demand.annotate("alice", "burst", {"AnnexState": '"running"', "AnnexRunningInstances": "1"})
    assert len(edits(one)) == 1  # refused at the first attribute, left at that
    assert [e[1:] for e in two.edits] == [
        ("AnnexState", '"running"'),
        ("AnnexRunningInstances", "1"),
    ]
    assert all('Owner =?= "alice"' in e[0] for e in one.edits + two.edits)


def test_holds_reach_every_schedd_even_when_one_does_not_answer(schedds):
    demand, one, two = schedds
    one.down = True
    with pytest.raises(OSError, match="Failed to connect"):
        demand.hold("alice", "burst", "the annex was deleted")
    assert [a[0] for a in two.acts] == ["Hold"] and 'Owner =?= "alice"' in two.acts[0][1]


def test_every_call_about_an_annex_reaches_every_schedd(schedds):
    demand, one, two = schedds
    demand.hold_left_behind("alice", "burst", "the annex was deleted", NOW)
    demand.reroute("alice", "burst", NOW)
    demand.reschedule()
    for binding in (one, two):
        assert [a[0] for a in binding.acts] == ["Hold"]
        assert sum(c.startswith("edit AnnexRoutedName") for c in binding.calls) == 2
        assert binding.calls[-1] == "reschedule"


# --- the loop: an annex whose jobs are in two schedds ---------------------------------------


def test_an_annex_used_from_two_schedds_stays_while_either_has_jobs(moto_url, tmp_path):  # noqa: F811
    """The loop over the real ScheddDemand: alice's annex has a job in each schedd (both 7.0).
    When ONE's job leaves, the annex is not idle: TWO's job still wants it, and its status
    edits still reach TWO. Only when both have left does its idle clock start."""
    world = build(moto_url, tmp_path)
    one, two = BindingSchedd(), BindingSchedd()
    one.add(7, 0, owner="alice", annex="burst")
    two.add(7, 0, owner="alice", annex="burst")
    demand = demand_over({ONE: one, TWO: two})
    world.loop.ctx.demand = demand
    wanted = spec.from_keywords({"name": "burst", "instances": 1}, "alice", world.service.settings)
    annex = world.service.ensure(wanted)
    world.loop.run_once()
    annex = world.store.get(annex.id)
    assert (annex.demand_idle, annex.idle_since) == (2, None)
    assert any(e[1] == "AnnexState" for e in two.edits)

    one.ads.clear()  # ONE's job completed
    two.edits.clear()
    world.clock.now += 600  # past the idle timeout (120 s), within the lease
    world.loop.run_once()
    annex = world.store.get(annex.id)
    assert annex.state != names.RETIRED and annex.idle_since is None
    assert annex.demand_idle == 1

    two.ads.clear()
    world.loop.run_once()
    assert world.store.get(annex.id).idle_since is not None
