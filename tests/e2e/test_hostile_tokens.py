"""Annex tokens on a shared access point (issue 12, items 3 and 4), end to end in the sandbox.

- The running helper holds no root: real, effective, saved and filesystem uid and gid are all
  the condor user's, while it still mints the token an annex's instance joins the pool with.
- That token is the annex's own (`annex.<annex>.<owner>@<ANNEX_TOKEN_DOMAIN>`): with it, an ad
  naming another annex, another owner, or no annex at all is refused by the pool's collector,
  while an ad of its own annex is taken (the control that the refusal is the check's doing).
- The annex's START admits its owner by User (owner@the access point's UID_DOMAIN): a job with
  the same Owner from elsewhere does not match.
- When the annex retires, its stored token (SSM parameter) is gone.
- A provision-mode annex gets no instance profile: not in its launch template, not on the
  instance, and its IMDS hands out no role credentials.
"""

from __future__ import annotations

import os
import pwd
import re
import subprocess
import sys
import uuid
from pathlib import Path

import classad2
import sandbox

SRC = Path(os.environ.get("ANNEX_SRC", "/src"))
sys.path.insert(0, str(SRC))
from annex_gahp import names  # noqa: E402
from annex_gahp.cloud.aws.secrets import INSTANCE_TAG  # noqa: E402

HELPER_LOG = Path("/var/log/condor/AnnexGahpLog")
ALICE = "alice"


def logs() -> str:
    lines = HELPER_LOG.read_text(errors="replace").splitlines()[-25:]
    return "AnnexGahpLog tail:\n" + "\n".join(lines) + "\n" + sandbox.booter_log_tail()


def config(name: str) -> str:
    return subprocess.run(
        ["condor_config_val", name], capture_output=True, text=True, check=True
    ).stdout.strip()


def helper_pid() -> int:
    pids = re.findall(r"annex_gahp starting \(pid (\d+)\)", HELPER_LOG.read_text(errors="replace"))
    assert pids, logs()
    pid = int(pids[-1])
    assert os.readlink(f"/proc/{pid}/root") == "/", f"helper pid {pid} is not running"
    return pid


def ids_of(pid: int) -> dict[str, list[int]]:
    status = Path(f"/proc/{pid}/status").read_text()
    return {
        key: [int(v) for v in line.split()[1:]]
        for line in status.splitlines()
        for key in ("Uid", "Gid", "Groups")
        if line.startswith(key + ":")
    }


def submit(user: str, text: str) -> int:
    workdir = sandbox.user_tmpdir(user, "annex-tokens-")
    return sandbox.condor_submit_as(user, text, cwd=str(workdir))


def advertise_with(token_dir: Path, ad: dict[str, object]) -> None:
    """condor_advertise UPDATE_STARTD_AD, authenticating with the token(s) in token_dir only."""
    path = token_dir.parent / "ad"
    path.write_text(classad2.ClassAd(ad).printOld())
    env = dict(
        os.environ,
        _CONDOR_SEC_TOKEN_DIRECTORY=str(token_dir),
        _CONDOR_SEC_CLIENT_AUTHENTICATION_METHODS="IDTOKENS",
    )
    subprocess.run(
        ["condor_advertise", "UPDATE_STARTD_AD", str(path)], env=env, check=False, timeout=30
    )


def remove_fakes(token_dir: Path) -> None:
    """Take this test's fake ads out of the collector again (tidiness for later tests)."""
    path = token_dir.parent / "query"
    path.write_text(
        'MyType = "Query"\nTargetType = "Machine"\nRequirements = Machine == "rogue.invalid"\n'
    )
    env = dict(
        os.environ,
        _CONDOR_SEC_TOKEN_DIRECTORY=str(token_dir),
        _CONDOR_SEC_CLIENT_AUTHENTICATION_METHODS="IDTOKENS",
    )
    subprocess.run(
        ["condor_advertise", "INVALIDATE_STARTD_ADS", str(path)], env=env, check=False, timeout=30
    )


def fake_slot(name: str, annex: object, owner: object) -> dict[str, object]:
    ad: dict[str, object] = {
        "MyType": "Machine",
        "TargetType": "Job",
        "Name": name,
        "Machine": "rogue.invalid",
        "MyAddress": "<127.0.0.1:9>",
        "StartdIpAddr": "<127.0.0.1:9>",
        "IsAnnex": True,
        "Start": False,
        "Requirements": False,
    }
    if annex is not None:
        ad["AnnexName"] = annex
    if owner is not None:
        ad["AnnexOwner"] = owner
    return ad


def rogue_names() -> set[str]:
    return {str(a["Name"]) for a in sandbox.query_ads("Startd", 'Machine == "rogue.invalid"')}


def test_helper_has_no_root_and_annex_token_binds_its_ads(tmp_path: Path) -> None:
    sandbox.check_running()
    condor = pwd.getpwnam("condor")
    name = f"tk-{uuid.uuid4().hex[:6]}"
    uid_domain = config("UID_DOMAIN")
    domain = config("ANNEX_TOKEN_DOMAIN")
    cluster = submit(
        ALICE,
        "\n".join(
            [
                "executable = /bin/sleep",
                "arguments = 300",
                "log = job.log",
                f"annex_name = {name}",
                "annex_instances = 1",
                "annex_lease = 20m",
                "annex_idle_timeout = 5",
                "queue",
                "",
            ]
        ),
    )
    try:
        # The instance joins with the token the helper minted, and alice's job runs there.
        slots = sandbox.wait_for(
            lambda: (
                sandbox.query_ads("Startd", f'AnnexName == "{name}" && Machine != "rogue.invalid"')
                or None
            ),
            timeout=120,
            what=f"annex {name}'s startd in the pool",
            on_timeout=logs,
        )
        slot = slots[0]
        assert slot["AuthenticatedIdentity"] == f"annex.{name}.{ALICE}@{domain}"
        instance = str(slot["AnnexInstanceId"])
        sandbox.wait_for(
            lambda: (ad := sandbox.job_ad(cluster)) is not None and ad["JobStatus"] == 2,
            timeout=90,
            what=f"job {cluster}.0 running on the annex",
            on_timeout=logs,
        )

        # 0. The instance read its own copy of the token, tagged with its own ARN (what the real
        #    instance role's policy matches against ec2:SourceInstanceARN).
        ssm = sandbox.aws_client("ssm")

        def stored() -> dict[str, dict[str, str]]:
            found = ssm.describe_parameters(
                ParameterFilters=[{"Key": f"tag:{names.TAG_NAME}", "Values": [name]}]
            )["Parameters"]
            return {
                p["Name"]: {
                    t["Key"]: t["Value"]
                    for t in ssm.list_tags_for_resource(
                        ResourceType="Parameter", ResourceId=p["Name"]
                    )["TagList"]
                }
                for p in found
            }

        copies = {n: t for n, t in stored().items() if n.endswith("/" + instance)}
        assert len(copies) == 1, stored()
        (tags,) = copies.values()
        assert re.fullmatch(
            rf"arn:aws:ec2:[a-z0-9-]+:\d{{12}}:instance/{instance}", tags[INSTANCE_TAG]
        )

        # 1. The helper that minted that token holds no root: Uid and Gid lines are
        #    real, effective, saved, filesystem = condor, and no supplementary group 0.
        ids = ids_of(helper_pid())
        assert ids["Uid"] == [condor.pw_uid] * 4, ids
        assert ids["Gid"] == [condor.pw_gid] * 4, ids
        assert 0 not in ids.get("Groups", []), ids

        # 2. With the annex's own token: its own annex's ad is taken, any other is refused.
        token_dir = tmp_path / "tokens"
        token_dir.mkdir(mode=0o700)
        token = (sandbox.instance_root(instance) / "etc/condor/tokens.d/annex").read_text()
        (token_dir / "annex").write_text(token)
        (token_dir / "annex").chmod(0o600)
        own = f"own-{name}@rogue.invalid"
        refused = {
            f"other-annex-{name}@rogue.invalid": ("b-annex", ALICE),
            f"other-owner-{name}@rogue.invalid": (name, "bob"),
            f"no-annex-{name}@rogue.invalid": (None, None),
            f"lookalike-{name}@rogue.invalid": (f"{name}.{ALICE}", ""),
        }
        for rogue, (annex, owner) in refused.items():
            advertise_with(token_dir, fake_slot(rogue, annex, owner))
        advertise_with(token_dir, fake_slot(own, name, ALICE))
        seen = sandbox.wait_for(
            lambda: rogue_names() if own in rogue_names() else None,
            timeout=20,
            what="the control ad of the annex's own name",
        )
        assert not (seen & set(refused)), f"collector took ads of others: {seen & set(refused)}"
        assert sandbox.query_ads(
            "Startd", f'AnnexName == "{name}" && AnnexInstanceId == "{instance}"'
        ), "the legit ad is gone"

        # 3. START admits alice by User (owner@this access point's UID_DOMAIN), not by Owner.
        start = slot.lookup("START")
        for user, expected in (
            (f"{ALICE}@{uid_domain}", True),
            (f"{ALICE}@other.pool.example", False),  # same Owner, another schedd's domain
            (f"bob@{uid_domain}", False),
        ):
            job = classad2.ClassAd({"TargetAnnexName": name, "Owner": ALICE, "User": user})
            assert start.eval(scope=slot, target=job) is expected, (user, str(start))
    finally:
        sandbox.run_as(ALICE, "condor_rm", str(cluster), check=False)
        if (tmp_path / "tokens" / "annex").exists():
            remove_fakes(tmp_path / "tokens")

    # 5. Retired (job gone, idle timeout): instances and every stored copy are gone.
    sandbox.wait_for(
        lambda: not sandbox.instances([{"Name": f"tag:{names.TAG_NAME}", "Values": [name]}]),
        timeout=90,
        what=f"annex {name}'s instances terminated",
        on_timeout=logs,
    )
    sandbox.wait_for(
        lambda: (
            not ssm.describe_parameters(
                ParameterFilters=[{"Key": f"tag:{names.TAG_NAME}", "Values": [name]}]
            )["Parameters"]
        ),
        timeout=60,
        what=f"annex {name}'s token parameter deleted",
        on_timeout=logs,
    )


def test_provision_annex_gets_no_instance_profile(tmp_path: Path) -> None:
    sandbox.check_running()
    name = f"tkp-{uuid.uuid4().hex[:6]}"
    workdir = sandbox.user_tmpdir(ALICE, "annex-tokens-")
    pilot = workdir / "pilot.sh"
    pilot.write_text("#!/bin/sh\nexec sleep 100000\n")
    subprocess.run(["chown", f"{ALICE}:{ALICE}", str(pilot)], check=True)
    cluster = sandbox.condor_submit_as(
        ALICE,
        "\n".join(
            [
                "executable = /bin/true",
                f"annex_name = {name}",
                "annex_mode = provision",
                "annex_user_data_file = pilot.sh",
                "annex_lease = 20m",
                "log = job.log",
                "queue",
                "",
            ]
        ),
        cwd=str(workdir),
    )
    try:
        (instance,) = sandbox.wait_for(
            lambda: (
                sandbox.instances([{"Name": f"tag:{names.TAG_NAME}", "Values": [name]}]) or None
            ),
            timeout=90,
            what=f"provision annex {name}'s instance",
            on_timeout=logs,
        )
        assert not instance.get("IamInstanceProfile"), instance.get("IamInstanceProfile")
        ec2 = sandbox.ec2_client()
        (template,) = ec2.describe_launch_templates(
            Filters=[{"Name": f"tag:{names.TAG_NAME}", "Values": [name]}]
        )["LaunchTemplates"]
        data = ec2.describe_launch_template_versions(
            LaunchTemplateId=template["LaunchTemplateId"], Versions=["$Default"]
        )["LaunchTemplateVersions"][0]["LaunchTemplateData"]
        assert "IamInstanceProfile" not in data, data["IamInstanceProfile"]
        # What the pilot sees: no role behind the instance's metadata service.
        sandbox.wait_for(
            lambda: (sandbox.instance_dir(instance["InstanceId"]) / "imds-url").exists() or None,
            timeout=60,
            what="the instance booted",
        )
        code, body = sandbox.imds_get(instance["InstanceId"], "meta-data/iam/security-credentials/")
        assert code == 404, (code, body)
    finally:
        sandbox.run_as(ALICE, "condor_rm", str(cluster), check=False)
