"""Several schedds on one access point (issue 18, item 4): docs/admin.md's config block for a
second schedd with its own job router, and ANNEX_SCHEDDS listing both, applied as it stands
to the sandbox's pool, with the real schedds, routers, hooks and helper.

The second schedd is made to start its cluster ids where the default schedd's next job is, and
bob's job takes that id in the default schedd first: alice's job in the second schedd then has
the same id as bob's. Her job gets its annex and runs on it; its AnnexState, and the hold that
`htcondor-annex delete` puts on a job still waiting, land in the second schedd; bob's job of
the same id in the default schedd is never touched.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import htcondor2
import pytest
import sandbox
from test_lifecycle import ALICE, BOB, HELD, cleanup, htcondor_annex, startds, unique, wait

# Serial: it adds a schedd and a job router to the pool and lists both schedds for the helper.
pytestmark = [pytest.mark.sandbox, pytest.mark.serial]

CONFIG = Path("/etc/condor/config.d/95-several-schedds-test.conf")
DOC = Path(os.environ.get("ANNEX_SRC", "/src")) / "docs" / "admin.md"
SECTION = "## Several schedds on one access point"
SPOOL = Path("/var/spool/condor/schedd2")
ROUTER_LOG = Path("/var/log/condor/JobRouterLog.schedd2")


def config_val(knob: str) -> str:
    res = subprocess.run(["condor_config_val", knob], capture_output=True, text=True, check=True)
    return res.stdout.strip()


def documented_config() -> str:
    """The config block of docs/admin.md's section on several schedds, as it stands."""
    text = DOC.read_text()
    section = text[text.index(SECTION) :]
    found = re.search(r"^```\n(.*?)^```$", section, re.S | re.M)
    assert found, f"no config block under {SECTION!r} in {DOC}"
    return found[1]


def schedd_names() -> set[str]:
    return {str(ad.get("Name")) for ad in sandbox.query_ads("Schedd", "true", ["Name"])}


@pytest.fixture
def second_schedd() -> Iterator[tuple[str, int]]:
    """The second schedd, its job router and ANNEX_SCHEDDS; bob's job N.0 in the default
    schedd, where the second schedd's ids start: (the second schedd's name, N)."""
    host = config_val("FULL_HOSTNAME")
    name = f"schedd2@{host}"
    workdir = str(sandbox.user_tmpdir(BOB, "annex-schedds-"))
    # bob's job: idle for good on the default schedd, naming no annex.
    bobs = sandbox.condor_submit_as(
        BOB, "executable = /bin/true\nrequirements = false\nqueue\n", cwd=workdir
    )
    shutil.rmtree(SPOOL, ignore_errors=True)
    ROUTER_LOG.unlink(missing_ok=True)  # (a previous run's says the router is up)
    SPOOL.mkdir(parents=True)
    shutil.chown(SPOOL, "condor", "condor")
    # The documented block, plus where the second schedd's job ids start (bob's id).
    CONFIG.write_text(
        f"# {__file__} (removed after the test)\n{documented_config()}"
        f"SCHEDD2.SCHEDD_CLUSTER_INITIAL_VALUE = {bobs}\n"
    )
    subprocess.run(["condor_reconfig"], check=True, capture_output=True)
    try:
        sandbox.wait_for(lambda: name in schedd_names(), timeout=40, what=f"{name} advertised")
        sandbox.wait_for(
            lambda: ROUTER_LOG.exists() and "Checking for candidate jobs" in ROUTER_LOG.read_text(),
            timeout=30,
            what="the second job router",
        )
        yield name, bobs
    finally:
        subprocess.run(["condor_rm", "-name", name, "-all"], check=False, capture_output=True)
        sandbox.run_as(BOB, "condor_rm", str(bobs), check=False)
        CONFIG.unlink(missing_ok=True)
        subprocess.run(["condor_reconfig"], check=True, capture_output=True)
        # A schedd that shuts down takes its ad out of the collector.
        sandbox.wait_for(lambda: name not in schedd_names(), timeout=30, what=f"{name} gone")
        time.sleep(1)
        shutil.rmtree(SPOOL, ignore_errors=True)


def named(schedd: str):
    return htcondor2.Schedd(htcondor2.Collector().locate(htcondor2.DaemonType.Schedd, schedd))


def job_in(schedd: str | None, cluster: int, proc: int = 0):
    target = named(schedd) if schedd else sandbox.schedd()
    ads = list(target.query(f"ClusterId == {cluster} && ProcId == {proc}"))
    return ads[0] if ads else None


def history_in(schedd: str, cluster: int):
    found = list(named(schedd).history(f"ClusterId == {cluster}", [], match=1))
    return found[0] if found else None


def submit_to(schedd: str, name: str, seconds: int, jobs: int = 1, extra: str = "") -> int:
    workdir = str(sandbox.user_tmpdir(ALICE, "annex-schedds-"))
    text = (
        f"executable = /bin/sleep\narguments = {seconds}\nannex_name = {name}\n"
        f"annex_lease = 10m\n{extra}queue {jobs}\n"
    )
    res = sandbox.run_as(
        ALICE, "condor_submit", "-name", schedd, "-terse", "-", input=text, cwd=workdir
    )
    found = re.match(r"\s*(\d+)\.\d+", res.stdout)
    assert found, res.stdout + res.stderr
    return int(found[1])


def router_tail() -> str:
    text = ROUTER_LOG.read_text(errors="replace") if ROUTER_LOG.exists() else ""
    return "JobRouterLog of the second router:\n" + "\n".join(text.splitlines()[-20:])


def test_a_job_of_the_second_schedd_gets_its_annex_and_its_status_there(second_schedd) -> None:
    schedd2, bobs = second_schedd
    name = unique("schedds")
    cluster = submit_to(schedd2, name, seconds=1)
    assert cluster == bobs  # the same id as bob's job in the default schedd
    waiting: int | None = None
    try:
        # Routed by the second schedd's router, checked against the second schedd: AnnexState
        # in alice's job there.
        sandbox.wait_for(
            lambda: (ad := job_in(schedd2, cluster)) is None or "AnnexState" in ad,
            timeout=40,
            what=f"AnnexState in {cluster}.0 of {schedd2}",
            on_timeout=router_tail,
        )
        wait(lambda: len(startds(ALICE, name)) == 1, 60, "the annex's startd")
        done = wait(lambda: history_in(schedd2, cluster), 60, f"{cluster}.0 done in {schedd2}")
        assert done["JobStatus"] == 4 and done["TargetAnnexName"] == name
        assert str(done.get("LastRemoteHost", "")) != ""
        assert "AnnexState" in done  # (as the helper last wrote it while the job waited)

        # A job that waits for the annex in the second schedd: the delete holds it there. It
        # must not match the annex's now free slot: a job the negotiator starts before the
        # router's next poll is never routed (the router takes idle jobs), and this test then
        # failed now and then in CI.
        waiting = submit_to(schedd2, name, seconds=600, extra="requirements = false\n")
        sandbox.wait_for(
            lambda: (ad := job_in(schedd2, waiting)) and ad.get("AnnexRoutedName") == name,
            timeout=30,
            what="the waiting job routed",
            on_timeout=router_tail,
        )
        htcondor_annex(ALICE, "delete", "--name", name)
        held = wait(
            lambda: (ad := job_in(schedd2, waiting)) and ad["JobStatus"] == HELD and ad,
            30,
            "the waiting job held in the second schedd",
        )
        assert f"annex {name} was deleted" in held["HoldReason"]

        # bob's job of the same id, in the default schedd: untouched.
        bob = job_in(None, bobs)
        assert bob is not None and bob["Owner"] == BOB and bob["JobStatus"] == 1
        assert not any(k.startswith("Annex") for k in bob.keys()), dict(bob)
    finally:
        if waiting is not None:
            sandbox.run_as(ALICE, "condor_rm", "-name", schedd2, str(waiting), check=False)
        cleanup(ALICE, name, [])
