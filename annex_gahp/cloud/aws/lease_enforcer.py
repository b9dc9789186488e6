"""Lease enforcer: terminate this pool's instances whose htcondor-annex:expires is past.

Runs as an AWS Lambda function on an EventBridge schedule (made by `htcondor-annex setup`), so
leases hold even when the access point is down. Self-contained (stdlib + boto3, as the Lambda
runtime has): the setup stack ships this file's text inline as the function's code.

Event keys (all optional): pool_id (else env ANNEX_POOL_ID), grace seconds (else env
ANNEX_REAPER_GRACE), now (epoch, for tests), region, endpoint_url (an emulator; the schedule
fires only on AWS, so tests call handler() directly). Members of an Auto Scaling group (the
stack strategy) are not terminated one by one, which the group would answer with
replacements: their group is set to 0.
"""

import logging
import os
import time

import boto3

POOL_TAG = "htcondor-annex:pool"
EXPIRES_TAG = "htcondor-annex:expires"
GROUP_TAG = "aws:autoscaling:groupName"
LIVE = ["pending", "running", "stopping", "stopped"]
log = logging.getLogger("htcondor-annex-lease-enforcer")
log.setLevel(logging.INFO)


def expired_instances(ec2, pool_id, now, grace):
    """(id, expires, group or None) of the pool's live instances past lease plus grace."""
    found = []
    pages = ec2.get_paginator("describe_instances").paginate(
        Filters=[
            {"Name": "tag:" + POOL_TAG, "Values": [pool_id]},
            {"Name": "instance-state-name", "Values": LIVE},
        ]
    )
    for page in pages:
        for reservation in page["Reservations"]:
            for inst in reservation["Instances"]:
                tags = {t["Key"]: t["Value"] for t in inst.get("Tags", [])}
                try:
                    expires = int(tags[EXPIRES_TAG])
                except (KeyError, ValueError):
                    # No lease to enforce; the helper's reaper handles untagged strays.
                    log.warning("%s has no usable %s tag", inst["InstanceId"], EXPIRES_TAG)
                    continue
                if expires + grace <= now:
                    found.append((inst["InstanceId"], expires, tags.get(GROUP_TAG)))
    return found


def handler(event, context):
    event = event or {}
    pool_id = event.get("pool_id") or os.environ["ANNEX_POOL_ID"]
    grace = int(event.get("grace", os.environ.get("ANNEX_REAPER_GRACE", "0")))
    now = float(event.get("now", time.time()))
    kwargs = {}
    if event.get("region") or os.environ.get("AWS_REGION"):
        kwargs["region_name"] = event.get("region") or os.environ.get("AWS_REGION")
    if event.get("endpoint_url"):
        kwargs["endpoint_url"] = event["endpoint_url"]
    ec2 = boto3.client("ec2", **kwargs)
    expired = expired_instances(ec2, pool_id, now, grace)
    groups = sorted({g for _, _, g in expired if g})
    if groups:
        asg = boto3.client("autoscaling", **kwargs)
        for group in groups:
            asg.update_auto_scaling_group(AutoScalingGroupName=group, MinSize=0, DesiredCapacity=0)
            log.info("set group %s of pool %s to 0: lease ended", group, pool_id)
    ids = [i for i, _, g in expired if not g]
    for start in range(0, len(ids), 1000):
        ec2.terminate_instances(InstanceIds=ids[start : start + 1000])
    for instance_id, expires, group in expired:
        log.info(
            "ended %s (%s) of pool %s: lease ended at %d", instance_id, group, pool_id, expires
        )
    result = {"pool_id": pool_id, "terminated": ids}
    if groups:
        result["groups_zeroed"] = groups
    return result
