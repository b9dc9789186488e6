"""docs/glideinwms.md's worked factory-style request, run in the sandbox (issue 18, item 5).

The sh block under "A worked request, factory style" is read from the document and run as a
factory user would, with two substitutions only: the sandbox's image for the placeholder AMI,
and 2 instances instead of 10 (two cores boot the emulated instances). It must give one
provision-mode request for the mapped entry name, reading the user data file the block wrote,
and condor_rm of that one job must end its instances.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import sandbox
from test_lifecycle import ALICE, annex_instances, htcondor_annex

pytestmark = pytest.mark.sandbox

DOC = Path(os.environ.get("ANNEX_SRC", "/src")) / "docs" / "glideinwms.md"
SECTION = "## A worked request, factory style"


def worked_block() -> str:
    text = DOC.read_text()
    section = text[text.index(SECTION) :]
    found = re.search(r"^```sh\n(.*?)^```$", section, re.S | re.M)
    assert found, f"no sh block under {SECTION!r} in {DOC}"
    return found[1]


def test_the_worked_factory_request_is_one_provision_request_that_condor_rm_ends() -> None:
    script = worked_block()
    assert "ami-0123456789abcdef0" in script and "annex_instances      = 10" in script
    script = script.replace("ami-0123456789abcdef0", sandbox.default_image_id())
    script = script.replace("annex_instances      = 10", "annex_instances      = 2")
    res = sandbox.run_as(ALICE, "bash", "-e", "-c", script)
    cluster = int(re.search(r"submitted to cluster (\d+)", res.stdout)[1])
    name = f"cms-t2-us-cloud-{cluster}"
    try:
        [ad] = sandbox.schedd().query(f"ClusterId == {cluster}")
        assert ad["TargetAnnexName"] == name
        assert ad["AnnexMode"] == "provision" and ad["JobUniverse"] == 12
        assert ad["AnnexUserDataFile"].endswith("/user-data.sh")
        assert "glidein_startup.sh -name CMS_T2_US_Cloud" in Path(
            ad["AnnexUserDataFile"]
        ).read_text()
        sandbox.wait_for(
            lambda: len(annex_instances(ALICE, name)) == 2,
            timeout=90, interval=1, what=f"2 instances of {name}", on_timeout=sandbox.line_logs,
        )  # fmt: skip
        sandbox.run_as(ALICE, "condor_rm", str(cluster))
        sandbox.wait_for(
            lambda: not annex_instances(ALICE, name),
            timeout=90, interval=1, what=f"{name}'s instances to end after condor_rm",
            on_timeout=sandbox.line_logs,
        )  # fmt: skip
    finally:
        sandbox.run_as(ALICE, "condor_rm", str(cluster), check=False)
        htcondor_annex(ALICE, "delete", "--name", name, check=False)
