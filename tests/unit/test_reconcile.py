"""The reconcile loop against a real moto server: launches once, adopts after a kill, retires.

The schedd and collector are replaced by small recording peers here (the end-to-end tests use
the real ones); the cloud side is the product's own AwsCloud on the emulator.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import boto3
import pytest
from aws_fixtures import REGION, default_image, make_settings, moto_server_url, moto_url  # noqa: F401
from fake_schedd import FakeSchedd

from annex_gahp import names, spec
from annex_gahp.cloud.aws.cloud import AwsCloud
from annex_gahp.reconcile import Reconciler
from annex_gahp.schedd import Demand
from annex_gahp.service import AnnexService
from annex_gahp.store import Store


class Clock:
    def __init__(self, now: float = 1_900_000_000) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class RecordingPublisher:
    def __init__(self) -> None:
        self.ads: dict[str, dict[str, Any]] = {}

    def publish(self, views: Iterable[dict[str, Any]]) -> None:
        for view in views:
            self.ads[f"{view['Owner']}/{view['AnnexName']}"] = dict(view)

    def invalidate(self, owner: str, annex: str) -> None:
        self.ads.pop(f"{owner}/{annex}", None)


@dataclasses.dataclass
class World:
    store: Store
    service: AnnexService
    cloud: AwsCloud
    demand: FakeSchedd
    publisher: RecordingPublisher
    clock: Clock
    loop: Reconciler
    fleet_calls: list[str]
    ec2: Any


def build(moto_url: str, tmp_path, store: Store | None = None, clock: Clock | None = None):  # noqa: F811
    ec2 = boto3.client("ec2", endpoint_url=moto_url, region_name=REGION)
    image = default_image(moto_url)
    try:
        ec2.create_launch_template(
            LaunchTemplateName="annex-base",
            LaunchTemplateData={"ImageId": image, "InstanceType": "m5.large"},
        )
    except ec2.exceptions.ClientError:
        pass  # a second World in one test shares the emulator
    settings = make_settings(
        moto_url,
        launch_template="annex-base",
        default_image_id=image,
        idle_timeout=120,
        reaper_grace=60,
    )
    clock = clock or Clock()
    store = store or Store(str(tmp_path / "state.sqlite"))
    demand, publisher = FakeSchedd(), RecordingPublisher()
    # Wired as the daemon wires them (daemon.py), but for `jobs`: the tests here call the
    # service as the hooks do without putting each job in the fake's queue.
    service = AnnexService(
        store, settings, clock=clock, resolve_region=lambda r, s: REGION, hold_job=demand.hold_job
    )
    cloud = AwsCloud(settings, mint=lambda identity, lifetime: f"token-for-{identity}")
    loop = Reconciler(
        store, settings, cloud, demand, publisher, clock=clock, resolve_region=lambda r, s: REGION
    )
    calls: list[str] = []
    cloud._client("ec2", REGION).meta.events.register(
        "before-call.ec2.CreateFleet", lambda **kw: calls.append("CreateFleet")
    )
    return World(store, service, cloud, demand, publisher, clock, loop, calls, ec2)


def want(world: World, owner: str = "alice", name: str = "burst", instances: int = 2):
    wanted = spec.from_keywords(
        {"name": name, "instances": instances}, owner, world.service.settings
    )
    world.demand.jobs[(owner, name)] = Demand(idle=4)
    return world.service.ensure(wanted)


def live_instances(world: World, name: str = "burst") -> list[dict]:
    found = []
    pages = world.ec2.get_paginator("describe_instances").paginate(
        Filters=[
            {"Name": f"tag:{names.TAG_NAME}", "Values": [name]},
            {"Name": "instance-state-name", "Values": ["pending", "running"]},
        ]
    )
    for page in pages:
        for reservation in page["Reservations"]:
            found.extend(reservation["Instances"])
    return found


def test_one_create_call_for_many_jobs_and_cycles(moto_url, tmp_path):  # noqa: F811
    world = build(moto_url, tmp_path)
    for _ in range(50):  # fifty jobs naming the same annex
        want(world)
    for _ in range(3):
        world.loop.run_once()
    assert world.fleet_calls == ["CreateFleet"]
    found = live_instances(world)
    assert len(found) == 2
    tags = {t["Key"]: t["Value"] for t in found[0]["Tags"]}
    assert tags[names.TAG_OWNER] == "alice" and tags[names.TAG_NAME] == "burst"
    assert tags[names.TAG_POOL] == world.service.settings.pool_id
    assert tags[names.TAG_REQUEST].startswith("r-")
    annex = world.store.live("alice", "burst")
    assert annex.state == names.RUNNING
    assert int(tags[names.TAG_EXPIRES]) == annex.lease_expiration
    job = world.demand.annotated[("alice", "burst")]
    assert (job["AnnexState"], job["AnnexRunningInstances"]) == ('"running"', "2")
    assert job["AnnexLeaseExpiration"] == str(annex.lease_expiration)
    ad = world.publisher.ads["alice/burst"]
    assert (ad["AnnexState"], ad["RequestedInstances"], ad["RunningInstances"]) == (
        "running",
        2,
        2,
    )


@pytest.mark.slow
def test_killed_after_the_call_adopts_instead_of_launching_again(moto_url, tmp_path):  # noqa: F811
    world = build(moto_url, tmp_path)
    annex = want(world)
    prepared = world.cloud.prepare(annex)
    annex = world.store.update_annex(annex.id, cloud_resources=prepared)
    # What the loop does, cut short after the cloud answered: intent written, result not.
    op = world.store.begin_op(annex.id, "launch", {"count": 2, "region": REGION})
    world.cloud.ensure(annex, 2, 0, op.request)
    world.store.close()

    again = build(moto_url, tmp_path, store=Store(str(tmp_path / "state.sqlite")))
    again.demand.jobs[("alice", "burst")] = Demand(idle=4)
    again.loop.recover()
    again.loop.run_once()
    again.loop.run_once()
    assert again.fleet_calls == []  # adopted, not relaunched
    assert len(live_instances(again)) == 2
    assert {i.request for i in again.store.instances(annex.id)} == {op.request}
    # The state change the killed helper never wrote is made up for.
    assert again.store.live("alice", "burst").state == names.RUNNING


@pytest.mark.slow
def test_killed_before_the_call_launches_exactly_once(moto_url, tmp_path):  # noqa: F811
    world = build(moto_url, tmp_path)
    annex = want(world)
    world.store.begin_op(annex.id, "launch", {"count": 2, "region": REGION})
    world.store.close()

    again = build(moto_url, tmp_path, store=Store(str(tmp_path / "state.sqlite")))
    again.demand.jobs[("alice", "burst")] = Demand(idle=4)
    again.loop.recover()
    again.loop.run_once()
    again.loop.run_once()
    assert again.fleet_calls == ["CreateFleet"]
    assert len(live_instances(again)) == 2


@pytest.mark.slow
def test_lost_state_file_rebuilds_from_tags(moto_url, tmp_path):  # noqa: F811
    world = build(moto_url, tmp_path)
    want(world)
    world.loop.run_once()
    world.store.close()
    (tmp_path / "state.sqlite").unlink()

    again = build(moto_url, tmp_path, store=Store(str(tmp_path / "lost.sqlite")))
    again.loop.recover()
    annex = again.store.live("alice", "burst")
    assert annex is not None and annex.adopted and annex.requested == 2
    again.loop.run_once()
    assert again.fleet_calls == []
    assert len(live_instances(again)) == 2


def test_idle_annex_retires_and_cleans_up(moto_url, tmp_path):  # noqa: F811
    world = build(moto_url, tmp_path)
    annex = want(world)
    world.loop.run_once()
    assert len(live_instances(world)) == 2
    world.demand.jobs.clear()  # the jobs finished
    world.loop.run_once()
    assert world.store.get(annex.id).idle_since == world.clock.now
    world.clock.now += 121
    world.loop.run_once()  # retire: terminate
    world.loop.run_once()  # gone: release and invalidate
    retired = world.store.get(annex.id)
    assert (retired.state, retired.retire_reason) == (names.RETIRED, "idle")
    assert live_instances(world) == []
    assert "alice/burst" not in world.publisher.ads
    templates = world.ec2.describe_launch_templates()["LaunchTemplates"]
    assert [t["LaunchTemplateName"] for t in templates] == ["annex-base"]


def test_lease_end_holds_waiting_jobs_and_terminates(moto_url, tmp_path):  # noqa: F811
    world = build(moto_url, tmp_path)
    annex = want(world)
    world.loop.run_once()
    world.clock.now = annex.lease_expiration
    world.loop.run_once()
    world.loop.run_once()
    assert world.store.get(annex.id).retire_reason == "lease"
    assert live_instances(world) == []
    (held,) = world.demand.held
    assert held[:2] == ("alice", "burst") and "lease" in held[2] and "extend" in held[2]
    # The jobs left behind do not bring an expired annex back.
    with pytest.raises(Exception, match="lease"):
        world.service.ensure(
            spec.from_keywords({"name": "burst"}, "alice", world.service.settings),
            qdate=int(world.clock.now) - 10,
        )


def test_extension_retags_instances(moto_url, tmp_path):  # noqa: F811
    world = build(moto_url, tmp_path)
    annex = want(world)
    world.loop.run_once()
    world.store.update_annex(annex.id, lease_expiration=annex.lease_expiration + 3600)
    world.loop.run_once()
    live = live_instances(world)
    assert len(live) == annex.requested == 2  # the loop launched them: every one retagged
    expires = [{t["Key"]: t["Value"] for t in i["Tags"]}[names.TAG_EXPIRES] for i in live]
    assert expires == [str(annex.lease_expiration + 3600)] * 2


@pytest.mark.slow
def test_orphans_are_reaped_after_the_grace_period(moto_url, tmp_path):  # noqa: F811
    world = build(moto_url, tmp_path)
    want(world)
    world.loop.run_once()  # a record exists, so the store is not "fresh" on the next start
    image = default_image(moto_url)
    orphan = world.ec2.run_instances(
        ImageId=image,
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[
            {
                "ResourceType": "instance",
                "Tags": [
                    {"Key": names.TAG_POOL, "Value": world.service.settings.pool_id},
                    {"Key": names.TAG_NAME, "Value": "ghost"},
                    {"Key": names.TAG_OWNER, "Value": "mallory"},
                ],
            }
        ],
    )["Instances"][0]["InstanceId"]
    world.loop.run_once()
    assert orphan in {i["InstanceId"] for i in live_instances(world, "ghost")}
    world.clock.now += 61
    world.loop.run_once()
    assert live_instances(world, "ghost") == []
    assert len(live_instances(world)) == 2  # the owned annex is untouched
