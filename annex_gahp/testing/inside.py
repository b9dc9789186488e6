"""Helpers for tests that run inside the sandbox's root (the project's own tests: `scripts/test`,
or `scripts/sandbox run -- python -m pytest ...`), where the pool's files, processes and
bindings are at hand. tests/sandbox.py re-exports them as `sandbox`.

Everything here reads the running sandbox's facts from /etc/annex-sandbox.env (written by
`scripts/sandbox up`): ports, the emulator's endpoint, the default image id. Commands in the pool
from a test go through annex_gahp.testing.pool.Sandbox.run (the `annex_pool` fixture), which
uses run_as below when inside.
"""

from __future__ import annotations

import functools
import json
import os
import pwd
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from annex_gahp.testing.pool import INSIDE_ENV, parse_env
from annex_gahp.testing.waiting import wait_for

ENV_FILE = INSIDE_ENV
INSTANCES_DIR = Path("/srv/instances")
BOOTER_LOG = Path("/var/log/annex-booter.log")


class NotInSandbox(RuntimeError):
    """Raised when a test needs the running sandbox and is not inside one."""


@functools.cache
def env() -> dict[str, str]:
    """The sandbox's KEY=value facts (ports, endpoint, ...)."""
    if not ENV_FILE.exists():
        raise NotInSandbox(
            f"{ENV_FILE} is missing: not inside a sandbox. Run the tests with scripts/test, or "
            "scripts/sandbox up && scripts/sandbox run -- python -m pytest -p no:cacheprovider "
            "/src/tests"
        )
    return parse_env(ENV_FILE.read_text())


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def check_running() -> dict[str, str]:
    """Raise NotInSandbox unless the sandbox's pool and emulator answer."""
    facts = env()
    for what, key in (("collector", "ANNEX_COLLECTOR_PORT"), ("AWS emulator", "ANNEX_MOTO_PORT")):
        if not _port_open(int(facts[key])):
            raise NotInSandbox(f"the sandbox's {what} on port {facts[key]} does not answer")
    return facts


def collector_host() -> str:
    return env()["ANNEX_COLLECTOR_HOST"]


def endpoint_url() -> str:
    return env()["ANNEX_AWS_ENDPOINT_URL"]


def region() -> str:
    return env().get("ANNEX_AWS_REGION", "us-east-1")


def default_image_id() -> str:
    return env()["ANNEX_DEFAULT_IMAGE_ID"]


# --- running things ---------------------------------------------------------------------------

def run_as(
    user: str,
    *cmd: str,
    input: str | None = None,
    check: bool = True,
    timeout: float = 120,
    cwd: str | None = None,
    env_extra: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run cmd as `user` (via runuser when that is not us), cwd = that user's home unless
    given. Returns the CompletedProcess (text); raises CalledProcessError if check and it
    fails, with its output in the message."""
    pw = pwd.getpwnam(user)
    environment = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "HOME": pw.pw_dir,
        "USER": user,
        "LOGNAME": user,
    }
    environment.update(env_extra or {})
    argv = list(cmd)
    if os.geteuid() != pw.pw_uid:
        argv = ["runuser", "-u", user, "--", "env", *[f"{k}={v}" for k, v in
                                                     environment.items()], *argv]
    res = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout,
                         cwd=cwd or pw.pw_dir, env=environment, check=False)
    if check and res.returncode != 0:
        raise subprocess.CalledProcessError(
            res.returncode, cmd,
            output=f"{res.stdout}\n--- stderr ---\n{res.stderr}", stderr=res.stderr)
    return res


def condor_submit_as(user: str, text: str, cwd: str | None = None) -> int:
    """Submit the submit-description `text` as `user`; return the cluster id."""
    res = run_as(user, "condor_submit", "-terse", "-", input=text, cwd=cwd)
    m = re.match(r"\s*(\d+)\.\d+", res.stdout)
    if not m:
        raise AssertionError(f"condor_submit said: {res.stdout!r} {res.stderr!r}")
    return int(m.group(1))


def user_tmpdir(user: str, prefix: str = "annex-test-") -> Path:
    """A fresh directory owned by `user` under its home."""
    return Path(run_as(user, "mktemp", "-d", "-p", pwd.getpwnam(user).pw_dir,
                       prefix + "XXXXXX").stdout.strip())


# --- HTCondor --------------------------------------------------------------------------------

def collector():
    import htcondor2  # noqa: PLC0415 - only where the pool is

    return htcondor2.Collector(collector_host())


def schedd():
    import htcondor2  # noqa: PLC0415 - only where the pool is

    return htcondor2.Schedd()


def query_ads(ad_type: str, constraint: str = "true", projection: list[str] | None = None
              ) -> list[Any]:
    """Collector query; ad_type is an htcondor2.AdType name: "Startd", "Schedd", "Any"..."""
    import htcondor2  # noqa: PLC0415 - only where the pool is

    return collector().query(getattr(htcondor2.AdType, ad_type), constraint, projection or [])


def job_ad(cluster: int, proc: int = 0) -> Any | None:
    """The job's ad from the queue, else from the history; None if neither has it."""
    constraint = f"ClusterId == {cluster} && ProcId == {proc}"
    ads = schedd().query(constraint)
    if ads:
        return ads[0]
    ads = list(schedd().history(constraint, [], match=1))
    return ads[0] if ads else None


def wait_for_job(cluster: int, timeout: float = 120, proc: int = 0) -> Any:
    """Wait until the job completed (JobStatus 4) and return its ad; fail early on hold/removal."""
    def done():
        ad = job_ad(cluster, proc)
        if ad is None:
            return None
        status = ad.get("JobStatus")
        if status in (3, 5):
            raise AssertionError(
                f"job {cluster}.{proc} is {'removed' if status == 3 else 'held'}: "
                f"{ad.get('HoldReason', '')}")
        # The queue says 4 a moment before the schedd has written the end of the run
        # (LastRemoteHost, ...) and moved the job to the history: wait for that final ad.
        return ad if status == 4 and "LastRemoteHost" in ad else None

    def tail():
        ad = job_ad(cluster, proc)
        return f"job ad: {dict(ad) if ad is not None else None}"

    return wait_for(done, timeout=timeout, what=f"job {cluster}.{proc} to complete",
                    on_timeout=tail)


def pool_token(identity: str | None = None, lifetime: int = 3600) -> str:
    """An IDTOKEN minted on the pool (default identity condor@<UID_DOMAIN>)."""
    if identity is None:
        uid_domain = subprocess.run(["condor_config_val", "UID_DOMAIN"], capture_output=True,
                                    text=True, check=True).stdout.strip()
        identity = f"condor@{uid_domain}"
    res = subprocess.run(["condor_token_create", "-identity", identity, "-lifetime",
                          str(lifetime)], capture_output=True, text=True, check=True)
    return res.stdout.strip()


# --- the AWS emulator and the emulated instances -----------------------------------------

def aws_client(service: str):
    import boto3  # noqa: PLC0415

    return boto3.client(service, endpoint_url=endpoint_url(), region_name=region())


def ec2_client():
    return aws_client("ec2")


def instance_state(instance_id: str) -> str | None:
    res = ec2_client().describe_instances(InstanceIds=[instance_id])
    for r in res["Reservations"]:
        for i in r["Instances"]:
            return i["State"]["Name"]
    return None


def instances(filters: list[dict] | None = None, states: tuple[str, ...] = ("pending", "running")
              ) -> list[dict]:
    """EC2 instances (paginated), e.g. filters=[{"Name": "tag:htcondor-annex:name",
    "Values": ["a1"]}]; only those in `states` (empty tuple: all)."""
    found = []
    for page in ec2_client().get_paginator("describe_instances").paginate(
            Filters=filters or []):
        for r in page["Reservations"]:
            found += [i for i in r["Instances"] if not states or i["State"]["Name"] in states]
    return found


def instance_dir(instance_id: str) -> Path:
    """Where the booter keeps an instance: merged/ (its root), console.log, imds-url."""
    return INSTANCES_DIR / instance_id


def instance_root(instance_id: str) -> Path:
    return instance_dir(instance_id) / "merged"


def console_log(instance_id: str) -> str:
    for p in (instance_dir(instance_id) / "console.log",
              Path("/var/log/annex-instances") / f"{instance_id}.console.log"):
        if p.exists():
            return p.read_text(errors="replace")
    return ""


def interrupt(instance_id: str, action: str = "terminate", in_seconds: int = 120) -> str:
    """Serve a spot interruption notice at the instance's IMDS (the booter's test control), as
    EC2 does two minutes before it reclaims a spot instance; returns the notice's JSON."""
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + in_seconds))
    notice = json.dumps({"action": action, "time": when})
    target = instance_dir(instance_id) / "spot-instance-action"
    temp = target.with_suffix(".tmp")
    temp.write_text(notice)
    temp.replace(target)
    return notice


def imds_url(instance_id: str) -> str:
    """The instance's metadata server base URL (once the booter has booted it)."""
    return (instance_dir(instance_id) / "imds-url").read_text().strip()


def imds_get(instance_id: str, path: str, token: str | None = None) -> tuple[int, str]:
    """GET <imds>/latest/<path> with an IMDSv2 token (fetched if None, none if "")."""
    base = imds_url(instance_id)
    if token is None:
        req = urllib.request.Request(  # noqa: S310 - our own http URL
            f"{base}/latest/api/token", method="PUT",
            headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
        with urllib.request.urlopen(req, timeout=5) as r:  # noqa: S310
            token = r.read().decode()
    headers = {"X-aws-ec2-metadata-token": token} if token else {}
    req = urllib.request.Request(f"{base}/latest/{path}", headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=5) as r:  # noqa: S310
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def processes_in_root(root: Path) -> list[int]:
    """PIDs whose root directory is `root` or below (e.g. an instance's processes)."""
    root_s = str(root)
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            r = os.readlink(f"/proc/{entry}/root")
        except OSError:
            continue
        if r == root_s or r.startswith(root_s + "/"):
            pids.append(int(entry))
    return pids


def booter_log_tail(lines: int = 30) -> str:
    if not BOOTER_LOG.exists():
        return "(no booter log)"
    return "\n".join(BOOTER_LOG.read_text(errors="replace").splitlines()[-lines:])


def file_tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return f"(no {path})"
    return f"{path} tail:\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


ROUTER_LOG = Path("/var/log/condor/JobRouterLog")
HELPER_LOG = Path("/var/log/condor/AnnexGahpLog")


def line_logs() -> str:
    """The tails of the logs a job's trip through the line leaves: router, helper, booter
    (for an assertion's message)."""
    return "\n".join([file_tail(ROUTER_LOG), file_tail(HELPER_LOG), booter_log_tail()])
