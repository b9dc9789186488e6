"""Liveness end to end (issue 14 item 3): an instance that runs in EC2 but never boots (the
booter is told not to boot it) is terminated after the join timeout, the Annex ad's LastError
and the waiting job's AnnexLastError name it (with the tail of its console as EC2 keeps it),
and the replacement, which boots, runs the job.

Serial: ANNEX_JOIN_TIMEOUT is a pool-wide knob (no per-annex one is public), set short here
for the helper and put back after.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sandbox

SRC = Path(os.environ.get("ANNEX_SRC", "/src"))
sys.path.insert(0, str(SRC))
from annex_gahp import names  # noqa: E402

pytestmark = pytest.mark.sandbox

TEST_CONFIG = Path("/etc/condor/config.d/95-liveness-test.conf")
NO_BOOT = Path("/run/annex-booter/no-boot")  # the booter's test control (sandbox-booter)
CYCLE = 3  # ANNEX_RECONCILE_INTERVAL in the sandbox
JOIN_TIMEOUT = 25  # seconds: long enough for an emulated instance to boot and join
HELPER_LOG = Path("/var/log/condor/AnnexGahpLog")


def helper_log_tail() -> str:
    lines = HELPER_LOG.read_text(errors="replace").splitlines()
    return "AnnexGahpLog tail:\n" + "\n".join(lines[-30:]) + "\n" + sandbox.booter_log_tail()


def wait(condition, timeout: float, what: str):
    return sandbox.wait_for(
        condition, timeout=timeout, interval=1, what=what, on_timeout=helper_log_tail
    )


@pytest.fixture
def short_join_timeout() -> Iterator[None]:
    TEST_CONFIG.write_text(
        "# tests/e2e/test_join_timeout.py (removed after the test)\n"
        f"ANNEX_JOIN_TIMEOUT = {JOIN_TIMEOUT}\n"
    )
    subprocess.run(["condor_reconfig"], check=True, capture_output=True)
    time.sleep(2 * CYCLE)  # the helper re-reads its knobs on the SIGHUP
    try:
        yield
    finally:
        TEST_CONFIG.unlink(missing_ok=True)
        subprocess.run(["condor_reconfig"], check=True, capture_output=True)
        time.sleep(CYCLE)


def annex_ad(name: str):
    ads = sandbox.query_ads("Any", f'MyType == "Annex" && AnnexName == "{name}"')
    return ads[0] if ads else None


def instances(name: str, states: tuple[str, ...] = ("pending", "running")) -> list[str]:
    found = sandbox.instances([{"Name": f"tag:{names.TAG_NAME}", "Values": [name]}], states)
    return sorted(i["InstanceId"] for i in found)


@pytest.mark.serial
def test_an_instance_that_never_joins_is_replaced_and_the_job_runs(short_join_timeout) -> None:
    name = f"liveness-{uuid.uuid4().hex[:6]}"
    NO_BOOT.mkdir(parents=True, exist_ok=True)
    (NO_BOOT / name).write_text("1\n")  # the first instance of this annex never boots
    workdir = sandbox.user_tmpdir("alice", "annex-liveness-")
    cluster = sandbox.condor_submit_as(
        "alice",
        "\n".join(
            [
                "executable = /bin/sleep",
                "arguments = 1",
                "log = job.log",
                f"annex_name = {name}",
                "annex_instances = 1",
                "queue",
                "",
            ]
        ),
        cwd=str(workdir),
    )
    try:
        first = wait(lambda: instances(name), 60, f"annex {name}'s first instance")[0]
        started = time.time()
        # Terminated at the join timeout (plus a cycle or two), not before.
        wait(lambda: first not in instances(name), JOIN_TIMEOUT + 6 * CYCLE, f"{first} to end")
        assert time.time() - started >= JOIN_TIMEOUT - 2 * CYCLE

        def failed_ad():
            ad = annex_ad(name)
            return ad if ad is not None and ad.get("JoinFailures") == 1 else None

        ad = wait(failed_ad, 3 * CYCLE, "the Annex ad to count the join failure")
        error = str(ad.get("LastError"))
        assert f"instance {first} did not join the pool within" in error
        assert "its console ends:" in error  # EC2's console (the emulator's sample)

        def told() -> str:
            job = sandbox.job_ad(cluster)
            text = str(job.get("AnnexLastError", "")) if job is not None else ""
            return text if first in text else ""

        assert "did not join the pool" in wait(told, 3 * CYCLE, "the job's AnnexLastError")
        shown = sandbox.run_as("alice", "htcondor-annex", "status", "--name", name).stdout
        assert "join failures: 1 in a row" in shown

        # The replacement boots and joins: the job runs there and finishes.
        (replacement,) = wait(
            lambda: [i for i in instances(name) if i != first], 12 * CYCLE, "a replacement"
        )
        done = sandbox.wait_for_job(cluster, timeout=90)
        assert done.get("MachineAttrAnnexName0") == name
        assert replacement in str(done.get("LastRemoteHost", ""))  # it ran on the replacement
        joined = wait(
            lambda: (a := annex_ad(name)) is not None and a.get("JoinFailures") == 0 and a,
            3 * CYCLE,
            "the run of failures to end once the replacement joined",
        )
        assert joined.get("LastError", "") == ""
    finally:
        (NO_BOOT / name).unlink(missing_ok=True)
        sandbox.run_as("alice", "condor_rm", str(cluster), check=False)
        sandbox.run_as("alice", "htcondor-annex", "delete", "--name", name, check=False)
        wait(lambda: not instances(name), 60, f"annex {name}'s instances to go")
