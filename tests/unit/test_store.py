"""The state store: what must survive a kill, and what a damaged file does."""

from __future__ import annotations

import sqlite3

import pytest

from annex_gahp import lifecycle, names
from annex_gahp.spec import AnnexSpec
from annex_gahp.store import Store, StoreError


def make(store: Store, owner: str = "alice", name: str = "burst"):
    return store.insert_annex(
        owner=owner,
        name=name,
        state=names.REQUESTED,
        spec={"name": name},
        region="us-east-1",
        requested=2,
        lease_expiration=2_000_000_000,
        now=1000,
    )


def test_one_live_annex_per_owner_and_name(tmp_path):
    store = Store(str(tmp_path / "s.sqlite"))
    first = make(store)
    make(store, owner="bob")  # bob's burst is a different annex
    with pytest.raises(sqlite3.IntegrityError):
        make(store)
    store.update_annex(first.id, state=names.RETIRED, retired_at=5)
    again = make(store)  # a retired annex frees its name
    assert again.id != first.id
    assert store.live("alice", "burst").id == again.id
    assert store.last_retired("alice", "burst").id == first.id


def test_a_stale_writer_cannot_make_a_retiring_annex_active_again(tmp_path):
    """The loop, mid-cycle with an older view, records its launch after a delete landed: the
    lifecycle keeps the retirement (and the write's other fields)."""
    store = Store(str(tmp_path / "s.sqlite"))
    annex = make(store)  # the loop's view: requested
    store.update_annex(annex.id, state=names.RETIRING, retire_reason="deleted")
    after = lifecycle.record(store, annex, lifecycle.Event.LAUNCH, last_error="partial")
    assert (after.state, after.retire_reason, after.last_error) == (
        names.RETIRING,
        "deleted",
        "partial",
    )
    done = lifecycle.record(store, after, lifecycle.Event.GONE, retired_at=5)
    assert done.state == names.RETIRED


def test_the_store_records_and_decides_nothing(tmp_path):
    """Whatever state it is given is written: refusing is the lifecycle's job."""
    store = Store(str(tmp_path / "s.sqlite"))
    annex = make(store)
    store.update_annex(annex.id, state=names.RETIRING, retire_reason="deleted")
    after = store.update_annex(annex.id, state=names.PROVISIONING)
    assert after.state == names.PROVISIONING
    with pytest.raises(lifecycle.TransitionError):  # the lifecycle does refuse it
        lifecycle.next_state(names.RETIRING, lifecycle.Event.LAUNCH)


def test_the_spec_is_typed_from_the_store_on(tmp_path):
    store = Store(str(tmp_path / "s.sqlite"))
    annex = make(store)  # written as an older version did: a bare dict, no owner
    assert isinstance(annex.spec, AnnexSpec)
    assert (annex.spec.owner, annex.spec.name, annex.spec.mode) == ("alice", "burst", "pool")
    wanted = AnnexSpec(name="burst", owner="alice", instance_types=("m5.large", "m5a.large"))
    again = store.update_annex(annex.id, spec=wanted)
    assert again.spec == wanted == store.get(annex.id).spec


def test_intent_survives_reopen_and_is_reported_open(tmp_path):
    path = str(tmp_path / "s.sqlite")
    store = Store(path)
    annex = make(store)
    op = store.begin_op(annex.id, "launch", {"count": 2})
    assert op.request.startswith("r-")
    store.close()  # as if killed between the intent and the call's result
    reopened = Store(path)
    assert not reopened.fresh
    (pending,) = reopened.open_ops()
    assert pending.request == op.request and pending.intent == {"count": 2}
    reopened.finish_op(pending.id, result={"instances": ["i-1"]})
    assert reopened.open_ops() == []
    assert reopened.ops(annex.id)[0].result == {"instances": ["i-1"]}


def test_instances_upsert_keeps_type_and_updates_state(tmp_path):
    store = Store(str(tmp_path / "s.sqlite"))
    annex = make(store)
    store.record_instances(annex.id, "r-1", [("i-1", "pending", "m5.large")], now=10)
    store.record_instances(annex.id, "r-1", [("i-1", "running", "")], now=20)
    (record,) = store.instances(annex.id)
    assert (record.state, record.instance_type, record.launched, record.last_seen) == (
        "running",
        "m5.large",
        10,
        20,
    )
    assert store.instance_owner("i-1") == annex.id
    assert store.instance_owner("i-2") is None


def test_corrupt_file_is_refused_with_a_way_out(tmp_path):
    path = tmp_path / "s.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError) as err:
        Store(str(path))
    assert str(path) in str(err.value)
    assert "htcondor-annex tags" in str(err.value)


def test_unknown_fields_are_not_updatable(tmp_path):
    store = Store(str(tmp_path / "s.sqlite"))
    annex = make(store)
    with pytest.raises(ValueError):
        store.update_annex(annex.id, owner="bob")


def test_lifecycle_table_is_closed():
    assert lifecycle.next_state(names.REQUESTED, "launch") == names.PROVISIONING
    assert lifecycle.next_state(names.PROVISIONING, "up") == names.RUNNING
    assert lifecycle.next_state(names.RUNNING, "retire") == names.RETIRING
    assert lifecycle.next_state(names.RETIRING, "gone") == names.RETIRED
    with pytest.raises(lifecycle.TransitionError):
        lifecycle.next_state(names.RETIRED, "launch")
    # every state but retired can be retired: a user's delete always has a way out
    for state in lifecycle.LIVE:
        assert lifecycle.next_state(state, "retire") == names.RETIRING
