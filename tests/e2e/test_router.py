"""The job router route `Annex` with the real condor_job_router, hook and helper (sandbox).

A job that names an annex is edited in place by the route (docs/router.md): the translate
hook, run as the job's owner, asks the helper (JOB_ROUTED) and the helper's attributes land in
the job ad; the route marks the job (AnnexRoutedName) so it is not routed again; no routed
copy appears. The CLI then sees the annex the job asked for, and deletes it.
"""

from __future__ import annotations

import json
import os
import re
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

USER = "alice"
ROUTER_LOG = Path("/var/log/condor/JobRouterLog")


def htcondor_annex(*args: str, check: bool = True):
    return sandbox.run_as(USER, "htcondor-annex", *args, check=check)


def queue(constraint: str) -> list:
    return list(sandbox.schedd().query(constraint))


def test_job_naming_an_annex_is_routed_in_place_with_the_helpers_attributes() -> None:
    name = f"rt-{uuid.uuid4().hex[:8]}"
    workdir = sandbox.user_tmpdir(USER, "annex-router-")
    cluster = sandbox.condor_submit_as(
        USER,
        "\n".join(
            [
                "executable = /bin/true",
                f"annex_name = {name}",
                "annex_instances = 1",
                "annex_lease = 20m",
                "log = job.log",
                "queue",
                "",
            ]
        ),
        cwd=str(workdir),
    )
    try:

        def routed():
            ads = queue(f"ClusterId == {cluster}")
            if ads and ads[0].get("AnnexRoutedName") == name and "AnnexState" in ads[0]:
                return ads[0]
            return None

        def router_tail() -> str:
            lines = ROUTER_LOG.read_text(errors="replace").splitlines()
            return "JobRouterLog tail:\n" + "\n".join(lines[-30:])

        ad = sandbox.wait_for(
            routed, timeout=90, what=f"job {cluster}.0 to be routed", on_timeout=router_tail
        )
        # The helper's answer, through the hook's stdout, is in the job's own ad.
        assert ad["TargetAnnexName"] == name
        assert ad["AnnexState"] in names.STATES
        assert int(ad["AnnexRequestedInstances"]) == 1
        assert ad[names.SOCKET_ATTR].endswith(".sock")
        # Edited in place: the job kept its id, its owner and its command; there is no copy.
        assert ad["Owner"] == USER
        assert ad["Cmd"] == "/bin/true"
        assert ad.get("RoutedBy") is None
        assert queue(f'RoutedFromJobId == "{cluster}.0"') == []
        text = ROUTER_LOG.read_text(errors="replace")
        assert re.search(rf"src={cluster}\.0,route=Annex\): Done editing job", text)

        # Not routed again while it waits (the route's own mark, AnnexRoutedName).
        edits = len(re.findall(rf"src={cluster}\.0,route=Annex\): Done editing job", text))
        time.sleep(20)  # four polling periods (JOB_ROUTER_POLLING_PERIOD = 5 in the sandbox)
        text = ROUTER_LOG.read_text(errors="replace")
        assert len(re.findall(rf"src={cluster}\.0,route=Annex\): Done editing job", text)) == edits

        # The annex the job asked for is the owner's, and the CLI sees it.
        out = htcondor_annex("status", "--name", name, "--json").stdout
        view = json.loads(out)
        assert view["AnnexName"] == name
        assert view["Owner"] == USER
        table = htcondor_annex("status").stdout
        assert name in table
    finally:
        sandbox.run_as(USER, "condor_rm", str(cluster), check=False)
        htcondor_annex("delete", "--name", name, check=False)


# -- the command line against the real helper (the CLI's only e2e home) ----------------------


def test_cli_submit_runs_condor_submit_with_the_annex_keywords() -> None:
    name = f"cs-{uuid.uuid4().hex[:8]}"
    workdir = sandbox.user_tmpdir(USER, "annex-cli-")
    sandbox.run_as(USER, "sh", "-c", "printf 'executable = /bin/true\\nqueue\\n' > job.sub",
                   cwd=str(workdir))  # fmt: skip
    # Held (a condor_submit argument after the file): the router and helper leave it alone.
    res = sandbox.run_as(
        USER, "htcondor-annex", "submit", "--annex-name", name, "--instances", "3",
        "--lease", "2h", "job.sub", "-terse", "-append", "hold = true", cwd=str(workdir),
    )  # fmt: skip
    cluster = int(res.stdout.strip().split(".")[0])
    try:
        [ad] = queue(f"ClusterId == {cluster}")
        assert ad["TargetAnnexName"] == name
        assert ad["AnnexInstances"] == 3
        assert ad["AnnexLease"] == 7200
        assert ad["JobStatus"] == 5
    finally:
        sandbox.run_as(USER, "condor_rm", str(cluster), check=False)


def test_cli_create_status_extend_delete() -> None:
    name = f"cl-{uuid.uuid4().hex[:8]}"
    try:
        out = htcondor_annex("create", "--name", name, "--instances", "1", "--lease", "15m").stdout
        assert out.startswith(f"annex {name} (owner {USER}): ")
        view = json.loads(htcondor_annex("status", "--name", name, "--json").stdout)
        assert (view["AnnexName"], view["Owner"], view["RequestedInstances"]) == (name, USER, 1)
        out = htcondor_annex("extend", "--name", name, "--lease", "30m").stdout
        assert out.startswith(f"annex {name}: ")
        view = json.loads(htcondor_annex("status", "--name", name, "--json").stdout)
        assert view["LeaseExpiration"] - time.time() > 25 * 60
        # Another user cannot touch it: the helper knows who asks (SO_PEERCRED).
        res = sandbox.run_as("bob", "htcondor-annex", "delete", "--name", name, check=False)
        assert res.returncode == 1
        assert res.stderr.startswith("htcondor-annex: ")
        assert len(res.stderr.splitlines()) == 1
        out = htcondor_annex("delete", "--name", name).stdout
        assert out.split(": ", 1)[1].strip() in ("retiring", "retired")
    finally:
        htcondor_annex("delete", "--name", name, check=False)
