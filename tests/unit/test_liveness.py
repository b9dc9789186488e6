"""Liveness (issue 14 item 3): a pool-mode instance whose startd does not join the pool within
ANNEX_JOIN_TIMEOUT of its launch (or leaves it for that long) is terminated and counted as a
failed launch; ANNEX_MAX_JOIN_FAILURES in a row stop the annex's launches; provision mode is
never looked at. The product's Reconciler and AwsCloud on a real moto server, with the
collector's startd ads and the schedd as recording peers and an injected clock
(test_lifecycle_reconcile.py's world). tests/e2e/test_join_timeout.py proves it with the real pool.
"""

from __future__ import annotations

import base64
import dataclasses

import classad2
import pytest
from aws_fixtures import REGION, moto_server_url, moto_url  # noqa: F401
from test_lifecycle_reconcile import INTERVAL, Collector, live, want, world  # noqa: F401
from test_provision import ALICE, _job_ad, provision_world
from test_reconcile import live_instances

from annex_gahp import compat, lifecycle, names, settings
from annex_gahp.cloud.aws import instances
from annex_gahp.controllers import liveness, status
from annex_gahp.errors import CloudError, SetupError
from annex_gahp.schedd import Demand
from annex_gahp.store import Store

# Two minutes, not the default ten: the same decisions in a fifth of the cycles, each of which
# asks the emulator (these tests were a third of the fast tier's time at 600 s).
TIMEOUT = 120


@pytest.fixture(autouse=True)
def _join_timeout(request):
    """Every world of this module (the shared `world` fixture's) uses TIMEOUT."""
    if "world" in request.fixturenames:
        found = request.getfixturevalue("world")
        found.loop.settings = dataclasses.replace(found.loop.settings, join_timeout=TIMEOUT)


def launch_one(world) -> tuple[int, str]:  # noqa: F811
    annex = want(world, instances=1)
    world.schedd.jobs[("alice", "burst")] = Demand(idle=1)
    world.loop.run_once()
    (instance,) = live(world)
    return annex.id, instance


def cycles(world, seconds: int) -> None:  # noqa: F811
    """Run the loop for `seconds` of the injected clock, one cycle per reconcile interval."""
    for _ in range(seconds // INTERVAL):
        world.clock.now += INTERVAL
        world.loop.run_once()


def test_an_instance_that_never_joins_is_terminated_at_the_timeout_and_replaced(world):  # noqa: F811
    annex_id, instance = launch_one(world)
    cycles(world, TIMEOUT - INTERVAL)
    assert live(world) == [instance]  # not before the timeout
    world.clock.now += INTERVAL
    world.loop.run_once()
    assert live(world) == []
    assert world.collector.invalidated == [instance]  # its ads (if any) leave the collector
    annex = world.store.get(annex_id)
    assert annex.join_failures == 1 and annex.launch_failures == 1
    assert f"instance {instance} did not join the pool within 2m00s" in annex.last_error
    # The tail of what EC2 keeps of its console (the end of the emulator's sample boot log).
    assert "its console ends: ..." in annex.last_error
    assert "Enabling fast FPU save and restore... done." in annex.last_error
    view = status.describe(world.store, annex)
    assert view["JoinFailures"] == 1 and view["NextLaunchAttempt"] == annex.retry_at
    # The waiting job is told which instance did not join.
    told = world.schedd.annotated[("alice", "burst")]["AnnexLastError"]
    assert instance in told
    # The replacement comes after the back-off (retry_delay(1) = 2 intervals), not before.
    world.clock.now += INTERVAL
    world.loop.run_once()
    assert live(world) == []
    world.clock.now += INTERVAL
    world.loop.run_once()
    (replacement,) = live(world)
    assert replacement != instance
    # Until one joins, the annex still says why this is a replacement.
    assert instance in world.store.get(annex_id).last_error
    # It joins: the run of failures ends, and its message with it.
    world.collector.set(replacement, "Claimed", int(world.clock.now))
    world.clock.now += INTERVAL
    world.loop.run_once()
    annex = world.store.get(annex_id)
    assert (annex.join_failures, annex.last_error) == (0, "")
    cycles(world, 2 * TIMEOUT)
    assert live(world) == [replacement]  # a joined startd that stays is never touched


def test_instances_late_in_one_cycle_count_each_and_are_named_once(world):  # noqa: F811
    annex = want(world, instances=2)
    world.schedd.jobs[("alice", "burst")] = Demand(idle=2)
    world.loop.run_once()
    both = live(world)
    cycles(world, TIMEOUT)
    assert live(world) == []
    annex = world.store.get(annex.id)
    assert annex.join_failures == 2 and annex.state == names.RUNNING
    assert all(i in annex.last_error for i in both) and "(and 1 more:" in annex.last_error


def test_a_startd_that_disappears_for_the_timeout_is_replaced(world):  # noqa: F811
    annex_id, instance = launch_one(world)
    world.clock.now += 60
    # Claimed: an unclaimed one would be retired as unused first (disruption.py).
    world.collector.set(instance, "Claimed", int(world.clock.now))
    world.loop.run_once()
    cycles(world, 3 * TIMEOUT)  # well past its launch: it joined, so it stays
    assert live(world) == [instance]
    world.collector.ads = []  # its startd is gone; EC2 still runs the instance
    left = int(world.clock.now)
    cycles(world, TIMEOUT - INTERVAL)
    assert live(world) == [instance]
    cycles(world, INTERVAL)
    assert int(world.clock.now) - left == TIMEOUT
    assert live(world) == []
    annex = world.store.get(annex_id)
    assert annex.join_failures == 1
    assert f"instance {instance} left the pool" in annex.last_error


def test_a_startd_of_another_annex_claiming_the_id_does_not_count(world):  # noqa: F811
    _, instance = launch_one(world)
    world.collector.set(instance, "Unclaimed", int(world.clock.now), name="other")
    cycles(world, TIMEOUT)
    assert live(world) == []


def test_no_collector_answer_decides_nothing(world):  # noqa: F811
    _, instance = launch_one(world)

    def down(pool_id):
        raise OSError("Failed to connect to collector")

    world.collector.slots = down
    cycles(world, 2 * TIMEOUT)
    assert live(world) == [instance]


def test_max_join_failures_in_a_row_stop_the_launches_and_survive_a_restart(world, tmp_path):  # noqa: F811
    annex_id, first = launch_one(world)
    seen = {first}
    for _ in range(500):  # at most ~80 min of cycles; three failures take ~8 min
        world.clock.now += INTERVAL
        world.loop.run_once()
        seen.update(live(world))
        if world.store.get(annex_id).state == names.FAILED:
            break
    annex = world.store.get(annex_id)
    assert annex.state == names.FAILED and annex.join_failures == 3
    assert len(seen) == 3  # the first and two replacements, each terminated
    assert annex.last_error.startswith("stopped launching: 3 in a row did not join or left")
    assert "ANNEX_MAX_JOIN_FAILURES = 3" in annex.last_error
    assert f"htcondor-annex delete --name {annex.name}" in annex.last_error
    assert status.describe(world.store, annex)["NextLaunchAttempt"] is None
    assert not lifecycle.may_launch(annex, int(world.clock.now) + 10**6, 3)
    cycles(world, 2 * TIMEOUT)
    assert live(world) == [] and world.store.get(annex_id).state == names.FAILED
    # The count is in the state file: a restarted helper reads the same.
    again = Store(str(tmp_path / "state.sqlite")).get(annex_id)
    assert (again.join_failures, again.state) == (3, names.FAILED)
    # An admin who raises the knob lets it try again.
    world.loop.settings = dataclasses.replace(world.loop.settings, max_join_failures=5)
    world.clock.now += INTERVAL
    world.loop.run_once()
    assert len(live(world)) == 1


def test_the_back_off_grows_with_the_run_of_join_failures():
    annex = type("A", (), {"launch_failures": 0, "join_failures": 1})()
    event, fields = lifecycle.join_failed(annex, 1, 1000, INTERVAL, 3)
    assert event == lifecycle.Event.LAUNCH_FAILED
    assert fields == {"join_failures": 2, "launch_failures": 2, "retry_at": 1000 + 40}
    event, fields = lifecycle.join_failed(annex, 2, 1000, INTERVAL, 3)
    assert event == lifecycle.Event.GIVE_UP and fields["retry_at"] is None
    assert lifecycle.join_failed(annex, 50, 0, INTERVAL, 0)[0] == lifecycle.Event.LAUNCH_FAILED


def test_provision_mode_is_never_looked_at(moto_url, tmp_path):  # noqa: F811
    pilots, _held = provision_world(moto_url, tmp_path)
    pilots.loop.ctx.slots = Collector()  # answers, with no startd at all
    pilots.loop.settings = dataclasses.replace(pilots.loop.settings, join_timeout=TIMEOUT)
    (tmp_path / "ud.sh").write_text("#!/bin/sh\n")
    pilots.service.job_routed(
        ALICE, {"ad": _job_ad(tmp_path), "user_data": base64.b64encode(b"#!/bin/sh\n").decode()}
    )
    pilots.demand.jobs[("alice", "pilots")] = Demand(running=1)
    pilots.loop.run_once()
    launched = sorted(i["InstanceId"] for i in live_instances(pilots, "pilots"))
    assert len(launched) == 2
    for _ in range(2 * TIMEOUT // INTERVAL):
        pilots.clock.now += INTERVAL
        pilots.loop.run_once()
    assert sorted(i["InstanceId"] for i in live_instances(pilots, "pilots")) == launched
    assert pilots.store.live("alice", "pilots").join_failures == 0


def test_hostile_console_text_is_bounded_printable_and_quotes_safely(world, monkeypatch):  # noqa: F811
    evil = (
        'boot ok"\n] ; AnnexState = "running"\x1b[2J\x00\r\t\\' + "é" * 10 + "x" * 5000 + 'END"'
    )
    monkeypatch.setattr(instances, "console_output", lambda ec2, iid: evil)
    annex_id, _ = launch_one(world)
    cycles(world, TIMEOUT)
    error = world.store.get(annex_id).last_error
    tail = error.split("its console ends: ", 1)[1]
    assert tail.startswith("...") and 'END"' in tail
    assert len(tail) <= liveness.CONSOLE_TAIL + 200  # the tail and this message's own words
    assert all(" " <= ch <= "~" for ch in error)
    # Quoted, it reads back as the same one string: it cannot add or end an attribute.
    ad = classad2.parseOne(f"LastError = {compat.quote(error)}")
    assert list(ad.keys()) == ["LastError"] and ad["LastError"] == error
    cleaned = liveness.printable_tail(evil[:80])
    assert "\n" not in cleaned and "\x1b" not in cleaned and "é" not in cleaned


def test_a_console_that_cannot_be_read_leaves_the_reason(world, monkeypatch):  # noqa: F811
    def refuse(ec2, iid):
        raise CloudError("read the console output: UnauthorizedOperation")

    monkeypatch.setattr(instances, "console_output", refuse)
    annex_id, instance = launch_one(world)
    cycles(world, TIMEOUT)
    error = world.store.get(annex_id).last_error
    assert instance in error and "console" not in error


def test_the_console_is_read_through_the_cloud_from_ec2(world):  # noqa: F811
    _, instance = launch_one(world)
    text = world.loop.cloud.console(REGION, instance)
    assert "Linux version" in text


def test_the_knobs():
    assert (settings.load({}.get).join_timeout, settings.load({}.get).max_join_failures) == (600, 3)
    knobs = {"ANNEX_JOIN_TIMEOUT": "2m", "ANNEX_MAX_JOIN_FAILURES": "0"}
    loaded = settings.load(knobs.get)
    assert (loaded.join_timeout, loaded.max_join_failures) == (120, 0)
    with pytest.raises(SetupError, match="ANNEX_MAX_JOIN_FAILURES"):
        settings.load({"ANNEX_MAX_JOIN_FAILURES": "-1"}.get)
    with pytest.raises(SetupError, match="ANNEX_JOIN_TIMEOUT"):
        settings.load({"ANNEX_JOIN_TIMEOUT": "soon"}.get)


def test_a_version_3_state_file_gets_the_counts(tmp_path):
    path = str(tmp_path / "state.sqlite")
    store = Store(path)
    annex = store.insert_annex(
        owner="alice",
        name="burst",
        state=names.RUNNING,
        spec={"name": "burst", "owner": "alice"},
        region=REGION,
        requested=1,
        lease_expiration=2_000_000_000,
    )
    store.record_instances(annex.id, "r-1", [("i-0abc", "running", "m5.large")], 100)
    store._db.execute("ALTER TABLE annexes DROP COLUMN join_failures")
    store._db.execute("ALTER TABLE instances DROP COLUMN joined")
    store._db.execute("UPDATE meta SET value='3' WHERE key='schema'")
    store.close()
    store = Store(path)
    assert store.get(annex.id).join_failures == 0
    store.mark_joined(annex.id, ["i-0abc"], 200)
    store.mark_joined(annex.id, ["i-0abc"], 300)  # the first sighting is kept
    assert [i.joined for i in store.instances(annex.id)] == [200]
