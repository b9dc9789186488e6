"""The submit interface with the real condor_submit and schedd (inside the sandbox).

Every file in submit-examples/ is submitted as alice: the valid ones must be queued with the
canonical job attributes of docs/users.md (and read back by annex_gahp.spec the same way), the
ones in submit-examples/invalid/ must be refused with exactly the `# expect: ERROR: ...` line
they carry, with nothing queued and nothing created in the emulator.

Valid examples are submitted held (`-append "hold = true"`): the job router and the helper only
act on idle jobs, so these tests create no annexes. An invalid example may carry
`# config: KNOB = value` lines (the admin's allow-lists): they are put into the pool's config
for its submission and taken out again.

The checkout is found at $ANNEX_SRC (default /src, where the sandbox mounts it).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sandbox

SRC = Path(os.environ.get("ANNEX_SRC", "/src"))
EXAMPLES = SRC / "submit-examples"
USER = "alice"
TEST_CONFIG = Path("/etc/condor/config.d/95-annex-submit-test.conf")

sys.path.insert(0, str(SRC))
from annex_gahp import names, settings, spec  # noqa: E402

# Serial (scripts/test runs it alone): alice's jobs name the examples' annexes ("burst" among
# them, as test_demo.py's does), and the refusals set ANNEX_ALLOWED_* for the whole pool.
pytestmark = [pytest.mark.sandbox, pytest.mark.serial]

CANONICAL = [names.JOB_TARGET, *names.JOB_ATTRS.values()]
SPELLINGS = ["AnnexName", "annex_name", *(f"annex_{k}" for k in names.JOB_ATTRS)]


# ---- helpers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir() -> Path:
    """A copy of submit-examples/ owned by alice (outputs and relative paths land there)."""
    where = sandbox.user_tmpdir(USER, "annex-submit-")
    shutil.copytree(EXAMPLES, where, dirs_exist_ok=True)
    subprocess.run(["chown", "-R", f"{USER}:{USER}", str(where)], check=True)
    return where


def submit(path: Path, *append: str) -> subprocess.CompletedProcess[str]:
    argv = ["condor_submit"]
    for line in append:
        argv += ["-append", line]
    return sandbox.run_as(USER, *argv, path.name, cwd=str(path.parent), check=False)


def cluster_of(res: subprocess.CompletedProcess[str]) -> int:
    m = re.search(r"submitted to cluster (\d+)", res.stdout)
    assert m and res.returncode == 0, f"not queued:\n{res.stdout}\n{res.stderr}"
    return int(m.group(1))


def job_ads(cluster: int) -> list[dict]:
    res = sandbox.run_as(
        USER, "condor_q", str(cluster), "-json", "-attributes",
        ",".join([*CANONICAL, *SPELLINGS, "Requirements", "JobMachineAttrs", "Iwd", "ProcId",
                  "JobUniverse", "Cmd"]),
    )  # fmt: skip
    return json.loads(res.stdout) if res.stdout.strip() else []


def my_clusters() -> set[int]:
    out = sandbox.run_as(USER, "condor_q", USER, "-af", "ClusterId").stdout
    return {int(x) for x in out.split()}


def remove(cluster: int) -> None:
    sandbox.run_as(USER, "condor_rm", str(cluster), check=False)


def expectations(path: Path) -> tuple[dict[str, str], str | None]:
    config: dict[str, str] = {}
    expect = None
    for line in path.read_text().splitlines():
        if m := re.match(r"#\s*config:\s*(\w+)\s*=\s*(.*)$", line.strip()):
            config[m.group(1)] = m.group(2).strip()
        elif m := re.match(r"#\s*expect:\s*(ERROR: .*)$", line.strip()):
            expect = m.group(1)
    return config, expect


def _schedd_value(knob: str) -> str:
    res = subprocess.run(
        ["condor_config_val", "-schedd", knob], capture_output=True, text=True, check=False
    )
    value = res.stdout.strip()
    return "" if res.returncode != 0 or value.startswith("Not defined") else value


@contextlib.contextmanager
def pool_config(knobs: dict[str, str]):
    """Put `knobs` into the running pool's config (the schedd re-reads it) for the block."""
    if not knobs:
        yield
        return
    before = {k: _schedd_value(k) for k in knobs}
    TEST_CONFIG.write_text("".join(f"{k} = {v}\n" for k, v in knobs.items()))
    try:
        subprocess.run(["condor_reconfig"], check=True, capture_output=True)
        sandbox.wait_for(
            lambda: all(_schedd_value(k) == v for k, v in knobs.items()),
            timeout=30, what=f"the schedd to read {knobs}",
        )  # fmt: skip
        yield
    finally:
        TEST_CONFIG.unlink(missing_ok=True)
        subprocess.run(["condor_reconfig"], check=True, capture_output=True)
        sandbox.wait_for(
            lambda: all(_schedd_value(k) == v for k, v in before.items()),
            timeout=30, what="the schedd to drop the test config",
        )  # fmt: skip


@functools.cache
def helper_settings() -> settings.Settings:
    """The helper's knobs, read the helper's way (htcondor2.param)."""
    return settings.load()


# ---- valid examples --------------------------------------------------------------------------

# What each example must carry, exactly as the transform sets it (types included).
VALID = {
    "burst.sub": (4, {"TargetAnnexName": "burst", "AnnexInstances": 2}),
    "spot.sub": (8, {
        "TargetAnnexName": "spot", "AnnexInstances": 4,
        "AnnexInstanceTypes": "m5.large,m5a.large,m4.large", "AnnexSpotPrices": "0.05",
        "AnnexSubnets": "subnet-0a1b2c3d,subnet-4e5f6a7b", "AnnexSecurityGroups": "sg-0123abcd",
        "AnnexLease": 7200, "AnnexIdleTimeout": 1200,
        "AnnexTags": "project=genomics,cost-center=4711",
    }),
    "expiry.sub": (1, {"TargetAnnexName": "until-tonight", "AnnexLease": None}),
    "provision.sub": (1, {
        "TargetAnnexName": "my-pilots", "AnnexMode": "provision", "AnnexInstances": 2,
        "AnnexInstanceTypes": "c5.xlarge", "AnnexKeypair": "my-ssh-key", "AnnexLease": 5400,
    }),
    "stack.sub": (3, {
        "TargetAnnexName": "stacked", "AnnexStrategy": "stack",
        "AnnexStackName": "alice-stacked-annex", "AnnexInstances": 3, "AnnexLease": 14400,
        "AnnexInstanceTypes": "m5.large",
    }),
    "shared-1.sub": (2, {
        "TargetAnnexName": "shared", "AnnexInstances": 2, "AnnexInstanceTypes": "m5.large",
        "AnnexLease": 3600,
    }),
    "shared-2.sub": (3, {
        "TargetAnnexName": "shared", "AnnexInstances": 3, "AnnexInstanceTypes": None,
        "AnnexLease": 7200,
    }),
    "classic.sub": (1, {
        "TargetAnnexName": "classic", "AnnexInstances": 2,
        "AnnexInstanceTypes": "m5.large,c5.large", "AnnexLease": 5400, "AnnexRegion": "us-east-1",
    }),
}  # fmt: skip
DEFAULTS = {"AnnexMode": "pool", "AnnexStrategy": "fleet"}


def test_every_valid_example_is_covered():
    assert {p.name for p in EXAMPLES.glob("*.sub")} == set(VALID)


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_example_is_queued_with_canonical_attributes(workdir, name):
    procs, wanted = VALID[name]
    submitted_at = int(time.time())
    cluster = cluster_of(submit(workdir / name, "hold = true"))
    try:
        ads = job_ads(cluster)
        assert len(ads) == procs
        for ad in ads:
            for attr, value in {**DEFAULTS, **wanted}.items():
                assert ad.get(attr) == value, f"{name}: {attr} = {ad.get(attr)!r}"
                if isinstance(value, int):
                    assert type(ad[attr]) is int, f"{name}: {attr} is not an int"
            # Nothing downstream ever sees a second spelling.
            for attr in SPELLINGS:
                assert ad.get(attr) is None, f"{name}: {attr} = {ad.get(attr)!r} left in the ad"
            for attr in CANONICAL:
                value = ad.get(attr)
                assert value is None or isinstance(value, (str, int)), (attr, value)
                if isinstance(value, str) and attr != "AnnexTags":
                    assert " " not in value, (attr, value)
            assert "AnnexName" in ad["JobMachineAttrs"].split(",")
            if name == "provision.sub":
                assert ad["AnnexUserDataFile"] == f"{ad['Iwd']}/pilot-user-data.sh"
                # The job stands for its annex: a local universe job of ours, which may start
                # once the route has handed it to the helper (docs/users.md, provision mode).
                assert ad["JobUniverse"] == 12
                assert ad["Cmd"].endswith("/annex_provision_job")
                routed = r"AnnexRoutedName (=\?=|is) MY\.TargetAnnexName"
                assert re.search(routed, ad["Requirements"])
            else:
                assert re.search(
                    r"TARGET\.AnnexName (=\?=|is) MY\.TargetAnnexName", ad["Requirements"]
                )
            if name == "expiry.sub":
                assert type(ad["AnnexExpiry"]) is int
                assert abs(ad["AnnexExpiry"] - (submitted_at + 3 * 3600)) < 300
            # The helper reads the queued ad the same way.
            got = spec.from_job_attrs(ad, USER, helper_settings())
            assert got.name == ad["TargetAnnexName"]
            assert got.instances == ad["AnnexInstances"]
    finally:
        remove(cluster)


def test_two_clusters_share_one_annex(workdir):
    first = cluster_of(submit(workdir / "shared-1.sub", "hold = true"))
    second = cluster_of(submit(workdir / "shared-2.sub", "hold = true"))
    try:
        s = helper_settings()
        a = spec.from_job_attrs(job_ads(first)[0], USER, s)
        b = spec.from_job_attrs(job_ads(second)[0], USER, s)
        assert a.name == b.name == "shared"
        merged = spec.merge(a, b, s)
        assert (merged.instances, merged.lease_seconds) == (3, 7200)
        assert merged.instance_types == ("m5.large",)
    finally:
        remove(first)
        remove(second)


def test_jobs_without_an_annex_are_untouched(workdir):
    plain = workdir / "plain.sub"
    plain.write_text("executable = /bin/true\nqueue\n")
    shutil.chown(plain, USER, USER)
    cluster = cluster_of(submit(plain, "hold = true"))
    try:
        (ad,) = job_ads(cluster)
        assert all(ad.get(a) is None for a in [*CANONICAL, *SPELLINGS]), ad
        assert "AnnexName" not in ad["Requirements"]
        assert ad.get("JobMachineAttrs") is None
    finally:
        remove(cluster)


# ---- refusals --------------------------------------------------------------------------------

INVALID = sorted((EXAMPLES / "invalid").glob("*.sub"))


@pytest.fixture(scope="module")
def refusals(workdir) -> dict[str, tuple[subprocess.CompletedProcess[str], set[int], set[int]]]:
    """Submit every invalid example once (grouped by the config they need).

    The examples that need knobs share one reconfig when no knob is wanted with two values: an
    allow-list refuses only the keyword it names, and each example must still print its own
    line (two reconfigs of the pool instead of two per example)."""
    results = {}
    by_config: dict[tuple, list[Path]] = {}
    for path in INVALID:
        config, _ = expectations(path)
        by_config.setdefault(tuple(sorted(config.items())), []).append(path)
    wanted: dict[str, set[str]] = {}
    for config in by_config:
        for knob, value in config:
            wanted.setdefault(knob, set()).add(value)
    if wanted and all(len(values) == 1 for values in wanted.values()):
        merged = tuple(sorted((knob, values.pop()) for knob, values in wanted.items()))
        with_knobs = [path for config, paths in by_config.items() if config for path in paths]
        by_config = {(): by_config.get((), []), merged: with_knobs}
    for config, paths in sorted(by_config.items()):
        with pool_config(dict(config)):
            for path in paths:
                before = my_clusters()
                res = submit(workdir / "invalid" / path.name)
                results[path.name] = (res, before, my_clusters())
    return results


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_example_is_refused_with_its_message(refusals, path):
    _, expect = expectations(path)
    assert expect, f"{path.name} has no '# expect: ERROR: ...' line"
    res, before, after = refusals[path.name]
    assert res.returncode != 0, f"{path.name} was accepted:\n{res.stdout}"
    assert "submitted to cluster" not in res.stdout
    lines = [line.strip() for line in res.stderr.splitlines()]
    assert expect in lines, f"{path.name}: wanted {expect!r}, condor_submit said:\n{res.stderr}"
    assert after == before, f"{path.name}: something was queued ({after - before})"


def test_refusals_create_nothing_in_the_emulator(refusals):
    assert refusals
    ec2 = sandbox.ec2_client()
    pages = ec2.get_paginator("describe_instances").paginate(
        Filters=[{"Name": f"tag:{names.TAG_NAME}", "Values": ["refused"]}]
    )
    found = [i["InstanceId"] for p in pages for r in p["Reservations"] for i in r["Instances"]]
    assert found == []


def test_help_names_every_keyword():
    res = sandbox.run_as(USER, "condor_submit", "-capabilities")
    for key in ("name", *names.JOB_ATTRS):
        assert f"annex_{key}" in res.stdout, f"annex_{key} is not an extended submit command"
