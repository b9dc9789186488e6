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

# One name per pytest process: scripts/test spreads this file's tests over xdist workers, each
# with its own module-scoped instance, and a shared name let one worker's query find another's.
NAME = f"t1{uuid.uuid4().hex[:8]}"

pytestmark = pytest.mark.sandbox


def test_pool_has_a_schedd_and_a_startd():
    assert sb.query_ads("Schedd", projection=["Name"]), "no schedd in the pool"
    startds = sb.wait_for(lambda: sb.query_ads("Startd", "IsAnnex =!= True", ["Name"]),
                          timeout=60, what="the pool's own startd")
    assert startds


def test_alice_runs_a_vanilla_job(annex_pool):
    workdir = annex_pool.run("mktemp -d -p . job-XXXXXX", user="alice", check=True).stdout.strip()
    cluster = annex_pool.submit(textwrap.dedent("""\
        universe = vanilla
        executable = /bin/sh
        arguments = "-c 'echo hello from $(id -un)'"
        output = out.txt
        error = err.txt
        log = job.log
        request_memory = 64
        queue
        """), user="alice", cwd=workdir)
    ad = annex_pool.wait_for_job(cluster, timeout=120)
    assert ad["Owner"] == "alice"
    assert ad["ExitCode"] == 0
    assert annex_pool.run("cat out.txt", user="alice", cwd=workdir).stdout.strip() == \
        "hello from alice"


@pytest.mark.serial  # writes and removes the pool's knob file: alone, not beside other tests
def test_pool_knobs_a_test_sets_are_undone(annex_pool, annex_sandbox):
    from annex_gahp.testing import AnnexPool  # noqa: PLC0415

    def knob():
        return annex_pool.run("condor_config_val ANNEX_PLUGIN_TEST_KNOB").stdout.strip()

    pool = AnnexPool(annex_sandbox)
    pool.config(ANNEX_PLUGIN_TEST_KNOB="set by a test", UPDATE_INTERVAL=7)
    assert knob() == "set by a test"
    assert annex_pool.run("condor_config_val UPDATE_INTERVAL").stdout.strip() == "7"
    pool.undo_config()  # what the annex_pool fixture does when a test ends
    assert knob() == ""
    assert annex_pool.run("condor_config_val UPDATE_INTERVAL").stdout.strip() == "10"
    with pytest.raises(ValueError, match="one knob name, one line"):
        pool.config(ANNEX_PLUGIN_TEST_KNOB="two\nlines")


def test_write_puts_a_users_file_in_their_home(annex_pool):
    path = annex_pool.write("bob", "plugin-test/note.txt", "bob's\n")
    assert path == "/home/bob/plugin-test/note.txt"
    assert annex_pool.run(f"stat -c %U {path}").stdout.strip() == "bob"
    assert annex_pool.run("cat plugin-test/note.txt", user="bob").stdout == "bob's\n"


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
AnnexName = "{name}"
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
    user_data = USER_DATA.format(
        token=sb.pool_token(), collector=sb.collector_host(), name=NAME
    )
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


def test_instance_boots_from_user_data(instance, boot_instance):
    booted = boot_instance(instance)
    assert booted.dir == str(sb.instance_dir(instance))
    marker = sb.instance_root(instance) / "root/boot-marker"
    text = sb.wait_for(lambda: marker.exists() and "hostname" in marker.read_text()
                       and marker.read_text(), timeout=60, what="the boot marker",
                       on_timeout=lambda: _diagnostics(instance))
    assert f"booted {instance}" in text
    assert f"hostname {instance}" in text
    assert "starting condor" in booted.console_log()


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


def test_instance_joins_the_pool_and_runs_an_annex_job(instance, annex_pool):
    slots = sb.wait_for(
        lambda: sb.query_ads("Startd", f'AnnexName == "{NAME}"', ["Name", "Machine", "IsAnnex"]),
        timeout=90, what=f'a startd with AnnexName == "{NAME}"',
        on_timeout=lambda: _diagnostics(instance))
    assert all(s["IsAnnex"] is True for s in slots)
    assert any(instance in s["Machine"] for s in slots)

    cluster = annex_pool.submit(textwrap.dedent(f"""\
        universe = vanilla
        executable = /bin/hostname
        transfer_executable = False
        should_transfer_files = YES
        when_to_transfer_output = ON_EXIT
        requirements = TARGET.AnnexName =?= "{NAME}"
        output = {NAME}-out.txt
        error = {NAME}-err.txt
        log = {NAME}-job.log
        request_memory = 64
        queue
        """), user="alice")
    ad = annex_pool.wait_for_job(cluster, timeout=120)
    assert ad["ExitCode"] == 0
    # The job ran on the instance: its host name is the instance id.
    assert annex_pool.run(f"cat {NAME}-out.txt", user="alice").stdout.strip() == instance


def test_terminate_removes_the_startd_and_kills_the_instance(instance, boot_instance):
    root = sb.instance_root(instance)
    sb.wait_for(lambda: sb.processes_in_root(root), timeout=60, what="the instance's processes",
                on_timeout=lambda: _diagnostics(instance))
    boot_instance(instance).stop(timeout=30)  # terminates, waits for the root to go
    assert not Path(sb.instance_dir(instance)).exists()
    assert not sb.processes_in_root(root)
    sb.wait_for(lambda: not sb.query_ads("Startd", f'AnnexName == "{NAME}"', ["Name"]), timeout=60,
                what="the annex startd to leave the pool")
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
