"""FailedInstances counts what the cloud refused, not what it has yet to deliver (a stack's
Auto Scaling group returns no ids at once on AWS, though moto's does)."""

from __future__ import annotations

from aws_fixtures import make_settings

from annex_gahp import lifecycle, spec
from annex_gahp.controllers import status
from annex_gahp.store import Store


def _annex(store: Store):
    wanted = spec.from_keywords({"name": "burst", "instances": 4}, "alice", make_settings())
    return lifecycle.create(
        store,
        lifecycle.Event.REQUEST,
        owner="alice",
        name="burst",
        spec=wanted,
        region="us-east-1",
        requested=4,
        lease_expiration=10**10,
        now=1,
    )


def test_a_launch_without_ids_and_without_errors_is_not_a_failure(tmp_path):
    store = Store(str(tmp_path / "state.sqlite"))
    annex = _annex(store)
    op = store.begin_op(annex.id, "launch", {"count": 4, "region": "us-east-1"})
    store.finish_op(op.id, result={"instances": [], "errors": []})
    assert status.failed_instances(store, annex) == 0


def test_a_short_launch_with_the_clouds_reasons_counts_the_shortfall(tmp_path):
    store = Store(str(tmp_path / "state.sqlite"))
    annex = _annex(store)
    op = store.begin_op(annex.id, "launch", {"count": 4, "region": "us-east-1"})
    store.finish_op(
        op.id, result={"instances": ["i-1"], "errors": ["InsufficientInstanceCapacity"]}
    )
    failed = store.begin_op(annex.id, "launch", {"count": 2, "region": "us-east-1"})
    store.finish_op(failed.id, error="UnauthorizedOperation")
    assert status.failed_instances(store, annex) == 3 + 2
