"""The sandbox itself works: a real pool, a real job, an emulated EC2 instance that boots from
its user data, joins the pool as an annex execute node, runs a job, and dies with terminate."""

from __future__ import annotations

import base64
import gzip
import json
import textwrap
import uuid
from pathlib import Path

import pytest
import sandbox as sb

pytestmark = pytest.mark.sandbox


def test_pool_has_a_schedd_and_a_startd():
    assert sb.query_ads("Schedd", projection=["Name"]), "no schedd in the pool"
    startds = sb.wait_for(lambda: sb.query_ads("Startd", "IsAnnex =!= True", ["Name"]),
                          timeout=60, what="the pool's own startd")
    assert startds


def test_alice_runs_a_vanilla_job():
    workdir = sb.user_tmpdir("alice")
    cluster = sb.condor_submit_as("alice", textwrap.dedent(f"""\
        universe = vanilla
        executable = /bin/sh
        arguments = "-c 'echo hello from $(id -un)'"
        initialdir = {workdir}
        output = out.txt
        error = err.txt
        log = job.log
        request_memory = 64
        queue
        """))
    ad = sb.wait_for_job(cluster, timeout=120)
    assert ad["Owner"] == "alice"
    assert ad["ExitCode"] == 0
    assert (workdir / "out.txt").read_text().strip() == "hello from alice"


# --- an emulated EC2 instance ----------------------------------------------------------------

USER_DATA = """\
#!/bin/sh
# Test user data (the product renders its own): record the boot, then join the pool as an
# annex execute node with a token minted on the pool.
set -e
python3 - <<'PY' > /root/boot-marker
import os, urllib.request
base = os.environ["ANNEX_IMDS_URL"]
req = urllib.request.Request(base + "/latest/api/token", method="PUT",
                             headers={{"X-aws-ec2-metadata-token-ttl-seconds": "300"}})
token = urllib.request.urlopen(req).read().decode()
get = urllib.request.Request(base + "/latest/meta-data/instance-id",
                             headers={{"X-aws-ec2-metadata-token": token}})
print("booted", urllib.request.urlopen(get).read().decode())
PY
echo "hostname $(hostname)" >> /root/boot-marker
mkdir -p /etc/condor/tokens.d
printf '%s\\n' '{token}' > /etc/condor/tokens.d/pool
chmod 600 /etc/condor/tokens.d/pool
cat > /etc/condor/config.d/50-test-annex.conf <<'EOF'
CONDOR_HOST = 127.0.0.1
COLLECTOR_HOST = {collector}
NETWORK_INTERFACE = 127.0.0.1
BIND_ALL_INTERFACES = False
DAEMON_LIST = MASTER, STARTD
USE_SHARED_PORT = False
SEC_USE_FAMILY_SESSION = False
AnnexName = "t1"
IsAnnex = True
STARTD_ATTRS = $(STARTD_ATTRS) AnnexName IsAnnex
START = TRUE
UPDATE_INTERVAL = 5
RUNBENCHMARKS = 0
MOUNT_UNDER_SCRATCH =
USE_PID_NAMESPACES = False
EOF
echo "starting condor"
exec condor_master -f
"""


@pytest.fixture(scope="module")
def instance():
    ec2 = sb.ec2_client()
    user_data = USER_DATA.format(token=sb.pool_token(), collector=sb.collector_host())
    res = ec2.run_instances(
        ImageId=sb.default_image_id(), InstanceType="m5.large", MinCount=1, MaxCount=1,
        UserData=user_data,
        TagSpecifications=[{"ResourceType": "instance",
                            "Tags": [{"Key": "purpose", "Value": "sandbox-test"}]}],
    )
    iid = res["Instances"][0]["InstanceId"]
    yield iid
    ec2.terminate_instances(InstanceIds=[iid])


def _diagnostics(iid: str) -> str:
    return (f"--- booter log ---\n{sb.booter_log_tail()}\n"
            f"--- console of {iid} ---\n{sb.console_log(iid)[-3000:]}")


def test_instance_boots_from_user_data(instance):
    marker = sb.instance_root(instance) / "root/boot-marker"
    text = sb.wait_for(lambda: marker.exists() and "hostname" in marker.read_text()
                       and marker.read_text(), timeout=60, what="the boot marker",
                       on_timeout=lambda: _diagnostics(instance))
    assert f"booted {instance}" in text
    assert f"hostname {instance}" in text


def test_imds_wants_a_token(instance):
    sb.wait_for(lambda: sb.imds_url(instance), timeout=60, what="the instance's IMDS",
                on_timeout=lambda: _diagnostics(instance))
    assert sb.imds_get(instance, "meta-data/instance-id", token="")[0] == 401
    assert sb.imds_get(instance, "meta-data/instance-id", token="not-a-token")[0] == 401  # noqa: S106
    assert sb.imds_get(instance, "meta-data/instance-id") == (200, instance)
    assert sb.imds_get(instance, "meta-data/placement/region") == (200, sb.region())
    # Tags are looked up live: a tag added after boot is seen.
    assert sb.imds_get(instance, "meta-data/tags/instance/purpose") == (200, "sandbox-test")
    sb.ec2_client().create_tags(Resources=[instance], Tags=[{"Key": "later", "Value": "yes"}])
    assert sb.imds_get(instance, "meta-data/tags/instance/later") == (200, "yes")
    status, body = sb.imds_get(instance, "user-data")
    assert status == 200 and body.startswith("#!/bin/sh")


def test_instance_joins_the_pool_and_runs_an_annex_job(instance):
    slots = sb.wait_for(
        lambda: sb.query_ads("Startd", 'AnnexName == "t1"', ["Name", "Machine", "IsAnnex"]),
        timeout=90, what='a startd with AnnexName == "t1"',
        on_timeout=lambda: _diagnostics(instance))
    assert all(s["IsAnnex"] is True for s in slots)
    assert any(instance in s["Machine"] for s in slots)

    workdir = sb.user_tmpdir("alice")
    cluster = sb.condor_submit_as("alice", textwrap.dedent(f"""\
        universe = vanilla
        executable = /bin/hostname
        transfer_executable = False
        should_transfer_files = YES
        when_to_transfer_output = ON_EXIT
        requirements = TARGET.AnnexName =?= "t1"
        initialdir = {workdir}
        output = out.txt
        error = err.txt
        log = job.log
        request_memory = 64
        queue
        """))
    ad = sb.wait_for_job(cluster, timeout=120)
    assert ad["ExitCode"] == 0
    # The job ran on the instance: its host name is the instance id.
    assert (workdir / "out.txt").read_text().strip() == instance


def test_terminate_removes_the_startd_and_kills_the_instance(instance):
    root = sb.instance_root(instance)
    sb.wait_for(lambda: sb.processes_in_root(root), timeout=60, what="the instance's processes",
                on_timeout=lambda: _diagnostics(instance))
    sb.ec2_client().terminate_instances(InstanceIds=[instance])
    sb.wait_for(lambda: not sb.processes_in_root(root), timeout=30,
                what="the instance's processes to die", on_timeout=lambda: _diagnostics(instance))
    sb.wait_for(lambda: not sb.query_ads("Startd", 'AnnexName == "t1"', ["Name"]), timeout=60,
                what="the annex startd to leave the pool")
    sb.wait_for(lambda: not Path(sb.instance_dir(instance)).exists(), timeout=30,
                what="the instance's root to be removed")
    assert sb.instance_state(instance) in ("shutting-down", "terminated")


def test_poweroff_from_inside_terminates_the_instance():
    ec2 = sb.ec2_client()
    script = "#!/bin/sh\necho going down\n$ANNEX_POWEROFF_CMD\nsleep 300\n"
    res = ec2.run_instances(ImageId=sb.default_image_id(), MinCount=1, MaxCount=1,
                            UserData=script)
    iid = res["Instances"][0]["InstanceId"]
    try:
        sb.wait_for(lambda: sb.instance_state(iid) == "terminated", timeout=60,
                    what="the powered-off instance to be terminated",
                    on_timeout=lambda: _diagnostics(iid))
        sb.wait_for(lambda: "going down" in sb.console_log(iid), timeout=30,
                    what="its console output")
    finally:
        ec2.terminate_instances(InstanceIds=[iid])


def test_launch_template_user_data_gzip_and_role_are_used():
    """CreateFleet from a launch template whose user data is gzipped and that names an
    instance profile (what the product does): the user data runs, IMDS serves the role."""
    ec2, iam = sb.ec2_client(), sb.aws_client("iam")
    suffix = uuid.uuid4().hex[:8]
    role, profile = f"sandbox-test-role-{suffix}", f"sandbox-test-profile-{suffix}"
    iam.create_role(RoleName=role, AssumeRolePolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"},
            "Action": "sts:AssumeRole"}]}))
    iam.create_instance_profile(InstanceProfileName=profile)
    iam.add_role_to_instance_profile(InstanceProfileName=profile, RoleName=role)
    script = b"#!/bin/sh\necho from-template > /root/lt-marker\nsleep 300\n"
    lt = ec2.create_launch_template(
        LaunchTemplateName=f"sandbox-test-{suffix}",
        LaunchTemplateData={"ImageId": sb.default_image_id(), "InstanceType": "m5.large",
                            "IamInstanceProfile": {"Name": profile},
                            "UserData": base64.b64encode(gzip.compress(script)).decode()})
    ltid = lt["LaunchTemplate"]["LaunchTemplateId"]
    iids = []
    try:
        res = ec2.create_fleet(
            Type="instant",
            TargetCapacitySpecification={"TotalTargetCapacity": 1,
                                         "DefaultTargetCapacityType": "on-demand"},
            LaunchTemplateConfigs=[{"LaunchTemplateSpecification": {
                "LaunchTemplateId": ltid, "Version": "$Latest"}}])
        iids = res["Instances"][0]["InstanceIds"]
        marker = sb.instance_root(iids[0]) / "root/lt-marker"
        sb.wait_for(lambda: marker.exists() and marker.read_text().strip() == "from-template",
                    timeout=60, what="the launch template's user data to run",
                    on_timeout=lambda: _diagnostics(iids[0]))
        assert sb.imds_get(iids[0], "meta-data/iam/security-credentials/") == (200, role)
        status, body = sb.imds_get(iids[0], f"meta-data/iam/security-credentials/{role}")
        assert status == 200
        assert {"AccessKeyId", "SecretAccessKey", "Token", "Expiration"} <= set(json.loads(body))
    finally:
        if iids:
            ec2.terminate_instances(InstanceIds=iids)
        ec2.delete_launch_template(LaunchTemplateId=ltid)
