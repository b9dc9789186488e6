"""The helper's binding-facing parts against the real sandbox pool (HTCondor 23.9 daemons), with
whatever htcondor2/classad2 this interpreter has: Debian's 23.9 in the sandbox venv, PyPI's
24.0 LTS and 25.x wheels in the compat venvs (`scripts/test compat` runs this file with each,
after pointing the pool's ANNEX_BIN_DIR at that venv and restarting the helper).

Real schedd, collector, config and condor_master: nothing of HTCondor is stood in for here.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import classad2
import htcondor2
import pytest
import sandbox as sb

from annex_gahp import compat, names, schedd, service, settings, spec

pytestmark = pytest.mark.sandbox

HELPER_LOG = Path("/var/log/condor/AnnexGahpLog")
MASTER_LOG = Path("/var/log/condor/MasterLog")


def test_bindings_version_is_the_one_asked_for():
    got = compat.version()
    print(f"\nHTCondor bindings {got} ({htcondor2.__file__}), Python {sys.version.split()[0]}")
    expected = os.environ.get("ANNEX_COMPAT_EXPECT_VERSION")
    if expected:
        assert got == expected, htcondor2.version()


def _submit_waiting(annex: str, extra: str = "") -> int:
    """An idle job of alice waiting for `annex` that the route leaves alone (AnnexRoutedName
    already names it) and that never runs (Requirements false)."""
    return sb.condor_submit_as(
        "alice",
        f"""executable = /bin/true
requirements = false
+{names.JOB_TARGET} = "{annex}"
+AnnexRoutedName = "{annex}"
{extra}
queue
""",
    )


def _rm(cluster: int) -> None:
    sb.run_as("root", "condor_rm", str(cluster), check=False)


def test_schedd_edits_that_match_nothing_do_not_raise():
    demand = schedd.ScheddDemand()
    ghost = f"compat-ghost-{os.getpid()}"
    # Each of these edits a constraint no job matches: OSError on 23.9, HTCondorException on
    # 24/25; before compat.py the latter escaped from hold() and aborted a reconcile cycle.
    demand.hold("alice", ghost, "nothing to hold")
    demand.hold_left_behind("alice", ghost, "nothing left behind", int(time.time()))
    demand.reroute("alice", ghost, int(time.time()))
    demand.tell_job("alice", 999_999, 0, {"AnnexLastError": '"nobody"'})
    assert demand.job(999_999, 0) is None


def test_schedd_demand_tell_and_hold_a_real_job():
    annex = f"compat{os.getpid()}"
    cluster = _submit_waiting(annex)
    try:
        demand = schedd.ScheddDemand()
        counts = sb.wait_for(lambda: demand.counts().get(("alice", annex)), timeout=20,
                             what="the job in the demand query")
        assert counts.idle == 1 and counts.running == 0
        assert demand.job(cluster, 0) == schedd.QueuedJob("alice", schedd.IDLE)
        demand.tell_job("alice", cluster, 0, {"AnnexLastError": '"compat test"'})
        assert sb.job_ad(cluster)["AnnexLastError"] == "compat test"
        demand.hold("alice", annex, "compat: the annex will not come back")
        ad = sb.job_ad(cluster)
        assert ad["JobStatus"] == schedd.HELD, dict(ad)
        # The schedd appends "(by user X)" to the reason.
        assert ad["HoldReason"].startswith("compat: the annex will not come back"), dict(ad)
        # Unrouted before the hold (AnnexRoutedName = undefined): once released, it is routed.
        assert isinstance(ad.eval("AnnexRoutedName"), classad2.Value), dict(ad)
    finally:
        _rm(cluster)


def test_job_ad_undefined_values_from_a_real_job():
    """A job whose submit file left AnnexRegion/AnnexLease undefined (what the transform makes
    of spellings it removed) beside an AnnexExpiry: the ad the schedd keeps, in the old text
    form the job router hands its hooks, parses to a valid request."""
    annex = f"compatad{os.getpid()}"
    expiry = int(time.time()) + 7200
    cluster = _submit_waiting(
        annex, f"+AnnexRegion = undefined\n+AnnexLease = undefined\n+AnnexExpiry = {expiry}\n"
    )
    try:
        ad = sb.job_ad(cluster)
        assert isinstance(ad.eval("AnnexRegion"), classad2.Value)  # what the bindings return
        text = ad.printOld() if hasattr(ad, "printOld") else str(ad)
        got = service.parse_job_ad(text)
        assert "AnnexRegion" not in got and "AnnexLease" not in got
        assert got["AnnexExpiry"] == expiry and got[names.JOB_TARGET] == annex
        request = spec.from_job_attrs(got, "alice", settings.load({}.get))
        assert request.region == "" and request.expiry == expiry
    finally:
        _rm(cluster)


def test_an_empty_knob_in_a_config_file_takes_its_default():
    conf = Path("/etc/condor/config.d/97-compat-test.conf")
    conf.write_text("ANNEX_DEFAULT_INSTANCE_TYPES =\nANNEX_DEFAULT_LEASE =\n")
    try:
        htcondor2.reload_config()
        # 23.9 says "" here, 24.0.9+ None: the helper sees the same on both.
        assert htcondor2.param.get("ANNEX_DEFAULT_INSTANCE_TYPES") in ("", None)
        assert compat.param("ANNEX_DEFAULT_INSTANCE_TYPES") is None
        got = settings.load()
        assert got.default_instance_types == ("m5.large",) and got.default_lease == 3600
    finally:
        conf.unlink()
        htcondor2.reload_config()
    assert compat.param("ANNEX_AWS_REGION") == "us-east-1"  # the sandbox's own value


_COLLECTOR_AS_CONDOR = """
import sys, time
import htcondor2
from annex_gahp import collector, compat
name = sys.argv[1]
pub = collector.Publisher("compat-schedd")
pub.publish([{"Owner": "alice", "AnnexName": name, "AnnexState": "compat", "Ignored": None}])
def names():
    ads = htcondor2.Collector().query(
        htcondor2.AdType.Any, constraint=f'MyType == "Annex" && AnnexName == "{name}"',
        projection=["Name"])
    return [a["Name"] for a in ads]
for _ in range(40):
    if names(): break
    time.sleep(0.25)
print("published", names())
print("slots", collector.AnnexSlots().slots("no-such-pool"))
pub.invalidate("alice", name)
for _ in range(40):
    if not names(): break
    time.sleep(0.25)
print("after", names())
collector.AnnexSlots().invalidate(["i-0123456789abcdef0"])
print("schedd", collector.schedd_name() != "")
"""


def test_collector_publish_query_invalidate_as_the_helper():
    """As the condor user, as the helper does it (UPDATE_AD_GENERIC needs DAEMON level; with
    25.x bindings against 23.9 daemons that is the IDTOKEN in ~condor/.condor/tokens.d)."""
    name = f"compatcol{os.getpid()}"
    res = sb.run_as("condor", sys.executable, "-c", _COLLECTOR_AS_CONDOR, name)
    lines = res.stdout.splitlines()
    assert f"published ['alice/{name}@compat-schedd']" in lines, res.stdout + res.stderr
    assert "slots []" in lines and "after []" in lines and "schedd True" in lines, res.stdout


def test_helper_under_the_master_runs_these_bindings_and_tells_it_alive():
    """The helper the master started last is this interpreter's venv (scripts/test compat
    switched ANNEX_BIN_DIR), and it told condor_master alive, and Ready where
    set_ready_state exists (24.1.1 on), with no failed attempt before."""

    def started() -> tuple[int, str] | None:
        text = HELPER_LOG.read_text(errors="replace")
        starts = list(re.finditer(r"annex_gahp starting \(pid (\d+)\)", text))
        if not starts:
            return None
        since = text[starts[-1].start():]
        # What the helper says between its start and its first alive message.
        head, alive, _ = since.partition("told condor_master: alive")
        return (int(starts[-1].group(1)), head + alive) if alive else None

    pid, head = sb.wait_for(started, timeout=30, what="the helper's alive message",
                            on_timeout=lambda: HELPER_LOG.read_text()[-2000:])
    master_log = MASTER_LOG.read_text(errors="replace")
    # "DaemonCore process": ANNEXD is one of the master's built-in DaemonCore names.
    program = re.findall(
        rf'Started DaemonCore process "([^"]+)", pid and pgroup = {pid}\b', master_log
    )
    assert program and program[-1] == f"{sys.prefix}/bin/annex_gahp", (program, sys.prefix)
    assert "could not tell condor_master" not in head, head
    after = HELPER_LOG.read_text(errors="replace").split(f"(pid {pid})", 1)[1]
    ready = re.search(r"told condor_master: Ready|could not tell condor_master this helper is "
                      r"ready", after)
    if compat.set_ready_state() is not None:
        assert ready and ready.group(0) == "told condor_master: Ready", after[:2000]
    else:
        assert ready is None, after[:2000]


def test_the_router_hooks_are_this_venvs():
    """The job router's translate hook is this venv's script, run by this venv's python."""
    htcondor2.reload_config()
    hook = compat.param("ANNEX_HOOK_TRANSLATE_JOB")
    assert hook == f"{sys.prefix}/bin/annex_hook_translate", hook
    assert Path(hook).read_text().splitlines()[0].startswith(f"#!{sys.prefix}/bin/python")
