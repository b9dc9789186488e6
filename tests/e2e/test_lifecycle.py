"""How a job's life drives its annex's life, end to end in the sandbox (issue 6).

Real condor_submit, the real job router with the translate hook, the helper, emulated EC2
instances booted by the sandbox's booter whose startds join the pool and run the jobs. Every
test uses its own annex name, so they do not see each other's annexes; the sandbox's knobs
(ANNEX_RECONCILE_INTERVAL = 3, JOB_ROUTER_POLLING_PERIOD = 5) keep the waits short, and the
idle timeouts and leases are short per job (annex_idle_timeout, annex_lease).

What each test proves is in its docstring; docs/users.md ("What happens to your jobs and your
annex") is the user's side of the same behaviour.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
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

ALICE, BOB = "alice", "bob"
HELPER_LOG = Path("/var/log/condor/AnnexGahpLog")
TEST_CONFIG = Path("/etc/condor/config.d/95-lifecycle-test.conf")
CYCLE = 3  # ANNEX_RECONCILE_INTERVAL in the sandbox
IDLE, RUNNING, HELD = 1, 2, 5
WAIT_ATTRS = (
    "AnnexState",
    "AnnexRequestedInstances",
    "AnnexRunningInstances",
    "AnnexLeaseExpiration",
    "AnnexLastError",
)


# --- helpers ---------------------------------------------------------------------------------


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def submit(
    user: str,
    name: str,
    *,
    instances: int = 1,
    jobs: int = 1,
    seconds: int = 600,
    extra: tuple[str, ...] = (),
) -> int:
    """condor_submit, as `user`, `jobs` jobs of `sleep seconds` naming annex `name`."""
    workdir = sandbox.user_tmpdir(user, "annex-lifecycle-")
    text = "\n".join(
        [
            "executable = /bin/sleep",
            f"arguments = {seconds}",
            "log = job.log",
            "output = job-$(ProcId).out",
            "error = job-$(ProcId).err",
            f"annex_name = {name}",
            f"annex_instances = {instances}",
            *extra,
            f"queue {jobs}",
            "",
        ]
    )
    return sandbox.condor_submit_as(user, text, cwd=str(workdir))


def jobs(cluster: int) -> list:
    return list(sandbox.schedd().query(f"ClusterId == {cluster}"))


def statuses(cluster: int) -> list[int]:
    return sorted(int(ad["JobStatus"]) for ad in jobs(cluster))


def annex_ad(owner: str, name: str):
    ads = sandbox.query_ads(
        "Any", f'MyType == "Annex" && AnnexName == "{name}" && Owner == "{owner}"'
    )
    return ads[0] if ads else None


def annex_instances(owner: str, name: str, states: tuple[str, ...] = ("pending", "running")):
    return sandbox.instances(
        [
            {"Name": f"tag:{names.TAG_NAME}", "Values": [name]},
            {"Name": f"tag:{names.TAG_OWNER}", "Values": [owner]},
        ],
        states=states,
    )


def tag(instance: dict, key: str) -> str:
    return next((t["Value"] for t in instance.get("Tags", []) if t["Key"] == key), "")


def requests(owner: str, name: str) -> dict[str, int]:
    """htcondor-annex:request tag -> instances launched with it (in any state): one tag per
    CreateFleet call the helper made for this annex."""
    found: dict[str, int] = {}
    for instance in annex_instances(owner, name, states=()):
        request = tag(instance, names.TAG_REQUEST)
        found[request] = found.get(request, 0) + 1
    return found


def startds(owner: str, name: str) -> set[str]:
    """Instance ids whose startd is in the pool for this annex."""
    ads = sandbox.query_ads(
        "Startd", f'AnnexName == "{name}" && AnnexOwner == "{owner}"', ["AnnexInstanceId"]
    )
    return {str(ad.get("AnnexInstanceId")) for ad in ads}


def htcondor_annex(user: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return sandbox.run_as(user, "htcondor-annex", *args, check=check)


def status(user: str, name: str) -> dict | None:
    res = htcondor_annex(user, "status", "--name", name, "--json", check=False)
    return json.loads(res.stdout) if res.returncode == 0 else None


def condor_q_af(user: str, cluster: int, *attrs: str) -> list[list[str]]:
    """`condor_q -af:t` as the user, one row of tab-separated values per job."""
    res = sandbox.run_as(
        user, "condor_q", str(cluster), "-constraint", "JobStatus == 1", "-af:t", *attrs
    )
    return [line.split("\t") for line in res.stdout.splitlines() if line.strip()]


def helper_log_tail() -> str:
    lines = HELPER_LOG.read_text(errors="replace").splitlines()
    return "AnnexGahpLog tail:\n" + "\n".join(lines[-30:])


def wait(condition, timeout: float, what: str):
    return sandbox.wait_for(
        condition, timeout=timeout, interval=1, what=what, on_timeout=helper_log_tail
    )


ROUTER_LOG = Path("/var/log/condor/JobRouterLog")


def reconfig_until(log: Path, line: str, what: str) -> None:
    """condor_reconfig, then wait until `log` has `line` after what it held before: the
    daemon's own word that it has read the new config (instead of sleeping and hoping)."""
    offset = log.stat().st_size

    def written() -> bool:
        with log.open(errors="replace") as handle:
            handle.seek(offset)
            return line in handle.read()

    subprocess.run(["condor_reconfig"], check=True, capture_output=True)
    wait(written, 30, what)


def router_reconfigured() -> None:
    """condor_reconfig, then wait until the job router has re-read its routes (it logs their
    order after each reconfig): its next pass uses the new config."""
    reconfig_until(
        ROUTER_LOG, "Routes will be matched in this order", "the job router to re-read its routes"
    )


def cleanup(user: str, name: str, clusters: list[int]) -> None:
    for cluster in clusters:
        sandbox.run_as(user, "condor_rm", str(cluster), check=False)
    htcondor_annex(user, "delete", "--name", name, check=False)
    wait(lambda: not annex_instances(user, name), 60, f"annex {name}'s instances to go")


def gone(owner: str, name: str) -> bool:
    return annex_ad(owner, name) is None and not annex_instances(owner, name)


# --- grow, extend, job status, idle instances, condor_rm -----------------------------------


def test_grow_extend_status_idle_instance_and_rm() -> None:
    """One annex through its life.

    - The waiting jobs' ads carry AnnexState, AnnexRequestedInstances, AnnexRunningInstances,
      AnnexLeaseExpiration and AnnexLastError, as condor_q -af shows them to the owner.
    - A second cluster naming the same annex with annex_instances = 3 grows it with exactly
      one more CreateFleet, for the difference (2), whatever the number of jobs.
    - htcondor-annex extend --lease moves the lease: Annex ad, status and every instance's
      htcondor-annex:expires tag; extend --instances 4 adds one instance with one more call.
    - That extra instance, never claimed, is terminated after the idle timeout and the annex
      asks for one less; the busy instances stay.
    - condor_rm of every job: the annex retires whole after the idle timeout, not before.
    """
    name = unique("life")
    idle_timeout = 25
    common = (f"annex_idle_timeout = {idle_timeout}", "annex_lease = 30m")
    clusters: list[int] = []
    try:
        # 1. Four jobs, one 2-core instance: two run, two wait and say why.
        clusters.append(submit(ALICE, name, instances=1, jobs=4, extra=common))
        wait(lambda: statuses(clusters[0]) == [IDLE, IDLE, RUNNING, RUNNING], 90, "2 jobs running")
        ad = annex_ad(ALICE, name)
        assert ad is not None and ad["RequestedInstances"] == 1
        lease = int(ad["LeaseExpiration"])
        expected = ["running", "1", "1", str(lease), ""]

        def waiting_rows():
            rows = condor_q_af(ALICE, clusters[0], *WAIT_ATTRS)
            return rows if len(rows) == 2 and all(r == expected for r in rows) else None

        wait(waiting_rows, 30, f"the waiting jobs to show {expected}")

        # 2. A second cluster asks for 3 instances: one more create call, for 2 instances.
        clusters.append(submit(ALICE, name, instances=3, jobs=1, extra=common))
        wait(lambda: len(startds(ALICE, name)) == 3, 90, "3 annex startds")
        launched = requests(ALICE, name)
        assert sorted(launched.values()) == [1, 2], launched
        wait(lambda: statuses(clusters[0]) + statuses(clusters[1]) == [2] * 5, 60, "5 running")

        # 3. extend --lease: the ad, the status and every instance's tag move.
        before = time.time()
        out = htcondor_annex(ALICE, "extend", "--name", name, "--lease", "2h").stdout
        assert f"annex {name}: running, 3 instance(s) requested" in out, out
        view = status(ALICE, name)
        new_end = int(view["LeaseExpiration"])
        assert before + 7200 - 5 <= new_end <= time.time() + 7200 + 5
        wait(
            lambda: (
                {tag(i, names.TAG_EXPIRES) for i in annex_instances(ALICE, name)} == {str(new_end)}
            ),
            30,
            "every instance retagged with the new lease end",
        )
        wait(lambda: annex_ad(ALICE, name)["LeaseExpiration"] == new_end, 30, "ad updated")

        # 4. extend --instances 4: one more call; nothing to run there, so after the idle
        # timeout that instance alone is terminated and the annex asks for 3 again.
        out = htcondor_annex(ALICE, "extend", "--name", name, "--instances", "4").stdout
        assert "4 instance(s) requested" in out, out
        busy = startds(ALICE, name)
        wait(lambda: len(startds(ALICE, name)) == 4, 90, "a 4th annex startd")
        assert sorted(requests(ALICE, name).values()) == [1, 1, 2]
        (extra,) = startds(ALICE, name) - busy
        t_up = time.time()
        wait(lambda: sandbox.instance_state(extra) != "running", idle_timeout + 40, "retire")
        assert time.time() - t_up >= idle_timeout - 2 * CYCLE
        assert {i["InstanceId"] for i in annex_instances(ALICE, name)} == busy
        wait(lambda: annex_ad(ALICE, name)["RequestedInstances"] == 3, 30, "requested 3")
        assert "unclaimed for" in HELPER_LOG.read_text(errors="replace")
        assert statuses(clusters[0]) + statuses(clusters[1]) == [2] * 5

        # 5. condor_rm of every job: the annex retires after the idle timeout, whole.
        for cluster in clusters:
            sandbox.run_as(ALICE, "condor_rm", str(cluster))
        t_rm = time.time()
        time.sleep(idle_timeout - 2 * CYCLE)
        assert annex_ad(ALICE, name) is not None, "retired before the idle timeout"
        assert len(annex_instances(ALICE, name)) == 3
        wait(lambda: gone(ALICE, name), idle_timeout + 40, "the annex to retire")
        took = time.time() - t_rm
        assert took < idle_timeout + 30, took
        assert status(ALICE, name) is None  # no live annex of that name any more
    finally:
        cleanup(ALICE, name, clusters)


# --- caps -----------------------------------------------------------------------------------


def schedd_knob(knob: str) -> str:
    """The running schedd's value of `knob` (what its submit requirements use)."""
    res = subprocess.run(
        ["condor_config_val", "-schedd", knob], capture_output=True, text=True, check=False
    )
    return res.stdout.strip() if res.returncode == 0 else ""


def reconfigured(knobs: dict[str, str]) -> None:
    """condor_reconfig, then wait until the helper has re-read its knobs (its log says so) and
    the schedd holds `knobs` (instead of sleeping through cycles and hoping)."""
    reconfig_until(HELPER_LOG, "configuration reloaded", "the helper to reload its configuration")
    wait(
        lambda: all(schedd_knob(k) == v for k, v in knobs.items()),
        30,
        f"the schedd to hold {knobs}",
    )


@pytest.fixture
def tight_caps() -> Iterator[None]:
    """ANNEX_MAX_INSTANCES = 2, ANNEX_MAX_INSTANCES_PER_USER = 3 for the helper and the schedd,
    then back to the sandbox's values."""
    caps = {"ANNEX_MAX_INSTANCES": "2", "ANNEX_MAX_INSTANCES_PER_USER": "3"}
    before = {knob: schedd_knob(knob) for knob in caps}
    TEST_CONFIG.write_text(
        "# tests/e2e/test_lifecycle.py (removed after the test)\n"
        + "".join(f"{knob} = {value}\n" for knob, value in caps.items())
    )
    reconfigured(caps)
    try:
        yield
    finally:
        TEST_CONFIG.unlink(missing_ok=True)
        reconfigured(before)


def never_runs() -> tuple[str, ...]:
    # Jobs that wait (they match no slot), and instances that are not retired as unclaimed
    # while the test looks at them.
    return ("requirements = false", "annex_idle_timeout = 10m")


# Serial (tight_caps): the caps are the whole pool's.
@pytest.mark.serial
@pytest.mark.parametrize("knob", ["ANNEX_MAX_INSTANCES", "ANNEX_MAX_INSTANCES_PER_USER"])
def test_binding_cap_is_named_on_the_annex_ad_and_the_waiting_jobs(tight_caps, knob) -> None:
    """A cap that binds: the annex gets what the cap allows, its Annex ad says which knob
    (BindingLimit), and so does AnnexLastError in the waiting jobs (condor_q -af).

    ANNEX_MAX_INSTANCES: condor_submit refuses more than the cap, so the owner asks with
    htcondor-annex extend --instances 5. ANNEX_MAX_INSTANCES_PER_USER: bob's second annex
    asks for 2 while his first holds 2 of his 3."""
    user = ALICE if knob == "ANNEX_MAX_INSTANCES" else BOB
    first, second = unique("cap"), unique("cap")
    made: list[tuple[str, int]] = []
    try:
        if knob == "ANNEX_MAX_INSTANCES":
            made.append((first, submit(user, first, instances=2, extra=never_runs())))
            wait(lambda: annex_ad(user, first), 30, "the Annex ad")
            out = htcondor_annex(user, "extend", "--name", first, "--instances", "5").stdout
            assert "2 instance(s) requested" in out, out
            capped, allowed = first, 2
        else:
            made.append((first, submit(user, first, instances=2, extra=never_runs())))
            wait(lambda: annex_ad(user, first), 30, "the first Annex ad")
            made.append((second, submit(user, second, instances=2, extra=never_runs())))
            capped, allowed = second, 1
        cluster = made[-1][1]
        ad = wait(
            lambda: (a := annex_ad(user, capped)) and a.get("BindingLimit") == knob and a,
            30,
            f"BindingLimit = {knob} on the Annex ad",
        )
        assert ad["RequestedInstances"] == allowed
        message = f"limited to {allowed} instance(s) by {knob}"
        wait(
            lambda: (
                condor_q_af(user, cluster, "AnnexLastError", "AnnexRequestedInstances")
                == [[message, str(allowed)]]
            ),
            30,
            f"the waiting job to say {message!r}",
        )
        wait(lambda: len(annex_instances(user, capped)) == allowed, 30, "the instances")
        time.sleep(2 * CYCLE)
        assert len(annex_instances(user, capped)) == allowed  # and no more
        if knob == "ANNEX_MAX_INSTANCES_PER_USER":
            # bob's 3 are all taken: a third annex is refused, and its job (left unrouted)
            # says why instead of just waiting.
            third = unique("cap")
            made.append((third, submit(user, third, instances=1, extra=never_runs())))
            refused = wait(
                lambda: (
                    (af := condor_q_af(user, made[-1][1], "AnnexLastError"))
                    and "ANNEX_MAX_INSTANCES_PER_USER (3)" in af[0][0]
                    and af[0][0]
                ),
                30,
                "the refused job to name ANNEX_MAX_INSTANCES_PER_USER",
            )
            assert "already has 3 instance(s)" in refused, refused
            assert condor_q_af(user, made[-1][1], "AnnexState") == [["refused"]]
            assert annex_ad(user, third) is None
            assert annex_instances(user, third) == []
    finally:
        for name, cluster in made:
            cleanup(user, name, [cluster])


# --- lease ----------------------------------------------------------------------------------


def test_lease_end_terminates_holds_and_only_a_release_starts_a_new_annex() -> None:
    """annex_lease = 45: at its end the instances are terminated and every job still waiting
    or running is held, with a reason naming the annex, the time, and what to do (release,
    rm, extend). Nothing brings the annex back by itself. condor_release of a held job starts
    a new annex (a new create call) for it; the jobs still held stay held."""
    name = unique("lease")
    lease = 45
    cluster = submit(ALICE, name, instances=1, jobs=3, extra=(f"annex_lease = {lease}",))
    try:
        wait(lambda: statuses(cluster) == [IDLE, RUNNING, RUNNING], 90, "2 jobs running")
        end = int(annex_ad(ALICE, name)["LeaseExpiration"])
        (first_request,) = requests(ALICE, name)
        wait(lambda: statuses(cluster) == [HELD] * 3, end - time.time() + 30, "jobs held")
        # Held two cycles ahead of the end, while the startd can still stop them cleanly.
        assert time.time() >= end - 2 * CYCLE - 1
        wait(lambda: gone(ALICE, name), 30, "instances terminated and the ad invalidated")
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(end))
        for ad in jobs(cluster):
            reason = ad["HoldReason"]
            assert f"the lease of annex {name} ends at {when}" in reason
            assert "condor_release" in reason and "condor_rm" in reason
            assert f"htcondor-annex extend --name {name} --lease" in reason

        # Left alone, nothing comes back.
        time.sleep(4 * CYCLE)
        assert gone(ALICE, name) and status(ALICE, name) is None
        assert statuses(cluster) == [HELD] * 3

        # condor_release of one job: the route takes it again and a new annex starts.
        sandbox.run_as(ALICE, "condor_release", f"{cluster}.0")
        wait(lambda: annex_ad(ALICE, name), 60, "a new Annex ad")
        wait(lambda: len(requests(ALICE, name)) == 2, 30, "a second create call")
        assert first_request in requests(ALICE, name)
        wait(lambda: sandbox.job_ad(cluster, 0)["JobStatus"] == RUNNING, 90, "the job to run")
        assert [sandbox.job_ad(cluster, p)["JobStatus"] for p in (1, 2)] == [HELD, HELD]
        new_end = int(annex_ad(ALICE, name)["LeaseExpiration"])
        assert new_end > end + lease / 2  # a new lease
    finally:
        cleanup(ALICE, name, [cluster])


def test_delete_holds_the_waiting_jobs_and_release_starts_a_new_annex() -> None:
    """htcondor-annex delete while jobs wait: the instances go, the waiting jobs are held
    within a cycle with a reason naming the annex, the deletion and what to do, and the
    annex does not come back until a job is released (then with a new create call)."""
    name = unique("del")
    cluster = submit(ALICE, name, instances=1, jobs=2, extra=never_runs())
    try:
        wait(lambda: len(startds(ALICE, name)) == 1, 90, "the annex startd")
        (first_request,) = requests(ALICE, name)
        htcondor_annex(ALICE, "delete", "--name", name)
        wait(lambda: statuses(cluster) == [HELD, HELD], 30, "the waiting jobs held")
        wait(lambda: gone(ALICE, name), 30, "the annex gone")
        for ad in jobs(cluster):
            reason = ad["HoldReason"]
            assert f"annex {name} was deleted (htcondor-annex delete) at " in reason, reason
            assert "condor_release" in reason and "condor_rm" in reason
        time.sleep(3 * CYCLE)
        assert gone(ALICE, name) and statuses(cluster) == [HELD, HELD]

        sandbox.run_as(ALICE, "condor_release", f"{cluster}.1")
        wait(lambda: len(requests(ALICE, name)) == 2, 60, "a new create call")
        assert first_request in requests(ALICE, name)
        assert sandbox.job_ad(cluster, 0)["JobStatus"] == HELD
    finally:
        cleanup(ALICE, name, [cluster])


# --- condor_hold / condor_release -----------------------------------------------------------


def test_hold_and_release() -> None:
    """condor_hold of every job counts as no job: released within the idle timeout, the jobs
    run again on the same annex (no new create call); held past it, the annex retires, and
    condor_release then starts a new annex for them."""
    name = unique("hold")
    idle_timeout = 20
    cluster = submit(
        ALICE, name, instances=1, jobs=2, extra=(f"annex_idle_timeout = {idle_timeout}",)
    )
    try:
        wait(lambda: statuses(cluster) == [RUNNING, RUNNING], 90, "2 jobs running")
        sandbox.run_as(ALICE, "condor_hold", str(cluster))
        wait(lambda: statuses(cluster) == [HELD, HELD], 30, "jobs held")
        time.sleep(idle_timeout / 2)
        assert annex_ad(ALICE, name) is not None
        sandbox.run_as(ALICE, "condor_release", str(cluster))
        wait(lambda: statuses(cluster) == [RUNNING, RUNNING], 60, "jobs running again")
        assert len(requests(ALICE, name)) == 1  # the same annex, no new call

        sandbox.run_as(ALICE, "condor_hold", str(cluster))
        t_hold = time.time()
        wait(lambda: gone(ALICE, name), idle_timeout + 40, "the annex to retire")
        assert time.time() - t_hold >= idle_timeout - 2 * CYCLE
        time.sleep(2 * CYCLE)
        assert gone(ALICE, name)  # held jobs do not bring it back

        sandbox.run_as(ALICE, "condor_release", str(cluster))
        wait(lambda: len(requests(ALICE, name)) == 2, 60, "a new create call")
        wait(lambda: statuses(cluster) == [RUNNING, RUNNING], 90, "jobs running on it")
    finally:
        cleanup(ALICE, name, [cluster])


# --- two users ------------------------------------------------------------------------------


def test_two_users_same_annex_name_get_two_annexes() -> None:
    """alice's and bob's annexes of the same name are two annexes (two Annex ads, instances
    tagged with their owner), and each user's jobs ran only on their own annex's slots."""
    name = unique("pair")
    clusters = {user: submit(user, name, instances=1, jobs=2, seconds=3) for user in (ALICE, BOB)}
    try:
        for user, cluster in clusters.items():
            for proc in (0, 1):
                ad = sandbox.wait_for_job(cluster, timeout=120, proc=proc)
                assert ad["Owner"] == user
                assert ad["MachineAttrAnnexName0"] == name
                host = str(ad["LastRemoteHost"])
                instance = host.split("@", 1)[1].split(":", 1)[0]
                (described,) = annex_instances(user, name, states=())  # one instance each
                assert instance == described["InstanceId"], (user, host)
        owners = {tag(i, names.TAG_OWNER) for u in (ALICE, BOB) for i in annex_instances(u, name)}
        assert owners == {ALICE, BOB}
        ads = sandbox.query_ads("Any", f'MyType == "Annex" && AnnexName == "{name}"')
        assert sorted(a["Owner"] for a in ads) == [ALICE, BOB]
        assert len({a["Name"] for a in ads}) == 2
        # Neither sees (nor may touch) the other's annex.
        assert status(ALICE, name)["Owner"] == ALICE
        res = htcondor_annex(ALICE, "delete", "--name", name, "--owner", BOB, check=False)
        assert res.returncode != 0 and "may not act on annexes of bob" in res.stderr
        assert annex_ad(BOB, name) is not None
    finally:
        for user, cluster in clusters.items():
            cleanup(user, name, [cluster])


# --- safety: the translate hook given a malformed or hostile ad -----------------------------

ROUTE = '[ Name = "Annex"; TargetUniverse = 5 ]'


def job_ad_text(name: str, owner: str = ALICE, **overrides: str) -> str:
    attrs = {
        "ClusterId": "999",
        "ProcId": "0",
        "Owner": f'"{owner}"',
        "JobStatus": "1",
        "QDate": str(int(time.time())),
        "Cmd": '"/bin/true"',
        "TargetAnnexName": f'"{name}"',
        "AnnexInstances": "1",
    }
    attrs.update(overrides)
    return "".join(f"{k} = {v}\n" for k, v in attrs.items() if v is not None)


def hostile_inputs(name: str) -> dict[str, str]:
    good = job_ad_text(name)
    return {
        "not a ClassAd": f"{ROUTE}\n------\nthis is not a job ad\n",
        "no separator": f"{ROUTE}\n{good}",
        "NUL byte": f'{ROUTE}\n------\n{good}Foo = "a\x00b"\n',
        "over 512 KiB": f"{ROUTE}\n------\n{good}" + 'Pad = "' + "x" * 600_000 + '"\n',
        "repeated attribute": f'{ROUTE}\n------\n{good}Owner = "bob"\n',
        "bad annex name": f"{ROUTE}\n------\n" + job_ad_text(name, TargetAnnexName='"x; rm -rf /"'),
        "not a string name": f"{ROUTE}\n------\n" + job_ad_text(name, TargetAnnexName="5"),
        "no ClusterId": f"{ROUTE}\n------\n" + job_ad_text(name, ClusterId=None),
        "another user's job": f"{ROUTE}\n------\n" + job_ad_text(name, owner=BOB),
        "too many instances": f"{ROUTE}\n------\n" + job_ad_text(name, AnnexInstances="100000"),
        "reserved tag": f"{ROUTE}\n------\n"
        + job_ad_text(name, AnnexTags='"htcondor-annex:owner=bob"'),
        "negative lease": f"{ROUTE}\n------\n" + job_ad_text(name, AnnexLease="-5"),
    }


def state_counts() -> tuple[int, int]:
    """(annex records, cloud-call intents) in the helper's store, read-only."""
    path = Path("/var/spool/condor/annex/annexes.sqlite")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return (
            db.execute("SELECT count(*) FROM annexes").fetchone()[0],
            db.execute("SELECT count(*) FROM ops").fetchone()[0],
        )
    finally:
        db.close()


def run_hook(text: str) -> subprocess.CompletedProcess:
    socket = subprocess.run(
        ["condor_config_val", "ANNEX_GAHP_SOCKET"], capture_output=True, text=True, check=True
    ).stdout.strip()
    return sandbox.run_as(
        ALICE,
        "annex_hook_translate",
        input=text,
        check=False,
        timeout=30,
        env_extra={names.SOCKET_ENV: socket},
    )


# Serial: counts every record and instance of the pool before and after.
@pytest.mark.serial
def test_translate_hook_refuses_malformed_and_hostile_ads() -> None:
    """The translate hook, run by hand as alice (as the router runs it: the job's owner) on
    malformed or hostile input: each exits non-zero with one line on stderr naming the
    problem, prints nothing, and nothing is created - no annex record, no cloud call, no
    instance. (A well-formed ad, last, is accepted: the inputs differ only where they say.)"""
    name = unique("safe")
    records, intents = state_counts()
    ec2_before = len(sandbox.instances(states=()))
    for what, text in hostile_inputs(name).items():
        res = run_hook(text)
        assert res.returncode != 0, what
        assert res.stdout == "", what
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("annex_hook_translate: "), (what, lines)
    # The two the helper refuses say why, in its words.
    assert (
        "alice sent a job ad owned by bob"
        in run_hook(hostile_inputs(name)["another user's job"]).stderr
    )
    assert "ANNEX_MAX_INSTANCES" in run_hook(hostile_inputs(name)["too many instances"]).stderr
    time.sleep(2 * CYCLE)
    assert state_counts() == (records, intents)
    assert len(sandbox.instances(states=())) == ec2_before
    assert status(ALICE, name) is None

    # The control: the same ad, well formed and for a real job of alice's that waits, is
    # accepted and asks for the annex (the helper creates an annex only for a job the schedd
    # still has; the route leaves this one alone: it looks routed already).
    cluster = submit(ALICE, name, extra=("requirements = false", f'+AnnexRoutedName = "{name}"'))
    res = run_hook(f"{ROUTE}\n------\n{job_ad_text(name, ClusterId=str(cluster))}")
    try:
        assert res.returncode == 0, res.stderr
        assert re.search(r'^AnnexState = "requested"$', res.stdout, re.M), res.stdout
        assert 'Cmd = "/bin/true"' in res.stdout
        assert status(ALICE, name)["AnnexName"] == name
    finally:
        sandbox.run_as(ALICE, "condor_rm", str(cluster), check=False)
        htcondor_annex(ALICE, "delete", "--name", name, check=False)
        wait(lambda: gone(ALICE, name), 60, "the control annex to go")
