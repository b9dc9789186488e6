"""The reconcile loop's lifecycle pieces (issue 6) on a real moto server, with recording peers
for the schedd and the collector: unclaimed instances retired one by one, the lease hold ahead
of the end, and what happens to jobs whose annex has ended. tests/e2e/test_lifecycle.py
proves the same with the real pool."""

from __future__ import annotations

from typing import Any

import boto3
import pytest
from aws_fixtures import REGION, default_image, make_settings, moto_server_url, moto_url  # noqa: F401
from fake_schedd import FakeSchedd

from annex_gahp import lifecycle, names, spec
from annex_gahp.cloud.aws.cloud import AwsCloud
from annex_gahp.errors import InputError
from annex_gahp.reconcile import Reconciler
from annex_gahp.schedd import Demand
from annex_gahp.service import AnnexService
from annex_gahp.store import Store

IDLE_TIMEOUT = 120
INTERVAL = 10


class Clock:
    def __init__(self, now: float = 1_900_000_000) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Collector:
    """The annexes' startds as the collector would list them; records invalidations."""

    def __init__(self) -> None:
        self.ads: list[dict[str, Any]] = []
        self.invalidated: list[str] = []

    def slots(self, pool_id: str) -> list[dict[str, Any]]:
        return list(self.ads)

    def invalidate(self, instance_ids: list[str]) -> None:
        self.invalidated += instance_ids

    def publish(self, views: Any) -> None:
        pass

    def set(self, instance: str, state: str, since: int, name: str = "burst") -> None:
        self.ads = [a for a in self.ads if a["AnnexInstanceId"] != instance]
        self.ads.append(
            {
                "AnnexOwner": "alice",
                "AnnexName": name,
                "AnnexInstanceId": instance,
                "State": state,
                "Activity": "Busy" if state == "Claimed" else "Idle",
                "EnteredCurrentState": since,
            }
        )


class Publisher:
    def publish(self, views: Any) -> None:
        pass

    def invalidate(self, owner: str, annex: str) -> None:
        pass


@pytest.fixture
def world(moto_url, tmp_path):  # noqa: F811
    ec2 = boto3.client("ec2", endpoint_url=moto_url, region_name=REGION)
    image = default_image(moto_url)
    ec2.create_launch_template(
        LaunchTemplateName="annex-base",
        LaunchTemplateData={"ImageId": image, "InstanceType": "m5.large"},
    )
    settings = make_settings(
        moto_url,
        launch_template="annex-base",
        default_image_id=image,
        idle_timeout=IDLE_TIMEOUT,
        reconcile_interval=INTERVAL,
    )
    clock = Clock()
    store = Store(str(tmp_path / "state.sqlite"))
    service = AnnexService(store, settings, clock=clock, resolve_region=lambda r, s: REGION)
    cloud = AwsCloud(settings, mint=lambda identity, lifetime: "token")
    schedd, collector = FakeSchedd(), Collector()
    loop = Reconciler(
        store,
        settings,
        cloud,
        schedd,
        Publisher(),
        clock=clock,
        slots=collector,
        resolve_region=lambda r, s: REGION,
    )
    return type(
        "World",
        (),
        {
            "ec2": ec2,
            "clock": clock,
            "store": store,
            "service": service,
            "schedd": schedd,
            "collector": collector,
            "loop": loop,
        },
    )


def want(world, instances: int = 2, **keywords: Any):
    wanted = spec.from_keywords(
        {"name": "burst", "instances": instances, **keywords}, "alice", world.service.settings
    )
    return world.service.ensure(wanted)


def live(world) -> list[str]:
    found = []
    pages = world.ec2.get_paginator("describe_instances").paginate(
        Filters=[
            {"Name": f"tag:{names.TAG_NAME}", "Values": ["burst"]},
            {"Name": "instance-state-name", "Values": ["pending", "running"]},
        ]
    )
    for page in pages:
        for reservation in page["Reservations"]:
            found += [i["InstanceId"] for i in reservation["Instances"]]
    return sorted(found)


def test_an_unclaimed_instance_is_retired_alone_and_the_annex_asks_for_one_less(world):
    annex = want(world)
    world.schedd.jobs[("alice", "burst")] = Demand(running=1)
    world.loop.run_once()
    busy, spare = live(world)
    t0 = int(world.clock.now)
    world.collector.set(busy, "Claimed", t0)
    world.collector.set(spare, "Unclaimed", t0)
    world.loop.run_once()
    world.clock.now += IDLE_TIMEOUT - 1
    world.loop.run_once()
    assert live(world) == [busy, spare]  # not before the timeout
    world.clock.now += 1
    world.loop.run_once()
    assert live(world) == [busy]
    assert world.store.get(annex.id).requested == 1
    assert world.collector.invalidated == [spare]  # its slots leave the collector
    # The next cycles neither shrink again nor launch a replacement.
    world.collector.set(spare, "Unclaimed", t0)  # a stale ad of the gone instance is ignored
    world.loop.run_once()
    world.clock.now += 5
    world.loop.run_once()
    assert live(world) == [busy]


def test_a_partitionable_slot_seen_busy_restarts_the_clock(world):
    want(world, instances=1)
    world.schedd.jobs[("alice", "burst")] = Demand(idle=1, running=1)
    world.loop.run_once()
    (instance,) = live(world)
    booted = int(world.clock.now)
    # The pslot stays Unclaimed since boot; a dynamic slot is claimed for a while.
    world.collector.set(instance, "Unclaimed", booted)
    world.collector.ads.append({**world.collector.ads[0], "State": "Claimed"})
    world.clock.now += 100
    world.loop.run_once()
    world.collector.set(instance, "Unclaimed", booted)  # the job left
    world.clock.now += IDLE_TIMEOUT - 1
    world.loop.run_once()
    assert live(world) == [instance]
    world.clock.now += 1
    world.loop.run_once()
    assert live(world) == []
    annex = world.store.live("alice", "burst")
    assert annex.requested == 0
    assert "do not match them" in annex.last_error  # jobs waited all along


def test_without_jobs_the_instance_clock_stops_and_the_annex_retires_whole(world):
    annex = want(world, instances=1)
    world.schedd.jobs[("alice", "burst")] = Demand(running=1)
    world.loop.run_once()
    (instance,) = live(world)
    world.schedd.jobs.clear()  # condor_hold or condor_rm of every job
    world.collector.set(instance, "Unclaimed", int(world.clock.now))
    world.loop.run_once()
    world.clock.now += IDLE_TIMEOUT - 5
    world.loop.run_once()
    # Released before the annex's idle timeout: the instance's clock starts again now.
    world.schedd.jobs[("alice", "burst")] = Demand(idle=1)
    world.clock.now += 10
    world.loop.run_once()
    assert live(world) == [instance]
    # Held again: after the annex's idle timeout it retires whole.
    world.schedd.jobs.clear()
    world.loop.run_once()
    world.clock.now += IDLE_TIMEOUT
    world.loop.run_once()
    assert world.store.get(annex.id).retire_reason == "idle"


def test_jobs_are_held_two_cycles_ahead_of_the_lease_end(world):
    annex = want(world, instances=1)
    world.schedd.jobs[("alice", "burst")] = Demand(idle=1, running=1)
    world.loop.run_once()
    world.clock.now = annex.lease_expiration - 2 * INTERVAL - 1
    world.loop.run_once()
    assert world.schedd.held == []
    world.clock.now += 1
    world.loop.run_once()
    (held,) = world.schedd.held
    assert world.store.get(annex.id).state in lifecycle.ACTIVE  # not retired before the end
    reason = held[2]
    assert "the lease of annex burst ends at" in reason
    assert "condor_release" in reason and "condor_rm" in reason
    assert "htcondor-annex extend --name burst --lease" in reason
    world.clock.now = annex.lease_expiration
    world.loop.run_once()
    world.loop.run_once()
    assert world.store.get(annex.id).retire_reason == "lease"
    assert live(world) == []


@pytest.mark.parametrize("ending", ["lease", "deleted"])
@pytest.mark.slow
def test_jobs_left_behind_are_held_and_released_ones_start_a_new_annex(world, ending):
    annex = want(world, instances=1)
    world.schedd.jobs[("alice", "burst")] = Demand(idle=2)
    world.loop.run_once()
    if ending == "lease":
        world.clock.now = annex.lease_expiration
    else:
        world.service.retire(annex, "deleted")
    world.loop.run_once()
    world.loop.run_once()
    ended = world.store.get(annex.id)
    assert ended.state == names.RETIRED and ended.retired_at
    # Jobs still idle for it: the ones from before the end are held, the rest rerouted.
    world.loop.run_once()
    owner, name, reason, when = world.schedd.left_behind[-1]
    assert (owner, name, when) == ("alice", "burst", ended.retired_at)
    assert "condor_release" in reason
    if ending == "deleted":
        assert "was deleted (htcondor-annex delete)" in reason
    assert world.schedd.rerouted[-1] == ("alice", "burst", ended.retired_at)
    # A job waiting since before the end does not bring it back; one released since does.
    wanted = spec.from_keywords({"name": "burst"}, "alice", world.service.settings)
    with pytest.raises(InputError, match="condor_release starts a new annex"):
        world.service.ensure(wanted, qdate=ended.retired_at)
    again = world.service.ensure(wanted, qdate=ended.retired_at + 1)
    assert again.id != annex.id and again.state == names.REQUESTED


@pytest.mark.slow
def test_after_an_idle_retirement_released_jobs_are_rerouted_not_held(world):
    annex = want(world, instances=1)
    world.loop.run_once()
    world.clock.now += IDLE_TIMEOUT
    world.loop.run_once()
    world.loop.run_once()
    assert world.store.get(annex.id).retire_reason == "idle"
    world.schedd.jobs[("alice", "burst")] = Demand(idle=2)  # released after the retirement
    world.loop.run_once()
    assert world.schedd.left_behind == []
    assert world.schedd.rerouted == [("alice", "burst", 0)]
