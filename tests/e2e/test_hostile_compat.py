"""A job's owner edits its annex attributes after submit (condor_qedit, past the submit
transform) to ClassAd `error` or `undefined`: values the bindings hand the helper as
classad2.Value, an IntEnum (error is the int 1, undefined the int 2) on every HTCondor version.

`error` is refused, by name, and no annex is made; `undefined` is the attribute not being there,
so an expiry beside an undefined lease and region is a valid request. Real schedd, job router,
hooks and helper.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import sandbox as sb

pytestmark = pytest.mark.sandbox

ROUTER_LOG = Path("/var/log/condor/JobRouterLog")


def _submit_held(annex: str) -> int:
    return sb.condor_submit_as(
        "alice",
        f"executable = /bin/true\nannex_name = {annex}\nannex_instances = 1\nhold = true\nqueue\n",
    )


def _qedit_and_release(cluster: int, edits: dict[str, str]) -> None:
    for attr, expr in edits.items():
        sb.run_as("alice", "condor_qedit", str(cluster), attr, expr)
    sb.run_as("alice", "condor_release", str(cluster))


def _status(annex: str) -> str:
    res = sb.run_as("alice", "htcondor-annex", "status", "--name", annex, check=False)
    return res.stdout + res.stderr


def test_error_in_a_request_attribute_is_refused_and_makes_no_annex():
    annex = f"hcerr{os.getpid()}"
    cluster = _submit_held(annex)
    try:
        _qedit_and_release(cluster, {"AnnexInstances": "error"})
        line = f"(src={cluster}.0,route=Annex)"

        def refused() -> bool:
            return any(
                line in row and "AnnexInstances evaluates to error" in row
                for row in ROUTER_LOG.read_text(errors="replace").splitlines()
            )

        sb.wait_for(refused, timeout=30, what="the translate hook's refusal",
                    on_timeout=lambda: ROUTER_LOG.read_text()[-2000:])
        assert annex not in _status(annex).split()  # not made (error is not "1 instance")
        assert sb.job_ad(cluster)["JobStatus"] == 1  # left idle and unrouted
    finally:
        sb.run_as("root", "condor_rm", str(cluster), check=False)


def test_undefined_lease_and_region_beside_an_expiry_is_a_valid_request():
    annex = f"hcund{os.getpid()}"
    cluster = _submit_held(annex)
    try:
        expiry = int(time.time()) + 1800
        _qedit_and_release(
            cluster,
            {"AnnexLease": "undefined", "AnnexRegion": "undefined", "AnnexExpiry": str(expiry)},
        )

        def made() -> str | None:
            out = _status(annex)
            return out if annex in out.split() else None

        sb.wait_for(made, timeout=30, what=f"annex {annex} to be made",
                    on_timeout=lambda: ROUTER_LOG.read_text()[-2000:])
        ours = [row for row in ROUTER_LOG.read_text(errors="replace").splitlines()
                if f"(src={cluster}.0," in row]
        assert not [r for r in ours if "quoted string" in r or "exclude each other" in r], ours
        assert not sb.job_ad(cluster).get("AnnexLastError")  # "" while nothing went wrong
    finally:
        sb.run_as("root", "condor_rm", str(cluster), check=False)
        sb.run_as("alice", "htcondor-annex", "delete", "--name", annex, check=False)
