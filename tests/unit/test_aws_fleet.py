"""aws/fleet.py and aws/instances.py against a real moto server."""

from __future__ import annotations

import base64
import time
from typing import Any

import pytest
from aws_fixtures import (  # noqa: F401
    count_calls,
    default_image,
    moto_server_url,
    moto_url,
    raw_client,
    settings,
)
from aws_fixtures import (
    images as moto_images,
)
from botocore.awsrequest import AWSResponse

from annex_gahp import names
from annex_gahp.cloud.aws import fleet, instances, session
from annex_gahp.errors import CloudError, InputError

POOL = "cm.test:9618"


def plan(**changes: Any) -> fleet.LaunchPlan:
    values: dict[str, Any] = {
        "annex": "a1",
        "owner": "alice",
        "request_id": "req-1",
        "pool_id": POOL,
        "expires": int(time.time()) + 3600,
        "count": 2,
        "instance_types": ("m5.large", "m5a.large"),
        "user_data": "#!/bin/sh\necho boot a1\n",
        "extra_tags": {"project": "x", names.TAG_NAME: "spoof", "aws:foo": "no"},
    }
    values.update(changes)
    return fleet.LaunchPlan(**values)


@pytest.fixture
def ec2(settings):  # noqa: F811
    # A pacer of its own per test: the process-wide one would make later tests wait.
    return session.client("ec2", settings)


@pytest.fixture
def base_template(moto_url: str) -> str:  # noqa: F811
    raw = raw_client("ec2", moto_url)
    raw.create_launch_template(
        LaunchTemplateName="annex-base",
        LaunchTemplateData={
            "ImageId": default_image(moto_url),
            "MetadataOptions": {"HttpTokens": "required", "InstanceMetadataTags": "enabled"},
            "InstanceInitiatedShutdownBehavior": "terminate",
        },
    )
    return "annex-base"


@pytest.mark.slow
def test_launch_describe_terminate_with_tags(ec2, base_template, moto_url) -> None:  # noqa: F811
    fleets = count_calls(ec2, "CreateFleet")
    the_plan = plan(count=3)
    result = fleet.launch(ec2, the_plan, base_template)
    assert len(result.instance_ids) == 3
    assert result.errors == []
    assert len(fleets) == 1, "one CreateFleet call per change"
    request = fleets[0]
    assert request["Type"] == "instant"
    overrides = request["LaunchTemplateConfigs"][0]["Overrides"]
    assert [o["InstanceType"] for o in overrides] == ["m5.large", "m5a.large"]
    assert "UserData" not in str(request)

    found = {v.id: v for v in instances.describe_pool(ec2, POOL)}
    assert set(found) == set(result.instance_ids)
    view = found[result.instance_ids[0]]
    assert (view.annex, view.owner, view.request) == ("a1", "alice", "req-1")
    assert view.expires == the_plan.expires
    assert view.tags["project"] == "x"
    assert view.tags[names.TAG_POOL] == POOL
    assert "aws:foo" not in view.tags
    assert view.state in ("pending", "running")

    # Where an emulated booter finds the user data: the instance attribute, from the template.
    raw = raw_client("ec2", moto_url)
    attr = raw.describe_instance_attribute(InstanceId=view.id, Attribute="userData")
    assert base64.b64decode(attr["UserData"]["Value"]).decode() == the_plan.user_data

    # The fleet itself carries the tags too.
    tags = {t["Key"]: t["Value"] for t in raw.describe_fleets()["Fleets"][0]["Tags"]}
    assert tags[names.TAG_NAME] == "a1"

    assert sorted(instances.terminate(ec2, result.instance_ids)) == sorted(result.instance_ids)
    assert instances.describe_pool(ec2, POOL) == []
    everything = instances.describe_pool(ec2, POOL, include_terminated=True)
    assert {v.state for v in everything} == {"terminated"}


def test_other_pools_not_seen(ec2, base_template) -> None:
    fleet.launch(ec2, plan(pool_id="other:9618", count=1), base_template)
    assert instances.describe_pool(ec2, POOL) == []


def test_template_reused_on_growth_and_deleted(ec2, base_template, moto_url) -> None:  # noqa: F811
    raw = raw_client("ec2", moto_url)
    creates = count_calls(ec2, "CreateLaunchTemplate")
    fleet.launch(ec2, plan(count=1), base_template)
    fleet.launch(ec2, plan(count=2), base_template)
    assert len(creates) == 2  # the second one found it existing
    name = fleet.template_name(POOL, "alice", "a1")
    templates = raw.describe_launch_templates(LaunchTemplateNames=[name])["LaunchTemplates"]
    assert templates[0]["LatestVersionNumber"] == 1, "unchanged data: no new version"
    # A different boot script makes a new default version.
    fleet.launch(ec2, plan(count=1, user_data="#!/bin/sh\necho v2\n"), base_template)
    version = raw.describe_launch_template_versions(LaunchTemplateName=name, Versions=["$Default"])[
        "LaunchTemplateVersions"
    ][0]
    assert base64.b64decode(version["LaunchTemplateData"]["UserData"]) == b"#!/bin/sh\necho v2\n"
    data = version["LaunchTemplateData"]
    assert data["MetadataOptions"]["HttpTokens"] == "required"
    assert data["InstanceInitiatedShutdownBehavior"] == "terminate"
    assert len(instances.describe_pool(ec2, POOL)) == 4
    assert fleet.delete_annex_template(ec2, POOL, "alice", "a1") is True
    assert fleet.delete_annex_template(ec2, POOL, "alice", "a1") is False


def test_template_name_safe() -> None:
    name = fleet.template_name("cm.example.org:9618", "al ice@x", "a" * 63)
    assert len(name) <= 128
    assert all(c.isalnum() or c in "()./-_" for c in name)
    assert name != fleet.template_name("cm.example.org_9618", "al ice@x", "a" * 63)


def test_spot_images_subnets(ec2, base_template, moto_url) -> None:  # noqa: F811
    raw = raw_client("ec2", moto_url)
    subnets = [s["SubnetId"] for s in raw.describe_subnets()["Subnets"]][:2]
    images = list(moto_images(moto_url)[:2])
    fleets = count_calls(ec2, "CreateFleet")
    result = fleet.launch(
        ec2,
        plan(subnets=tuple(subnets), image_ids=tuple(images), spot_prices=("0.10", "0.20")),
        base_template,
    )
    assert len(result.instance_ids) == 2
    request = fleets[0]
    assert request["TargetCapacitySpecification"]["DefaultTargetCapacityType"] == "spot"
    overrides = request["LaunchTemplateConfigs"][0]["Overrides"]
    assert len(overrides) == 4  # types x subnets
    assert overrides[0] == {
        "InstanceType": "m5.large",
        "Priority": 0.0,
        "SubnetId": subnets[0],
        "ImageId": images[0],
        "MaxPrice": "0.10",
    }
    assert overrides[3]["MaxPrice"] == "0.20" and overrides[3]["ImageId"] == images[1]
    views = instances.describe_pool(ec2, POOL)
    assert {v.lifecycle for v in views} == {"spot"}


def test_bad_per_type_lists() -> None:
    with pytest.raises(InputError, match="annex_spot_prices"):
        fleet.overrides(plan(spot_prices=("1", "2", "3")))


def test_no_image_anywhere(ec2) -> None:
    with pytest.raises(InputError, match="ANNEX_DEFAULT_IMAGE_ID"):
        fleet.launch(ec2, plan(), "")


class _Raw:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def stream(self, **_: Any):
        yield self.body


def _fleet_errors_response(types: list[str]) -> bytes:
    items = "".join(
        f"<item><launchTemplateAndOverrides><overrides><instanceType>{t}</instanceType>"
        "</overrides></launchTemplateAndOverrides><lifecycle>on-demand</lifecycle>"
        "<errorCode>InsufficientInstanceCapacity</errorCode>"
        f"<errorMessage>We currently do not have sufficient {t} capacity.</errorMessage></item>"
        for t in types
    )
    return (
        '<CreateFleetResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">'
        "<requestId>r</requestId><fleetId>fleet-injected</fleetId>"
        f"<errorSet>{items}</errorSet><fleetInstanceSet/></CreateFleetResponse>"
    ).encode()


def _inject_once(client: Any, body: bytes, status: int = 200) -> list[int]:
    """before-send hook: the first CreateFleet gets `body` instead of reaching moto."""
    fired: list[int] = []

    def hook(request: Any, **_: Any) -> AWSResponse | None:
        if fired:
            return None
        fired.append(1)
        return AWSResponse(request.url, status, {}, _Raw(body))

    client.meta.events.register("before-send.ec2.CreateFleet", hook)
    return fired


def test_capacity_errors_fall_through_to_next_type(ec2, base_template) -> None:
    fleets = count_calls(ec2, "CreateFleet")
    fired = _inject_once(ec2, _fleet_errors_response(["m5.large"]))
    result = fleet.launch(ec2, plan(count=2), base_template)
    assert fired == [1]
    assert len(result.instance_ids) == 2
    assert len(fleets) == 2
    retried = [o["InstanceType"] for o in fleets[1]["LaunchTemplateConfigs"][0]["Overrides"]]
    assert retried == ["m5a.large"]
    assert {v.instance_type for v in instances.describe_pool(ec2, POOL)} == {"m5a.large"}
    assert len(result.errors) == 1
    assert "InsufficientInstanceCapacity" in result.errors[0]
    assert "m5.large" in result.errors[0]


def test_whole_call_capacity_error_falls_through(ec2, base_template) -> None:
    body = (
        b"<Response><Errors><Error><Code>InsufficientInstanceCapacity</Code>"
        b"<Message>no m5.large</Message></Error></Errors><RequestID>r</RequestID></Response>"
    )
    _inject_once(ec2, body, status=500 - 100)
    result = fleet.launch(ec2, plan(count=1), base_template)
    assert len(result.instance_ids) == 1
    assert "InsufficientInstanceCapacity" in result.errors[0]
    assert {v.instance_type for v in instances.describe_pool(ec2, POOL)} == {"m5a.large"}


def test_everything_out_of_capacity_reports_errors(ec2, base_template) -> None:
    _inject_once(ec2, _fleet_errors_response(["m5.large", "m5a.large"]))
    result = fleet.launch(ec2, plan(count=2), base_template)
    assert result.instance_ids == []
    assert len(result.errors) == 2


def test_other_errors_raise(ec2, base_template) -> None:
    body = (
        b"<Response><Errors><Error><Code>UnauthorizedOperation</Code>"
        b"<Message>You are not authorized</Message></Error></Errors>"
        b"<RequestID>r</RequestID></Response>"
    )
    _inject_once(ec2, body, status=403)
    with pytest.raises(CloudError, match="UnauthorizedOperation"):
        fleet.launch(ec2, plan(count=1), base_template)


@pytest.mark.slow
def test_describe_paginates_in_one_logical_call(ec2, base_template, moto_url) -> None:  # noqa: F811
    raw = raw_client("ec2", moto_url)
    image = default_image(moto_url)
    tags = [{"Key": names.TAG_POOL, "Value": POOL}, {"Key": names.TAG_NAME, "Value": "big"}]
    # 105 reservations: more than one page of 100.
    for _ in range(105):
        raw.run_instances(
            ImageId=image,
            MinCount=1,
            MaxCount=1,
            TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
        )
    describes = count_calls(ec2, "DescribeInstances")
    views = instances.describe_pool(ec2, POOL)
    assert len(views) == 105
    assert len(describes) >= 2, "the paginator fetched more than one page"
    assert all(
        {"Name": f"tag:{names.TAG_POOL}", "Values": [POOL]} in d["Filters"] for d in describes
    )
    assert len(instances.terminate(ec2, [v.id for v in views])) == 105


def test_terminate_skips_unknown_ids(ec2, base_template) -> None:
    result = fleet.launch(ec2, plan(count=1), base_template)
    done = instances.terminate(ec2, ["i-0000000000000dead", *result.instance_ids])
    assert set(done) == {"i-0000000000000dead", *result.instance_ids}
    assert instances.describe_pool(ec2, POOL) == []


def test_terminate_batches(monkeypatch) -> None:
    calls: list[int] = []

    class FakeEc2:
        def terminate_instances(self, InstanceIds: list[str]) -> None:
            calls.append(len(InstanceIds))

    ids = [f"i-{n:017x}" for n in range(2500)]
    assert len(instances.terminate(FakeEc2(), ids)) == 2500
    assert calls == [1000, 1000, 500]


def test_prepared_template_is_used_without_template_calls(ec2, base_template, moto_url) -> None:  # noqa: F811
    """The helper prepares the annex's template once, then launches growth with its id."""
    template_id = fleet.ensure_annex_template(ec2, plan(count=0), base_template)
    creates = count_calls(ec2, "CreateLaunchTemplate")
    reads = count_calls(ec2, "DescribeLaunchTemplateVersions")
    fleets = count_calls(ec2, "CreateFleet")
    result = fleet.launch(
        ec2, plan(count=2, user_data=""), base_template, annex_template_id=template_id
    )
    assert len(result.instance_ids) == 2
    assert creates == [] and reads == []
    spec = fleets[0]["LaunchTemplateConfigs"][0]["LaunchTemplateSpecification"]
    assert spec["LaunchTemplateId"] == template_id
    attr = raw_client("ec2", moto_url).describe_instance_attribute(
        InstanceId=result.instance_ids[0], Attribute="userData"
    )
    assert base64.b64decode(attr["UserData"]["Value"]).decode() == plan().user_data
    # The same, passing the prepared template where the base one goes (no user data in plan).
    again = fleet.launch(ec2, plan(count=1, user_data=""), template_id)
    assert len(again.instance_ids) == 1 and creates == []


def test_missing_base_template_names_region(ec2) -> None:
    with pytest.raises(CloudError, match=r"region us-east-1 set up\?"):
        fleet.launch(ec2, plan(image_ids=("ami-12c6146b",)), "no-such-template")


@pytest.mark.slow
def test_throttled_launch_is_retried_with_backoff_not_failed(ec2, base_template) -> None:
    """RequestLimitExceeded twice, as AWS answers a burst: botocore's retries (with backoff)
    take it, the launch succeeds, and the fleet is still one logical create."""
    throttled = (
        b"<Response><Errors><Error><Code>RequestLimitExceeded</Code>"
        b"<Message>Request limit exceeded.</Message></Error></Errors>"
        b"<RequestID>r</RequestID></Response>"
    )
    answered: list[str] = []

    def hook(request: Any, **_: Any) -> AWSResponse | None:
        if len(answered) < 2:
            answered.append("throttled")
            return AWSResponse(request.url, 503, {}, _Raw(throttled))
        answered.append("sent")
        return None

    ec2.meta.events.register("before-send.ec2.CreateFleet", hook)
    result = fleet.launch(ec2, plan(count=2), base_template)
    assert answered == ["throttled", "throttled", "sent"]
    assert len(result.instance_ids) == 2 and result.errors == []
    assert len(instances.describe_pool(ec2, POOL)) == 2


def test_instances_and_volumes_carry_cost_allocation_tags(ec2, base_template, moto_url) -> None:  # noqa: F811
    """Issue 16: owner, annex and pool are on the instance and on its volumes from creation
    (the annex's launch template tags volumes, CreateFleet tags instances), so AWS's cost
    reports can group by them once the tags are activated (docs/admin.md)."""
    result = fleet.launch(ec2, plan(count=1), base_template)
    raw = raw_client("ec2", moto_url)
    (instance_id,) = result.instance_ids
    wanted = {names.TAG_OWNER: "alice", names.TAG_NAME: "a1", names.TAG_POOL: POOL}
    found = instances.describe_pool(ec2, POOL)
    assert wanted.items() <= {v.id: v for v in found}[instance_id].tags.items()
    data = fleet.annex_template_data({}, plan())
    (volumes,) = [s for s in data["TagSpecifications"] if s["ResourceType"] == "volume"]
    assert wanted.items() <= {t["Key"]: t["Value"] for t in volumes["Tags"]}.items()
    attached = raw.describe_volumes(
        Filters=[{"Name": "attachment.instance-id", "Values": [instance_id]}]
    )["Volumes"]
    assert attached, "an instance has its root volume"
    for volume in attached:  # the emulator tags what it attaches as the template says
        assert wanted.items() <= {t["Key"]: t["Value"] for t in volume.get("Tags", [])}.items()
    instances.terminate(ec2, result.instance_ids)
