"""aws/instances.py's describe_pool reads its pages with a lean parse: the same views as
botocore's own parse of the whole answer, and nothing of the answer kept afterwards."""

from __future__ import annotations

import gc
import sys
from typing import Any

import pytest
from aws_fixtures import (  # noqa: F401
    default_image,
    moto_server_url,
    moto_url,
    raw_client,
    settings,
)

from annex_gahp import names
from annex_gahp.cloud.aws import instances, session

POOL = "cm.test:9618"


@pytest.fixture
def ec2(settings):  # noqa: F811
    return session.client("ec2", settings)


def _launch(raw: Any, image: str, count: int, tags: dict[str, str], **extra: Any) -> list[str]:
    spec = [{"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}]
    got = raw.run_instances(
        ImageId=image,
        InstanceType="t3.micro",
        MinCount=count,
        MaxCount=count,
        TagSpecifications=spec if tags else [],
        **extra,
    )
    return [i["InstanceId"] for i in got["Instances"]]


def _full_parse(raw: Any, include_terminated: bool) -> list[instances.InstanceView]:
    """What describe_pool saw before: botocore's parse of every field."""
    filters = [{"Name": f"tag:{names.TAG_POOL}", "Values": [POOL]}]
    if not include_terminated:
        filters.append({"Name": "instance-state-name", "Values": list(instances.NOT_TERMINATED)})
    return [
        instances.InstanceView.from_api(i)
        for page in raw.get_paginator("describe_instances").paginate(Filters=filters)
        for r in page["Reservations"]
        for i in r["Instances"]
    ]


def test_lean_views_equal_botocore_views(ec2, moto_url) -> None:  # noqa: F811
    raw = raw_client("ec2", moto_url)
    image = default_image(moto_url)
    pool = {names.TAG_POOL: POOL}
    _launch(raw, image, 3, {**pool, names.TAG_NAME: "a1", names.TAG_OWNER: "alice", "x": "y"})
    _launch(raw, image, 1, {**pool, names.TAG_EXPIRES: "not a number"})
    spot = _launch(raw, image, 1, pool, InstanceMarketOptions={"MarketType": "spot"})
    gone = _launch(raw, image, 1, {**pool, names.TAG_NAME: "gone"})
    _launch(raw, image, 2, {names.TAG_POOL: "other:9618"})
    _launch(raw, image, 1, {})
    raw.terminate_instances(InstanceIds=gone)

    for include_terminated in (False, True):
        lean = instances.describe_pool(ec2, POOL, include_terminated=include_terminated)
        assert lean == _full_parse(raw, include_terminated)
        assert len(lean) == (6 if include_terminated else 5)
    views = {v.id: v for v in instances.describe_pool(ec2, POOL)}
    assert views[spot[0]].lifecycle == "spot"
    assert all(v.launch_time > 0 and v.private_ip and v.state for v in views.values())

    # Any other DescribeInstances on the same client is botocore's whole answer.
    full = ec2.describe_instances(InstanceIds=spot)["Reservations"][0]["Instances"][0]
    assert full["ImageId"] == image
    assert "NetworkInterfaces" in full


ANSWER = b"""<?xml version="1.0" encoding="UTF-8"?>
<DescribeInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
  <requestId>req-1</requestId>
  <reservationSet>
    <item>
      <reservationId>r-1</reservationId>
      <groupSet><item><groupId>sg-1</groupId><groupName>name</groupName></item></groupSet>
      <instancesSet>
        <item>
          <instanceId>i-0a</instanceId>
          <instanceState><code>16</code><name>running</name></instanceState>
          <instanceType>m5.large</instanceType>
          <launchTime>2026-11-24T20:06:00.000Z</launchTime>
          <networkInterfaceSet><item><privateIpAddress>10.0.0.9</privateIpAddress>
            <tagSet><item><key>not</key><value>mine</value></item></tagSet></item>
          </networkInterfaceSet>
          <privateIpAddress>10.0.0.1</privateIpAddress>
          <tagSet>
            <item><key>htcondor-annex:name</key><value>a1</value></item>
            <item><key>empty</key><value/></item>
          </tagSet>
        </item>
        <item><instanceId>i-0b</instanceId></item>
      </instancesSet>
    </item>
  </reservationSet>
  <nextToken>page-2</nextToken>
</DescribeInstancesResponse>
"""


def test_page_parse_keeps_only_what_views_read() -> None:
    parsed, request_id = instances.parse_instances_page(ANSWER)
    assert request_id == "req-1"
    assert parsed["NextToken"] == "page-2"
    first, second = parsed["Reservations"][0]["Instances"]
    assert first["InstanceId"] == "i-0a"
    assert first["State"] == {"Name": "running"}
    assert first["PrivateIpAddress"] == "10.0.0.1"  # not the interface's
    assert first["LaunchTime"].isoformat() == "2026-11-24T20:06:00+00:00"
    assert first["Tags"] == [
        {"Key": "htcondor-annex:name", "Value": "a1"},
        {"Key": "empty", "Value": ""},
    ]
    assert set(first) == {
        "InstanceId",
        "State",
        "InstanceType",
        "LaunchTime",
        "PrivateIpAddress",
        "Tags",
    }
    assert second == {"InstanceId": "i-0b"}
    assert instances.InstanceView.from_api(second).state == "unknown"


def test_page_parse_keeps_no_reference_to_the_answer() -> None:
    """ElementTree.iterparse would keep its source until the garbage collector's next full
    pass: in the helper, several 3.3 MB answers at once."""
    body = bytes(ANSWER)
    before = sys.getrefcount(body)
    gc.disable()
    try:
        instances.parse_instances_page(body)
        assert sys.getrefcount(body) == before
    finally:
        gc.enable()


def test_other_answers_go_to_botocore_untouched() -> None:
    error = {"status_code": 400, "body": b"<Response><Errors/></Response>"}
    odd = {"status_code": 200, "body": b"<SomethingElse/>"}
    instances._LEAN.on = True
    try:
        for response in (error, odd):
            before = dict(response)
            custom: dict[str, Any] = {}
            instances._lean_parse(response_dict=response, customized_response_dict=custom)
            assert (response, custom) == (before, {})
    finally:
        instances._LEAN.on = False
    # Outside describe_pool, not even a describe_pool-shaped answer is touched.
    page = {"status_code": 200, "body": ANSWER}
    instances._lean_parse(response_dict=page, customized_response_dict={})
    assert page["body"] == ANSWER
