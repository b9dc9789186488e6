"""The `stack` strategy end to end in the sandbox: a real condor_submit with
`annex_strategy = stack`, the helper makes one CloudFormation stack (an Auto Scaling group per
instance type) and the annex's S3 token bucket, the groups' instances boot from their user
data (the token fetched from S3 by the instance agent), join the pool with the annex's name,
run the jobs; `htcondor-annex extend --instances` grows and shrinks the groups; `htcondor-annex
delete` retires the annex: stack, bucket and instances gone.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import sandbox as sb

SRC = Path(os.environ.get("ANNEX_SRC", "/src"))
sys.path.insert(0, str(SRC / "scripts"))
sys.path.insert(0, str(SRC))

import burst_demo  # noqa: E402

from annex_gahp.cloud.aws import stack  # noqa: E402

pytestmark = pytest.mark.sandbox
OWNER = "alice"
TIMEOUT = 300


def _groups(cfn: Any, asg: Any, name: str) -> list[stack.GroupView]:
    view = stack.describe(cfn, asg, name)
    return view.groups if view else []


def _live(ec2: Any, annex: str) -> list[dict[str, Any]]:
    return burst_demo.annex_instances(ec2, OWNER, annex, ("pending", "running"))


def _startds(annex: str) -> set[str]:
    return {
        str(s.get("AnnexInstanceId") or s.get("Machine")) for s in burst_demo.annex_startds(annex)
    }


def _user_data_of(template: Any) -> str:
    """The user data of the stack's launch templates, decoded."""
    body = template if isinstance(template, dict) else json.loads(template)
    texts = []
    for resource in body["Resources"].values():
        data = resource["Properties"].get("LaunchTemplateData", {}).get("UserData")
        if data:
            raw = base64.b64decode(data)
            texts.append((gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode())
    return "\n".join(texts)


def _cli(*args: str) -> str:
    return sb.run_as(OWNER, "htcondor-annex", *args, timeout=60).stdout


def test_stack_annex_create_run_grow_shrink_retire() -> None:
    annex = f"stk-{uuid.uuid4().hex[:6]}"
    cfn, asg = sb.aws_client("cloudformation"), sb.aws_client("autoscaling")
    ec2, s3 = sb.ec2_client(), sb.aws_client("s3")
    workdir = sb.user_tmpdir(OWNER)
    cluster = sb.condor_submit_as(
        OWNER,
        textwrap.dedent(f"""\
            executable = /bin/sh
            arguments = "-c 'sleep 3; echo ran'"
            initialdir = {workdir}
            output = out-$(ProcId).txt
            error = err-$(ProcId).txt
            log = job.log
            request_memory = 64

            annex_name = {annex}
            annex_strategy = stack
            annex_instances = 2
            annex_instance_types = m5.large,c5.large
            annex_lease = 1h
            annex_idle_timeout = 30m
            queue 3
            """),
    )

    # The stack: two groups (one per type), the size split 1 + 1; the token in its bucket.
    ad = burst_demo.wait_for("the Annex ad", lambda: burst_demo.annex_ads(OWNER, annex), TIMEOUT)[0]
    assert ad["Strategy"] == "stack"
    stacks = burst_demo.wait_for(
        "the annex's stack",
        lambda: [
            s
            for s in cfn.describe_stacks()["Stacks"]
            if {t["Key"]: t["Value"] for t in s.get("Tags", [])}.get("htcondor-annex:name") == annex
            and s["StackStatus"] == "CREATE_COMPLETE"
        ],
        TIMEOUT,
    )
    name = stacks[0]["StackName"]
    tags = {t["Key"]: t["Value"] for t in stacks[0]["Tags"]}
    assert tags["htcondor-annex:owner"] == OWNER and tags["htcondor-annex:pool"]
    groups = _groups(cfn, asg, name)
    assert [g.desired for g in groups] == [1, 1]
    buckets = [
        b["Name"]
        for b in s3.list_buckets()["Buckets"]
        if b["Name"].startswith("htcondor-annex-") and annex in b["Name"]
    ]
    assert len(buckets) == 1, buckets
    token = s3.get_object(Bucket=buckets[0], Key="token")["Body"].read().decode().strip()
    assert token
    # The secret is only in the bucket: not in the stack's template (the user data), not in
    # the helper's log.
    template = cfn.get_template(StackName=name)["TemplateBody"]
    assert token not in str(template) and buckets[0] in _user_data_of(template)
    assert token not in Path("/var/log/condor/AnnexGahpLog").read_text(errors="replace")

    # Instances boot from the groups' user data, fetch the token from S3 and join as the annex.
    live = burst_demo.wait_for(
        "2 instances", lambda: len(_live(ec2, annex)) >= 2 and _live(ec2, annex), TIMEOUT
    )
    for inst in live:
        itags = {t["Key"]: t["Value"] for t in inst["Tags"]}
        assert itags["aws:autoscaling:groupName"] in {g.name for g in groups}
        for key in ("name", "owner", "request", "expires", "pool"):
            assert f"htcondor-annex:{key}" in itags
    assert sorted(i["InstanceType"] for i in live) == ["c5.large", "m5.large"]
    burst_demo.wait_for("2 annex startds", lambda: len(_startds(annex)) >= 2, TIMEOUT)
    # The token came from the bucket (the startd could not have joined without it).
    agent_log = sb.instance_root(live[0]["InstanceId"]) / "var/log/htcondor-annex-agent.log"
    assert "wrote the annex token" in agent_log.read_text(), sb.console_log(live[0]["InstanceId"])

    # The jobs run on the annex's slots.
    def all_done() -> list[Any] | None:
        ads = burst_demo.finished_jobs(cluster)
        done = {a.get("ProcId") for a in ads if a.get("ClusterId") == cluster}
        return ads if len(done) >= 3 else None

    ads = burst_demo.wait_for("3 jobs to complete", all_done, TIMEOUT, every=2)
    assert set(burst_demo.ran_on(cluster, ads).values()) == {annex}

    # Grow: capacity, not a new stack.
    _cli("extend", "--name", annex, "--instances", "3")
    burst_demo.wait_for(
        "the groups at 3", lambda: sum(g.desired for g in _groups(cfn, asg, name)) == 3, 60
    )
    burst_demo.wait_for("3 instances", lambda: len(_live(ec2, annex)) == 3, 60)
    burst_demo.wait_for("3 annex startds", lambda: len(_startds(annex)) >= 3, TIMEOUT)
    assert len([s for s in cfn.describe_stacks()["Stacks"] if s["StackName"] == name]) == 1

    # A longer lease reaches the groups (for instances launched later) and the instances.
    before = s3.get_object(Bucket=buckets[0], Key="token")["LastModified"]
    _cli("extend", "--name", annex, "--lease", "2h")

    def expiries() -> set[str]:
        found = {
            t["Value"]
            for g in asg.describe_auto_scaling_groups(
                AutoScalingGroupNames=[g.name for g in groups]
            )["AutoScalingGroups"]
            for t in g["Tags"]
            if t["Key"] == "htcondor-annex:expires"
        }
        for inst in _live(ec2, annex):
            found |= {t["Value"] for t in inst["Tags"] if t["Key"] == "htcondor-annex:expires"}
        return found

    new = burst_demo.wait_for(
        "the new lease on groups and instances",
        lambda: len(e := expiries()) == 1 and int(next(iter(e))) > time.time() + 3600 and e,
        60,
    )
    assert burst_demo.annex_ads(OWNER, annex)[0]["LeaseExpiration"] == int(next(iter(new)))
    assert s3.get_object(Bucket=buckets[0], Key="token")["LastModified"] >= before

    # Shrink: instances leave with their group's capacity, so none is replaced.
    _cli("extend", "--name", annex, "--instances", "1")
    burst_demo.wait_for(
        "the groups at 1", lambda: sum(g.desired for g in _groups(cfn, asg, name)) == 1, 60
    )
    burst_demo.wait_for("1 instance", lambda: len(_live(ec2, annex)) == 1, 60)
    time.sleep(10)  # a few reconcile cycles: still one, nothing replaced or relaunched
    assert len(_live(ec2, annex)) == 1
    assert sum(g.desired for g in _groups(cfn, asg, name)) == 1

    # Retire: the stack, its groups and instances, and the token bucket are gone.
    _cli("delete", "--name", annex)
    burst_demo.wait_for(
        "the annex to retire",
        lambda: not burst_demo.annex_ads(OWNER, annex) and not _live(ec2, annex),
        TIMEOUT,
        every=2,
    )
    burst_demo.wait_for("the stack to go", lambda: stack.describe(cfn, asg, name) is None, 60)
    burst_demo.wait_for(
        "the bucket to go",
        lambda: buckets[0] not in [b["Name"] for b in s3.list_buckets()["Buckets"]],
        60,
    )
