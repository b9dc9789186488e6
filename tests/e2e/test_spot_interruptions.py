"""Capacity health end to end (issue 14, items 1 and 2): spot interruption notices and
capacity errors, in the sandbox.

Real condor_submit, router, helper, HTCondor on emulated instances booted by the booter. The
interruption notice is the booter's test control (its IMDS serves
meta-data/spot/instance-action from /srv/instances/<id>/spot-instance-action, see
`sandbox.interrupt`); capacity errors come from the helper's emulator-only fault hook
(<ANNEX_STATE_DIR>/test-capacity-faults, cloud/aws/capacity_faults.py), read at every
CreateFleet, so no pool reconfig is needed. Each test has its own annex name and its own
instance types; the sandbox sets ANNEX_UNAVAILABLE_OFFERING_TTL = 20.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import sandbox

SRC = Path(os.environ.get("ANNEX_SRC", "/src"))
sys.path.insert(0, str(SRC))
from annex_gahp import names  # noqa: E402

pytestmark = pytest.mark.sandbox

ALICE = "alice"
HELPER_LOG = Path("/var/log/condor/AnnexGahpLog")
STATE_DIR = subprocess.run(
    ["condor_config_val", "ANNEX_STATE_DIR"], capture_output=True, text=True, check=False
).stdout.strip()
FAULTS = Path(STATE_DIR or "/var/lib/condor/annex") / "test-capacity-faults"
TTL = 20  # ANNEX_UNAVAILABLE_OFFERING_TTL in the sandbox
IDLE, RUNNING, DONE = 1, 2, 4
# The spot test's own instance type: marks are pool-wide, so other tests' m5.large launches
# never meet the pool this one interrupts.
TYPE = "m6i.large"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def helper_log_tail() -> str:
    lines = HELPER_LOG.read_text(errors="replace").splitlines()
    return "AnnexGahpLog tail:\n" + "\n".join(lines[-40:])


def wait(condition, timeout: float, what: str, interval: float = 0.5):
    return sandbox.wait_for(
        condition, timeout=timeout, interval=interval, what=what, on_timeout=helper_log_tail
    )


def instances(name: str, states: tuple[str, ...] = ("pending", "running")) -> list[dict]:
    return sandbox.instances(
        [
            {"Name": f"tag:{names.TAG_NAME}", "Values": [name]},
            {"Name": f"tag:{names.TAG_OWNER}", "Values": [ALICE]},
        ],
        states=states,
    )


def annex_ad(name: str):
    ads = sandbox.query_ads("Any", f'MyType == "Annex" && AnnexName == "{name}"')
    return ads[0] if ads else None


def job_status(cluster: int) -> int | None:
    ad = sandbox.job_ad(cluster)
    return int(ad["JobStatus"]) if ad is not None else None


def instance_logs(instance_id: str) -> str:
    """The instance's agent log and its startd's policy lines, for a failure's message."""
    root = sandbox.instance_root(instance_id)
    agent = sandbox.file_tail(root / "var/log/htcondor-annex-agent.log", 10)
    start = sandbox.file_tail(root / "var/log/condor/StartLog", 25)
    return f"agent log:\n{agent}\nStartLog:\n{start}\n{helper_log_tail()}"


def annex_cli(*args: str, check: bool = True):
    return sandbox.run_as(ALICE, "htcondor-annex", *args, check=check)


def cleanup(name: str, clusters: list[int]) -> None:
    for cluster in clusters:
        sandbox.run_as(ALICE, "condor_rm", str(cluster), check=False)
    annex_cli("delete", "--name", name, check=False)
    wait(lambda: not instances(name), 60, f"annex {name}'s instances to go")


def two_zones() -> list[dict]:
    """Two default subnets in different zones, in zone order."""
    subnets = sandbox.ec2_client().describe_subnets()["Subnets"]
    by_zone = {}
    for subnet in sorted(subnets, key=lambda s: (s["AvailabilityZone"], s["SubnetId"])):
        by_zone.setdefault(subnet["AvailabilityZone"], subnet)
    return list(by_zone.values())[:2]


def test_a_notice_vacates_the_job_which_completes_on_a_replacement_elsewhere() -> None:
    """A spot instance running a job gets EC2's interruption notice:
    - within seconds the job is idle again in the schedd (vacated: the agent's file, the
      startd's cron job, START false, PREEMPT true);
    - the helper, reading AnnexInterruption in the startd ad, launches a replacement in the
      other subnet's zone (the interrupted pool is avoided) and ends the interrupted instance
      once its job has left; the job runs again there to completion (its log shows the
      eviction and then the end);
    - the Annex ad and `htcondor-annex status` count one interruption and one replacement and
      name the avoided pool."""
    name = unique("spot")
    zone_a, zone_b = two_zones()
    workdir = sandbox.user_tmpdir(ALICE, "annex-spot-")
    clusters: list[int] = []
    try:
        cluster = sandbox.condor_submit_as(
            ALICE,
            "\n".join(
                [
                    "executable = /bin/sleep",
                    "arguments = 20",
                    "log = job.log",
                    f"annex_name = {name}",
                    f"annex_instance_types = {TYPE}",
                    "annex_spot_prices = 0.10",
                    f"annex_subnets = {zone_a['SubnetId']},{zone_b['SubnetId']}",
                    "queue",
                    "",
                ]
            ),
            cwd=str(workdir),
        )
        clusters.append(cluster)
        wait(lambda: job_status(cluster) == RUNNING, 120, "the job to run on the first instance")
        (first,) = instances(name)
        assert first.get("InstanceLifecycle") == "spot"
        other = zone_b if first["SubnetId"] == zone_a["SubnetId"] else zone_a

        noticed = time.time()
        sandbox.interrupt(first["InstanceId"])
        sandbox.wait_for(
            lambda: job_status(cluster) == IDLE,
            timeout=30,
            interval=0.5,
            what="the job to be vacated (idle)",
            on_timeout=lambda: instance_logs(first["InstanceId"]),
        )
        vacated = time.time() - noticed

        def replacement():
            found = [i for i in instances(name) if i["InstanceId"] != first["InstanceId"]]
            return found[0] if found else None

        second = wait(replacement, 30, "a replacement instance")
        replaced = time.time() - noticed
        assert second["SubnetId"] == other["SubnetId"]  # the interrupted zone avoided
        # Its jobs gone, the helper ends the interrupted instance (EC2 would, two minutes
        # after the notice).
        wait(
            lambda: first["InstanceId"] not in {i["InstanceId"] for i in instances(name)},
            15,
            "the interrupted instance to be ended",
        )
        zone = first["Placement"]["AvailabilityZone"]
        avoided = f"{TYPE}/{zone}/spot"  # for the sandbox's 20 s TTL
        ad = wait(
            lambda: (a := annex_ad(name)) and avoided in list(a.get("AvoidedOfferings", [])) and a,
            10,
            "the Annex ad to name the interrupted pool",
        )
        assert (ad["Interruptions"], ad["Replacements"]) == (1, 1)
        wait(lambda: job_status(cluster) in (DONE, None), 120, "the job to complete")
        log = (workdir / "job.log").read_text()
        assert "Job was evicted" in log and "Job terminated" in log, log
        assert log.count("Job executing on host") == 2, log
        ad = annex_ad(name)
        assert (ad["Interruptions"], ad["Replacements"]) == (1, 1)
        shown = annex_cli("status", "--name", name).stdout
        assert "interruptions 1, replacements 1" in shown, shown
        print(f"notice -> job idle {vacated:.1f} s; notice -> replacement seen {replaced:.1f} s")
        assert vacated < 20
    finally:
        cleanup(name, clusters)


def test_a_capacity_error_moves_the_next_launch_to_another_type_until_the_ttl() -> None:
    """CreateFleet answers InsufficientInstanceCapacity for c6a.large: the annex gets
    c6i.large, and its next launch (a grow) asks for c6i.large only while the pool is avoided
    (the Annex ad names it); after the TTL a grow gets c6a.large again."""
    name = unique("cap")
    types = ("c6a.large", "c6i.large")
    FAULTS.write_text(f"{types[0]} InsufficientInstanceCapacity\n")
    try:
        annex_cli(
            "create",
            "--name",
            name,
            "--instances",
            "1",
            "--instance-types",
            ",".join(types),
            "--idle-timeout",
            "5m",
        )
        wait(lambda: len(instances(name)) == 1, 30, "the first instance")
        assert [i["InstanceType"] for i in instances(name)] == [types[1]]
        avoided = f"{types[0]}/{sandbox.region()}/on-demand"
        ad = wait(
            lambda: (a := annex_ad(name)) and avoided in list(a.get("AvoidedOfferings", [])) and a,
            20,
            "the Annex ad to name the avoided pool",
        )
        assert "InsufficientInstanceCapacity" in ad["LastError"]
        FAULTS.unlink()  # capacity is back; the helper does not know until the TTL ends

        annex_cli("extend", "--name", name, "--instances", "2")
        wait(lambda: len(instances(name)) == 2, 30, "the second instance")
        assert sorted(i["InstanceType"] for i in instances(name)) == [types[1]] * 2

        wait(
            lambda: avoided not in list(annex_ad(name).get("AvoidedOfferings", [])),
            TTL + 10,
            "the mark to expire",
        )
        annex_cli("extend", "--name", name, "--instances", "3")
        wait(lambda: len(instances(name)) == 3, 30, "the third instance")
        assert sorted(i["InstanceType"] for i in instances(name)) == [types[0], types[1], types[1]]
    finally:
        FAULTS.unlink(missing_ok=True)
        cleanup(name, [])
