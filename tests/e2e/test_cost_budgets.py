"""Cost and budgets (issue 16) in the real pool, with a price file and the emulator.

- a request over the budget is refused: by condor_submit when its annex_max_cost is over the
  user's whole budget or its worst case over what is left (the schedd cron's AnnexBudget*
  attributes), and by the helper (AnnexLastError) when condor_submit could not judge it;
- an annex stops at its annex_max_cost: retired with reason `budget`, its job held with a
  reason naming the cap, its instance terminated; the Annex ad showed CostSoFar on the way;
- `htcondor-annex report` matches the helper's own records of that annex's instance.

Serial: the price file and the budget knobs are the pool's.
"""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest

from annex_gahp.testing import wait_for

pytestmark = [pytest.mark.sandbox, pytest.mark.serial]

# A high test price so a tiny budget is reached in seconds: one instance-hour of m5.large costs
# 3600 USD here, one second one dollar.
PRICE = 3600.0
BUDGET_ADS = "condor_status -any -constraint 'MyType == \"AnnexBudget\"'"
# The helper's records, read as root with the sandbox's python (no helper call in between).
RECORDS = """
import json, os, sqlite3, sys
from annex_gahp import settings
db = sqlite3.connect(os.path.join(settings.load().state_dir, "annexes.sqlite"))
print(json.dumps(db.execute(
    "SELECT i.launched, COALESCE(i.ended, i.last_seen), a.retire_reason FROM instances i"
    " JOIN annexes a ON a.id = i.annex_id WHERE a.name = ?", (sys.argv[1],)).fetchall()))
"""


@pytest.fixture
def priced(annex_pool):
    region = annex_pool.facts.get("region") or "us-east-1"
    annex_pool.run(f"htcondor-annex prices set {region}:m5.large={PRICE}", check=True)
    yield annex_pool
    annex_pool.run(f"htcondor-annex prices set {region}:m5.large=0.096", check=True)


def job(name: str, extra: str = "") -> str:
    return f"""
        executable = /bin/sleep
        arguments = 600
        annex_name = {name}
        annex_lease = 1h
        {extra}
        queue
    """


def test_a_request_over_budget_is_refused_at_submit_and_by_the_helper(priced):
    pool = priced
    pool.config(ANNEX_BUDGET_PER_USER="10 USD/30d")
    name = f"cost-{uuid.uuid4().hex[:8]}"
    with pytest.raises(subprocess.CalledProcessError) as refused:
        pool.submit(job(name, "annex_max_cost = 50"), user="bob")
    assert (
        "annex_max_cost = 50 is over your whole budget (ANNEX_BUDGET_PER_USER = 10 USD/30d)"
        in refused.value.stderr
    ), refused.value.stderr
    # Worst case 1 instance x 1 h x 3600 USD/h: over the 10 USD that are left. Five instance
    # types are more than condor_submit prices (spec._BUDGET_MAX_TYPES): the helper judges it.
    types = ",".join(["m5.large"] * 5)
    cluster = pool.submit(job(name, f"annex_instance_types = {types}"), user="bob")
    why = wait_for(
        lambda: (pool.job_ad(cluster) or {}).get("AnnexLastError"),
        timeout=60,
        what=f"AnnexLastError of job {cluster}",
    )
    assert "ANNEX_BUDGET_PER_USER = 10.00 USD/30d" in why and "USD left" in why, why
    assert not pool.annex_ads(name) and not pool.instances(name)
    pool.run(f"condor_rm {cluster}", user="bob")


def test_an_annex_stops_at_its_max_cost_and_the_report_matches(priced):
    pool = priced
    pool.config(ANNEX_BUDGET_PER_USER="1000 USD/30d", ANNEX_BUDGET_PER_POOL="5000 USD/30d")
    name = f"capped-{uuid.uuid4().hex[:8]}"
    cluster = pool.submit(job(name, "annex_max_cost = 5"))
    ad = wait_for(
        lambda: next((a for a in pool.annex_ads(name) if a.get("CostPerHour")), None),
        timeout=60,
        what=f"a CostPerHour in the Annex ad of {name}",
    )
    assert ad["Currency"] == "USD" and ad["CostPerHour"] == pytest.approx(PRICE)
    assert ad["CostSoFar"] >= 0

    def held_ad():
        found = pool.job_ad(cluster)
        return found if found and found.get("JobStatus") == 5 else None

    held = wait_for(
        held_ad,
        timeout=90,
        what=f"job {cluster} held at its budget",
    )
    assert f"annex {name} stopped: it reached its annex_max_cost = 5" in held["HoldReason"]
    wait_for(lambda: not pool.instances(name), timeout=60, what=f"{name}'s instance gone")
    wait_for(lambda: not pool.annex_ads(name), timeout=60, what=f"{name}'s ad gone")
    # The records: one instance, from launch to when it was seen ending, at the test price.
    rows = json.loads(pool.run(f"python - {name}", input=RECORDS, check=True).stdout)
    assert len(rows) == 1 and rows[0][2] == "budget", rows
    expected = (rows[0][1] - rows[0][0]) * PRICE / 3600
    report = json.loads(
        pool.run("htcondor-annex report --since 1h --by annex --json", user="alice").stdout
    )
    mine = {r["key"]: r for r in report["rows"]}[f"alice/{name}"]
    assert mine["cost"] == pytest.approx(expected, abs=1e-6)
    assert mine["cost"] >= 5  # stopped at the cap, not before
    print(pool.run("htcondor-annex report --since 1h --by annex", user="alice").stdout)
    # The admin sees each user's spending against the budget: one AnnexBudget ad per user.
    spent = wait_for(
        lambda: next(
            (a for a in pool.json_ads(BUDGET_ADS) if a.get("Owner") == "alice"
             and a.get("Spent", 0) >= mine["cost"] - 1e-6), None),
        timeout=60,
        what="alice's AnnexBudget ad with this annex's cost",
    )  # fmt: skip
    assert spent["Budget"] == 1000 and spent["BudgetKnob"] == "ANNEX_BUDGET_PER_USER"
    assert spent["Remaining"] == pytest.approx(1000 - spent["Spent"])
    assert any(a.get("BudgetKnob") == "ANNEX_BUDGET_PER_POOL" for a in pool.json_ads(BUDGET_ADS))
    pool.run(f"condor_rm {cluster}")


def test_a_request_over_what_is_left_is_refused_by_condor_submit(priced):
    pool = priced
    # What alice has spent already (the annex of the test above, when run with it): her budget
    # is that plus 10 USD, so 10 USD are left.
    report = json.loads(
        pool.run("htcondor-annex report --since 30d --by owner --json", user="alice").stdout
    )
    spent = sum(r["cost"] for r in report["rows"] if r["key"] == "alice")
    budget = f"{spent + 10:.6f} USD/30d"
    pool.config(ANNEX_BUDGET_PER_USER=budget, ANNEX_BUDGET_CRON_PERIOD=5)
    # A new cron period takes a schedd restart (a reconfig keeps the old one).
    pool.run("condor_restart -schedd", check=True)

    def published():
        ads = pool.json_ads("condor_status -schedd")
        wanted = pytest.approx(spent + 10)
        return next((a for a in ads if a.get("AnnexBudgetUser") == wanted), None)

    wait_for(published, timeout=40, what="the budget in the schedd's ad")
    name = f"left-{uuid.uuid4().hex[:8]}"
    with pytest.raises(subprocess.CalledProcessError) as refused:
        pool.submit(job(name))
    said = refused.value.stderr
    assert "the worst case of this annex (3600.00 USD) is over what is left of your budget" in said
    assert f"ANNEX_BUDGET_PER_USER = {spent + 10:.2f} USD/30d: 10.00 USD left" in said, said
    assert not pool.annex_ads(name) and not pool.instances(name)
    # The budget gone, the schedd's ad says so before the next test submits.
    pool.undo_config()
    wait_for(
        lambda: not any(a.get("AnnexBudgetUser") for a in pool.json_ads("condor_status -schedd")),
        timeout=40,
        what="no budget in the schedd's ad",
    )
