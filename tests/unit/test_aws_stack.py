"""The `stack` strategy (cloud/aws/stack.py, and AwsCloud's dispatch to it) against moto.

moto's CloudFormation really creates the launch templates and Auto Scaling groups, the groups
really launch (and, on capacity changes, terminate) instances, and DeleteStack really removes
them: what is checked here is what the emulator did, never a stub of our own.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib.util
import json
import re
import time
from pathlib import Path
from typing import Any

import boto3
import pytest
from aws_fixtures import (  # noqa: F401
    REGION,
    count_calls,
    default_image,
    make_settings,
    moto_server_url,
    moto_url,
    raw_client,
)
from botocore.exceptions import ClientError
from fake_schedd import FakeSchedd

from annex_gahp import names, spec, userdata
from annex_gahp.cloud.aws import fleet, instances, lease_enforcer, policy, secrets, stack
from annex_gahp.cloud.aws.cloud import AwsCloud
from annex_gahp.errors import CloudError
from annex_gahp.reconcile import Reconciler
from annex_gahp.schedd import Demand
from annex_gahp.service import AnnexService
from annex_gahp.store import Store

POOL = "cm.test:9618"
AGENT = Path(userdata.__file__).parent / "templates" / "annex-agent.py"


def _plan(url: str, **changes: Any) -> fleet.LaunchPlan:
    base = fleet.LaunchPlan(
        annex="a1",
        owner="alice",
        request_id="r-0001",
        pool_id=POOL,
        expires=int(time.time()) + 3600,
        count=0,
        instance_types=("m5.large", "c5.large"),
        image_ids=(default_image(url),),
        user_data="#!/bin/sh\necho booted\n",
    )
    return dataclasses.replace(base, **changes)


def _clients(url: str) -> tuple[Any, Any]:
    return raw_client("cloudformation", url), raw_client("autoscaling", url)


def _ensure(
    url: str, plan: fleet.LaunchPlan, target: int, name: str = "annex-a1", clients: Any = None
) -> Any:
    cfn, asg = clients or _clients(url)
    return stack.ensure(cfn, asg, plan, name=name, base={}, target=target, max_size=50)


def _live(url: str) -> dict[str, dict[str, Any]]:
    ec2 = raw_client("ec2", url)
    return {
        i["InstanceId"]: i
        for r in ec2.describe_instances()["Reservations"]
        for i in r["Instances"]
        if i["State"]["Name"] in ("pending", "running")
    }


# --- names -----------------------------------------------------------------------------------


def test_bucket_names_follow_s3_rules_and_are_unique_per_owner() -> None:
    a = stack.bucket_name("CM.Example.ORG:9618", POOL, "alice", "Burst")
    b = stack.bucket_name("CM.Example.ORG:9618", POOL, "bob", "Burst")
    c = stack.bucket_name("CM.Example.ORG:9618", POOL, "alice", "burst")
    assert a.startswith("htcondor-annex-cm-example-org-9618-burst-")
    assert len({a, b, c}) == 3
    long = stack.bucket_name("a" * 200 + ".example.org", POOL, "o" * 100, "A" + "x" * 62)
    for name in (a, b, c, long):
        assert re.fullmatch(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]", name), name
        assert ".." not in name and not re.fullmatch(r"[\d.]+", name)
    for name in (a, b, c):
        assert name.startswith(stack.bucket_prefix("CM.Example.ORG:9618"))
    assert long.startswith(stack.bucket_prefix("a" * 200 + ".example.org"))
    assert len(stack.bucket_prefix("a" * 200)) <= len("htcondor-annex-") + 21
    # The runtime policy allows exactly the buckets of this central manager.
    arns = policy.token_bucket_arns("CM.Example.ORG:9618", literal=True)
    assert arns["buckets"] == "arn:aws:s3:::htcondor-annex-cm-example-org-9618-*"


def test_stack_names_derived_or_given() -> None:
    derived = stack.stack_name(POOL, "alice@example.org", "a1")
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9-]{0,127}", derived), derived
    assert derived != stack.stack_name(POOL, "alice-example-org", "a1")
    assert stack.stack_name(POOL, "alice", "a1", "my-stack") == "my-stack"


def test_split_raises_the_smallest_group_first_and_never_lowers_one() -> None:
    assert stack.split([0, 0], 5) == [3, 2]
    assert stack.split([3, 2], 7) == [4, 3]
    assert stack.split([0, 2], 3) == [1, 2]
    assert stack.split([4, 4], 3) == [4, 4]


# --- create, grow, shrink, delete ------------------------------------------------------------


def test_create_makes_one_group_per_type_with_the_split_and_the_tags(moto_url: str) -> None:  # noqa: F811
    plan = _plan(moto_url, extra_tags={"project": "x", "htcondor-annex:name": "spoof"})
    cfn, asg = _clients(moto_url)
    creates = count_calls(cfn, "CreateStack")
    result = _ensure(moto_url, plan, 5, clients=(cfn, asg))
    assert result.created and len(result.instance_ids) == 5
    assert len(creates) == 1
    assert sorted(creates[0]["ResourceTypes"]) == sorted(stack.RESOURCE_TYPES)
    view = stack.describe(cfn, asg, "annex-a1")
    assert view is not None and view.status == "CREATE_COMPLETE"
    assert [g.desired for g in view.groups] == [3, 2]
    assert view.tags[names.TAG_POOL] == POOL and names.TAG_EXPIRES not in view.tags
    live = _live(moto_url)
    assert set(live) == set(result.instance_ids)
    by_group: dict[str, set[str]] = {}
    for inst in live.values():
        tags = {t["Key"]: t["Value"] for t in inst["Tags"]}
        assert tags[names.TAG_POOL] == POOL
        assert tags[names.TAG_NAME] == "a1" and tags[names.TAG_OWNER] == "alice"
        assert tags[names.TAG_REQUEST] == "r-0001"
        assert tags[names.TAG_EXPIRES] == str(plan.expires)
        assert tags["project"] == "x"
        by_group.setdefault(tags[stack.GROUP_TAG], set()).add(inst["InstanceType"])
    # One type per group, in the user's order of preference.
    assert sorted(tuple(types) for types in by_group.values()) == [("c5.large",), ("m5.large",)]
    # The boot script is the groups' user data: an emulated booter reads it from the instance.
    ec2 = raw_client("ec2", moto_url)
    some = next(iter(live))
    data = ec2.describe_instance_attribute(InstanceId=some, Attribute="userData")["UserData"]
    assert base64.b64decode(data["Value"]).startswith(b"#!/bin/sh\necho booted")
    # The groups' launch templates carry the pool's tags too.
    templates = [
        t
        for t in ec2.describe_launch_templates()["LaunchTemplates"]
        if t["LaunchTemplateName"].startswith("annex-a1-")
    ]
    assert len(templates) == 2
    for template in templates:
        assert {"Key": names.TAG_POOL, "Value": POOL} in template["Tags"]
    # describe_pool (the loop, the reaper, the enforcer) sees them as the pool's.
    assert {v.id for v in instances.describe_pool(ec2, POOL)} == set(live)


def test_grow_is_one_capacity_call_per_changed_group_and_idempotent(moto_url: str) -> None:  # noqa: F811
    plan = _plan(moto_url)
    _ensure(moto_url, plan, 3)
    cfn, asg = _clients(moto_url)
    updates = count_calls(asg, "UpdateAutoScalingGroup")
    grown = stack.ensure(cfn, asg, plan, name="annex-a1", base={}, target=6, max_size=50)
    assert len(grown.instance_ids) == 3 and grown.changed
    assert len(updates) == 2  # [2, 1] -> [3, 3]
    assert len(_live(moto_url)) == 6
    again = stack.ensure(cfn, asg, plan, name="annex-a1", base={}, target=6, max_size=50)
    assert again.instance_ids == [] and not again.changed and len(updates) == 2
    updates.clear()
    single = stack.ensure(cfn, asg, plan, name="annex-a1", base={}, target=7, max_size=50)
    assert len(single.instance_ids) == 1 and len(updates) == 1


def test_shrink_lowers_capacity_so_nothing_is_replaced(moto_url: str) -> None:  # noqa: F811
    result = _ensure(moto_url, _plan(moto_url, instance_types=("m5.large",)), 3)
    cfn, asg = _clients(moto_url)
    victim = result.instance_ids[0]
    assert stack.retire_instances(asg, [victim]) == []
    view = stack.describe(cfn, asg, "annex-a1")
    assert view is not None and [g.desired for g in view.groups] == [2]
    live = _live(moto_url)
    assert victim not in live and len(live) == 2


def test_delete_removes_groups_templates_and_instances(moto_url: str) -> None:  # noqa: F811
    _ensure(moto_url, _plan(moto_url), 3)
    cfn, asg = _clients(moto_url)
    assert stack.delete(cfn, "annex-a1") == ""
    assert stack.describe(cfn, asg, "annex-a1") is None
    assert _live(moto_url) == {}
    assert asg.describe_auto_scaling_groups()["AutoScalingGroups"] == []
    templates = raw_client("ec2", moto_url).describe_launch_templates()["LaunchTemplates"]
    assert not [t for t in templates if t["LaunchTemplateName"].startswith("annex-a1")]
    assert stack.delete(cfn, "annex-a1") == ""  # idempotent


def test_a_stack_of_someone_else_is_not_taken_over(moto_url: str) -> None:  # noqa: F811
    _ensure(moto_url, _plan(moto_url), 1)
    with pytest.raises(CloudError, match="choose another annex_stack_name"):
        _ensure(moto_url, _plan(moto_url, owner="bob"), 1)
    # Nor deleted when bob's (failed) annex retires.
    cfn, asg = _clients(moto_url)
    bobs = {names.TAG_POOL: POOL, names.TAG_OWNER: "bob", names.TAG_NAME: "a1"}
    assert stack.delete(cfn, "annex-a1", bobs) == ""
    assert stack.describe(cfn, asg, "annex-a1") is not None
    assert len(_live(moto_url)) == 1


# --- the token bucket ------------------------------------------------------------------------


def test_token_bucket_round_trip(moto_url: str) -> None:  # noqa: F811
    s3 = raw_client("s3", moto_url)
    bucket = stack.bucket_name(POOL, POOL, "alice", "a1")
    where = stack.put_token(s3, bucket, "tok-1", {names.TAG_POOL: POOL}, REGION)
    assert where == f"s3://{bucket}/token"
    assert s3.get_object(Bucket=bucket, Key="token")["Body"].read() == b"tok-1"
    tags = s3.get_bucket_tagging(Bucket=bucket)["TagSet"]
    assert {"Key": names.TAG_POOL, "Value": POOL} in tags
    stack.put_token(s3, bucket, "tok-2", {names.TAG_POOL: POOL}, REGION)  # reused, replaced
    assert s3.get_object(Bucket=bucket, Key="token")["Body"].read() == b"tok-2"
    assert stack.delete_bucket(s3, bucket) is True
    assert stack.delete_bucket(s3, bucket) is False


def _fail(operation: str, client: Any) -> None:
    """Make every `operation` through `client` fail as AWS would (a before-send hook)."""

    def before_send(request: Any, **_: Any) -> Any:
        from botocore.awsrequest import AWSResponse  # noqa: PLC0415

        body = b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"

        class Raw:
            def stream(self, **_: Any) -> Any:
                yield body

        return AWSResponse(request.url, 500, {}, Raw())

    client.meta.events.register(f"before-send.s3.{operation}", before_send)


def test_a_failed_upload_rolls_the_bucket_back(moto_url: str) -> None:  # noqa: F811
    s3 = boto3.client(
        "s3",
        endpoint_url=moto_url,
        region_name=REGION,
        config=boto3.session.Config(retries={"max_attempts": 1}),
    )
    _fail("PutObject", s3)
    bucket = stack.bucket_name(POOL, POOL, "alice", "a1")
    with pytest.raises(CloudError, match="InternalError"):
        stack.put_token(s3, bucket, "tok", {names.TAG_POOL: POOL}, REGION)
    names_left = [b["Name"] for b in raw_client("s3", moto_url).list_buckets()["Buckets"]]
    assert bucket not in names_left
    # A bucket that existed before the failing call is not ours to roll back.
    raw_client("s3", moto_url).create_bucket(Bucket=bucket)
    with pytest.raises(CloudError):
        stack.put_token(s3, bucket, "tok", {names.TAG_POOL: POOL}, REGION)
    names_left = [b["Name"] for b in raw_client("s3", moto_url).list_buckets()["Buckets"]]
    assert bucket in names_left


def test_the_instance_agent_fetches_the_token_from_s3(moto_url: str, tmp_path, monkeypatch) -> None:  # noqa: F811
    s3 = raw_client("s3", moto_url)
    bucket = stack.bucket_name(POOL, POOL, "alice", "a1")
    stack.put_token(s3, bucket, "the-token", {names.TAG_POOL: POOL}, REGION)
    agent_spec = importlib.util.spec_from_file_location("agent_for_stack_test", AGENT)
    assert agent_spec and agent_spec.loader
    agent = importlib.util.module_from_spec(agent_spec)
    agent_spec.loader.exec_module(agent)
    creds = {"AccessKeyId": "testing", "SecretAccessKey": "testing", "Token": "session"}
    assert agent.get_s3_object(moto_url, REGION, bucket, "token", creds) == "the-token"
    assert agent.s3_url("", "eu-west-1", bucket, "token") == (
        f"https://{bucket}.s3.eu-west-1.amazonaws.com/token"
    )
    with pytest.raises(agent.AgentError, match="404"):
        agent.get_s3_object(moto_url, REGION, bucket, "missing", creds)

    class FakeImds:
        def credentials(self) -> dict[str, str]:
            return creds

        def get(self, path: str) -> str:
            return "i-0123456789abcdef0" if path.endswith("instance-id") else REGION

    # The instance fetches its own copy, token/<its id> (issue 12), not the annex's object.
    stack.put_token(s3, bucket, "not-mine", {names.TAG_POOL: POOL}, REGION)
    secrets.put_object_copy(
        s3, bucket, "token/i-0123456789abcdef0", "the-token", {"k": "v"}, account=""
    )
    cfg = {
        "aws_endpoint_url": moto_url,
        "region": REGION,
        "token_parameter": "",
        "token_bucket": bucket,
        "token_key": "token",
    }
    assert agent.fetch_token(cfg, FakeImds(), deadline_s=5) == "the-token"


# --- the lease enforcer ----------------------------------------------------------------------


def test_lease_enforcer_empties_groups_instead_of_terminating_members(moto_url: str) -> None:  # noqa: F811
    now = int(time.time())
    result = _ensure(moto_url, _plan(moto_url, expires=now - 100), 3)
    event = {"pool_id": POOL, "grace": 0, "endpoint_url": moto_url, "region": REGION}
    outcome = lease_enforcer.handler(event, None)
    assert outcome["terminated"] == [] and len(outcome["groups_zeroed"]) == 2
    cfn, asg = _clients(moto_url)
    view = stack.describe(cfn, asg, "annex-a1")
    assert view is not None and [g.desired for g in view.groups] == [0, 0]
    live = _live(moto_url)
    assert not set(result.instance_ids) & set(live) and live == {}  # none replaced


# --- AwsCloud and the loop, with the stack strategy --------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = float(int(time.time()))

    def __call__(self) -> float:
        return self.now


class Publisher:
    def publish(self, views: Any) -> None:
        pass

    def invalidate(self, owner: str, annex: str) -> None:
        pass


def test_the_loop_creates_grows_shrinks_and_retires_a_stack_annex(moto_url: str, tmp_path) -> None:  # noqa: F811
    image = default_image(moto_url)
    settings = make_settings(moto_url, default_image_id=image, pool_id=POOL)
    clock = Clock()
    store = Store(str(tmp_path / "state.sqlite"))
    service = AnnexService(store, settings, clock=clock, resolve_region=lambda r, s: REGION)
    cloud = AwsCloud(settings, mint=lambda identity, lifetime: f"token-for-{identity}")
    demand = FakeSchedd()
    loop = Reconciler(
        store, settings, cloud, demand, Publisher(), clock=clock, resolve_region=lambda r, s: REGION
    )
    cfn = cloud._client("cloudformation", REGION)
    calls: list[str] = []
    for op in ("CreateStack", "DeleteStack", "UpdateStack"):
        cfn.meta.events.register(
            f"before-call.cloudformation.{op}", lambda op=op, **kw: calls.append(op)
        )
    asg = cloud._client("autoscaling", REGION)
    for op in ("UpdateAutoScalingGroup", "TerminateInstanceInAutoScalingGroup"):
        asg.meta.events.register(
            f"before-call.autoscaling.{op}", lambda op=op, **kw: calls.append(op)
        )
    ec2 = cloud._client("ec2", REGION)
    ec2.meta.events.register(
        "before-call.ec2.TerminateInstances", lambda **kw: calls.append("TerminateInstances")
    )

    wanted = spec.from_keywords(
        {
            "name": "st",
            "instances": 3,
            "strategy": "stack",
            "instance_types": "m5.large,c5.large",
        },
        "alice",
        settings,
    )
    demand.jobs[("alice", "st")] = Demand(idle=3)
    annex = service.ensure(wanted)
    loop.run_once()
    annex = store.get(annex.id)
    assert calls == ["CreateStack"], calls
    assert annex.state == names.PROVISIONING and annex.last_error == ""
    name = annex.cloud_resources["stack"]
    assert name == stack.stack_name(POOL, "alice", "st")
    # The bucket's name has a random suffix (issue #12: a predictable name can be taken by
    # another account first); the record keeps it.
    bucket = stack.parse_location(annex.cloud_resources["token"])[0]
    assert annex.cloud_resources["token"] == f"s3://{bucket}/token"
    assert re.fullmatch(r"htcondor-annex-[a-z0-9-]+-st-[0-9a-f]{16}", bucket), bucket
    assert bucket != stack.bucket_name(settings.central_manager, POOL, "alice", "st")
    s3 = raw_client("s3", moto_url)
    # The annex's own identity (issue 12), no longer the pool-wide condor@UID_DOMAIN.
    assert s3.get_object(Bucket=bucket, Key="token")["Body"].read() == (
        b"token-for-annex.st.alice@annex.invalid"
    )
    # The boot script in the groups' templates fetches the token from that bucket.
    some = next(iter(_live(moto_url)))
    script = userdata.decode_user_data(
        raw_client("ec2", moto_url).describe_instance_attribute(
            InstanceId=some, Attribute="userData"
        )["UserData"]["Value"]
    )
    boot = json.loads(script.split("<<'ANNEX_BOOT_EOF'\n", 1)[1].split("\n", 1)[0])
    assert (boot["token_bucket"], boot["token_key"], boot["token_parameter"]) == (
        bucket,
        "token",
        "",
    )
    loop.run_once()
    assert store.get(annex.id).state == names.RUNNING and calls == ["CreateStack"]
    assert len(_live(moto_url)) == 3

    # Extend: grow to 5 (capacity, never a new stack) and a later lease everywhere.
    calls.clear()
    service.extend(service_caller("alice"), {"name": "st", "instances": "5", "lease": "2h"})
    loop.run_once()
    assert sorted(calls) == ["UpdateAutoScalingGroup", "UpdateAutoScalingGroup"], calls
    annex = store.get(annex.id)
    assert len(_live(moto_url)) == 5
    loop.run_once()
    tags = [
        {t["Key"]: t["Value"] for t in i["Tags"]}[names.TAG_EXPIRES]
        for i in _live(moto_url).values()
    ]
    assert set(tags) == {str(annex.lease_expiration)}
    group_tags = {
        t["Value"]
        for g in asg.describe_auto_scaling_groups()["AutoScalingGroups"]
        for t in g["Tags"]
        if t["Key"] == names.TAG_EXPIRES
    }
    assert group_tags == {str(annex.lease_expiration)}

    # Shrink (the loop terminates the surplus): capacity goes down with them, no replacement.
    calls.clear()
    store.update_annex(annex.id, requested=2)
    loop.run_once()
    assert calls == ["TerminateInstanceInAutoScalingGroup"] * 3, calls
    loop.run_once()
    assert len(_live(moto_url)) == 2
    view = stack.describe(cfn, asg, name)
    assert view is not None and sum(g.desired for g in view.groups) == 2

    # Retire: the stack and the bucket are gone, and with them every instance.
    calls.clear()
    service.retire(store.get(annex.id), "deleted")
    for _ in range(3):
        loop.run_once()
    assert store.get(annex.id).state == names.RETIRED
    assert "DeleteStack" in calls and "TerminateInstances" not in calls
    assert stack.describe(cfn, asg, name) is None
    assert _live(moto_url) == {}
    assert bucket not in [b["Name"] for b in s3.list_buckets()["Buckets"]]


def service_caller(user: str) -> Any:
    from annex_gahp.gahp import Caller  # noqa: PLC0415

    return Caller(uid=1000, user=user, is_admin=False)


def test_stack_create_failure_shows_as_an_error(moto_url: str) -> None:  # noqa: F811
    cfn, asg = _clients(moto_url)

    def refuse(**_: Any) -> None:
        raise ClientError(
            {"Error": {"Code": "InsufficientCapabilitiesException", "Message": "no"}},
            "CreateStack",
        )

    cfn.meta.events.register("before-call.cloudformation.CreateStack", refuse)
    with pytest.raises(CloudError, match=r"create stack annex-a1 .*InsufficientCapabilities"):
        stack.ensure(cfn, asg, _plan(moto_url), name="annex-a1", base={}, target=1, max_size=5)


def test_teardown_deletes_annex_stacks_and_token_buckets(moto_url: str) -> None:  # noqa: F811
    """Teardown refuses while a stack annex exists; forced, it deletes the stack (taking the
    instances with it: none is terminated behind its group's back) and the token bucket."""
    from annex_gahp.cloud.aws import setup  # noqa: PLC0415
    from annex_gahp.errors import SetupError  # noqa: PLC0415

    settings = make_settings(moto_url, pool_id=POOL, central_manager=POOL)
    made = _ensure(moto_url, _plan(moto_url), 2)
    s3 = raw_client("s3", moto_url)
    bucket = stack.bucket_name(POOL, POOL, "alice", "a1")
    stack.put_token(s3, bucket, "tok", {names.TAG_POOL: POOL}, REGION)
    s3.create_bucket(Bucket=stack.bucket_name(POOL, POOL, "bob", "other-pool"))  # untagged
    clients = setup.AdminClients(
        cloudformation=raw_client("cloudformation", moto_url),
        ec2=raw_client("ec2", moto_url),
        iam=raw_client("iam", moto_url),
        lambda_=raw_client("lambda", moto_url),
        events=raw_client("events", moto_url),
        ssm=raw_client("ssm", moto_url),
        region=REGION,
        s3=s3,
    )
    with pytest.raises(SetupError, match=r"1 annex stack\(s\).*alice/a1.*--force"):
        setup.teardown(settings, clients=clients)
    terminations = count_calls(clients.ec2, "TerminateInstances")
    removed = setup.teardown(settings, clients=clients, force=True)
    assert removed["annex_stacks"] == ["annex-a1"]
    assert removed["instances"] == [] and terminations == []
    assert removed["buckets"] == [bucket]
    assert not set(made.instance_ids) & set(_live(moto_url))
    assert (
        stack.describe(clients.cloudformation, raw_client("autoscaling", moto_url), "annex-a1")
        is None
    )
    left = [b["Name"] for b in s3.list_buckets()["Buckets"]]
    assert left == [stack.bucket_name(POOL, POOL, "bob", "other-pool")]


def test_an_annex_rebuilt_from_tags_still_gets_its_stack_deleted(moto_url: str, tmp_path) -> None:  # noqa: F811
    """State file lost: the helper rebuilds the annex from its instances' tags (as a plain
    annex: the record of its strategy is gone); retiring it still takes the stack's way out
    (through the groups, then DeleteStack) and deletes the bucket, found by the
    htcondor-annex:stack tag."""

    def world(path: str) -> tuple[Store, AnnexService, AwsCloud, Reconciler]:
        settings = make_settings(moto_url, default_image_id=default_image(moto_url), pool_id=POOL)
        store = Store(path)
        service = AnnexService(store, settings, clock=Clock(), resolve_region=lambda r, s: REGION)
        cloud = AwsCloud(settings, mint=lambda identity, lifetime: "tok")
        return (
            store,
            service,
            cloud,
            Reconciler(
                store,
                settings,
                cloud,
                FakeSchedd(),
                Publisher(),
                resolve_region=lambda r, s: REGION,
            ),
        )

    store, service, _, loop = world(str(tmp_path / "first.sqlite"))
    wanted = spec.from_keywords(
        {"name": "st", "instances": 2, "strategy": "stack"}, "alice", service.settings
    )
    service.ensure(wanted)
    loop.run_once()
    assert len(_live(moto_url)) == 2
    tags = {t["Key"]: t["Value"] for t in next(iter(_live(moto_url).values()))["Tags"]}
    name = stack.stack_name(POOL, "alice", "st")
    assert tags[stack.STACK_TAG] == name
    bucket = tags[stack.BUCKET_TAG]

    store, service, _cloud, loop = world(str(tmp_path / "lost.sqlite"))
    loop.recover()
    (adopted,) = store.annexes()
    assert (adopted.owner, adopted.name, adopted.requested) == ("alice", "st", 2)
    service.retire(adopted, "deleted")
    for _ in range(3):
        loop.run_once()
    assert store.get(adopted.id).state == names.RETIRED
    cfn, asg = _clients(moto_url)
    assert stack.describe(cfn, asg, name) is None and _live(moto_url) == {}
    assert bucket not in [b["Name"] for b in raw_client("s3", moto_url).list_buckets()["Buckets"]]
