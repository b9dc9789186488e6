"""A refused request reaches the job, through the real schedd, job router, hook and helper
(issue 18; docs/troubleshooting.md, "My job stays idle"): `condor_q -af AnnexState
AnnexLastError` as the owner shows `refused` and why, and the job stays idle.

Two kinds only HTCondor shows: a conflict with the live annex of that name (and the annex's
own state, written into its waiting jobs each cycle, does not replace the refusal), and an
attribute edited to ClassAd `error` after submit (refused while the ad is read). Every kind is
in tests/unit/test_refusals.py; the per-user cap in test_lifecycle.py too.
"""

from __future__ import annotations

import os
import uuid

import pytest
import sandbox as sb

pytestmark = pytest.mark.sandbox

ALICE = "alice"
NO_SLOT = "request_memory = 100000000\n"


def submit(annex: str, extra: str = "", *, hold: bool = False) -> int:
    return sb.condor_submit_as(
        ALICE,
        f"executable = /bin/true\nannex_name = {annex}\nannex_instances = 1\n{extra}"
        f"{'hold = true' if hold else ''}\nqueue\n",
    )


def af(cluster: int) -> list[str]:
    """What the owner sees: condor_q -af JobStatus AnnexState AnnexLastError, as alice."""
    out = sb.run_as(
        ALICE, "condor_q", str(cluster), "-af:t", "JobStatus", "AnnexState", "AnnexLastError"
    ).stdout.strip()
    return out.split("\t") if out else []


def lease_of(cluster: int) -> int | None:
    value = (sb.job_ad(cluster) or {}).get("AnnexLeaseExpiration")
    return value if isinstance(value, int) else None


def refused(cluster: int) -> list[str] | None:
    row = af(cluster)
    return row if len(row) == 3 and row[1] == "refused" else None


def test_a_conflict_and_an_error_valued_attribute_reach_the_job() -> None:
    annex = f"refuse{os.getpid()}{uuid.uuid4().hex[:6]}"
    first = submit(annex, f"annex_instance_types = m5.large\n{NO_SLOT}")
    second = third = 0
    try:
        # The annex exists (its job routed) before the conflicting job comes.
        sb.wait_for(
            lambda: af(first)[1:2] in (["requested"], ["provisioning"], ["running"]),
            timeout=40,
            interval=1,
            what=f"job {first} to be routed",
            on_timeout=lambda: str(af(first)),
        )
        # The jobs fit no slot, so they stay idle: a refused job may still run on its annex's
        # slots when it fits them (they take any job of the owner that names the annex), and
        # a refusal, like the annex's state, is written only into an idle job.
        second = submit(annex, f"annex_instance_types = c5.large\n{NO_SLOT}")
        third = submit(annex, NO_SLOT, hold=True)
        # The error-valued attribute: edited after submit, past the submit transform.
        sb.run_as(ALICE, "condor_qedit", str(third), "AnnexInstances", "error")
        sb.run_as(ALICE, "condor_release", str(third))

        row = sb.wait_for(
            lambda: refused(second),
            timeout=40,
            interval=1,
            what=f"job {second}'s refusal",
            on_timeout=lambda: str(af(second)),
        )
        assert row[0] == "1", row  # idle
        assert "already runs with annex_instance_types = 'm5.large'" in row[2], row
        assert "this job asks for 'c5.large'" in row[2], row

        row = sb.wait_for(
            lambda: refused(third),
            timeout=40,
            interval=1,
            what=f"job {third}'s refusal",
            on_timeout=lambda: str(af(third)),
        )
        assert row[0] == "1" and "AnnexInstances evaluates to error" in row[2], row

        # The annex's own state is written into its waiting jobs when it changes, but not
        # into the refused ones: a lease extension is such a change, seen in the first job.
        before = lease_of(first)
        sb.run_as(ALICE, "htcondor-annex", "extend", "--name", annex, "--lease", "2h")
        new = sb.wait_for(
            lambda: lease_of(first) not in (None, before) and lease_of(first),
            timeout=40,
            interval=1,
            what=f"the new lease in job {first}",
            on_timeout=lambda: str(af(first)),
        )
        assert refused(second), af(second)
        assert lease_of(second) != new  # (it may carry a write from before its refusal)
    finally:
        for cluster in (first, second, third):
            if cluster:
                sb.run_as("root", "condor_rm", str(cluster), check=False)
        sb.run_as(ALICE, "htcondor-annex", "delete", "--name", annex, check=False)
