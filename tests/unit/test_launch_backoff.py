"""Failed launch attempts back off (lifecycle.retry_delay), and a retried attempt does not mint
and store the annex's token again while the stored one still outlives the lease.

Before: a setup failure that does not go away (here: the annex's launch template cannot be
made) was retried every reconcile cycle, each time minting a token and writing it to SSM.
Runs the product's Reconciler and AwsCloud on a real moto server (tests/unit/test_reconcile.py's
world); the failures are injected where the AWS calls are made.
"""

from __future__ import annotations

import sqlite3
import time

import pytest
from aws_fixtures import REGION, count_calls, moto_server_url, moto_url  # noqa: F401
from test_reconcile import build, want

from annex_gahp import lifecycle, names
from annex_gahp.cloud.aws import fleet
from annex_gahp.controllers import status
from annex_gahp.errors import CloudError
from annex_gahp.gahp import Caller
from annex_gahp.store import SCHEMA_VERSION, Store, StoreError

INTERVAL = 10  # make_settings' reconcile_interval


def test_retry_delay_doubles_from_the_interval_up_to_the_cap():
    assert [lifecycle.retry_delay(n, INTERVAL) for n in range(8)] == [
        0,
        20,
        40,
        80,
        160,
        300,
        300,
        300,
    ]
    assert lifecycle.retry_delay(1000, INTERVAL) == lifecycle.BACKOFF_MAX
    assert lifecycle.retry_delay(1, 0) == 2  # a zero interval still waits


def broken_template(monkeypatch):
    def refuse(*_args, **_kwargs):
        raise CloudError("create launch template: UnauthorizedOperation (not allowed)")

    monkeypatch.setattr(fleet, "ensure_annex_template", refuse)


def counting(world):
    """Count the tokens minted, and the SSM PutParameter calls (one or two per store)."""
    minted: list[int] = []
    mint = world.cloud.ctx.mint

    def counted(identity, lifetime):
        minted.append(lifetime)
        return mint(identity, lifetime)

    world.cloud.ctx.mint = counted
    return minted, count_calls(world.cloud._client("ssm", REGION), "PutParameter")


@pytest.mark.condor_host
def test_a_failing_setup_backs_off_and_stores_the_token_once(moto_url, tmp_path, monkeypatch):  # noqa: F811
    world = build(moto_url, tmp_path)
    minted, puts = counting(world)
    broken_template(monkeypatch)
    annex = want(world)
    attempts: list[int] = []
    start = int(world.clock.now)
    for _ in range(100):  # 1000 s in reconcile cycles
        before = world.store.get(annex.id).launch_failures
        world.loop.run_once()
        after = world.store.get(annex.id)
        if after.launch_failures != before:
            attempts.append(int(world.clock.now) - start)
        world.clock.now += INTERVAL
    # Tried at once, then after 20, 40, 80, 160, 300, 300 s: 7 attempts, not 100.
    assert attempts == [0, 20, 60, 140, 300, 600, 900]
    assert len(minted) == 1 and len(puts) == 1  # one token for all of them (a new parameter)
    annex = world.store.get(annex.id)
    assert annex.state == names.FAILED and annex.launch_failures == 7
    assert annex.retry_at == start + 900 + 300
    when = time.strftime("%H:%M:%S UTC", time.gmtime(annex.retry_at))
    assert annex.last_error == (
        "create launch template: UnauthorizedOperation (not allowed) "
        f"(attempt 7 failed; next attempt at {when})"
    )
    ad = world.publisher.ads["alice/burst"]  # what condor_status shows
    assert (ad["LaunchFailures"], ad["NextLaunchAttempt"]) == (7, annex.retry_at)
    assert ad["LastError"] == annex.last_error
    job = world.demand.annotated[("alice", "burst")]  # and condor_q, in the waiting jobs
    assert job["AnnexLastError"] == f'"{annex.last_error}"'
    assert world.fleet_calls == []

    # Fixed (say, the admin granted the permission): the next attempt launches, and clears it.
    monkeypatch.undo()
    world.clock.now = annex.retry_at
    world.loop.run_once()
    annex = world.store.get(annex.id)
    assert (annex.state, annex.launch_failures, annex.retry_at) == (names.PROVISIONING, 0, None)
    assert annex.last_error == ""
    assert world.fleet_calls == ["CreateFleet"]
    # The stored token still outlives the lease: not minted nor stored again; the launched
    # instances get their own copies of it (issue 12), one put each.
    tokens = world.cloud.backends["fleet"].tokens
    annex_puts = [p for p in puts if p["Name"] == tokens.store.location(annex)]
    assert len(minted) == 1 and len(annex_puts) == 1
    copies = {p["Name"].rsplit("/", 1)[1] for p in puts if p not in annex_puts}
    assert copies and all(c.startswith("i-") for c in copies), copies
    assert len(puts) == 1 + len(copies)
    view = status.describe(world.store, annex)
    assert (view["LaunchFailures"], view["NextLaunchAttempt"]) == (0, None)  # not in the ad


def test_an_unexpected_error_while_preparing_backs_off_too(moto_url, tmp_path, monkeypatch):  # noqa: F811
    # Seen: an SDK change that broke the S3 client failed the whole reconcile cycle, for
    # every annex, every cycle, minting a token each time.
    world = build(moto_url, tmp_path)
    minted, _ = counting(world)

    def broken(*_args, **_kwargs):
        raise KeyError("documentation")

    monkeypatch.setattr(fleet, "ensure_annex_template", broken)
    first = want(world)
    other = want(world, name="other")
    world.loop.run_once()
    world.clock.now += INTERVAL
    world.loop.run_once()  # backing off: no second attempt yet
    for annex in (first, other):
        record = world.store.get(annex.id)
        assert (record.state, record.launch_failures) == (names.FAILED, 1)
        assert record.last_error.startswith("internal error (KeyError: 'documentation'); see")
    assert len(minted) == 2  # one token per annex, once


def test_a_failing_grow_backs_off_without_leaving_running(moto_url, tmp_path, monkeypatch):  # noqa: F811
    world = build(moto_url, tmp_path)
    annex = want(world, instances=1)
    world.loop.run_once()
    world.loop.run_once()
    assert world.store.get(annex.id).state == names.RUNNING
    alice = Caller(uid=1000, user="alice", is_admin=False)
    world.service.extend(alice, {"name": "burst", "instances": "3"})

    def no_capacity(*_args, **_kwargs):
        raise CloudError("CreateFleet: InsufficientInstanceCapacity (none left)")

    monkeypatch.setattr(fleet, "launch", no_capacity)
    world.loop.run_once()
    annex = world.store.get(annex.id)
    assert (annex.state, annex.launch_failures) == (names.RUNNING, 1)
    assert "InsufficientInstanceCapacity" in annex.last_error
    assert "attempt 1 failed; next attempt at" in annex.last_error
    launches = len(world.store.ops(annex.id))
    world.clock.now += INTERVAL
    world.loop.run_once()
    assert len(world.store.ops(annex.id)) == launches  # backing off: no launch call
    world.clock.now += INTERVAL
    world.loop.run_once()
    assert len(world.store.ops(annex.id)) == launches + 1
    assert world.store.get(annex.id).launch_failures == 2


def test_a_longer_lease_stores_a_new_token_the_same_lease_does_not(moto_url, tmp_path):  # noqa: F811
    world = build(moto_url, tmp_path)
    minted, puts = counting(world)
    annex = want(world)
    tokens = world.cloud.backends["fleet"].tokens
    tokens.store_token(annex)
    tokens.store_token(annex)  # e.g. re-tagging instances, the lease unchanged
    assert (len(minted), len(puts)) == (1, 1)
    longer = world.store.update_annex(annex.id, lease_expiration=annex.lease_expiration + 600)
    tokens.store_token(longer)  # an extension: the stored token would end too early
    assert (len(minted), len(puts)) == (2, 3)  # a replacement: refused new, then overwritten
    world.cloud.release(longer)  # the parameter is deleted: a new annex stores its own
    tokens.store_token(longer)
    assert (len(minted), len(puts)) == (3, 4)


# --- the store: the two new fields, and a state file of the previous version -----------------


def test_a_version_1_state_file_gets_the_new_fields(tmp_path):
    path = str(tmp_path / "old.sqlite")
    Store(path).close()
    db = sqlite3.connect(path)  # made into what version 1 wrote: no such columns
    db.execute("ALTER TABLE annexes DROP COLUMN launch_failures")
    db.execute("ALTER TABLE annexes DROP COLUMN retry_at")
    db.execute(
        "INSERT INTO annexes(owner, name, state, spec, region, requested, lease_expiration,"
        " created, updated) VALUES ('alice', 'burst', 'failed', '{}', 'us-east-1', 2, 9, 1, 1)"
    )
    db.execute("UPDATE meta SET value='1' WHERE key='schema'")
    db.commit()
    db.close()
    store = Store(path)
    annex = store.live("alice", "burst")
    assert (annex.launch_failures, annex.retry_at) == (0, None)
    assert store._db.execute("SELECT value FROM meta").fetchone()[0] == str(SCHEMA_VERSION)
    assert store.update_annex(annex.id, launch_failures=1, retry_at=5).retry_at == 5


def test_a_state_file_of_a_newer_version_is_refused(tmp_path):
    path = str(tmp_path / "new.sqlite")
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value=? WHERE key='schema'", (str(SCHEMA_VERSION + 1),))
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="is not the supported"):
        Store(path)
