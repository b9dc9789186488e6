"""Issue 14 (items 1, 2): unavailable offerings and spot interruption notices, decided by the
loop against a real moto server; capacity errors come from the emulator-only fault hook
(cloud/aws/capacity_faults.py), the notices from startd ads as the collector lists them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import boto3
import pytest
from aws_fixtures import REGION, default_image, make_settings, moto_server_url, moto_url  # noqa: F401
from fake_schedd import FakeSchedd
from test_lifecycle_reconcile import Clock, Collector

from annex_gahp import names, offerings, spec
from annex_gahp.cloud.aws import capacity_faults, fleet
from annex_gahp.cloud.aws.cloud import AwsCloud
from annex_gahp.controllers.interruptions import DRAIN_LIMIT, Notice, notices
from annex_gahp.offerings import Offering
from annex_gahp.reconcile import Reconciler
from annex_gahp.schedd import Demand
from annex_gahp.service import AnnexService
from annex_gahp.store import Store

TTL = 180
INTERVAL = 10


class Publisher:
    def __init__(self) -> None:
        self.ads: dict[str, dict[str, Any]] = {}

    def publish(self, views: Any) -> None:
        for view in views:
            self.ads[view["AnnexName"]] = dict(view)

    def invalidate(self, owner: str, annex: str) -> None:
        self.ads.pop(annex, None)


class World:
    def __init__(self, moto_url: str, tmp_path: Path, store: Store | None = None) -> None:  # noqa: F811
        self.ec2 = boto3.client("ec2", endpoint_url=moto_url, region_name=REGION)
        image = default_image(moto_url)
        try:
            self.ec2.create_launch_template(
                LaunchTemplateName="annex-base", LaunchTemplateData={"ImageId": image}
            )
        except self.ec2.exceptions.ClientError:
            pass  # a second World (a restart) on the same emulator
        self.state_dir = tmp_path
        self.settings = make_settings(
            moto_url,
            launch_template="annex-base",
            default_image_id=image,
            reconcile_interval=INTERVAL,
            state_dir=str(tmp_path),
            unavailable_offering_ttl=TTL,
        )
        self.clock = Clock()
        self.store = store or Store(str(tmp_path / "state.sqlite"))
        self.service = AnnexService(
            self.store, self.settings, clock=self.clock, resolve_region=lambda r, s: REGION
        )
        self.cloud = AwsCloud(self.settings, mint=lambda identity, lifetime: "token")
        self.schedd, self.collector, self.publisher = FakeSchedd(), Collector(), Publisher()
        self.loop = Reconciler(
            self.store,
            self.settings,
            self.cloud,
            self.schedd,
            self.publisher,
            clock=self.clock,
            slots=self.collector,
            resolve_region=lambda r, s: REGION,
        )
        self.fleets: list[dict[str, Any]] = []
        self.cloud._client("ec2", REGION).meta.events.register(
            "provide-client-params.ec2.CreateFleet",
            lambda params, **_: self.fleets.append(params),
        )

    def want(self, name: str, instances: int, **keywords: str):
        wanted = spec.from_keywords(
            {"name": name, "instances": instances, **keywords}, "alice", self.settings
        )
        self.schedd.jobs[("alice", name)] = Demand(idle=1)
        return self.service.ensure(wanted)

    def fault(self, *types: str) -> None:
        path = self.state_dir / capacity_faults.FILE_NAME
        path.write_text("".join(f"{t}\n" for t in types))

    def live(self, name: str) -> list[dict[str, Any]]:
        found = []
        pages = self.ec2.get_paginator("describe_instances").paginate(
            Filters=[
                {"Name": f"tag:{names.TAG_NAME}", "Values": [name]},
                {"Name": "instance-state-name", "Values": ["pending", "running"]},
            ]
        )
        for page in pages:
            for reservation in page["Reservations"]:
                found += reservation["Instances"]
        return found

    def asked_types(self, call: int) -> list[str]:
        overrides = self.fleets[call]["LaunchTemplateConfigs"][0]["Overrides"]
        return [o["InstanceType"] for o in overrides]


@pytest.fixture
def world(moto_url, tmp_path) -> World:  # noqa: F811
    return World(moto_url, tmp_path)


# --- the offerings cache -----------------------------------------------------------------------


def test_a_mark_covers_its_pool_and_a_zoneless_mark_every_zone(tmp_path) -> None:
    store = Store(str(tmp_path / "s.sqlite"))
    anywhere = Offering(REGION, "m5.large", "", "spot")
    zone_a = Offering(REGION, "m5.large", "us-east-1a", "spot")
    zone_b = Offering(REGION, "m5.large", "us-east-1b", "spot")
    assert anywhere.covers(zone_a) and anywhere.covers(zone_b)
    assert zone_a.covers(zone_a) and not zone_a.covers(zone_b)
    assert not zone_a.covers(Offering(REGION, "m5.large", "us-east-1a", "on-demand"))
    assert not anywhere.covers(Offering("us-west-2", "m5.large", "", "spot"))

    offerings.mark(store, [zone_a], "interruption", ttl=60, now=1000)
    offerings.mark(store, [anywhere], "InsufficientInstanceCapacity", ttl=60, now=1030)
    assert [m.offering for m in offerings.in_force(store, REGION, 1059)] == [anywhere, zone_a]
    # Each expires on its own; a later mark of the same pool extends it.
    assert [m.offering for m in offerings.in_force(store, REGION, 1060)] == [anywhere]
    offerings.mark(store, [anywhere], "SpotMaxPriceTooLow", ttl=60, now=1080)
    (mark,) = offerings.in_force(store, REGION, 1100)
    assert (mark.until, mark.reason) == (1140, "SpotMaxPriceTooLow")
    assert offerings.in_force(store, REGION, 1140) == []
    # Kept in the state file: a restarted helper still avoids them.
    store.close()
    again = Store(str(tmp_path / "s.sqlite"))
    assert [m.offering for m in offerings.in_force(again, REGION, 1100)] == [anywhere]


def test_fleet_requests_use_the_allocation_strategies_and_cap_overrides() -> None:
    base = dict(annex="a", owner="o", request_id="r", pool_id="p", expires=1, count=1)
    on_demand = fleet.LaunchPlan(**base, instance_types=("m5.large",))
    spot = fleet.LaunchPlan(**base, instance_types=("m5.large",), spot_prices=("0.1",))
    candidates = fleet.overrides(on_demand)
    assert fleet.fleet_request(on_demand, "lt-1", candidates, 1)["OnDemandOptions"] == {
        "AllocationStrategy": "lowest-price"
    }
    assert fleet.fleet_request(spot, "lt-1", candidates, 1)["SpotOptions"] == {
        "AllocationStrategy": "price-capacity-optimized"
    }
    many = fleet.LaunchPlan(
        **base,
        instance_types=tuple(f"m{i}.large" for i in range(20)),
        subnets=tuple(f"subnet-{i}" for i in range(16)),
    )
    every = fleet.overrides(many)
    assert len(every) == 320
    kept = fleet.cap_overrides(every, "a")
    assert len(kept) == fleet.MAX_OVERRIDES == 300
    assert kept == every[:300]  # the user's first choices


# --- capacity errors ---------------------------------------------------------------------------


def test_a_capacity_error_moves_launches_to_another_type_until_the_ttl(world: World) -> None:
    """CreateFleet says m5.large has no capacity: this launch and the next ask for m5a.large
    only, the Annex ad names the avoided pool; after the TTL m5.large is asked for again."""
    world.fault("m5.large")
    world.want("cap", 1, instance_types="m5.large,m5a.large")
    world.loop.run_once()
    assert [i["InstanceType"] for i in world.live("cap")] == ["m5a.large"]
    assert world.asked_types(0) == ["m5.large", "m5a.large"]  # the faulted answer
    assert world.asked_types(1) == ["m5a.large"]  # the fall-through, same launch
    ad = world.publisher.ads["cap"]
    assert ad["AvoidedOfferings"] == [f"m5.large/{REGION}/on-demand"]

    (world.state_dir / capacity_faults.FILE_NAME).unlink()  # capacity is back, unknown to us
    world.clock.now += INTERVAL
    world.want("cap", 2, instance_types="m5.large,m5a.large")
    world.loop.run_once()
    assert world.asked_types(2) == ["m5a.large"]  # still avoided within the TTL
    assert sorted(i["InstanceType"] for i in world.live("cap")) == ["m5a.large"] * 2

    world.clock.now += TTL
    world.want("cap", 3, instance_types="m5.large,m5a.large")
    world.loop.run_once()
    assert world.asked_types(3) == ["m5.large", "m5a.large"]  # tried again after the TTL
    assert sorted(i["InstanceType"] for i in world.live("cap")) == [
        "m5.large",
        "m5a.large",
        "m5a.large",
    ]
    assert world.publisher.ads["cap"]["AvoidedOfferings"] is None  # absent from the ad


def test_every_type_unavailable_says_so_without_a_call(world: World) -> None:
    """The only type has no capacity: the first launch fails; the cycles after make no call
    and LastError (and the jobs' AnnexLastError) name the avoided choice, until the TTL."""
    world.fault("c5.large")
    world.want("none", 1, instance_types="c5.large")
    world.loop.run_once()
    assert world.live("none") == [] and len(world.fleets) == 1
    for _ in range(2):
        world.clock.now += 60  # past the launch back-off, within the TTL
        world.loop.run_once()
    assert len(world.fleets) == 1  # no call while every choice is avoided
    annex = world.store.live("alice", "none")
    assert annex.last_error.startswith("every instance type of annex none is unavailable")
    assert "c5.large in us-east-1 (on-demand, InsufficientInstanceCapacity, until" in (
        annex.last_error
    )
    assert "c5.large in us-east-1" in world.schedd.annotated[("alice", "none")]["AnnexLastError"]

    (world.state_dir / capacity_faults.FILE_NAME).unlink()
    world.clock.now = 1_900_000_000 + TTL + 1
    world.loop.run_once()
    assert [i["InstanceType"] for i in world.live("none")] == ["c5.large"]
    assert world.store.live("alice", "none").last_error == ""


# --- interruption notices ----------------------------------------------------------------------


def _notice(
    world: World, instance: dict[str, Any], name: str, when: int, state: str = "Owner"
) -> None:
    world.collector.ads.append(
        {
            "AnnexOwner": "alice",
            "AnnexName": name,
            "AnnexInstanceId": instance["InstanceId"],
            "State": state,
            "EnteredCurrentState": when,
            "AnnexInterruption": when,
        }
    )


def test_a_notice_ends_the_instance_and_replaces_it_in_another_pool(world: World, tmp_path) -> None:
    subnets = sorted(world.ec2.describe_subnets()["Subnets"], key=lambda s: s["AvailabilityZone"])[
        :2
    ]
    zones = {s["SubnetId"]: s["AvailabilityZone"] for s in subnets}
    world.want(
        "spot",
        1,
        instance_types="m5.large",
        spot_prices="0.10",
        subnets=",".join(s["SubnetId"] for s in subnets),
    )
    world.loop.run_once()
    (first,) = world.live("spot")
    assert first["SubnetId"] == subnets[0]["SubnetId"]  # moto: the first override

    world.clock.now += INTERVAL
    _notice(world, first, "spot", int(world.clock.now) - 2)
    world.loop.run_once()
    (second,) = world.live("spot")
    assert second["InstanceId"] != first["InstanceId"]
    assert second["SubnetId"] == subnets[1]["SubnetId"]  # the interrupted zone avoided
    assert first["InstanceId"] in world.collector.invalidated
    ad = world.publisher.ads["spot"]
    assert (ad["Interruptions"], ad["Replacements"]) == (1, 1)
    assert ad["AvoidedOfferings"] == [f"m5.large/{zones[first['SubnetId']]}/spot"]

    # The startd's ad lingers a cycle: the same notice is not counted again.
    world.clock.now += INTERVAL
    world.loop.run_once()
    assert [i["InstanceId"] for i in world.live("spot")] == [second["InstanceId"]]
    # The counts live in the state file: a restarted helper publishes them.
    world.store.close()
    again = World(world.settings.endpoint_url, tmp_path, Store(str(tmp_path / "state.sqlite")))
    again.clock.now = world.clock.now + INTERVAL
    again.loop.run_once()
    ad = again.publisher.ads["spot"]
    assert (ad["Interruptions"], ad["Replacements"]) == (1, 1)


def test_notices_trust_only_well_formed_ads() -> None:
    mine = {"AnnexOwner": "alice", "AnnexName": "a"}
    ads = [
        mine | {"AnnexInstanceId": "i-0a", "AnnexInterruption": 5},
        mine | {"AnnexInstanceId": "i-0b"},  # no notice
        mine | {"AnnexInstanceId": "x", "AnnexInterruption": 5},  # not an instance id
        mine | {"AnnexInstanceId": "i-0c", "AnnexInterruption": "5"},
        mine | {"AnnexInstanceId": "i-0d", "AnnexInterruption": True},
    ]
    assert notices(ads) == {("alice", "a"): {"i-0a": Notice(5, busy=False)}}
    # A dynamic slot still Claimed (its job not gone yet) makes the instance busy.
    ads.append(mine | {"AnnexInstanceId": "i-0a", "State": "Claimed"})
    assert notices(ads) == {("alice", "a"): {"i-0a": Notice(5, busy=True)}}


def test_an_interrupted_instance_is_ended_only_once_its_jobs_left(world: World) -> None:
    """While a slot of the interrupted instance is still Claimed (its job being vacated), the
    replacement is launched but the instance is not ended: ending it would strand the job as
    running in the schedd. It ends when its slots are free, or DRAIN_LIMIT after the notice."""
    world.want("drain", 1, instance_types="m5.large", spot_prices="0.10")
    world.loop.run_once()
    (first,) = world.live("drain")
    world.clock.now += INTERVAL
    _notice(world, first, "drain", int(world.clock.now), state="Claimed")
    world.loop.run_once()
    ids = {i["InstanceId"] for i in world.live("drain")}
    assert first["InstanceId"] in ids and len(ids) == 2  # replacement launched, first kept
    world.clock.now += INTERVAL
    world.loop.run_once()
    assert len(world.live("drain")) == 2  # no second replacement for the same notice
    assert world.publisher.ads["drain"]["Interruptions"] == 1

    world.clock.now += DRAIN_LIMIT
    world.loop.run_once()  # still Claimed, but EC2 will not wait: ended
    assert first["InstanceId"] not in {i["InstanceId"] for i in world.live("drain")}
    assert len(world.live("drain")) == 1


def test_a_notice_from_an_on_demand_instance_is_ignored(world: World) -> None:
    """EC2 sends notices to spot instances only: an on-demand instance's ad claiming one (its
    owner's doing) ends nothing, replaces nothing and marks no pool for everyone."""
    world.want("od", 1, instance_types="m5.large")
    world.loop.run_once()
    (first,) = world.live("od")
    world.clock.now += INTERVAL
    _notice(world, first, "od", int(world.clock.now))
    world.loop.run_once()
    assert [i["InstanceId"] for i in world.live("od")] == [first["InstanceId"]]
    assert offerings.in_force(world.store, REGION, int(world.clock.now)) == []
    assert world.publisher.ads["od"]["Interruptions"] == 0
