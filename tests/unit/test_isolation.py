"""Issue 12: one user's bad region, or one annex's failure, stops nobody else.

On a real moto server (tests/unit/aws_fixtures.py) with recording peers for the schedd and the
collector. Faults are injected with botocore event hooks on the helper's own clients: a region
whose every call fails, a call that raises a plain exception. Caps and retirements race on a
real Store (a temp SQLite file) from threads.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
import time
from typing import Any

import boto3
import pytest
from aws_fixtures import REGION, default_image, make_settings, moto_server_url, moto_url  # noqa: F401
from botocore.exceptions import ClientError, EndpointConnectionError
from fake_schedd import FakeSchedd

from annex_gahp import lifecycle, names, spec
from annex_gahp.cloud.aws.cloud import AwsCloud
from annex_gahp.errors import InputError, LimitExceeded
from annex_gahp.gahp import Caller
from annex_gahp.reconcile import Reconciler
from annex_gahp.schedd import Demand
from annex_gahp.service import AnnexService
from annex_gahp.store import Store, StoreError

FAR = "us-west-2"  # the region made unreachable
IDLE_TIMEOUT = 120
ALICE = Caller(uid=1001, user="alice", is_admin=False)
BOB = Caller(uid=1002, user="bob", is_admin=False)


class Clock:
    def __init__(self, now: float = 1_900_000_000) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Publisher:
    def publish(self, views: Any) -> None:
        pass

    def invalidate(self, owner: str, annex: str) -> None:
        pass


class World:
    def __init__(self, url: str, tmp_path: Any, store: Store | None = None, **settings: Any):
        self.ec2 = boto3.client("ec2", endpoint_url=url, region_name=REGION)
        image = default_image(url)
        self.ec2.create_launch_template(
            LaunchTemplateName="annex-base",
            LaunchTemplateData={"ImageId": image, "InstanceType": "m5.large"},
        )
        self.settings = make_settings(
            url,
            launch_template="annex-base",
            default_image_id=image,
            idle_timeout=IDLE_TIMEOUT,
            **settings,
        )
        self.clock = Clock()
        self.store = store or Store(str(tmp_path / "state.sqlite"))
        self.service = AnnexService(
            self.store, self.settings, clock=self.clock, resolve_region=lambda r, s: r or REGION
        )
        self.cloud = AwsCloud(self.settings, mint=lambda identity, lifetime: "token")
        self.schedd = FakeSchedd()
        self.loop = Reconciler(
            self.store,
            self.settings,
            self.cloud,
            self.schedd,
            Publisher(),
            clock=self.clock,
            resolve_region=lambda r, s: r or REGION,
        )

    def want(self, owner: str, name: str, instances: int = 1, **keywords: Any):
        wanted = spec.from_keywords(
            {"name": name, "instances": instances, **keywords}, owner, self.settings
        )
        annex = self.service.ensure(wanted)
        self.schedd.jobs[(owner, name)] = Demand(idle=1)  # someone waits: no idle retirement
        return annex

    def live(self, name: str, region: str = REGION) -> list[str]:
        ec2 = boto3.client("ec2", endpoint_url=self.settings.endpoint_url, region_name=region)
        found = []
        for page in ec2.get_paginator("describe_instances").paginate(
            Filters=[
                {"Name": f"tag:{names.TAG_NAME}", "Values": [name]},
                {"Name": "instance-state-name", "Values": ["pending", "running"]},
            ]
        ):
            for reservation in page["Reservations"]:
                found += [i["InstanceId"] for i in reservation["Instances"]]
        return sorted(found)


def region_down(world: World, region: str, error: Exception) -> list[str]:
    """Every EC2 call of the helper in `region` fails with `error` before it is sent."""
    calls: list[str] = []

    def refuse(request: Any, **_: Any) -> None:
        calls.append(request.url)
        raise error

    world.cloud._client("ec2", region).meta.events.register("before-send.ec2", refuse)
    return calls


THROTTLED = ClientError(
    {"Error": {"Code": "RequestLimitExceeded", "Message": "Request limit exceeded."}},
    "DescribeInstances",
)


# --- one region down -------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [THROTTLED, EndpointConnectionError(endpoint_url="https://ec2.us-west-2.amazonaws.com")],
    ids=["throttling-exhausted", "endpoint-down"],
)
@pytest.mark.slow
def test_a_region_that_cannot_be_observed_stops_no_other_region(moto_url, tmp_path, error):  # noqa: F811
    world = World(moto_url, tmp_path)
    world.want("alice", "keep")
    world.want("alice", "gone")
    idle = world.want("alice", "idle")
    world.loop.run_once()
    assert [len(world.live(n)) for n in ("keep", "gone", "idle")] == [1, 1, 1]
    del world.schedd.jobs[("alice", "idle")]  # its jobs left: the idle clock starts
    world.loop.run_once()

    calls = region_down(world, FAR, error)
    far = world.want("bob", "far", instances=2, region=FAR)
    world.service.delete(ALICE, {"name": "gone"})
    world.want("alice", "new")
    world.clock.now += IDLE_TIMEOUT
    world.loop.run_once()  # one cycle: launch, delete and idle retirement all happen

    assert calls, "the far region was asked"
    assert len(world.live("new")) == 1
    assert world.live("gone") == []
    assert world.store.get(idle.id).retire_reason == "idle"
    assert world.live("idle") == []
    assert len(world.live("keep")) == 1  # untouched
    far = world.store.get(far.id)
    # Not observed is not "no instances": no launch attempt counted, nothing retired.
    assert far.state == names.REQUESTED
    assert far.launch_failures == 0 and not world.store.ops(far.id)
    assert f"could not look at region {FAR}" in far.last_error
    asked = len(calls)
    world.loop.run_once()  # within the back-off: the region is not asked again
    assert len(calls) == asked
    # The region answers again: bob's annex is served, and its LastError cleared.
    world.cloud._clients.pop(("ec2", FAR))
    world.clock.now += 20  # looked at again after the back-off: one interval doubled
    world.loop.run_once()
    far = world.store.get(far.id)
    assert not far.last_error.startswith("could not look at region"), far.last_error


@pytest.mark.slow
def test_an_unobserved_region_is_not_reaped_nor_relaunched(moto_url, tmp_path):  # noqa: F811
    world = World(moto_url, tmp_path, reaper_grace=0)
    far = world.want("bob", "far", region=FAR)
    # bob's annex runs in FAR; a launch template exists there too.
    ec2_far = boto3.client("ec2", endpoint_url=moto_url, region_name=FAR)
    image = default_image(moto_url, FAR)
    ec2_far.create_launch_template(
        LaunchTemplateName="annex-base",
        LaunchTemplateData={"ImageId": image, "InstanceType": "m5.large"},
    )
    world.loop.run_once()
    (instance,) = world.live("far", FAR)
    region_down(world, FAR, THROTTLED)
    for _ in range(3):
        world.clock.now += 30
        world.loop.run_once()
    world.cloud._clients.pop(("ec2", FAR))
    world.clock.now += lifecycle.BACKOFF_MAX
    world.loop.run_once()
    assert world.live("far", FAR) == [instance]  # neither reaped nor doubled
    assert world.store.get(far.id).requested == 1


@pytest.mark.slow
def test_reaping_that_fails_in_one_region_still_reaps_the_others(moto_url, tmp_path):  # noqa: F811
    world = World(moto_url, tmp_path, reaper_grace=0)
    now = int(world.clock())
    for region in (REGION, FAR):  # records in both regions, so both are observed
        world.store.insert_annex(
            owner="carol",
            name=f"held-{region}",
            state=names.RUNNING,
            spec={"name": f"held-{region}", "owner": "carol", "instances": 0},
            region=region,
            requested=0,
            lease_expiration=now + 3600,
            now=now,
        )
    near = launch_tagged(moto_url, REGION, "mallory", "ghost", world.settings.pool_id)
    launch_tagged(moto_url, FAR, "mallory", "ghost", world.settings.pool_id)
    world.cloud._client("ec2", REGION).meta.events.register(
        "before-send.ec2.TerminateInstances",
        lambda **_: (_ for _ in ()).throw(THROTTLED),
    )
    world.loop.run_once()
    world.clock.now += 1
    world.loop.run_once()
    assert world.live("ghost", FAR) == []  # reaped
    assert world.live("ghost", REGION) == [near]  # its region refused; tried again later


# --- one annex failing -------------------------------------------------------------------


def test_a_plain_exception_in_one_annex_leaves_the_others_served(moto_url, tmp_path, caplog):  # noqa: F811
    world = World(moto_url, tmp_path)
    boom = world.want("alice", "boom")
    world.want("alice", "keep")
    world.loop.run_once()
    (boom_instance,) = world.live("boom")

    def explode(params: dict[str, Any], **_: Any) -> None:
        if boom_instance in params.get("InstanceIds", []):
            raise RuntimeError("a bug in a dependency")

    world.cloud._client("ec2", REGION).meta.events.register(
        "provide-client-params.ec2.TerminateInstances", explode
    )
    world.service.delete(ALICE, {"name": "boom"})  # sorted first: fails before the others
    world.service.delete(ALICE, {"name": "keep"})
    world.want("alice", "new")
    caplog.set_level(logging.ERROR, logger="annex_gahp.reconcile")
    world.loop.run_once()
    world.loop.run_once()

    assert world.live("keep") == []
    assert len(world.live("new")) == 1
    assert world.live("boom") == [boom_instance]
    after = world.store.get(boom.id)
    assert after.state == names.RETIRING
    assert "RuntimeError: a bug in a dependency" in after.last_error
    logged = [r for r in caplog.records if "alice/boom" in r.getMessage()]
    assert len(logged) == 1, [r.getMessage() for r in logged]  # once, not every cycle


def test_a_launch_that_raises_a_plain_exception_backs_off(moto_url, tmp_path):  # noqa: F811
    world = World(moto_url, tmp_path)

    def explode(params: dict[str, Any], **_: Any) -> None:
        raise RuntimeError("CreateFleet broke")

    world.cloud._client("ec2", REGION).meta.events.register(
        "provide-client-params.ec2.CreateFleet", explode
    )
    annex = world.want("alice", "boom")
    world.loop.run_once()
    after = world.store.get(annex.id)
    assert after.launch_failures == 1 and after.retry_at is not None
    # the intent is settled, not left open
    assert not [op for op in world.store.open_ops() if op.annex_id == annex.id]


@pytest.mark.slow
def test_a_schedd_that_fails_to_hold_does_not_keep_a_lease_alive(moto_url, tmp_path):  # noqa: F811
    world = World(moto_url, tmp_path)
    annex = world.want("alice", "keep", lease="10m")
    world.loop.run_once()

    def refuse(owner: str, name: str, reason: str) -> None:
        raise OSError("the schedd did not answer")  # whatever the bindings raise

    world.schedd.hold = refuse
    world.clock.now = annex.lease_expiration
    world.loop.run_once()
    world.loop.run_once()
    assert world.store.get(annex.id).retire_reason == "lease"
    assert world.live("keep") == []


# --- regions refused before anything is recorded -----------------------------------------


@pytest.mark.parametrize(
    "region",
    [
        "xx-nowhere-9",
        "us-east-1; DROP",
        "us-" + "a" * 495 + "-1",
        "us-éast-1",
        "us-east-1\u200b",
        "\uff55\uff53-east-1",  # fullwidth letters
        "us_east_1",
        "../us-east-1",
    ],
)
@pytest.mark.slow
def test_a_region_aws_does_not_have_is_refused_naming_annex_region(moto_url, tmp_path, region):  # noqa: F811
    world = World(moto_url, tmp_path)
    with pytest.raises(InputError) as refused:
        world.service.create(BOB, {"name": "far", "region": region})
    message = str(refused.value)
    assert len(message) < 200 and message.isprintable()
    if len(region) > 255:  # the bound every free-text value has comes first
        assert message == "annex_region is longer than 255 characters: shorten it", message
    else:
        assert message.startswith("annex_region = '"), message
        assert "is not an AWS region" in message
        assert region[:10].encode("unicode_escape").decode() in message
    assert world.store.annexes(include_retired=True) == []


@pytest.mark.parametrize("region", ["xx-nowhere-9", "us-east-1; DROP"])
@pytest.mark.slow
def test_a_job_naming_a_region_aws_does_not_have_records_nothing(moto_url, tmp_path, region):  # noqa: F811
    """The submit path: the translate hook forwards the job ad (no schedd here: jobs=None)."""
    world = World(moto_url, tmp_path)
    job = (
        f'Owner = "bob"\nClusterId = 7\nProcId = 0\nQDate = 1\nJobStatus = 1\n'
        f'TargetAnnexName = "far"\nAnnexRegion = "{region}"\n'
    )
    with pytest.raises(InputError, match=f"annex_region = '{re.escape(region)}' is not an AWS"):
        world.service.job_routed(BOB, {"ad": job})
    assert world.store.annexes(include_retired=True) == []


def test_known_and_newer_regions_pass_the_allow_list_binds(moto_url, tmp_path):  # noqa: F811
    assert spec.check_region("eu-west-1") == "eu-west-1"
    assert spec.check_region("us-gov-west-1") == "us-gov-west-1"
    assert spec.check_region("ap-future-9") == "ap-future-9"  # the partition's pattern
    world = World(moto_url, tmp_path, allowed_regions=(REGION,))
    allowed_only = r"annex_region = 'us-west-2' is not allowed here.*ANNEX_ALLOWED_REGIONS"
    with pytest.raises(LimitExceeded, match=allowed_only):
        world.service.create(BOB, {"name": "far", "region": FAR})
    assert world.store.annexes(include_retired=True) == []


@pytest.mark.slow
def test_a_bad_default_region_is_refused_naming_the_knob(moto_url, tmp_path):  # noqa: F811
    world = World(moto_url, tmp_path)
    world.service._resolve_region = lambda r, s: r or "nowhere"
    with pytest.raises(InputError, match="ANNEX_AWS_REGION = 'nowhere' is not an AWS region"):
        world.service.create(BOB, {"name": "far"})
    assert world.store.annexes(include_retired=True) == []


def test_a_record_holding_a_bad_region_fails_only_its_own_annex(moto_url, tmp_path):  # noqa: F811
    world = World(moto_url, tmp_path)
    now = int(world.clock())
    old = world.store.insert_annex(  # as a version that did not check regions wrote it
        owner="bob",
        name="old",
        state=names.REQUESTED,
        spec={"name": "old", "owner": "bob", "instances": 1},
        region="us-east-1; DROP",
        requested=1,
        lease_expiration=now + 3600,
        now=now,
    )
    world.want("alice", "keep")
    world.loop.run_once()
    assert len(world.live("keep")) == 1
    old = world.store.get(old.id)
    assert old.state == names.FAILED
    assert "annex_region = 'us-east-1; DROP' is not an AWS region" in old.last_error
    world.service.delete(BOB, {"name": "old"})
    world.service.delete(ALICE, {"name": "keep"})
    world.loop.run_once()
    assert world.store.get(old.id).state == names.RETIRED  # nothing of it could exist
    assert world.live("keep") == []


# --- recovery looks at every region --------------------------------------------------------


def launch_tagged(url: str, region: str, owner: str, name: str, pool: str) -> str:
    ec2 = boto3.client("ec2", endpoint_url=url, region_name=region)
    image = default_image(url, region)
    tags = {
        names.TAG_POOL: pool,
        names.TAG_OWNER: owner,
        names.TAG_NAME: name,
        names.TAG_REQUEST: "r-lost",
        names.TAG_EXPIRES: str(1_900_003_600),
    }
    return ec2.run_instances(
        ImageId=image,
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[
            {"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}
        ],
    )["Instances"][0]["InstanceId"]


@pytest.mark.slow
def test_recovery_of_a_lost_state_file_adopts_in_every_allowed_region(moto_url, tmp_path):  # noqa: F811
    pool = make_settings().pool_id
    instance = launch_tagged(moto_url, FAR, "bob", "far", pool)
    world = World(moto_url, tmp_path, allowed_regions=(REGION, FAR))
    world.loop.recover()
    adopted = world.store.live("bob", "far")
    assert adopted is not None and adopted.region == FAR
    assert [i.id for i in world.store.instances(adopted.id)] == [instance]


@pytest.mark.slow
def test_a_region_unreachable_at_recovery_is_adopted_once_it_answers(moto_url, tmp_path):  # noqa: F811
    pool = make_settings().pool_id
    instance = launch_tagged(moto_url, FAR, "bob", "far", pool)
    world = World(moto_url, tmp_path, allowed_regions=(REGION, FAR), reaper_grace=0)
    region_down(world, FAR, THROTTLED)
    world.loop.recover()
    world.loop.run_once()
    assert world.store.live("bob", "far") is None
    world.cloud._clients.pop(("ec2", FAR))
    world.clock.now += lifecycle.BACKOFF_MAX
    world.loop.run_once()
    adopted = world.store.live("bob", "far")
    assert adopted is not None and adopted.region == FAR
    assert world.live("far", FAR) == [instance]  # adopted, not reaped


# --- the per-user cap under races -----------------------------------------------------------


class SlowStore(Store):
    """A real Store whose writes take a while: the window in which a check made outside the
    write transaction goes stale."""

    def update_annex(self, annex_id: int, **fields: Any):
        time.sleep(0.05)
        return super().update_annex(annex_id, **fields)

    def insert_annex(self, **fields: Any):
        time.sleep(0.05)
        return super().insert_annex(**fields)


def race(*actions) -> list[BaseException | None]:
    barrier = threading.Barrier(len(actions))
    errors: list[BaseException | None] = [None] * len(actions)

    def run(i: int) -> None:
        barrier.wait()
        try:
            actions[i]()
        except Exception as err:
            errors[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(actions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return errors


@pytest.mark.slow
def test_racing_extends_grant_at_most_the_per_user_cap(moto_url, tmp_path):  # noqa: F811
    store = SlowStore(str(tmp_path / "race.sqlite"))
    world = World(moto_url, tmp_path, store=store, max_instances_per_user=4)
    world.want("alice", "a")
    world.want("alice", "b")
    errors = race(
        lambda: world.service.extend(ALICE, {"name": "a", "instances": "3"}),
        lambda: world.service.extend(ALICE, {"name": "b", "instances": "3"}),
    )
    granted = {a.name: a.requested for a in world.store.annexes("alice")}
    assert sum(granted.values()) == 4, (errors, granted)  # one got 3, the other what was left
    assert sorted(granted.values()) == [1, 3]


@pytest.mark.slow
def test_a_racing_create_and_extend_grant_at_most_the_per_user_cap(moto_url, tmp_path):  # noqa: F811
    store = SlowStore(str(tmp_path / "race.sqlite"))
    world = World(moto_url, tmp_path, store=store, max_instances_per_user=4)
    world.want("alice", "a")
    errors = race(
        lambda: world.service.extend(ALICE, {"name": "a", "instances": "3"}),
        lambda: world.service.create(ALICE, {"name": "c", "instances": "3"}),
    )
    granted = sum(a.requested for a in world.store.annexes("alice"))
    assert granted <= 4, (errors, [(a.name, a.requested) for a in world.store.annexes("alice")])


# --- an acknowledged extend wins over a retirement decided from older data -------------------


def test_an_extend_landing_after_the_snapshot_keeps_the_annex(moto_url, tmp_path):  # noqa: F811
    world = World(moto_url, tmp_path)
    annex = world.want("alice", "keep", lease="10m")
    world.loop.run_once()
    (instance,) = world.live("keep")
    world.clock.now = annex.lease_expiration  # the lease ends now...
    acknowledged: list[dict[str, str]] = []

    def extend() -> None:  # ...and the user's extend is acknowledged mid-cycle
        acknowledged.append(world.service.extend(ALICE, {"name": "keep", "lease": "1h"}))

    world.schedd.during_counts = extend
    world.loop.run_once()
    world.schedd.during_counts = lambda: None
    after = world.store.get(annex.id)
    assert acknowledged and int(acknowledged[0]["lease_expiration"]) == after.lease_expiration
    assert after.state in (names.PROVISIONING, names.RUNNING), after.state
    assert after.lease_expiration == int(world.clock.now) + 3600
    world.loop.run_once()
    assert world.live("keep") == [instance]


def test_an_extend_landing_after_the_snapshot_holds_no_job(moto_url, tmp_path):  # noqa: F811
    world = World(moto_url, tmp_path)
    annex = world.want("alice", "keep", lease="10m")
    world.loop.run_once()
    world.clock.now = annex.lease_expiration - 5  # within the two cycles before the end
    world.schedd.during_counts = lambda: world.service.extend(
        ALICE, {"name": "keep", "lease": "1h"}
    )
    world.loop.run_once()
    assert world.schedd.held == []


@pytest.mark.slow
def test_an_extend_landing_after_the_snapshot_stops_an_idle_retirement(moto_url, tmp_path):  # noqa: F811
    world = World(moto_url, tmp_path)
    annex = world.want("alice", "idle")
    world.loop.run_once()
    del world.schedd.jobs[("alice", "idle")]
    world.loop.run_once()  # the idle clock starts
    world.clock.now += IDLE_TIMEOUT
    world.schedd.during_counts = lambda: world.service.extend(
        ALICE, {"name": "idle", "lease": "2h"}
    )
    world.loop.run_once()
    assert world.store.get(annex.id).state != names.RETIRING


# --- a COMMIT that fails ----------------------------------------------------------------------


def test_a_failed_commit_rolls_back_and_the_store_goes_on(tmp_path):
    store = Store(str(tmp_path / "state.sqlite"))
    with pytest.raises(StoreError, match=r"could not commit.*rolled back"):
        with store.transaction() as db:
            db.execute("PRAGMA defer_foreign_keys=ON")  # the check moves to COMMIT
            db.execute(
                "INSERT INTO instances(id, annex_id, request, state, launched, last_seen)"
                " VALUES ('i-dangling', 4242, 'r-x', 'running', 0, 0)"
            )
    assert not store._db.in_transaction
    assert store.instance_owner("i-dangling") is None
    annex = store.insert_annex(  # the next write works
        owner="alice",
        name="after",
        state=names.REQUESTED,
        spec={},
        region=REGION,
        requested=1,
        lease_expiration=1,
        now=0,
    )
    assert store.get(annex.id) is not None


def test_a_nested_failure_rolls_back_only_its_savepoint(tmp_path):
    path = str(tmp_path / "state.sqlite")
    store = Store(path)
    other = sqlite3.connect(path, isolation_level=None, timeout=0)
    with store.transaction() as db:
        db.execute("INSERT INTO meta(key, value) VALUES ('k', 'v')")
    # A nested failure rolls back only its savepoint; the outer transaction commits.
    with store.transaction() as db:
        db.execute("INSERT INTO meta(key, value) VALUES ('outer', 'v')")
        with pytest.raises(sqlite3.IntegrityError):
            with store.transaction() as inner:
                inner.execute("INSERT INTO meta(key, value) VALUES ('inner', 'v')")
                inner.execute("INSERT INTO meta(key, value) VALUES ('k', 'again')")
    keys = {row[0] for row in other.execute("SELECT key FROM meta")}
    assert "outer" in keys and "inner" not in keys
    other.close()
