"""Cost (issue 16): the arithmetic, the records it reads, budgets, and the loop enforcing them.

The arithmetic is checked with numbers worked out by hand; the records with a real store
(reopened, as after a restart); the loop with the product's AwsCloud on the emulator, as
tests/unit/test_reconcile.py does.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3

import pytest
from aws_fixtures import REGION, moto_server_url, moto_url  # noqa: F401
from test_reconcile import build, want

from annex_gahp import accounting, budgets, cost, names, prices, spec
from annex_gahp.errors import InputError, LimitExceeded
from annex_gahp.gahp import Caller
from annex_gahp.lifecycle import RetireReason
from annex_gahp.schedd import Demand
from annex_gahp.store import Store

T0 = 1_900_000_000
M5 = cost.PriceKey(REGION, "m5.large")


def use(launched: int, end: int | None, *, last_seen: int | None = None, **kw) -> cost.Usage:
    base = {
        "instance_id": "i-1",
        "owner": "alice",
        "annex": "burst",
        "region": REGION,
        "instance_type": "m5.large",
        "lifecycle": cost.ON_DEMAND,
        "zone": "us-east-1a",
    }
    base.update(kw)
    return cost.Usage(
        launched=launched,
        ended=end,
        last_seen=last_seen if last_seen is not None else (end or launched),
        **base,
    )


# ---- arithmetic ----------------------------------------------------------------------------


def test_partial_hours_are_billed_by_the_second():
    table = {M5: [cost.PricePoint(T0 - 10, 0.10)]}
    # 90 minutes at 0.10/h = 0.15; 61 seconds = 0.10 * 61 / 3600.
    assert cost.usage_cost(use(T0, T0 + 5400), table).amount == pytest.approx(0.15)
    assert cost.usage_cost(use(T0, T0 + 61), table).amount == pytest.approx(0.10 * 61 / 3600)
    assert cost.usage_cost(use(T0, T0 + 5400), table).hours == pytest.approx(1.5)


def test_a_price_change_mid_annex_bills_each_part_at_its_price():
    table = {M5: [cost.PricePoint(T0, 0.10), cost.PricePoint(T0 + 3600, 0.40)]}
    # One hour at 0.10, then half an hour at 0.40.
    assert cost.usage_cost(use(T0, T0 + 5400), table).amount == pytest.approx(0.10 + 0.20)
    # The rate is the price in force now.
    assert cost.rate([use(T0, None)], table, T0 + 4000).amount == pytest.approx(0.40)
    assert cost.rate([use(T0, None)], table, T0 + 10).amount == pytest.approx(0.10)


def test_a_window_counts_only_its_part():
    table = {M5: [cost.PricePoint(T0, 1.0)]}
    two_hours = use(T0, T0 + 7200)
    assert cost.usage_cost(two_hours, table, since=T0 + 3600).amount == pytest.approx(1.0)
    assert cost.usage_cost(two_hours, table, until=T0 + 1800).amount == pytest.approx(0.5)
    assert cost.usage_cost(two_hours, table, since=T0 + 9000).amount == 0


def test_a_missing_price_is_said_not_zero():
    got = cost.usage_cost(use(T0, T0 + 3600, instance_type="c5.large"), {})
    assert not got.known
    assert got.unpriced == (f"c5.large on-demand in {REGION}",)
    assert got.hours == pytest.approx(1.0)
    assert not cost.rate([use(T0, None, instance_type="c5.large")], {}, T0).known


def test_the_zone_price_wins_over_the_region_price():
    spot = dataclasses.replace(M5, lifecycle=cost.SPOT)
    table = {
        spot: [cost.PricePoint(T0, 0.05)],
        dataclasses.replace(spot, zone="us-east-1a"): [cost.PricePoint(T0, 0.03)],
    }
    in_a = use(T0, T0 + 3600, lifecycle=cost.SPOT)
    in_b = use(T0, T0 + 3600, lifecycle=cost.SPOT, zone="us-east-1b")
    assert cost.usage_cost(in_a, table).amount == pytest.approx(0.03)
    assert cost.usage_cost(in_b, table).amount == pytest.approx(0.05)


def test_grouping_by_owner_annex_and_type():
    table = {M5: [cost.PricePoint(T0, 1.0)], cost.PriceKey(REGION, "c5.large"): [
        cost.PricePoint(T0, 2.0)]}  # fmt: skip
    usages = [
        use(T0, T0 + 3600),
        use(T0, T0 + 3600, instance_id="i-2", owner="bob", instance_type="c5.large"),
        use(T0, T0 + 1800, instance_id="i-3", annex="other"),
    ]
    assert {k: v.amount for k, v in cost.group(usages, table, "owner").items()} == {
        "alice": pytest.approx(1.5),
        "bob": pytest.approx(2.0),
    }
    assert set(cost.group(usages, table, "annex")) == {"alice/burst", "alice/other", "bob/burst"}
    assert cost.group(usages, table, "type")["c5.large"].amount == pytest.approx(2.0)
    with pytest.raises(ValueError, match="--by"):
        cost.group(usages, table, "colour")


def test_worst_case_is_instances_by_lease_by_price():
    assert cost.worst_case(4, 2 * 3600, 0.5) == pytest.approx(4.0)


# ---- budgets --------------------------------------------------------------------------------


def test_budget_parses_and_says_what_is_left():
    b = budgets.parse("ANNEX_BUDGET_PER_USER", "500 USD/30d")
    assert (b.amount, b.currency, b.period) == (500.0, "USD", 30 * 86400)
    assert b.shown() == "500.00 USD/30d"
    assert budgets.parse("ANNEX_BUDGET_PER_USER", "") is None
    assert budgets.refusal(b, 100.0, 400.0, "your ") is None
    why = budgets.refusal(b, 450.0, 60.0, "your ")
    assert "ANNEX_BUDGET_PER_USER = 500.00 USD/30d" in why and "50.00 USD left" in why


@pytest.mark.parametrize("text", ["500", "USD/30d", "500 USD", "-5 USD/1d", "5 USD/soon"])
def test_a_bad_budget_names_the_knob(text):
    with pytest.raises(InputError, match="ANNEX_BUDGET_PER_POOL"):
        budgets.parse("ANNEX_BUDGET_PER_POOL", text)


def test_max_cost_is_checked_against_the_whole_budget(moto_url, tmp_path):  # noqa: F811
    world = build(moto_url, tmp_path)
    settings = dataclasses.replace(world.service.settings, budget_per_user="20 USD/1d")
    assert spec.from_keywords({"name": "a", "max_cost": "2.5"}, "alice", settings).max_cost
    with pytest.raises(LimitExceeded, match=r"over your whole budget \(ANNEX_BUDGET_PER_USER"):
        spec.from_keywords({"name": "a", "max_cost": "25"}, "alice", settings)
    with pytest.raises(InputError, match="annex_max_cost = '0' is not allowed"):
        spec.from_keywords({"name": "a", "max_cost": "0"}, "alice", settings)


# ---- the records ----------------------------------------------------------------------------


def test_an_instance_ends_once_and_a_replayed_observation_counts_nothing_twice(tmp_path):
    path = str(tmp_path / "state.sqlite")
    store = Store(path)
    annex = store.insert_annex(owner="alice", name="burst", state="running",
                               spec={"name": "burst", "owner": "alice"}, region=REGION,
                               requested=1, lease_expiration=T0 + 7200, now=T0)  # fmt: skip
    store.record_instances(annex.id, "r-1", [("i-1", "pending", "")], T0)
    store.record_instances(annex.id, "r-1", [("i-1", "running", "m5.large")], T0 + 600,
                           {"i-1": ("spot", "us-east-1a")})  # fmt: skip
    store.record_instances(annex.id, "r-1", [("i-1", "shutting-down", "")], T0 + 3600)
    # After a restart the same instance is seen again, terminated, later and then replayed.
    store.close()
    store = Store(path)
    store.record_instances(annex.id, "r-1", [("i-1", "terminated", "")], T0 + 4000)
    store.record_instances(annex.id, "r-1", [("i-1", "terminated", "")], T0 + 3000)
    (record,) = store.instances(annex.id)
    assert (record.launched, record.ended, record.lifecycle, record.zone) == (
        T0, T0 + 3600, "spot", "us-east-1a")  # fmt: skip
    store.record_price(region=REGION, zone="", instance_type="m5.large", lifecycle="spot",
                       per_hour=0.5, currency="USD", source="file", now=T0)  # fmt: skip
    figures = accounting.annex_cost(store, annex, now=T0 + 5000)
    assert figures.so_far.amount == pytest.approx(0.5)  # one hour, once
    assert figures.per_hour.amount == 0  # nothing runs


def test_a_running_instance_is_billed_until_last_seen(tmp_path):
    store = Store(str(tmp_path / "s.sqlite"))
    annex = store.insert_annex(owner="alice", name="a", state="running",
                               spec={"name": "a", "owner": "alice"}, region=REGION,
                               requested=1, lease_expiration=T0 + 7200, now=T0)  # fmt: skip
    store.record_instances(annex.id, "r", [("i-1", "running", "m5.large")], T0)
    store.record_instances(annex.id, "r", [("i-1", "running", "m5.large")], T0 + 1800)
    assert store.record_price(region=REGION, zone="", instance_type="m5.large",
                              lifecycle="on-demand", per_hour=2.0, currency="USD",
                              source="file", now=T0)  # fmt: skip
    # The same price again adds no point; a new one does, from when it was seen.
    assert not store.record_price(region=REGION, zone="", instance_type="m5.large",
                                  lifecycle="on-demand", per_hour=2.0, currency="USD",
                                  source="file", now=T0 + 60)  # fmt: skip
    figures = accounting.annex_cost(store, annex, now=T0 + 1800)
    assert figures.so_far.amount == pytest.approx(1.0)
    assert figures.per_hour.amount == pytest.approx(2.0)


def test_a_version_3_state_file_gains_the_cost_columns(tmp_path):
    path = str(tmp_path / "v3.sqlite")
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute("DROP TABLE instances")
    db.execute("DROP TABLE prices")
    db.execute(
        "CREATE TABLE instances (id TEXT PRIMARY KEY, annex_id INTEGER NOT NULL, request TEXT"
        " NOT NULL, state TEXT NOT NULL, instance_type TEXT NOT NULL DEFAULT '', launched"
        " INTEGER NOT NULL, last_seen INTEGER NOT NULL)"
    )
    db.execute("UPDATE meta SET value='3' WHERE key='schema'")
    db.commit()
    db.close()
    store = Store(path)
    annex = store.insert_annex(owner="a", name="b", state="running", spec={"name": "b",
                               "owner": "a"}, region=REGION, requested=1,
                               lease_expiration=T0, now=T0)  # fmt: skip
    store.record_instances(annex.id, "r", [("i-9", "terminated", "m5.large")], T0)
    assert store.instances(annex.id)[0].ended == T0
    assert store.prices() == []


# ---- prices ---------------------------------------------------------------------------------


def test_the_price_file_is_read_when_it_changes(tmp_path):
    path = tmp_path / "prices.json"
    store = Store(str(tmp_path / "s.sqlite"))
    source = prices.PriceSource(str(path), 3600)
    source.refresh(store, {}, T0)  # no file: nothing, no error
    assert store.prices() == []
    prices.write_file(str(path), {"currency": "USD", "on_demand": {REGION: {"m5.large": 0.1}}})
    source.refresh(store, {}, T0 + 10)
    prices.write_file(str(path), {"currency": "USD", "on_demand": {REGION: {"m5.large": 0.25}}})
    source.refresh(store, {}, T0 + 20)
    series = prices.as_series(store.prices())[M5]
    assert [(p.since, p.per_hour) for p in series] == [(T0 + 10, 0.1), (T0 + 20, 0.25)]
    path.write_text(json.dumps({"on_demand": {REGION: {"m5.large": "cheap"}}}))
    with pytest.raises(Exception, match="is not a price"):
        prices.read_file(str(path))


def test_spot_prices_come_from_ec2_per_zone(moto_url, tmp_path):  # noqa: F811
    world = build(moto_url, tmp_path)
    found = world.cloud.spot_prices(REGION, ["m5.large"])
    # The emulator serves one fixed price per zone (moto 5.2: 0.00001).
    assert found and all(zone.startswith(REGION) for zone, _ in found)
    source = prices.PriceSource(str(tmp_path / "none.json"), 3600, world.cloud.spot_prices)
    source.refresh(world.store, {REGION: {"m5.large"}}, T0)
    rows = world.store.prices()
    assert rows and {r.lifecycle for r in rows} == {"spot"} and all(r.zone for r in rows)


# ---- the loop ---------------------------------------------------------------------------------


def spend_eight(world) -> None:
    """alice's annex `small` (2 instances x 5 h x 1.0 = 10: fits a 10 USD budget, just) runs
    4 hours at 1.0 an hour: 8 spent."""
    small = spec.from_keywords(
        {"name": "small", "instances": 2, "lease": "5h"}, "alice", world.service.settings
    )
    world.demand.jobs[("alice", "small")] = Demand(idle=4)
    world.service.ensure(small)
    world.loop.run_once()
    world.clock.now += 3600 * 4
    world.loop.run_once()


def _priced_world(moto_url, tmp_path, per_hour: float, **knobs):  # noqa: F811
    world = build(moto_url, tmp_path)
    path = tmp_path / "prices.json"
    prices.write_file(str(path), {"currency": "USD", "on_demand": {REGION: {"m5.large": per_hour}}})
    settings = dataclasses.replace(world.service.settings, price_file=str(path), **knobs)
    world.service.settings = world.loop.settings = settings
    world.loop.ctx.prices = prices.PriceSource(str(path), 3600)
    return world


def test_an_annex_at_its_max_cost_retires_and_its_jobs_are_held(moto_url, tmp_path):  # noqa: F811
    world = _priced_world(moto_url, tmp_path, 3.0)
    wanted = spec.from_keywords(
        {"name": "capped", "instances": 2, "max_cost": "2.5"}, "alice", world.service.settings
    )
    world.demand.jobs[("alice", "capped")] = Demand(idle=2)
    annex = world.service.ensure(wanted)
    world.loop.run_once()
    world.clock.now += 600
    world.loop.run_once()  # 2 instances x 10 min x 3.0/h = 1.0: goes on
    annex = world.store.get(annex.id)
    assert annex.state != names.RETIRING
    assert world.publisher.ads["alice/capped"]["CostSoFar"] == pytest.approx(1.0)
    assert world.publisher.ads["alice/capped"]["CostPerHour"] == pytest.approx(6.0)
    world.clock.now += 900
    world.loop.run_once()  # 25 min: 2.5, the cap
    annex = world.store.get(annex.id)
    assert annex.retire_reason == RetireReason.BUDGET.value
    assert "annex_max_cost = 2.5" in annex.last_error
    owner, name, reason = world.demand.held[-1]
    assert (owner, name) == ("alice", "capped") and "annex_max_cost = 2.5" in reason
    # Its instances end, and what it cost stays what it was when they ended.
    world.clock.now += 60
    world.loop.run_once()
    world.clock.now += 3600
    world.loop.run_once()
    figures = accounting.annex_cost(world.store, world.store.get(annex.id))
    assert figures.so_far.amount == pytest.approx(2.5, abs=0.2)


def test_a_request_over_what_is_left_is_refused_by_the_helper(moto_url, tmp_path):  # noqa: F811
    world = _priced_world(moto_url, tmp_path, 1.0, budget_per_user="10 USD/30d")
    spend_eight(world)
    wanted = spec.from_keywords({"name": "big", "instances": 3}, "alice", world.service.settings)
    with pytest.raises(
        LimitExceeded, match=r"ANNEX_BUDGET_PER_USER = 10.00 USD/30d: 2.00 USD left"
    ):
        world.service.ensure(wanted)
    # bob has his own budget.
    world.service.ensure(dataclasses.replace(wanted, owner="bob"))
    # Growing a live annex is judged the same way; shrinking or keeping it is not refused.
    alice = Caller(1000, "alice", False)
    with pytest.raises(LimitExceeded, match="ANNEX_BUDGET_PER_USER"):
        world.service.extend(alice, {"name": "small", "instances": "5"})
    assert world.service.extend(alice, {"name": "small", "instances": "1"})["requested"] == "1"


def test_a_budget_with_no_price_refuses_rather_than_guessing(moto_url, tmp_path):  # noqa: F811
    world = _priced_world(moto_url, tmp_path, 1.0, budget_per_user="10 USD/30d")
    wanted = spec.from_keywords(
        {"name": "odd", "instance_types": "c5.large"}, "alice", world.service.settings
    )
    with pytest.raises(LimitExceeded, match=r"no price for c5\.large on-demand in us-east-1"):
        world.service.ensure(wanted)


def test_the_report_matches_the_records_and_shows_users_their_own(moto_url, tmp_path):  # noqa: F811
    world = _priced_world(moto_url, tmp_path, 2.0)
    want(world, owner="alice", name="a1", instances=1)
    want(world, owner="bob", name="b1", instances=2)
    world.loop.run_once()
    world.clock.now += 1800
    world.loop.run_once()
    alice = json.loads(world.service.report(Caller(1000, "alice", False), {"by": "annex"})["json"])
    assert [r["key"] for r in alice["rows"]] == ["alice/a1"]  # not bob's
    assert alice["total"]["cost"] == pytest.approx(1.0)  # 1 instance x 30 min x 2.0/h
    assert alice["total"]["instance_hours"] == pytest.approx(0.5)
    admin = json.loads(world.service.report(Caller(0, "root", True), {"by": "owner"})["json"])
    assert {r["key"]: r["cost"] for r in admin["rows"]} == {
        "alice": pytest.approx(1.0),
        "bob": pytest.approx(2.0),
    }
    with pytest.raises(Exception, match="may not act on annexes of bob"):
        world.service.report(Caller(1000, "alice", False), {"owner": "bob"})


def test_a_spot_annex_is_billed_at_ec2s_spot_price_of_its_zone(moto_url, tmp_path):  # noqa: F811
    world = build(moto_url, tmp_path)
    world.loop.ctx.prices = prices.PriceSource(
        str(tmp_path / "none.json"), 3600, world.cloud.spot_prices
    )
    wanted = spec.from_keywords(
        {"name": "cheap", "spot_prices": "0.5"}, "alice", world.service.settings
    )
    world.demand.jobs[("alice", "cheap")] = Demand(idle=1)
    annex = world.service.ensure(wanted)
    world.loop.run_once()
    world.clock.now += 30
    world.loop.run_once()  # its instance is seen as spot...
    (record,) = world.store.instances(annex.id)
    assert (record.lifecycle, bool(record.zone)) == ("spot", True)
    world.clock.now += 10
    world.loop.run_once()  # ...so EC2's spot prices are read
    world.clock.now += 3600
    world.loop.run_once()
    ad = world.publisher.ads["alice/cheap"]
    # The emulator's spot price is 0.00001 an hour in every zone (moto 5.2).
    assert ad["CostPerHour"] == pytest.approx(0.00001)
    (record,) = world.store.instances(annex.id)
    assert ad["CostSoFar"] == pytest.approx(0.00001 * 3640 / 3600, rel=1e-3), record


def test_an_owner_at_the_budget_has_every_annex_retired_and_held(moto_url, tmp_path):  # noqa: F811
    world = _priced_world(moto_url, tmp_path, 1.0)
    want(world, name="first", instances=2)
    world.loop.run_once()
    # The admin sets a budget the owner has nearly spent: 2 instances x 40 min x 1.0/h.
    settings = dataclasses.replace(world.loop.settings, budget_per_user="1 USD/30d")
    world.loop.settings = world.service.settings = settings
    world.clock.now += 2400
    world.loop.run_once()  # the spending as of the last cycle: still 0
    world.clock.now += 10
    world.loop.run_once()
    annex = world.store.annexes(include_retired=True)[0]
    assert annex.retire_reason == RetireReason.BUDGET.value
    assert "alice reached the budget ANNEX_BUDGET_PER_USER = 1.00 USD/30d" in annex.last_error
    assert any("ANNEX_BUDGET_PER_USER" in reason for _, _, reason in world.demand.held)


def test_the_price_table_is_rebuilt_after_each_price_write_and_only_then(tmp_path):
    store = Store(str(tmp_path / "s.sqlite"))
    point = {"region": REGION, "zone": "", "instance_type": "m5.large", "lifecycle": "spot"}
    store.record_price(**point, per_hour=0.05, currency="USD", source="ec2", now=1000)
    first = accounting.price_table(store)
    assert accounting.price_table(store) is first  # views read it, nothing rebuilt it
    key = cost.PriceKey(REGION, "m5.large", "spot", "")
    assert [p.per_hour for p in first[key]] == [0.05]
    # The same price again is no write; a new one is seen by the next view.
    assert not store.record_price(**point, per_hour=0.05, currency="USD", source="ec2", now=2000)
    assert accounting.price_table(store) is first
    store.record_price(**point, per_hour=0.07, currency="USD", source="ec2", now=3000)
    assert [p.per_hour for p in accounting.price_table(store)[key]] == [0.05, 0.07]
    # A second store (another state file) has tables of its own.
    other = Store(str(tmp_path / "other.sqlite"))
    assert accounting.price_table(other) == {}
