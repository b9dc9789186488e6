"""annex_vpc is honoured by the fleet strategy (issue #12): subnets in that VPC, one per zone
when none are given; a subnet outside it, or a VPC that does not exist, is refused."""

from __future__ import annotations

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

from annex_gahp.cloud.aws import fleet, session
from annex_gahp.errors import InputError


def plan(**changes: Any) -> fleet.LaunchPlan:
    values: dict[str, Any] = {
        "annex": "v1",
        "owner": "alice",
        "request_id": "req-v",
        "pool_id": "cm.vpc:9618",
        "expires": int(time.time()) + 3600,
        "count": 1,
        "instance_types": ("m5.large",),
        "image_ids": (),
    }
    values.update(changes)
    return fleet.LaunchPlan(**values)


@pytest.fixture
def ec2(settings):  # noqa: F811
    return session.client("ec2", settings)


@pytest.fixture
def vpc(moto_url: str) -> dict[str, Any]:  # noqa: F811
    raw = raw_client("ec2", moto_url)
    vpc_id = raw.create_vpc(CidrBlock="10.77.0.0/16")["Vpc"]["VpcId"]
    zones = [z["ZoneName"] for z in raw.describe_availability_zones()["AvailabilityZones"]][:2]
    subnets = [
        raw.create_subnet(VpcId=vpc_id, CidrBlock=cidr, AvailabilityZone=zone)["Subnet"]
        for cidr, zone in (
            ("10.77.1.0/24", zones[0]), ("10.77.2.0/24", zones[0]), ("10.77.3.0/24", zones[-1])
        )
    ]  # fmt: skip
    return {"id": vpc_id, "subnets": subnets, "zones": zones}


def test_vpc_without_subnets_given_uses_one_subnet_per_zone(ec2, vpc, moto_url) -> None:  # noqa: F811
    fleets = count_calls(ec2, "CreateFleet")
    image = default_image(moto_url)
    result = fleet.launch(ec2, plan(vpc=vpc["id"], image_ids=(image,)), "")
    assert len(result.instance_ids) == 1
    used = [o["SubnetId"] for o in fleets[0]["LaunchTemplateConfigs"][0]["Overrides"]]
    ours = {s["SubnetId"]: s for s in vpc["subnets"]}
    assert set(used) <= set(ours)
    assert len({ours[s]["AvailabilityZone"] for s in used}) == len(used) == len(set(vpc["zones"]))
    raw = raw_client("ec2", moto_url)
    launched = raw.describe_instances(InstanceIds=result.instance_ids)["Reservations"]
    assert launched[0]["Instances"][0]["SubnetId"] in ours


def test_subnet_outside_the_vpc_is_refused_naming_both(ec2, vpc, moto_url) -> None:  # noqa: F811
    raw = raw_client("ec2", moto_url)
    elsewhere = next(
        s["SubnetId"] for s in raw.describe_subnets()["Subnets"] if s["VpcId"] != vpc["id"]
    )
    inside = vpc["subnets"][0]["SubnetId"]
    with pytest.raises(InputError) as err:
        fleet.resolve_vpc(ec2, plan(vpc=vpc["id"], subnets=(inside, elsewhere)))
    assert elsewhere in str(err.value) and vpc["id"] in str(err.value)
    assert str(err.value).startswith("annex_subnets: ")
    assert fleet.resolve_vpc(ec2, plan(vpc=vpc["id"], subnets=(inside,))).subnets == (inside,)


def test_vpc_that_does_not_exist_is_refused(ec2) -> None:
    fleets = count_calls(ec2, "CreateFleet")
    with pytest.raises(InputError, match=r"annex_vpc = vpc-0000000000deadbee does not exist"):
        fleet.launch(ec2, plan(vpc="vpc-0000000000deadbee"), "")
    assert not fleets


def test_no_vpc_changes_nothing(ec2) -> None:
    calls = count_calls(ec2, "DescribeSubnets")
    assert fleet.resolve_vpc(ec2, plan()) == plan()
    assert not calls
