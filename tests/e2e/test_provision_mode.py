"""Provision mode end to end (sandbox): the user's own user data boots the instances, the job
stands for the annex, condor_rm ends it.

A provision-mode job is made a local universe job running annex_provision_job by the schedd
transform; the route's translate hook (as the job's owner) reads the user data and the helper
creates the annex; the booter runs that user data on each emulated instance (a marker, then a
pilot that stays up). The test sees the marker, the job Running with its instances in its ad,
the Annex ad; condor_rm's the job and sees every instance terminated and the ad gone. Then the
refusals: a file the owner cannot read, and one over EC2's limit, hold the job with the reason.
"""

from __future__ import annotations

import base64
import os
import random
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import sandbox

SRC = Path(os.environ.get("ANNEX_SRC", "/src"))
sys.path.insert(0, str(SRC))
from annex_gahp import names  # noqa: E402

pytestmark = pytest.mark.sandbox

USER = "alice"
logs = sandbox.line_logs  # router, helper and booter tails for a timeout's message

# Rendered by the helper (annex_user_data_template = true): the marker names the annex, then
# the "pilot" stays up until the instance is terminated. Nothing HTCondor-specific.
PILOT = """#!/bin/sh
what="{{ annex_name }} ({{ annex_request_id }}, until {{ annex_expires }})"
echo "pilot of $what on $(hostname)" > /var/tmp/pilot-marker
exec sleep 100000
"""




def write_as_user(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.write_bytes(data)
    os.chmod(path, mode)
    subprocess.run(["chown", f"{USER}:{USER}", str(path)], check=True)


def submit(workdir: Path, name: str, user_data: str, *extra: str) -> int:
    return sandbox.condor_submit_as(
        USER,
        "\n".join(
            [
                "executable = /bin/true",
                f"annex_name = {name}",
                "annex_mode = provision",
                f"annex_user_data_file = {user_data}",
                "annex_lease = 30m",
                "output = job.out",
                "error = job.err",
                "log = job.log",
                *extra,
                "queue",
                "",
            ]
        ),
        cwd=str(workdir),
    )


def annex_ads(name: str) -> list:
    return sandbox.query_ads("Any", f'MyType == "Annex" && AnnexName == "{name}"')


def tagged(name: str, states=("pending", "running")) -> list[dict]:
    return sandbox.instances(
        [{"Name": f"tag:{names.TAG_NAME}", "Values": [name]}], states=tuple(states)
    )


def test_provision_job_stands_for_its_annex_and_condor_rm_ends_it() -> None:
    sandbox.check_running()
    name = f"pv-{uuid.uuid4().hex[:8]}"
    workdir = sandbox.user_tmpdir(USER, "annex-provision-")
    write_as_user(workdir / "pilot.sh", PILOT.encode())
    cluster = submit(
        workdir, name, "pilot.sh", "annex_instances = 2", "annex_user_data_template = true"
    )

    def running_with_instances():
        ad = sandbox.job_ad(cluster)
        if ad is None or ad.get("JobStatus") not in (1, 2):
            raise AssertionError(f"job {cluster}.0 left: {dict(ad) if ad else None}")
        ids = [i for i in str(ad.get("AnnexInstanceIds", "")).split(",") if i]
        states = str(ad.get("AnnexInstanceStates", "")).split(",")
        # (The helper writes one attribute at a time: wait for the counts too.)
        if ad.get("JobStatus") == 2 and len(ids) == 2 and states.count("running") == 2:
            return ad if ad.get("AnnexRunningInstances") == 2 else None
        return None

    ad = sandbox.wait_for(
        running_with_instances,
        timeout=150,
        what=f"job {cluster}.0 Running with 2 running instances in its ad",
        on_timeout=logs,
    )
    # The job stands for the annex: a local universe job of ours, on this access point.
    assert ad["JobUniverse"] == 12
    assert ad["Cmd"].endswith("/annex_provision_job")
    assert ad["AnnexState"] == names.RUNNING and int(ad["AnnexRunningInstances"]) == 2
    ids = ad["AnnexInstanceIds"].split(",")
    assert sorted(ids) == sorted(i["InstanceId"] for i in tagged(name))

    # The booter ran the user's own user data, rendered with the annex's variables.
    def markers():
        found = {}
        for instance in ids:
            marker = sandbox.instance_root(instance) / "var/tmp/pilot-marker"
            if marker.exists():
                found[instance] = marker.read_text()
        return found if len(found) == 2 else None

    found = sandbox.wait_for(markers, timeout=60, what="both pilots' markers", on_timeout=logs)
    for instance, text in found.items():
        assert text.startswith(f"pilot of {name} (annex-{ad['AnnexId']}, until ")
        assert instance in text
        # Nothing of this pool went there: no token, no HTCondor config of ours.
        root = sandbox.instance_root(instance)
        assert not (root / "etc/condor/tokens.d/annex").exists()
        assert not (root / "etc/condor/config.d/50-annex.conf").exists()

    # The Annex ad carries what a factory counts.
    (annex_ad,) = sandbox.wait_for(
        lambda: [a for a in annex_ads(name) if a.get("RunningInstances") == 2] or None,
        timeout=60,
        what="the Annex ad with 2 running instances",
    )
    assert annex_ad["Mode"] == "provision"
    assert annex_ad["RequestedInstances"] == 2 and annex_ad["PendingInstances"] == 0
    assert annex_ad["FailedInstances"] == 0

    # condor_rm: the job deletes the annex; every instance terminates; the ad goes.
    sandbox.run_as(USER, "condor_rm", str(cluster))
    sandbox.wait_for(
        lambda: not tagged(name), timeout=60, what="every instance terminated", on_timeout=logs
    )
    for instance in ids:
        assert sandbox.instance_state(instance) in ("shutting-down", "terminated")
    sandbox.wait_for(lambda: not annex_ads(name), timeout=60, what="the Annex ad gone")
    sandbox.wait_for(
        lambda: (a := sandbox.job_ad(cluster)) is not None and a.get("JobStatus") == 3,
        timeout=60,
        what=f"job {cluster}.0 removed",
    )

    # What the job printed: why it ended (the file is complete once the starter is gone).
    def last_line():
        text = (workdir / "job.out").read_text()
        return text if "instances are terminated" in text else None

    out = sandbox.wait_for(last_line, timeout=30, what="the job's last line")
    assert f"deleting annex {name}" in out and "instances are terminated" in out, out


def held_with(cluster: int) -> str:
    def held():
        ad = sandbox.job_ad(cluster)
        return ad.get("HoldReason") if ad is not None and ad.get("JobStatus") == 5 else None

    return sandbox.wait_for(held, timeout=90, what=f"job {cluster}.0 held", on_timeout=logs)


def test_user_data_the_owner_cannot_read_is_refused() -> None:
    sandbox.check_running()
    name = f"pv-{uuid.uuid4().hex[:8]}"
    workdir = sandbox.user_tmpdir(USER, "annex-provision-")
    secret = Path("/var/tmp") / f"root-only-{name}.sh"
    secret.write_text("#!/bin/sh\necho secret\n")
    os.chmod(secret, 0o600)  # root's: alice may not send it to EC2
    try:
        cluster = submit(workdir, name, str(secret))
        reason = held_with(cluster)
        # (HTCondor appends " (by user condor)": the helper held it.)
        assert reason.startswith(
            f"annex_user_data_file {secret} cannot be read by the job's owner "
            "(permission denied): the user data is read with your rights"
        )
        assert not annex_ads(name) and not tagged(name, states=())
        sandbox.run_as(USER, "condor_rm", str(cluster))
    finally:
        secret.unlink()


def test_oversize_user_data_is_refused_with_the_limit() -> None:
    sandbox.check_running()
    name = f"pv-{uuid.uuid4().hex[:8]}"
    workdir = sandbox.user_tmpdir(USER, "annex-provision-")
    noise = base64.b64encode(random.Random(1).randbytes(30_000))  # noqa: S311 - test data
    content = b"#!/bin/sh\n: " + noise + b"\n"
    write_as_user(workdir / "big.sh", content)
    cluster = submit(workdir, name, "big.sh")
    reason = held_with(cluster)
    path = workdir / "big.sh"
    assert reason.startswith(f"annex_user_data_file {path} is {len(content)} bytes (")
    assert "over EC2's user data limit of 16384 bytes" in reason
    assert not annex_ads(name) and not tagged(name, states=())
    sandbox.run_as(USER, "condor_rm", str(cluster))


def finished(cluster: int, timeout: float = 120):
    def done():
        ad = sandbox.job_ad(cluster)
        return ad if ad is not None and ad.get("JobStatus") == 4 else None

    return sandbox.wait_for(done, timeout=timeout, what=f"job {cluster}.0 done", on_timeout=logs)


def test_job_completes_with_0_when_every_pilot_ended_by_itself() -> None:
    sandbox.check_running()
    name = f"pv-{uuid.uuid4().hex[:8]}"
    workdir = sandbox.user_tmpdir(USER, "annex-provision-")
    # A pilot that does its work and powers the instance off (the booter's poweroff terminates
    # it in EC2, as InstanceInitiatedShutdownBehavior=terminate does).
    write_as_user(workdir / "short.sh", b"#!/bin/sh\nsleep 5\n$ANNEX_POWEROFF_CMD\n")
    cluster = submit(workdir, name, "short.sh", "annex_instances = 2")
    ad = finished(cluster)
    assert ad["ExitCode"] == names.EXIT_ENDED
    out = (workdir / "job.out").read_text()
    assert "every instance ended by itself (exit 0)" in out, out
    assert not tagged(name)
    sandbox.wait_for(lambda: not annex_ads(name), timeout=30, what="the Annex ad gone")


def test_job_completes_with_2_when_the_lease_ends() -> None:
    sandbox.check_running()
    name = f"pv-{uuid.uuid4().hex[:8]}"
    workdir = sandbox.user_tmpdir(USER, "annex-provision-")
    write_as_user(workdir / "pilot.sh", b"#!/bin/sh\nexec sleep 100000\n")
    cluster = sandbox.condor_submit_as(
        USER,
        "\n".join(
            [
                "executable = /bin/true",
                f"annex_name = {name}",
                "annex_mode = provision",
                "annex_user_data_file = pilot.sh",
                "annex_lease = 40s",
                "output = job.out",
                "log = job.log",
                "queue",
                "",
            ]
        ),
        cwd=str(workdir),
    )
    ad = finished(cluster)
    assert ad["ExitCode"] == names.EXIT_LEASE
    out = (workdir / "job.out").read_text()
    assert "lease ended; its instances were terminated (exit 2)" in out, out
    assert not tagged(name)
