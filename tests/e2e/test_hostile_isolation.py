"""Issue 12, hostile: one user's bad region stops nobody else (real HTCondor, moto, booter).

bob names a region AWS does not have: refused, naming annex_region and the value, nothing
recorded. carol (a user of this test's own) then names a well-formed region (it matches the
AWS partition's pattern, so the helper accepts it) that the endpoint refuses - moto answers a
region it does not serve with an HTTP 500, as a real endpoint that is down or unknown fails -
so every look at that region fails.
Meanwhile alice's annex in the default region is created, runs, and is deleted with its
instances terminated, within a few reconcile cycles (ANNEX_RECONCILE_INTERVAL = 3 here).
"""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest
import sandbox as sb

from annex_gahp import client, names
from annex_gahp import settings as settings_mod

pytestmark = pytest.mark.sandbox

UNREACHABLE = "us-nowhere-9"  # AWS-shaped; the emulator's endpoint refuses it


def annex(user: str, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return sb.run_as(user, "htcondor-annex", *args, check=check, timeout=60)


def listed(owner: str) -> dict[str, dict]:
    """The helper's records of `owner` (asked as the admin over the socket)."""
    path = settings_mod.load().socket_path
    views = json.loads(client.call("ANNEX_LIST", path=path, owner=owner)["json"])
    return {v["AnnexName"]: v for v in views}


def tagged(owner: str, name: str) -> list[dict]:
    return sb.instances(
        [
            {"Name": f"tag:{names.TAG_OWNER}", "Values": [owner]},
            {"Name": f"tag:{names.TAG_NAME}", "Values": [name]},
        ]
    )


def test_a_region_aws_does_not_have_is_refused_and_nothing_is_recorded(sandbox):
    name = f"bad-{uuid.uuid4().hex[:6]}"
    for region in ("xx-nowhere-9", "us-east-1;DROP"):
        res = annex("bob", "create", "--name", name, "--region", region)
        assert res.returncode != 0, res.stdout
        assert f"annex_region = '{region}" in res.stderr, res.stderr
        assert "is not an AWS region" in res.stderr, res.stderr
    # A 300-character one is refused by the length bound every free-text value has, before the
    # region check: still naming the field, in one short line.
    res = annex("bob", "create", "--name", name, "--region", "us-" + "e" * 300 + "-1")
    assert res.returncode != 0, res.stdout
    assert "annex_region is longer than 255 characters" in res.stderr, res.stderr
    assert len(res.stderr) < 400, res.stderr
    assert name not in listed("bob")


@pytest.fixture(scope="module")
def carol() -> str:
    """A user of this test's own: an annex deleted in a region that never answers stays
    retiring (instances might exist there) and keeps counting against its owner's
    ANNEX_MAX_INSTANCES_PER_USER, which must not leak into other tests' caps for bob."""
    if subprocess.run(["id", "carol"], capture_output=True, check=False).returncode != 0:
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", "carol"], check=True)
    return "carol"


def test_an_unreachable_region_does_not_stop_another_users_annex(sandbox, carol):
    far = f"far-{uuid.uuid4().hex[:6]}"
    mine = f"near-{uuid.uuid4().hex[:6]}"
    annex(carol, "create", "--name", far, "--region", UNREACHABLE, check=True)
    try:
        annex("alice", "create", "--name", mine, "--idle-timeout", "30m", check=True)
        (instance,) = sb.wait_for(
            lambda: tagged("alice", mine), timeout=30, what="alice's instance to be launched"
        )
        sb.wait_for(
            lambda: listed("alice")[mine]["RunningInstances"] == 1,
            timeout=60,
            what="alice's annex to run",
        )
        annex("alice", "delete", "--name", mine, check=True)
        sb.wait_for(
            lambda: sb.instance_state(instance["InstanceId"]) in ("shutting-down", "terminated"),
            timeout=30,
            what="alice's instance to be terminated",
        )
        sb.wait_for(lambda: mine not in listed("alice"), timeout=30, what="alice's annex to retire")
        # carol's annex was left alone all along: never launched, never retired, and says why.
        view = listed(carol)[far]
        assert "could not look at region" in view["LastError"], view
        assert view["AnnexState"] == "requested", view
        assert UNREACHABLE in view["LastError"], view
        assert "\n" not in view["LastError"] and len(view["LastError"]) < 500, view
    finally:
        annex(carol, "delete", "--name", far)
        annex("alice", "delete", "--name", mine)
