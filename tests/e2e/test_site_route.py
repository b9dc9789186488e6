"""A site's own job router route next to ours (issue 18, coexistence), with the real
condor_job_router, schedd, hooks and helper.

Our hooks are keyed to our jobs (the schedd transform AnnexHookKeyword gives every job that
names an annex `HookKeyword = "ANNEX"`), never to the whole router: 30-annex-router.conf sets no
JOB_ROUTER_HOOK_KEYWORD. So a site route keeps its own global hook keyword (here SITE, with a
translate hook of its own) or none at all, and its jobs never reach our hook. Our translate hook
is wrapped here so the test sees which jobs it was run for: the wrapper saves its stdin and
then runs the real hook on it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sandbox
from test_lifecycle import ALICE, htcondor_annex, router_reconfigured, unique, wait

pytestmark = pytest.mark.sandbox

CONFIG = Path("/etc/condor/config.d/95-site-route-test.conf")
HOOK_DIR = Path("/usr/local/libexec/annex-test-site-route")  # root's, not world-writable
MARKS = Path("/tmp/annex-test-site-route")  # where the hooks (run as the owner) write
ROUTER_LOG = Path("/var/log/condor/JobRouterLog")


def _write_hooks() -> tuple[Path, Path]:
    real = subprocess.run(
        ["condor_config_val", "ANNEX_HOOK_TRANSLATE_JOB"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert real.endswith("annex_hook_translate"), real
    shutil.rmtree(MARKS, ignore_errors=True)
    MARKS.mkdir(mode=0o1777)
    MARKS.chmod(0o1777)
    HOOK_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    ours = HOOK_DIR / "annex_translate"
    ours.write_text(
        "#!/bin/sh\n# tests/e2e/test_site_route.py: our real translate hook, seen.\n"
        f"tee {MARKS}/annex.$$ | {real}\n"
    )
    site = HOOK_DIR / "site_translate"
    # A site's translate hook: the job ad back (what follows the route line and ------), plus
    # one attribute of its own.
    site.write_text(
        "#!/bin/sh\n# tests/e2e/test_site_route.py: a site's own translate hook.\n"
        f"tee {MARKS}/site.$$ | sed '1,/^------$/d'\necho 'SiteHooked = true'\n"
    )
    for hook in (ours, site):
        hook.chmod(0o755)
    return ours, site


@pytest.fixture(params=["SITE", None], ids=["site-keyword", "no-keyword"])
def site_route(request) -> Iterator[str | None]:
    """A route `Site` (edit in place) for jobs with SiteWantsRoute, next to ours, with the
    site's own global JOB_ROUTER_HOOK_KEYWORD (SITE) or none."""
    ours, site = _write_hooks()
    keyword = request.param
    lines = [
        f"# {__file__} (removed after the test)",
        "JOB_ROUTER_ROUTE_NAMES = $(JOB_ROUTER_ROUTE_NAMES) Site",
        "JOB_ROUTER_ROUTE_Site @=rt",
        "    REQUIREMENTS SiteWantsRoute =?= true && SiteRouted =!= true",
        "    UNIVERSE VANILLA",
        "    EditJobInPlace = true",
        "    SET SiteRouted true",
        "@rt",
        f"ANNEX_HOOK_TRANSLATE_JOB = {ours}",
    ]
    if keyword:
        lines += [f"JOB_ROUTER_HOOK_KEYWORD = {keyword}", f"{keyword}_HOOK_TRANSLATE_JOB = {site}"]
    CONFIG.write_text("\n".join(lines) + "\n")
    router_reconfigured()
    try:
        yield keyword
    finally:
        CONFIG.unlink(missing_ok=True)
        router_reconfigured()


def seen_by(kind: str) -> set[int]:
    """Clusters whose ad the `kind` (annex or site) translate hook was given."""
    found = set()
    for saved in MARKS.glob(f"{kind}.*"):
        found.update(int(c) for c in re.findall(r"^ClusterId = (\d+)$", saved.read_text(), re.M))
    return found


def job(cluster: int):
    ads = list(sandbox.schedd().query(f"ClusterId == {cluster}"))
    return ads[0] if ads else None


def router_tail() -> str:
    lines = ROUTER_LOG.read_text(errors="replace").splitlines()
    return "JobRouterLog tail:\n" + "\n".join(lines[-30:])


# Serial (site_route): it reconfigures the pool's job router with a site route.
@pytest.mark.serial
def test_a_site_route_and_ours_each_route_their_own_jobs(site_route) -> None:
    name = unique("site")
    workdir = str(sandbox.user_tmpdir(ALICE, "annex-site-route-"))
    # Both idle for good on the sandbox's own slot, so only the router acts on them.
    site_job = sandbox.condor_submit_as(
        ALICE,
        "executable = /bin/true\n+SiteWantsRoute = true\nrequirements = false\nqueue\n",
        cwd=workdir,
    )
    annex_job = sandbox.condor_submit_as(
        ALICE,
        f"executable = /bin/true\nannex_name = {name}\nannex_lease = 10m\nqueue\n",
        cwd=workdir,
    )
    try:
        assert job(annex_job)["HookKeyword"] == "ANNEX"
        assert "HookKeyword" not in job(site_job)

        site_ad = sandbox.wait_for(
            lambda: (ad := job(site_job)) and ad.get("SiteRouted") is True and ad,
            timeout=60, what=f"job {site_job}.0 routed by Site", on_timeout=router_tail,
        )  # fmt: skip
        annex_ad = sandbox.wait_for(
            lambda: (ad := job(annex_job)) and ad.get("AnnexRoutedName") == name
            and "AnnexState" in ad and ad,
            timeout=60, what=f"job {annex_job}.0 routed by Annex", on_timeout=router_tail,
        )  # fmt: skip
        # Each job went through its own route only.
        assert "AnnexRoutedName" not in site_ad and "AnnexState" not in site_ad
        assert "SiteRouted" not in annex_ad and "SiteHooked" not in annex_ad
        # Our hook saw our job and never the site's; the site's hook (when there is one)
        # saw the site's job, its output is in the job, and it never saw ours.
        assert annex_job in seen_by("annex")
        assert site_job not in seen_by("annex")
        assert annex_job not in seen_by("site")
        if site_route:
            assert site_ad.get("SiteHooked") is True
            assert site_job in seen_by("site")
        else:
            assert "SiteHooked" not in site_ad
            assert seen_by("site") == set()
    finally:
        sandbox.run_as(ALICE, "condor_rm", str(site_job), str(annex_job), check=False)
        htcondor_annex(ALICE, "delete", "--name", name, check=False)


def test_a_job_given_an_annex_later_needs_our_hook_keyword_too() -> None:
    """condor_qedit of TargetAnnexName alone is not routed by Annex (no hook would run for it
    without a global keyword); with HookKeyword "ANNEX" as well it is, once.

    Not serial: it changes no config and counts nothing pool-wide, so it runs beside the other
    tests with the pool's own routes."""
    name = unique("late")
    workdir = str(sandbox.user_tmpdir(ALICE, "annex-site-route-"))
    cluster = sandbox.condor_submit_as(
        ALICE, "executable = /bin/true\nrequirements = false\nqueue\n", cwd=workdir
    )
    try:
        sandbox.run_as(ALICE, "condor_qedit", str(cluster), "TargetAnnexName", f'"{name}"')
        time.sleep(12)  # two polling periods (JOB_ROUTER_POLLING_PERIOD = 5 in the sandbox)
        ad = job(cluster)
        assert "AnnexRoutedName" not in ad and "AnnexState" not in ad
        sandbox.run_as(ALICE, "condor_qedit", str(cluster), "HookKeyword", '"ANNEX"')
        wait(
            lambda: (ad := job(cluster)) and ad.get("AnnexRoutedName") == name
            and "AnnexState" in ad,
            60, f"job {cluster}.0 routed by Annex after the edit",
        )  # fmt: skip
    finally:
        sandbox.run_as(ALICE, "condor_rm", str(cluster), check=False)
        htcondor_annex(ALICE, "delete", "--name", name, check=False)
