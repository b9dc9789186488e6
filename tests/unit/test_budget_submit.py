"""condor_submit's budget check (issue 16 item 3): the schedd cron's output and the
AnnexBudgetLeft requirement, evaluated by the real bindings with a schedd-like MY ad (the
schedd's ad plus the cron's attributes, prefixed Annex) and the job as TARGET."""

from __future__ import annotations

import json
import time

import pytest
from aws_fixtures import REGION, moto_server_url, moto_url  # noqa: F401
from test_cost import _priced_world, spend_eight

from annex_gahp import budgets, spec
from annex_gahp.controllers.budget import submit_view
from annex_gahp.cost import Cost
from annex_gahp.errors import LimitExceeded
from annex_gahp.hooks import budget_cron

RULE = next(r for r in spec.RULES if r.name == "AnnexBudgetLeft")
USER = budgets.parse("ANNEX_BUDGET_PER_USER", "10 USD/30d")
POOL = budgets.parse("ANNEX_BUDGET_PER_POOL", "100 USD/30d")


def view(now: float, **extra: object) -> dict[str, object]:
    """The helper's view: alice spent 6 of her 10 USD, the pool 20 of its 100."""
    data: dict[str, object] = {
        "updated": int(now),
        **submit_view(
            USER, {"alice": Cost(6.0)}, POOL, Cost(20.0), {"us-east-1:m5.large": 1.0,
                                                           "us-east-1:c5.large": 3.0}
        ),
        "live": {"alice/running": True},
        "region": "us-east-1",
        "types": ["m5.large"],
        "lease": 3600,
    }
    data.update(extra)
    return data


def schedd_ad(classad2, output: str):
    """The schedd's ad as SCHEDD_CRON_ANNEXBUDGET_PREFIX = Annex makes it."""
    ad = classad2.ClassAd({"MyType": "Scheduler", "Name": "schedd@host"})
    for line in output.splitlines():
        name, _, value = line.partition(" = ")
        ad[f"Annex{name}"] = classad2.ExprTree(value)
    return ad


def judge(data: object, now: float | None = None, **job: object) -> str | None:
    """None if the requirement passes, else the message condor_submit prints."""
    pytest.importorskip("htcondor2")  # registers HTCondor's functions (split, ...)
    classad2 = pytest.importorskip("classad2")
    my = schedd_ad(classad2, budget_cron.render(data, time.time() if now is None else now))
    target = classad2.ClassAd({"TargetAnnexName": "burst", "Owner": "alice",
                               "AnnexInstances": 1, "AnnexLease": 3600, **job})  # fmt: skip
    if classad2.ExprTree(f"{RULE.guard} || {RULE.accept}").eval(my, target) is True:
        return None
    return classad2.ExprTree(RULE.reason).eval(my, target)


def test_a_request_over_what_is_left_is_refused_naming_the_budget() -> None:
    now = time.time()
    said = judge(view(now), AnnexInstanceTypes="c5.large,m5.large", AnnexInstances=2)
    assert said == (
        "the worst case of this annex (6.00 USD) is over what is left of your budget"
        " ANNEX_BUDGET_PER_USER = 10.00 USD/30d: 4.00 USD left; ask for fewer instances, a"
        " shorter lease or a lower annex_max_cost"
    )
    # The helper's own message for the same request starts alike.
    helper = budgets.refusal(USER, 6.0, 6.0, "your ")
    assert helper and said.split(": 4.00")[0] in helper


@pytest.mark.parametrize(
    "job",
    [
        {},  # 1 x 1 h x 1 USD: under the 4 left
        {"AnnexInstances": 4},  # exactly what is left
        {"AnnexInstances": 40, "AnnexMaxCost": "3.5"},  # capped below what is left
        {"AnnexInstanceTypes": "p3.2xlarge", "AnnexInstances": 50},  # no price: the helper's
        {"AnnexInstanceTypes": "m5.large,m5.large,m5.large,m5.large,c5.large",
         "AnnexInstances": 50},  # more types than priced here: the helper's
        {"TargetAnnexName": "running", "AnnexInstances": 50},  # joins a live annex
        {"Owner": "carol", "AnnexInstances": 9},  # nothing spent: her whole 10
        {"AnnexLease": 600, "AnnexInstances": 20},  # 20 x 10 min x 1 USD/h = 3.33
    ],
)
def test_a_request_within_what_is_left_passes(job: dict[str, object]) -> None:
    assert judge(view(time.time()), **job) is None


def test_spot_prices_expiry_and_the_default_lease_are_the_worst_case() -> None:
    now = time.time()
    assert judge(view(now), AnnexSpotPrices="0.5,5", AnnexInstanceTypes="m5.large,c5.large")
    assert judge(view(now), AnnexSpotPrices="0.5") is None
    del_lease = {"AnnexLease": None}
    assert judge(view(now, lease=5 * 3600), **del_lease)  # 5 h by default: 5 USD
    assert judge(view(now), AnnexLease=None, AnnexExpiry=int(now) + 5 * 3600)


def test_the_pool_budget_is_checked_after_the_users() -> None:
    said = judge(view(time.time(), left={"alice": 10.0}, user=1000.0, pool_left=2.0),
                 AnnexInstances=3)  # fmt: skip
    assert said and "the pool's budget ANNEX_BUDGET_PER_POOL = 100.00 USD/30d: 2.00 USD" in said


@pytest.mark.parametrize(
    "data",
    [None, {}, "junk", {"updated": "soon"}, "stale", {"updated": time.time() + 3600}],
    ids=["missing", "empty", "junk", "bad-time", "stale", "future"],
)
def test_no_fresh_data_passes(data: object) -> None:
    if data == "stale":
        data = view(time.time() - budget_cron.MAX_AGE - 5)
    assert budget_cron.render(data, time.time()) == "BudgetUpdated = undefined\n"
    assert judge(data, AnnexInstances=50) is None


def test_no_budget_passes() -> None:
    assert judge({"updated": int(time.time())}, AnnexInstances=50) is None


HOSTILE = [
    "x' = 1; evil = true; 'y",
    "a]; AnnexBudgetUser = 0; [b",
    "new\nline",
    "quote\"d",
    "back\\slash",
    "",
    "ALICE",  # differs from alice only in case: ClassAd names are case-insensitive
    "u" * 300,
]


def test_the_cron_leaves_hostile_names_out_and_its_output_parses() -> None:
    pytest.importorskip("htcondor2")
    classad2 = pytest.importorskip("classad2")
    left = {name: 0.0 for name in HOSTILE} | {"alice": 4.0, "bob.x-y@dom": 2.0}
    data = view(time.time(), left=left, live={n: True for n in HOSTILE},
                prices={"us-east-1:m5.large": 1.0, "x' = 0; '": 0.0},
                user_text="10 USD\"; x = 1", currency=["USD"])  # fmt: skip
    output = budget_cron.render(data, time.time())
    my = schedd_ad(classad2, output)
    assert sorted(my["AnnexBudgetLeft"].keys()) == ["alice", "bob.x-y@dom"]
    assert my["AnnexBudgetLeft"]["ALICE"] == 4.0  # the larger of alice and ALICE
    assert list(my["AnnexBudgetPrices"].keys()) == ["us-east-1:m5.large"]
    assert list(my["AnnexBudgetLive"].keys()) == ["ALICE"]
    assert "BudgetUserText = undefined\n" in output and "BudgetCurrency = undefined\n" in output
    assert my.get("AnnexBudgetUser") == 10.0 and "evil" not in output.lower()
    # A hostile Owner only indexes the record: the expression holds, judged by the full budget.
    for owner in HOSTILE:
        if owner == "ALICE":
            continue  # alice's 4.0 left
        assert judge(data, Owner=owner, AnnexInstances=9) is None, owner
        assert judge(data, Owner=owner, AnnexInstances=11) is not None, owner


def test_the_helper_writes_what_the_cron_reads(tmp_path, capsys) -> None:
    data = view(time.time())
    budget_cron.write(str(tmp_path), data)
    assert (tmp_path / budget_cron.FILE_NAME).stat().st_mode & 0o777 == 0o644
    assert budget_cron.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "BudgetLeft = [ 'alice' = 4.0; ]" in out and "BudgetUser = 10.0" in out
    assert budget_cron.main([str(tmp_path / "nowhere")]) == 0
    assert capsys.readouterr().out == "BudgetUpdated = undefined\n"


def test_the_loop_publishes_what_the_helper_then_enforces(moto_url, tmp_path):  # noqa: F811
    """The reconcile loop's view, through the cron and the rule, refuses what the helper
    refuses, with the same amount left."""
    world = _priced_world(
        moto_url, tmp_path, 1.0, budget_per_user="10 USD/30d", state_dir=str(tmp_path)
    )
    spend_eight(world)
    world.loop.run_once()  # the budget view is computed from the last cycle's records
    with open(budget_cron.path(world.service.settings.state_dir), encoding="utf-8") as src:
        data = json.load(src)
    assert data["left"] == {"alice": pytest.approx(2.0)} and data["live"] == {"alice/small": True}
    assert data["prices"] == {f"{REGION}:m5.large": 1.0} and data["region"] == REGION
    said = judge(data, AnnexInstances=3, AnnexLease=None, now=world.clock.now)
    assert said and "ANNEX_BUDGET_PER_USER = 10.00 USD/30d: 2.00 USD left" in said
    big = spec.from_keywords({"name": "big", "instances": 3}, "alice", world.service.settings)
    with pytest.raises(LimitExceeded, match=r"10.00 USD/30d: 2.00 USD left"):
        world.service.ensure(big)
    assert judge(data, AnnexInstances=2, AnnexLease=None, now=world.clock.now) is None
    assert judge(data, TargetAnnexName="small", AnnexInstances=9, now=world.clock.now) is None
