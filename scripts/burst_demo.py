"""The burst demo, run inside the sandbox: submit -> annex -> jobs run on it -> annex retired.

`scripts/demo` runs this and prints the timeline; tests/e2e/test_demo.py runs the same stages
and asserts on them, so the demo can never quietly stop being true.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

ENV_FILE = "/etc/annex-sandbox.env"
SRC = os.environ.get("ANNEX_SRC", "/src")


def sandbox_env() -> dict[str, str]:
    values: dict[str, str] = {}
    with open(ENV_FILE) as handle:
        for line in handle:
            key, _, value = line.strip().partition("=")
            if key and not key.startswith("#"):
                values[key] = value
    return values


class Timeline:
    def __init__(self, out: Callable[[str], None]) -> None:
        self.start = time.time()
        self.stages: dict[str, float] = {}
        self.ran_on: dict[int, str] = {}
        self.out = out

    def mark(self, stage: str, detail: str = "") -> None:
        elapsed = time.time() - self.start
        self.stages[stage] = elapsed
        self.out(f"[{elapsed:7.1f} s] {stage}{': ' + detail if detail else ''}")


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 1.0) -> Any:
    deadline = time.time() + timeout
    last_error: Exception | None = None
    while time.time() < deadline:
        try:
            result = check()
        except Exception as err:  # the pool or emulator may still be settling
            last_error = err
            result = None
        if result:
            return result
        time.sleep(every)
    raise TimeoutError(
        f"timed out after {timeout:.0f} s waiting for {what}"
        + (f" (last error: {last_error})" if last_error else "")
    )


def ec2_client(env: dict[str, str]) -> Any:
    import boto3  # noqa: PLC0415

    return boto3.client(
        "ec2", endpoint_url=env["ANNEX_AWS_ENDPOINT_URL"], region_name=env["ANNEX_AWS_REGION"]
    )


def annex_instances(ec2: Any, owner: str, annex: str, states: tuple[str, ...]) -> list[dict]:
    found = []
    filters = [
        {"Name": "tag:htcondor-annex:name", "Values": [annex]},
        {"Name": "tag:htcondor-annex:owner", "Values": [owner]},
        {"Name": "instance-state-name", "Values": list(states)},
    ]
    for page in ec2.get_paginator("describe_instances").paginate(Filters=filters):
        for reservation in page["Reservations"]:
            found.extend(reservation["Instances"])
    return found


def annex_ads(owner: str, annex: str) -> list[Any]:
    import htcondor2  # noqa: PLC0415

    return htcondor2.Collector().query(
        htcondor2.AdTypes.Any,
        constraint=f'MyType == "Annex" && AnnexName == "{annex}" && Owner == "{owner}"',
    )


def annex_startds(annex: str) -> list[Any]:
    import htcondor2  # noqa: PLC0415

    return htcondor2.Collector().query(
        htcondor2.AdTypes.Startd, constraint=f'AnnexName == "{annex}" && IsAnnex == True'
    )


def submit_as(user: str, submit_file: str) -> int:
    home = pwd.getpwnam(user).pw_dir
    workdir = os.path.join(home, f"demo-{int(time.time() * 1000)}")
    os.makedirs(workdir)
    shutil.copy(submit_file, workdir)
    entry = pwd.getpwnam(user)
    for path in (workdir, os.path.join(workdir, os.path.basename(submit_file))):
        os.chown(path, entry.pw_uid, entry.pw_gid)
    result = subprocess.run(
        ["runuser", "-u", user, "--", "condor_submit", os.path.basename(submit_file)],
        cwd=workdir,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"condor_submit failed: {result.stdout}{result.stderr}")
    match = re.search(r"submitted to cluster (\d+)", result.stdout)
    if not match:
        raise RuntimeError(f"no cluster id in condor_submit output: {result.stdout}")
    return int(match.group(1))


def finished_jobs(cluster: int) -> list[Any]:
    """The source jobs of `cluster` that completed, each with the ad of the job that really ran
    (the job itself, or its routed copy)."""
    import htcondor2  # noqa: PLC0415

    schedd = htcondor2.Schedd()
    done = list(
        schedd.history(constraint=f"ClusterId == {cluster} && JobStatus == 4", projection=[])
    )
    ran = list(
        schedd.history(
            constraint=f'regexp("^{cluster}\\\\.", RoutedFromJobId ?: "")',
            projection=[],
        )
    )
    return done + ran


def ran_on(cluster: int, ads: list[Any]) -> dict[int, str]:
    """proc id -> MachineAttrAnnexName0 of the job that ran it (its routed copy, if routed)."""
    result: dict[int, str] = {}
    for ad in ads:
        routed_from = str(ad.get("RoutedFromJobId") or "")
        if routed_from.startswith(f"{cluster}."):
            proc = int(routed_from.split(".")[1])
        elif ad.get("ClusterId") == cluster:
            proc = int(ad["ProcId"])
        else:
            continue
        name = ad.get("MachineAttrAnnexName0")
        if name is not None or proc not in result:
            result[proc] = str(name)
    return result


def run(  # noqa: PLR0917 - keyword defaults describe the demo
    out: Callable[[str], None] = print,
    owner: str = "alice",
    annex: str = "burst",
    instances: int = 2,
    jobs: int = 4,
    timeout: float = 600,
) -> Timeline:
    env = sandbox_env()
    ec2 = ec2_client(env)
    timeline = Timeline(out)
    cluster = submit_as(owner, os.path.join(SRC, "submit-examples", "burst.sub"))
    timeline.mark("submitted", f"cluster {cluster}, {jobs} jobs, as {owner}")

    ad = wait_for("the Annex ad", lambda: annex_ads(owner, annex), timeout)[0]
    timeline.mark(
        "annex ad in the collector",
        f"{ad['Name']} state={ad.get('AnnexState')} requested={ad.get('RequestedInstances')}",
    )

    running = wait_for(
        f"{instances} instances in the emulator",
        lambda: (
            (found := annex_instances(ec2, owner, annex, ("pending", "running")))
            and len(found) >= instances
            and found
        ),
        timeout,
    )
    tags = {t["Key"] for t in running[0].get("Tags", [])}
    timeline.mark(
        "instances launched",
        " ".join(i["InstanceId"] for i in running)
        + f" (tags: {', '.join(sorted(t for t in tags if t.startswith('htcondor-annex:')))})",
    )

    startds = wait_for(
        f"{instances} annex startds",
        lambda: (
            (found := annex_startds(annex))
            and len({s.get("Machine") for s in found}) >= instances
            and found
        ),
        timeout,
    )
    timeline.mark(
        "annex startds joined the pool", ", ".join(sorted({str(s.get("Machine")) for s in startds}))
    )

    def all_done() -> list[Any] | None:
        ads = finished_jobs(cluster)
        done = {a.get("ProcId") for a in ads if a.get("ClusterId") == cluster}
        return ads if len(done) >= jobs else None

    ads = wait_for(f"{jobs} jobs to complete", all_done, timeout, every=2)
    timeline.ran_on = ran_on(cluster, ads)
    where = sorted(set(timeline.ran_on.values()))
    timeline.mark("jobs completed", f"ran on annex slots: {', '.join(where) or 'unknown'}")

    wait_for(
        "the annex to retire",
        lambda: (
            not annex_ads(owner, annex)
            and not annex_instances(ec2, owner, annex, ("pending", "running"))
        ),
        timeout,
        every=2,
    )
    timeline.mark("annex retired", "instances terminated, ad invalidated")
    return timeline


if __name__ == "__main__":
    try:
        line = run()
    except (TimeoutError, RuntimeError) as err:
        print(f"demo failed: {err}", file=sys.stderr)
        sys.exit(1)
    print("\ntimeline (seconds since condor_submit):")
    for stage, at in line.stages.items():
        print(f"  {at:7.1f}  {stage}")
