"""Jobs that leave the queue before their translate hook runs (docs/router.md, "Jobs that
leave before their hook runs"), with the real condor_job_router, schedd, hook and helper.

HTCondor 23.9's router runs the translate hook for every job it has picked up, removed or not,
and then edits the job in place. Here the route's hook is a wrapper that keeps the job's ad,
waits 8 s (as a hook does behind a thousand others) and then runs the real hook, so the test
can condor_rm the job in between. The helper must then create nothing, its answer must make
the hook exit non-zero (so the router edits nothing), and the schedd must not have been asked
to edit a job that is not there - in 23.9 that failure also fails the schedd's next commit,
someone's condor_submit ("Modifying attribute ... in nonexistent job").
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sandbox
from test_lifecycle import (
    ALICE,
    CYCLE,
    ROUTE,
    annex_ad,
    annex_instances,
    htcondor_annex,
    job_ad_text,
    router_reconfigured,
    run_hook,
    state_counts,
    status,
    submit,
    unique,
    wait,
)

pytestmark = pytest.mark.sandbox

ROUTER_LOG = Path("/var/log/condor/JobRouterLog")
SCHEDD_LOG = Path("/var/log/condor/SchedLog")
CONFIG = Path("/etc/condor/config.d/95-router-gone-test.conf")
HOOK_DIR = Path("/usr/local/libexec/annex-test-slow-hook")  # root's, not world-writable
MARKS = Path("/tmp/annex-test-slow-hook")  # where the wrapper (run as the owner) writes
DELAY = 8


def never_runs() -> tuple[str, ...]:
    return ("requirements = false", "annex_idle_timeout = 10m")


def log_size(path: Path) -> int:
    return path.stat().st_size


def log_since(path: Path, offset: int) -> str:
    with path.open(errors="replace") as handle:
        handle.seek(offset)
        return handle.read()


@pytest.fixture
def slow_hook() -> Iterator[None]:
    """ANNEX_HOOK_TRANSLATE_JOB = a wrapper: it saves its stdin as MARKS/in.<pid>, sleeps
    DELAY s, runs the real hook on it and writes the exit status to MARKS/rc.<pid>."""
    real = subprocess.run(
        ["condor_config_val", "ANNEX_HOOK_TRANSLATE_JOB"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert real.endswith("annex_hook_translate"), real
    shutil.rmtree(MARKS, ignore_errors=True)
    MARKS.mkdir(mode=0o1777)
    MARKS.chmod(0o1777)
    HOOK_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    wrapper = HOOK_DIR / "translate"
    wrapper.write_text(
        "#!/bin/sh\n"
        "# tests/e2e/test_router_gone.py: the real translate hook, late.\n"
        f'cat > {MARKS}/in.$$\nsleep {DELAY}\n{real} < {MARKS}/in.$$\nrc=$?\n'
        f"echo $rc > {MARKS}/rc.$$\nexit $rc\n"
    )
    wrapper.chmod(0o755)
    CONFIG.write_text(
        f"# {__file__} (removed after the test)\nANNEX_HOOK_TRANSLATE_JOB = {wrapper}\n"
    )
    router_reconfigured()
    try:
        yield
    finally:
        CONFIG.unlink(missing_ok=True)
        router_reconfigured()


def hook_started(cluster: int) -> str:
    """The wrapper's pid once it holds job `cluster`.0's ad, else ''."""
    for saved in MARKS.glob("in.*"):
        if re.search(rf"^ClusterId = {cluster}$", saved.read_text(errors="replace"), re.M):
            return saved.name.split(".", 1)[1]
    return ""


def hook_exit(pid: str) -> int | None:
    rc = MARKS / f"rc.{pid}"
    return int(rc.read_text()) if rc.exists() and rc.read_text().strip() else None


def remove_while_the_hook_waits(cluster: int) -> int:
    """condor_rm the job once its hook holds the ad; the hook's exit status when it is done."""
    pid = wait(lambda: hook_started(cluster), 60, f"the translate hook for {cluster}.0")
    sandbox.run_as(ALICE, "condor_rm", str(cluster))
    rc = wait(lambda: hook_exit(pid) is not None and (hook_exit(pid),), DELAY + 30, "the hook")
    return rc[0]


# Serial (slow_hook): every routed job of the pool gets the slow hook.
@pytest.mark.serial
def test_a_job_removed_before_its_hook_runs_gets_no_annex(slow_hook) -> None:
    """No annex, no cloud call, no record for it; the hook exits non-zero with the helper's
    reason; no edit of the removed job reached the schedd. The control, a job left in the
    queue, gets its annex through the same late hook."""
    name, control = unique("gone"), unique("kept")
    records, intents = state_counts()
    router, schedd = log_size(ROUTER_LOG), log_size(SCHEDD_LOG)
    cluster = submit(ALICE, name, extra=never_runs())
    kept = None
    try:
        assert remove_while_the_hook_waits(cluster) != 0
        text = log_since(ROUTER_LOG, router)
        said = re.search(rf"to stderr: annex_hook_translate: (job {cluster}\.0 [^\n]*)", text)
        assert said, text[-3000:]
        assert re.search(r"was removed|no longer in the queue|no longer idle or running", said[1])
        time.sleep(2 * CYCLE)
        assert state_counts() == (records, intents)  # no annex record, no cloud-call intent
        assert status(ALICE, name) is None and annex_ad(ALICE, name) is None
        assert annex_instances(ALICE, name, states=()) == []
        assert f"nonexistent job {cluster}.0" not in log_since(SCHEDD_LOG, schedd)

        kept = submit(ALICE, control, extra=never_runs())  # condor_submit still commits
        pid = wait(lambda: hook_started(kept), 60, f"the translate hook for {kept}.0")
        wait(lambda: hook_exit(pid) == 0, DELAY + 30, "the control's hook to succeed")
        view = wait(lambda: status(ALICE, control), 30, "the control's annex")
        assert view["Owner"] == ALICE
    finally:
        for job in (cluster, kept):
            if job is not None:
                sandbox.run_as(ALICE, "condor_rm", str(job), check=False)
        htcondor_annex(ALICE, "delete", "--name", control, check=False)
        wait(lambda: not annex_instances(ALICE, control), 60, "the control's instances to go")


@pytest.mark.serial
def test_a_job_removed_before_its_hook_runs_does_not_grow_a_live_annex(slow_hook) -> None:
    """The annex exists (the merge path asks the schedd nothing): the removed job's hook is
    refused from the helper's last demand query, the annex keeps its size, and the removed
    job is not edited."""
    name = unique("live")
    htcondor_annex(ALICE, "create", "--name", name, "--instances", "1", "--lease", "15m")
    schedd = log_size(SCHEDD_LOG)
    cluster = submit(ALICE, name, instances=3, extra=never_runs())
    try:
        assert remove_while_the_hook_waits(cluster) != 0
        view = json.loads(htcondor_annex(ALICE, "status", "--name", name, "--json").stdout)
        assert view["RequestedInstances"] == 1
        assert f"nonexistent job {cluster}.0" not in log_since(SCHEDD_LOG, schedd)
    finally:
        sandbox.run_as(ALICE, "condor_rm", str(cluster), check=False)
        htcondor_annex(ALICE, "delete", "--name", name, check=False)
        wait(lambda: not annex_instances(ALICE, name), 60, f"annex {name}'s instances to go")


def test_the_create_path_asks_the_schedd_about_the_job() -> None:
    """The translate hook by hand, as alice, for a real job the route leaves alone (it looks
    routed already). Its ad claims the job became idle after the helper's last look, so only
    the schedd query on the create path can tell: once the job is removed, nothing is
    created; while it waits, its annex is."""
    name = unique("ask")
    cluster = submit(ALICE, name, extra=(*never_runs(), f'+AnnexRoutedName = "{name}"'))
    records, intents = state_counts()
    later = str(int(time.time()) + 3600)
    text = f"{ROUTE}\n------\n" + job_ad_text(
        name, ClusterId=str(cluster), EnteredCurrentStatus=later, QDate=later
    )
    try:
        sandbox.run_as(ALICE, "condor_rm", str(cluster))
        res = run_hook(text)
        assert res.returncode != 0 and res.stdout == ""
        assert re.fullmatch(
            rf"annex_hook_translate: job {cluster}\.0 (was removed|is no longer in the queue): "
            r"no annex is created for it\n",
            res.stderr,
        ), res.stderr
        assert state_counts() == (records, intents)

        waiting = submit(ALICE, name, extra=(*never_runs(), f'+AnnexRoutedName = "{name}"'))
        res = run_hook(text.replace(f"ClusterId = {cluster}\n", f"ClusterId = {waiting}\n"))
        try:
            assert res.returncode == 0, res.stderr
            assert status(ALICE, name)["AnnexName"] == name
        finally:
            sandbox.run_as(ALICE, "condor_rm", str(waiting), check=False)
    finally:
        htcondor_annex(ALICE, "delete", "--name", name, check=False)
        wait(lambda: not annex_instances(ALICE, name), 60, f"annex {name}'s instances to go")
